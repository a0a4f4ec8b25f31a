"""Lifecycle: TTL and idle reaping, gc reconciliation, crash safety, and exactly one cost event each."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import anyio
import httpx
import pytest

from providers import Fleet, Request, SandboxGone, SandboxRecord
from providers.config import RunPodPoolConfig
from providers.errors import ProviderError
from providers.ledger import Ledger
from providers.local import LocalProvider
from providers.local_server import local_dir
from providers.profiles import PROFILES
from tests.mcp_support import ROOT, tether
from tests.processes import output_until_exit
from tunnels import TunnelManager


def cost_event_count(sandbox_id: str) -> int:
    rows = Ledger().store.query("SELECT COUNT(*) AS n FROM cost_events WHERE sandbox_id = ?", (sandbox_id,))
    return int(rows[0]["n"])


async def test_expired_sandboxes_are_reaped_with_exactly_one_cost_event() -> None:
    fleet = Fleet(config={})
    try:
        box = await fleet.create(Request(provider="local", timeout_s=0.3))
        assert box.record.expires_at is not None
        await asyncio.sleep(0.5)
        report = await fleet.gc()
        assert (box.id, "expired (TTL)") in report.reaped
        for _ in range(3):  # however often gc runs
            again = await fleet.gc()
            assert box.id not in [r for r, _ in again.reaped]
        record = fleet.ledger.get(box.id)
        assert record.status == "terminated" and record.status_reason == "expired (TTL)"
        assert cost_event_count(box.id) == 1
        assert 0.3 <= fleet.ledger.cost_event(box.id).seconds < 10
    finally:
        await fleet.close()


async def test_a_sandbox_past_its_ttl_is_not_used_before_a_reaper_comes() -> None:
    """`tether exec` runs no reaper: an expired sandbox is ended when it is asked for, with its one
    cost event, and the command is refused saying why. An open one goes within the ledger recheck."""
    maker = Fleet(config={})  # (`tether up --ttl 1 --keep`)
    kept = await maker.create(Request(provider="local", timeout_s=1, keep=True))
    opened = await maker.create(Request(provider="local", timeout_s=1))
    await opened.run("true")
    await asyncio.sleep(1.2)
    try:
        with pytest.raises(SandboxGone, match="expired"):
            await (await maker.get(opened.id)).run("true")
        result = await asyncio.to_thread(tether, "exec", kept.id, "--", "echo ran")
        assert result.returncode != 0 and "ran" not in result.stdout
        assert "expired" in result.stderr, result.stderr
        for box in (kept, opened):
            record = maker.ledger.get(box.id)
            assert (record.status, record.status_reason) == ("terminated", "expired (TTL)")
            assert cost_event_count(box.id) == 1
        assert not (local_dir() / "sandboxes" / kept.id).exists()
    finally:
        await maker.close()


async def test_idle_sandboxes_are_reaped_but_used_ones_are_not() -> None:
    fleet = Fleet(config={})
    try:
        idle = await fleet.create(Request(provider="local", idle_timeout_s=0.6))
        busy = await fleet.create(Request(provider="local", idle_timeout_s=0.6))
        for _ in range(4):
            await asyncio.sleep(0.25)
            await busy.run("true")
        reaped = dict(await fleet.reap())
        assert idle.id in reaped and reaped[idle.id].startswith("idle for")
        assert busy.id not in reaped and fleet.ledger.get(busy.id).status == "running"
        await busy.destroy()
    finally:
        await fleet.close()


async def test_a_use_not_yet_in_the_ledger_does_not_make_another_process_reap_early() -> None:
    """A process writes a sandbox's last use through only once it is flush_every newer than the
    last it wrote: another process's reaper allows for that lag, and never ends a sandbox used
    less than its idle timeout ago."""
    owner, reaper = Fleet(config={}), Fleet(config={})
    try:
        box = await owner.create(Request(provider="local", idle_timeout_s=6))  # (flush_every: 2 s)
        created = owner.ledger.get(box.id).last_activity
        await asyncio.sleep(0.3)
        await box.write("note.txt", "used\n")  # (not written through: less than 2 s after the last)
        used = time.time()
        assert owner.ledger.get(box.id).last_activity == created
        # (the reaper's clock: idle 6 s and more by the ledger, less than 6 s since the real use)
        assert await reaper.reap(now=(created + used) / 2 + 6) == [], "reaped before its idle timeout"
        assert [r for r, _ in await reaper.reap(now=used + 6 + 2 + 0.1)] == [box.id]
    finally:
        await owner.close()
        await reaper.close()


async def test_a_pid_taken_by_another_process_keeps_no_claim_or_ownership_alive() -> None:
    """`tether down` died half way, and after a reboot its pid belongs to some other process (pid 1
    here, whose start differs from the one recorded): the sandbox is not stuck "being terminated"
    for good, and one whose creator is gone is reaped. A row from before stamps keeps the old rule."""
    import socket

    fleet = Fleet(config={})
    try:
        claimed = await fleet.create(Request(provider="local", keep=True))
        orphaned = await fleet.create(Request(provider="local"))
        legacy = await fleet.create(Request(provider="local"))
        with fleet.ledger.store.transaction() as db:
            db.execute(
                "UPDATE sandboxes SET ending_reason = 'destroyed', ending_host = ?, ending_pid = 1,"
                " ending_stamp = 'another-boot:1' WHERE id = ?",
                (socket.gethostname(), claimed.id),
            )
            db.execute(
                "UPDATE sandboxes SET owner_pid = 1, owner_stamp = 'another-boot:1' WHERE id = ?", (orphaned.id,)
            )
            db.execute("UPDATE sandboxes SET owner_pid = 1, owner_stamp = NULL WHERE id = ?", (legacy.id,))
        assert fleet.ledger.get(claimed.id).ending_interrupted()
        assert not fleet.ledger.get(orphaned.id).owner_alive() and fleet.ledger.get(legacy.id).owner_alive()
        reaped = dict(await fleet.reap())
        assert set(reaped) == {claimed.id, orphaned.id}
        assert "finished here" in reaped[claimed.id] and "ended without tearing it down" in reaped[orphaned.id]
        assert cost_event_count(claimed.id) == 1 and cost_event_count(orphaned.id) == 1
        assert fleet.ledger.get(fleet.ledger.get(claimed.id).id).ending_stamp is None
        await legacy.destroy()
    finally:
        await fleet.close()


async def test_gc_marks_vanished_sandboxes_and_removes_orphans() -> None:
    first = Fleet(config={})
    box = await first.create(Request(provider="local", keep=True))
    await first.close()
    # behind tether's back: its machine disappears, and an unknown one shows up
    import shutil

    shutil.rmtree(local_dir() / "sandboxes" / box.id)
    orphan = local_dir() / "sandboxes" / "sb-0123456789"
    (orphan / "work").mkdir(parents=True)
    fleet = Fleet(config={})
    try:
        report = await fleet.gc()
        assert box.id in report.vanished and not orphan.exists()
        assert fleet.ledger.get(box.id).status_reason.startswith("vanished")
        assert cost_event_count(box.id) == 1
        second = await fleet.gc()
        assert box.id not in second.vanished and cost_event_count(box.id) == 1
    finally:
        await fleet.close()


HANGING_CREATE = """
import asyncio
from providers import Fleet, Request
asyncio.run(Fleet().create(Request(pool="flaky", name="{name}")))
"""


def hanging_cloud(tmp_path: Path, provider: str = "HangProvider") -> tuple[Path, dict[str, str]]:
    """A "cloud account" directory and an environment whose pool `flaky` provisions into it and hangs."""
    cloud = tmp_path / "cloud"
    cloud.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[[providers]]\nname = "hang"\nclass = "tests.hang_provider:{provider}"\n\n'
        '[[pools]]\nname = "flaky"\nprovider = "hang"\n'
    )
    return cloud, {**os.environ, "TETHER_CONFIG": str(config), "TETHER_TEST_CLOUD": str(cloud), "PYTHONPATH": str(ROOT)}


def crash_mid_provision(cloud: Path, env: dict[str, str], name: str) -> SandboxRecord:
    """A process provisions `name` on the hanging pool and is killed once its machine exists: its row."""
    kill_mid_provision(cloud, env, name)
    return Ledger().get(name)


def kill_mid_provision(cloud: Path, env: dict[str, str], name: str) -> None:
    """A process (of `env`'s state dir) provisions `name` on the hanging pool and is killed once its
    machine exists."""
    process = subprocess.Popen([sys.executable, "-c", HANGING_CREATE.format(name=name)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not list(cloud.iterdir()):
            assert process.poll() is None, "the provisioning process exited early"
            assert time.monotonic() < deadline, "the provider never created its machine"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_a_crash_mid_provision_with_a_provider_that_keeps_no_listing(tmp_path: Path) -> None:
    """Without a listing nothing can be looked for, but the row is still closed by gc, once, with its
    cost event, instead of staying "provisioning" for ever."""
    cloud, env = hanging_cloud(tmp_path, "UnlistedHangProvider")
    record = crash_mid_provision(cloud, env, f"unlisted-{os.getpid()}")
    assert record.status == "provisioning"
    reports = [json.loads(tether("gc", "--json", env=env).stdout) for _ in range(2)]
    assert [r["interrupted"] for r in reports] == [[record.id], []]
    assert Ledger().get(record.id).status == "terminated" and cost_event_count(record.id) == 1


async def test_destroying_a_provision_cut_short_removes_what_it_left_as_gc_would(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cloud, env = hanging_cloud(tmp_path)
    record = crash_mid_provision(cloud, env, f"down-crashy-{os.getpid()}")
    monkeypatch.setenv("TETHER_TEST_CLOUD", str(cloud))
    fleet = Fleet(config=tomllib.loads(Path(env["TETHER_CONFIG"]).read_text()))
    try:
        started = time.time()
        event = await fleet.destroy(record.id)
        assert list(cloud.iterdir()) == []  # its machine is gone ...
        # ... and was billed from the start of the provision until destroy removed it
        assert started - record.created_at <= event.seconds <= time.time() - record.created_at
        assert fleet.ledger.get(record.id).status == "terminated" and cost_event_count(record.id) == 1
        assert record.id not in (await fleet.gc()).interrupted and cost_event_count(record.id) == 1
    finally:
        await fleet.close()


async def test_destroying_a_sandbox_another_process_is_still_provisioning(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cloud, env = hanging_cloud(tmp_path)
    name = f"down-busy-{os.getpid()}"
    process = subprocess.Popen([sys.executable, "-c", HANGING_CREATE.format(name=name)], env=env, cwd=ROOT)
    monkeypatch.setenv("TETHER_TEST_CLOUD", str(cloud))
    fleet = Fleet(config=tomllib.loads(Path(env["TETHER_CONFIG"]).read_text()))
    try:
        deadline = time.monotonic() + 30
        while not list(cloud.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline, "the provider never created its machine"
            await asyncio.sleep(0.05)
        record = fleet.ledger.get(name)
        assert record.status == "provisioning" and record.owner_alive()
        event = await fleet.destroy(name)
        assert list(cloud.iterdir()) == []
        assert 0 < event.seconds <= time.time() - record.created_at and cost_event_count(record.id) == 1
        assert record.id not in (await fleet.gc()).interrupted and cost_event_count(record.id) == 1
    finally:
        process.kill()
        process.wait()
        await fleet.close()


def test_gc_leaves_the_rows_of_a_provider_it_cannot_use_for_later() -> None:
    """A provider unusable here (no credentials, not built) cannot be asked what it left: its
    abandoned rows are not closed as if it had nothing, they wait for a gc that can look."""
    ledger = Ledger()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = ledger.insert(
        sandbox_id=f"sb-{os.urandom(5).hex()}",
        name=f"cloudy-{os.getpid()}",
        provider="e2b",
        pool="e2b",
        request={},
        expires_at=None,
        idle_timeout=None,
        keep=False,
        gpu_type=None,
        gpu_count=0,
    )
    with ledger.store.transaction() as db:
        db.execute("UPDATE sandboxes SET owner_pid = ? WHERE id = ?", (dead.pid, record.id))
    assert Ledger().get(record.id).provision_abandoned()
    env = {k: v for k, v in os.environ.items() if k != "E2B_API_KEY"}
    report = json.loads(tether("gc", "--json", env={**env, "PYTHONPATH": str(ROOT)}).stdout)
    assert record.id not in report["interrupted"] and Ledger().get(record.id).status == "provisioning"
    with ledger.store.transaction() as db:
        db.execute("DELETE FROM sandboxes WHERE id = ?", (record.id,))


def test_gc_leaves_what_another_installation_made_on_a_shared_account(tmp_path: Path) -> None:
    """Two state dirs (two people, say) share one cloud account. A machine the other one's crash
    left is no orphan here: this gc leaves it, the other's reconciles it."""
    cloud, env = hanging_cloud(tmp_path)
    other = {**env, "TETHER_STATE_DIR": str(tmp_path / "other-state")}
    kill_mid_provision(cloud, other, f"theirs-{os.getpid()}")
    [machine] = list(cloud.iterdir())
    mine = json.loads(tether("gc", "--json", env=env).stdout)
    assert mine["orphans"] == [] and mine["interrupted"] == [] and machine.exists()
    theirs = json.loads(tether("gc", "--json", env=other).stdout)
    assert len(theirs["interrupted"]) == 1 and not machine.exists()


def test_a_crash_mid_provision_is_reconciled_by_gc(tmp_path: Path) -> None:
    cloud, env = hanging_cloud(tmp_path)
    record = crash_mid_provision(cloud, env, f"crashy-{os.getpid()}")
    assert record.status == "provisioning"  # written before the provider was asked

    gc_started = time.time()
    result = tether("gc", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["interrupted"] == [record.id]
    assert list(cloud.iterdir()) == []  # the orphaned machine is gone
    reconciled = Ledger().get(record.id)
    assert reconciled.status == "terminated" and "provisioning interrupted" in reconciled.status_reason
    assert cost_event_count(record.id) == 1
    for _ in range(2):
        again = tether("gc", "--json", env=env)
        assert json.loads(again.stdout)["interrupted"] == []
    assert cost_event_count(record.id) == 1
    costs = json.loads(tether("costs", "--json", env=env).stdout)
    [cost] = [c for c in costs if c["id"] == record.id]
    assert cost["billing_model"] == "wall-clock"
    # the machine ran (and is billed) from the start of the provision until gc removed it
    assert gc_started - record.created_at <= cost["seconds"] <= time.time() - record.created_at


async def test_gc_leaves_alone_a_sandbox_created_while_it_lists(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from providers.local import LocalProvider

    listing = LocalProvider.list
    creator, collector = Fleet(config={}), Fleet(config={})
    created: list[object] = []

    async def slow_list(self: LocalProvider) -> list[object]:
        # another process creates a sandbox between gc's ledger read and its listing (once: other
        # providers built on LocalProvider, which earlier tests registered, list too)
        if not created:
            created.append(await creator.create(Request(provider="local")))
        return await listing(self)  # type: ignore[return-value]

    monkeypatch.setattr(LocalProvider, "list", slow_list)
    try:
        report = await collector.gc()
        monkeypatch.setattr(LocalProvider, "list", listing)
        box = created[0]
        assert report.orphans == [] and box.id not in report.vanished  # type: ignore[attr-defined]
        assert collector.ledger.get(box.id).status == "running"  # type: ignore[attr-defined]
        assert (await box.run("pwd")).exit_code == 0  # type: ignore[attr-defined]
        # and one whose row was live before the listing began is still seen to vanish
        import shutil

        shutil.rmtree(local_dir() / "sandboxes" / box.id)  # type: ignore[attr-defined]
        assert box.id in (await collector.gc()).vanished  # type: ignore[attr-defined]
    finally:
        monkeypatch.setattr(LocalProvider, "list", listing)
        await creator.close(teardown_created=True)
        await collector.close()


async def test_a_command_still_running_is_not_idle_here_or_to_another_process(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from providers import fleet as fleet_module

    unit = 0.3  # seconds; every time below is a multiple, with room for a loaded machine
    monkeypatch.setattr(fleet_module, "ACTIVITY_FLUSH_SECONDS", unit)
    owner, other = Fleet(config={}), Fleet(config={})
    try:
        box = await owner.create(Request(provider="local", idle_timeout_s=5 * unit))
        command = asyncio.ensure_future(box.run(f"sleep {15 * unit}; echo done"))
        await asyncio.sleep(10 * unit)  # the command started this long ago, past the idle timeout
        assert await owner.reap() == []
        assert await other.reap() == []  # sees the activity the owner's reaper wrote through
        result = await command
        assert result.stdout == "done\n"
        # short calls every 2 units, seen by the other process through the write-through alone
        for _ in range(6):
            await box.run("true")
            await asyncio.sleep(2 * unit)
        assert await other.reap() == []
        await asyncio.sleep(7 * unit)
        assert [r for r, _ in await other.reap()] == [box.id]
    finally:
        await owner.close()
        await other.close()


def heartbeats() -> list[asyncio.Task[object]]:
    from providers.fleet import HEARTBEAT_TASK

    return [t for t in asyncio.all_tasks() if t.get_name() == HEARTBEAT_TASK and not t.done()]


async def test_a_command_running_in_one_process_is_not_idle_to_another_processs_reaper(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The owner runs no reaper of its own (the CLI, a script): only its heartbeat tells the other
    process's reaper that the sandbox is in use, however short the idle timeout."""
    from providers import fleet as fleet_module

    unit = 0.6  # the idle timeout, and ACTIVITY_FLUSH_SECONDS (the report's case: 5 and 5)
    monkeypatch.setattr(fleet_module, "ACTIVITY_FLUSH_SECONDS", unit)
    owner, reaper = Fleet(config={}), Fleet(config={})
    try:
        box = await owner.create(Request(provider="local", idle_timeout_s=unit))
        command = asyncio.ensure_future(box.run(f"sleep {4 * unit}; echo done"))
        while not command.done():
            assert await reaper.reap() == [], "reaped while its command ran"
            await asyncio.sleep(unit / 4)
        assert (await command).stdout == "done\n"
        for _ in range(20):  # the heartbeat stops once nothing runs ...
            if not heartbeats():
                break
            await asyncio.sleep(unit / 4)
        assert heartbeats() == []
        await asyncio.sleep(3 * unit)  # ... and the idle clock then runs out (and the lag it allows for)
        assert [r for r, _ in await reaper.reap()] == [box.id]
    finally:
        await owner.close()
        await reaper.close()


async def test_a_sandbox_busy_while_the_heartbeat_sleeps_for_another_is_not_idle_to_a_reaper() -> None:
    """The heartbeat, asleep until a slow sandbox is due, still writes through a command started
    meanwhile in a sandbox with a short idle timeout (it is woken for it)."""
    unit = 0.6  # the short idle timeout; the other sandbox is due only every ACTIVITY_FLUSH_SECONDS (5 s)
    owner, reaper = Fleet(config={}), Fleet(config={})
    try:
        slow = await owner.create(Request(provider="local"))
        quick = await owner.create(Request(provider="local", idle_timeout_s=unit))
        long_one = asyncio.ensure_future(slow.run("sleep 30"))
        deadline = time.monotonic() + 10
        while not heartbeats():
            assert time.monotonic() < deadline, "no heartbeat while a command ran"
            await asyncio.sleep(0.05)
        await asyncio.sleep(unit / 2)  # (the heartbeat is asleep until the slow one is due)
        command = asyncio.ensure_future(quick.run(f"sleep {4 * unit}; echo done"))
        while not command.done():
            assert quick.id not in [r for r, _ in await reaper.reap()], "reaped while its command ran"
            await asyncio.sleep(unit / 4)
        assert (await command).stdout == "done\n"
        await asyncio.sleep(2 * unit)  # ... and, once idle, the same reaper does reap it
        assert quick.id in [r for r, _ in await reaper.reap()]
        long_one.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await long_one
    finally:
        await owner.close(teardown_created=True)
        await reaper.close()


async def test_nothing_of_the_heartbeat_outlives_its_fleet() -> None:
    fleet = Fleet(config={})
    box = await fleet.create(Request(provider="local"))
    running = asyncio.ensure_future(box.run("sleep 30"))
    try:
        for _ in range(100):
            if heartbeats():
                break
            await asyncio.sleep(0.05)
        assert heartbeats(), "no heartbeat while a command runs"
    finally:
        await fleet.close()
    assert heartbeats() == []  # (with the command still running)
    cleaner = Fleet(config={})
    await cleaner.destroy(box.id)
    await cleaner.close()
    with contextlib.suppress(Exception):
        await running


EXEC_UNDER_GC = 'started=$(pwd)/started; touch "$started"; sleep 2.5; echo done'


async def test_tether_exec_keeps_its_sandbox_from_tether_gc_in_another_process() -> None:
    """The report's repro: an idle timeout, `tether exec ID -- 'sleep …; echo done'`, and a reaper in
    another process while it runs."""
    maker = Fleet(config={})  # (`tether up`)
    box = await maker.create(Request(provider="local", idle_timeout_s=0.6, keep=True))
    await maker.close()
    fleet = Fleet(config={})  # (`tether gc`)
    try:
        started = local_dir() / "sandboxes" / box.id / "work" / "started"
        exec_process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tools.cli",
            "exec",
            box.id,
            "--",
            EXEC_UNDER_GC,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        output = asyncio.ensure_future(exec_process.communicate())
        deadline = time.monotonic() + 60
        while not started.exists():
            assert not output.done(), (await output)[1].decode()
            assert time.monotonic() < deadline, "the command never started"
            await asyncio.sleep(0.05)
        while not output.done():
            assert await fleet.reap() == [], "reaped while `tether exec` ran its command"
            await asyncio.sleep(0.2)
        stdout, stderr = await output
        assert (exec_process.returncode, stdout) == (0, b"done\n"), stderr.decode()
        deadline = time.monotonic() + 10
        while not (reaped := [r for r, _ in await fleet.reap()]):  # (idle once the command ended)
            assert time.monotonic() < deadline, "never reaped once idle"
            await asyncio.sleep(0.1)
        assert reaped == [box.id]
    finally:
        await fleet.close()


async def test_connections_through_a_tunnel_are_activity() -> None:
    """A dev server someone keeps opening through its tunnel keeps its sandbox from the idle
    reaper (each connection counts when it is made), however long ago the agent's last call was."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    # (a local sandbox's loopback is this machine's: a server of the test's own stands for the app)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fleet = Fleet(config={})
    try:
        box = await fleet.create(Request(provider="local", idle_timeout_s=1))
        tunnels = TunnelManager()
        tunnel = await tunnels.open(box, server.server_port, backend="local")
        async with httpx.AsyncClient(headers={"Connection": "close"}) as client:
            for _ in range(8):
                await asyncio.sleep(0.3)
                assert (await client.get(tunnel.url)).text == "ok"
                assert await fleet.reap() == [], "reaped while its tunnel was in use"
        await tunnels.close_all()
        await asyncio.sleep(1.3)
        assert [r for r, _ in await fleet.reap()] == [box.id]
    finally:
        server.shutdown()
        await fleet.close()


async def test_a_background_job_still_running_is_activity_to_any_reaper() -> None:
    owner, reaper = Fleet(config={}), Fleet(config={})
    try:
        box = await owner.create(Request(provider="local", idle_timeout_s=0.6))
        job = await box.start_job("sleep 2.5")
        await asyncio.sleep(1)  # idle by the clock, but the job runs
        looked = time.time()
        assert await reaper.reap() == []
        assert reaper.ledger.get(box.id).last_activity >= looked  # (seen running: activity)
        assert await owner.reap() == []
        await output_until_exit(box, job.id)
        await asyncio.sleep(1)
        reaped = dict(await reaper.reap())
        assert reaped[box.id].startswith("idle for")
    finally:
        await owner.close()
        await reaper.close()


class UnreachableProvider(LocalProvider):
    """This machine, whose SSH server stops answering for the sandboxes in `cut`."""

    name = "unreachable"
    cut: ClassVar[set[str]] = set()

    async def endpoint(self, handle):  # type: ignore[no-untyped-def]
        endpoint = await super().endpoint(handle)
        if handle.data["dir"].rsplit("/", 1)[-1] not in self.cut:
            return endpoint
        import socket

        with socket.socket() as closed:  # a port nothing listens on
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        return endpoint.model_copy(update={"port": port})


async def test_a_sandbox_that_cannot_be_asked_about_its_jobs_is_idle() -> None:
    config = {
        "providers": [{"name": "unreachable", "class": "tests.test_lifecycle:UnreachableProvider"}],
        "pools": [{"name": "unreachable", "provider": "unreachable"}],
    }
    owner, reaper = Fleet(config=config), Fleet(config=config)
    try:
        box = await owner.create(Request(pool="unreachable", idle_timeout_s=0.5))
        await box.start_job("sleep 60")
        UnreachableProvider.cut.add(box.id)
        await asyncio.sleep(0.7)
        reaped = dict(await reaper.reap())
        assert reaped[box.id].startswith("idle for") and cost_event_count(box.id) == 1
    finally:
        UnreachableProvider.cut.clear()
        await owner.close()
        await reaper.close()


async def test_gc_leaves_another_providers_sandboxes_that_a_listing_shows() -> None:
    """A provider built on LocalProvider lists every local sandbox: those the ledger has under
    another provider are not its orphans (gc removed them, and drain then waited on their rows)."""
    config = {
        "providers": [{"name": "unreachable", "class": "tests.test_lifecycle:UnreachableProvider"}],
        "pools": [{"name": "unreachable", "provider": "unreachable"}, {"name": "local", "provider": "local"}],
    }
    fleet = Fleet(config=config)
    try:
        ours = await fleet.create(Request(pool="unreachable"))
        local = await fleet.create(Request(pool="local"))
        report = await fleet.gc()
        assert local.id not in report.orphans and ours.id not in report.orphans
        assert (local_dir() / "sandboxes" / local.id).is_dir() and fleet.ledger.get(local.id).status == "running"
        assert (await local.run("echo alive")).stdout == "alive\n"
    finally:
        await fleet.close(teardown_created=True)


async def test_concurrent_reapers_report_each_reaped_sandbox_once() -> None:
    fleets = [Fleet(config={}) for _ in range(3)]
    try:
        boxes = [await fleets[0].create(Request(provider="local", timeout_s=0.2)) for _ in range(4)]
        await asyncio.sleep(0.4)
        reports = await asyncio.gather(*(f.reap() for f in fleets))
        reaped = sorted(r for report in reports for r, _ in report)
        assert reaped == sorted(b.id for b in boxes)
        assert all(cost_event_count(b.id) == 1 for b in boxes)
    finally:
        for f in fleets:
            await f.close()


@pytest.mark.parametrize("reaper_is", ["the owner", "another fleet"])
async def test_a_sandbox_used_while_the_reaper_looks_at_others_is_not_reaped(reaper_is: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The reaper reads every row, then takes its time (asking one sandbox about its jobs): a
    sandbox that was idle when read but used since is spared, and its command runs to the end."""
    looking = asyncio.Event()

    async def slow_look(self, record):  # type: ignore[no-untyped-def]
        looking.set()
        await asyncio.sleep(1.0)  # (a slow box: up to JOB_PROBE_TIMEOUT_S)
        return False

    monkeypatch.setattr(Fleet, "_jobs_running", slow_look)
    owner = Fleet(config={})
    reaper = owner if reaper_is == "the owner" else Fleet(config={})
    try:
        box = await owner.create(Request(provider="local", idle_timeout_s=0.5))
        await asyncio.sleep(0.7)
        reaping = asyncio.ensure_future(reaper.reap())
        await looking.wait()
        result = await box.run("sleep 0.8; echo done")
        assert result.stdout == "done\n"
        assert await reaping == []
        assert owner.ledger.get(box.id).status == "running"
        await asyncio.sleep(0.7)  # (idle again, and nothing else to look at: reaped)
        assert [r for r, _ in await reaper.reap()] == [box.id]
    finally:
        await owner.close()
        await reaper.close()


def stalling_terminate(monkeypatch, seconds: float) -> list[str]:  # type: ignore[no-untyped-def]
    """LocalProvider.terminate does its work, then stalls (a slow cloud API): the ids it was asked to end."""
    asked: list[str] = []
    terminate = LocalProvider.terminate

    async def stalling(self, handle):  # type: ignore[no-untyped-def]
        asked.append(handle.external_id)
        await terminate(self, handle)
        await asyncio.sleep(seconds)

    monkeypatch.setattr(LocalProvider, "terminate", stalling)
    return asked


async def test_a_sandbox_being_ended_is_not_ended_again_by_a_reaper_or_another_destroy(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    asked = stalling_terminate(monkeypatch, 0.8)
    fleet, other = Fleet(config={}), Fleet(config={})
    try:
        box = await fleet.create(Request(provider="local", timeout_s=0.5))
        destroying = asyncio.ensure_future(fleet.end(box.id))
        while not asked:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # (expired now, and still being ended)
        assert await fleet.reap() == [] and await other.reap() == []
        waited = await asyncio.gather(fleet.end(box.id), other.end(box.id))  # (wait for the first, as it ends it)
        first = await destroying
        assert first[1] is True and [recorded for _, recorded in waited] == [False, False]
        assert {event for event, _ in waited} == {first[0]}
        assert len(asked) == 1 and cost_event_count(box.id) == 1
        assert fleet.ledger.get(box.id).status_reason == "destroyed"
    finally:
        await fleet.close()
        await other.close()


async def test_gc_does_not_take_a_sandbox_being_ended_elsewhere_for_vanished(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    asked = stalling_terminate(monkeypatch, 0.8)
    ender, collector = Fleet(config={}), Fleet(config={})
    try:
        box = await ender.create(Request(provider="local"))
        ending = asyncio.ensure_future(ender.end(box.id, "destroyed by its user"))
        while not asked:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # (gone from the provider's listing, not yet recorded as ended)
        report = await collector.gc()
        assert box.id not in report.vanished and not [e for e in report.errors if box.id in e]
        assert (await ending)[1] is True
        assert ender.ledger.get(box.id).status_reason == "destroyed by its user"
    finally:
        await ender.close()
        await collector.close()


async def test_a_destroy_cancelled_half_way_is_finished_not_left_half_done(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C, a cancelled tool call: the machine is half gone by then, so the ending goes on
    in the background (and close() waits for it), recorded with its cost event."""
    asked = stalling_terminate(monkeypatch, 0.5)
    fleet = Fleet(config={})
    try:
        box = await fleet.create(Request(provider="local"))
        destroying = asyncio.ensure_future(fleet.destroy(box.id))
        while not asked:
            await asyncio.sleep(0.02)
        destroying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await destroying
        with pytest.raises(SandboxGone, match="being terminated"):
            await fleet.get(box.id)
    finally:
        await fleet.close()
    record = fleet.ledger.get(box.id)
    assert (record.status, record.status_reason) == ("terminated", "destroyed")
    assert cost_event_count(box.id) == 1 and len(asked) == 1


CANCELLED_CREATE = """
import asyncio, os
from providers import Fleet, Request

async def main():
    fleet = Fleet()
    task = asyncio.ensure_future(fleet.create(Request(pool="flaky", name="{name}")))
    for _ in range(200):  # until the machine exists (its boot then hangs)
        if os.listdir(os.environ["TETHER_TEST_CLOUD"]):
            break
        await asyncio.sleep(0.05)
    else:
        print("never created")
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    for _ in range(100):  # the cleanup runs in the background; this process lives on
        await asyncio.sleep(0.05)
        if fleet.ledger.get("{name}").status == "terminated":
            print("cleaned")
            return
    print("not cleaned")

asyncio.run(main())
"""


def test_a_cancelled_provision_is_cleaned_up_by_the_process_that_cancelled_it(tmp_path: Path) -> None:
    cloud, env = hanging_cloud(tmp_path)
    name = f"cancelled-{os.getpid()}"
    done = subprocess.run(
        [sys.executable, "-c", CANCELLED_CREATE.format(name=name)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.stdout.strip() == "cleaned", done.stderr
    assert list(cloud.iterdir()) == []
    record = Ledger().get(name)
    assert "interrupted" in record.status_reason and cost_event_count(record.id) == 1


async def test_a_fleet_closing_while_a_cancelled_provision_is_undone_ends_the_machine_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server stops (tearing down what it created) while a provision it cancelled is being
    undone: the teardown waits for that undoing instead of asking the provider to end the same
    machine a second time, at once."""
    cloud, env = hanging_cloud(tmp_path, "SlowEndingHangProvider")
    for name in ("TETHER_CONFIG", "TETHER_TEST_CLOUD"):
        monkeypatch.setenv(name, env[name])
    fleet = Fleet()
    task = asyncio.ensure_future(fleet.create(Request(pool="flaky")))
    while not list(cloud.iterdir()):  # (its machine exists; the boot hangs)
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.1)  # (the create waits for its undoing ...)
    task.cancel()  # (... unless cancelled again, as an anyio scope, MCP's, cancels every await)
    with pytest.raises(asyncio.CancelledError):
        await task
    await fleet.close(teardown_created=True)
    [sandbox_id] = fleet.created_here
    record = fleet.ledger.get(sandbox_id)
    assert record.status == "terminated" and "provisioning interrupted" in (record.status_reason or "")
    assert len((tmp_path / "terminations.log").read_text().splitlines()) == 1
    assert list(cloud.iterdir()) == [] and cost_event_count(sandbox_id) == 1


@pytest.mark.parametrize("canceller", ["task.cancel", "anyio scope"])
@pytest.mark.parametrize(
    ("stage", "waits"),
    [
        ("provisioning ", True),
        ("provisioning ", False),  # (in the provision)
        ("connecting to ", True),
        ("connecting to ", False),  # (in the connect: an error's cleanup, under anyio, was cancelled too)
        (" is running", True),  # (the last await: cancelled after it, create has returned)
    ],
)
async def test_a_create_cancelled_at_any_point_leaves_nothing_behind(stage: str, canceller: str, waits: bool) -> None:
    """Cancelled while reporting progress (or at the await just after), a create ends what it made:
    no row left provisioning or running for ever, no sandbox dir, one cost event. An anyio scope
    (how MCP cancels a tool call) cancels every await after too, the cleanup's own included."""
    fleet = Fleet(config={})
    cancel: Callable[[], object]

    async def progress(message: str, fraction: float | None = None) -> None:
        if message.startswith(stage) or message.endswith(stage):
            cancel()
            if waits:
                await asyncio.sleep(3600)

    try:
        if canceller == "task.cancel":
            task = asyncio.ensure_future(fleet.create(Request(provider="local", keep=True), progress))
            cancel = task.cancel
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with anyio.CancelScope() as scope:
                cancel = scope.cancel
                await fleet.create(Request(provider="local", keep=True), progress)
            assert scope.cancelled_caught
    finally:
        await fleet.close()  # (it waits for cleanups still under way)
    [sandbox_id] = fleet.created_here
    record = fleet.ledger.get(sandbox_id)
    assert record.status == "terminated", (record.status, record.status_reason)
    assert "interrupted" in (record.status_reason or "")
    assert not (local_dir() / "sandboxes" / sandbox_id).exists()
    assert cost_event_count(sandbox_id) == 1


def test_gpu_type_and_count_come_from_the_pool_when_the_request_names_none() -> None:
    from pydantic import ValidationError

    from providers.config import parse_pool
    from providers.fleet import _gpu_of, _gpu_rate_key

    runpod = parse_pool({"name": "gpus", "provider": "runpod", "config": {"gpuCount": 2}})
    assert _gpu_of(Request(), runpod) == ("NVIDIA A100 80GB PCIe", 2)
    assert _gpu_of(Request(gpu="h100"), runpod) == ("h100", 2)
    assert _gpu_of(Request(gpu="h100:4"), runpod) == ("h100", 4)  # (a count asked for beats the pool's)
    assert _gpu_of(Request(gpu="A100:2"), parse_pool({"name": "l", "provider": "local"})) == ("A100", 2)
    for unusable in ("a100:0", "a100:two", ":2", ""):
        with pytest.raises(ValidationError, match="is not a GPU"):
            Request(gpu=unusable)
    modal = parse_pool({"name": "m", "provider": "modal", "config": {"gpu": "A100:4"}})
    assert _gpu_of(Request(), modal) == ("A100", 4)
    assert _gpu_of(Request(), parse_pool({"name": "cpu", "provider": "modal"})) == (None, 0)
    rates = {"a100": 0.5, "h100": 2.0}
    assert _gpu_rate_key("NVIDIA A100 80GB PCIe", rates) == "a100"
    assert _gpu_rate_key("A100-80GB", rates) == "a100"
    assert _gpu_rate_key("RTX 4090", rates) is None


def test_a_ttl_comes_from_the_request_then_the_pool_then_the_defaults() -> None:
    from providers.config import parse_pool

    def ttl(fleet: Fleet, request: Request, pool: object) -> float:
        return round(fleet._expiry(request, pool) - time.time())  # type: ignore[arg-type, operator]

    said = parse_pool({"name": "m", "provider": "modal", "config": {"resources": {"timeoutSec": 100}}})
    unsaid = parse_pool({"name": "m2", "provider": "modal"})
    with_defaults, without = Fleet(config={"defaults": {"ttl_s": 600}}), Fleet(config={})
    assert ttl(with_defaults, Request(timeout_s=50), said) == 50
    assert ttl(with_defaults, Request(), said) == 100  # the pool's own setting beats [defaults]
    assert ttl(with_defaults, Request(), unsaid) == 600  # [defaults] beats the pool config's default
    assert ttl(without, Request(), unsaid) == 3600
    assert with_defaults._expiry(Request(), parse_pool({"name": "l", "provider": "local"})) is not None
    assert without._expiry(Request(), parse_pool({"name": "l", "provider": "local"})) is None


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "d", "provider": "daytona"},
        # Daytona's timeoutSec sets when an idle workspace is archived, not when it ends
        {"name": "d", "provider": "daytona", "config": {"resources": {"timeoutSec": 600}}},
        {"name": "e", "provider": "e2b"},
        {"name": "r", "provider": "runpod"},
    ],
)
def test_only_modal_pools_give_their_sandboxes_a_ttl_of_their_own(entry: dict) -> None:
    """The seeds: Modal's resources default to timeoutSec 3600; Daytona's page has no session
    ceiling (maxSessionDurationSeconds null) and E2B's no resources; RunPod has no page."""
    from providers.config import parse_pool

    pool = parse_pool(entry)
    assert Fleet(config={})._expiry(Request(), pool) is None
    assert round(Fleet(config={})._expiry(Request(timeout_s=90), pool) - time.time()) == 90  # type: ignore[operator]
    defaults = Fleet(config={"defaults": {"ttl_s": 600}})
    assert round(defaults._expiry(Request(), pool) - time.time()) == 600  # type: ignore[operator]


def test_a_sandbox_whose_creator_ended_without_teardown_is_reaped(tmp_path: Path) -> None:
    script = (
        "import asyncio\nfrom providers import Fleet, Request\n"
        "async def main():\n"
        "    kept = await Fleet().create(Request(provider='local', keep=True))\n"
        "    left = await Fleet().create(Request(provider='local'))\n"
        "    print(kept.id, left.id)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    kept, left = done.stdout.split()
    fleet = Fleet(config={})
    try:
        reaped = dict(asyncio.run(fleet.reap()))
        assert "ended without tearing it down" in reaped[left] and kept not in reaped
        assert not (local_dir() / "sandboxes" / left).exists() and cost_event_count(left) == 1
        assert fleet.ledger.get(kept).status == "running"
        asyncio.run(fleet.destroy(kept))
    finally:
        asyncio.run(fleet.close())


HANGING_TERMINATE = (
    "import asyncio, sys\n"
    "from providers import Fleet\n"
    "from providers.local import LocalProvider\n"
    "async def hang(self, handle):\n"
    "    await asyncio.sleep(3600)\n"
    "LocalProvider.terminate = hang\n"
    "asyncio.run(Fleet(config={}).destroy(sys.argv[1]))\n"
)


async def test_a_termination_cut_short_is_no_end_and_is_finished_by_the_reaper(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Whoever ends a sandbox says so in the ledger before the provider is asked: while it does, a
    connection lost elsewhere is read as the end at once. Should it fail, or die before recording
    the end, the row is as it was (not ended, to anyone); a death leaves the reaper to finish it."""
    fleet = Fleet(config={})
    ender = None
    try:
        box = await fleet.create(Request(provider="local", keep=True))

        async def refuse(self, handle):  # type: ignore[no-untyped-def]
            raise ProviderError("the provider said no")

        monkeypatch.setattr(LocalProvider, "terminate", refuse)
        with pytest.raises(ProviderError):
            await fleet.destroy(box.id)
        monkeypatch.undo()
        assert fleet.ledger.get(box.id).ending_reason is None and fleet.ledger.get(box.id).status == "running"

        box = await fleet.get(box.id)
        ender = subprocess.Popen([sys.executable, "-c", HANGING_TERMINATE, box.id], cwd=ROOT)
        deadline = time.monotonic() + 30
        while fleet.ledger.get(box.id).ending() is None:
            assert ender.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await box.ended_elsewhere() == "destroyed"
        with pytest.raises(SandboxGone, match="being terminated"):
            await fleet.get(box.id)
        # a destroy here waits for the other process's ending (which hangs: it gives up, saying so)
        from providers import fleet as fleet_module

        monkeypatch.setattr(fleet_module, "ENDING_WAIT_S", 0.5)
        with pytest.raises(ProviderError, match="being terminated by another process"):
            await fleet.end(box.id)
        assert fleet.ledger.get(box.id).status == "running" and cost_event_count(box.id) == 0

        ender.kill()
        ender.wait()
        record = fleet.ledger.get(box.id)
        assert record.status == "running" and record.ending() is None and record.ending_interrupted()
        assert await box.ended_elsewhere() is None
        assert (await (await fleet.get(box.id)).run("echo alive")).stdout == "alive\n"
        reaped = dict(await fleet.reap())
        assert reaped[box.id].startswith("destroyed")
        assert fleet.ledger.get(box.id).status == "terminated" and cost_event_count(box.id) == 1
        assert not (local_dir() / "sandboxes" / box.id).exists()
    finally:
        if ender is not None and ender.poll() is None:
            ender.kill()
            ender.wait()
        await fleet.close()


class PausingProvider(LocalProvider):
    """A local machine with E2B's profile: it pauses, and a paused sandbox costs nothing."""

    name = "pausing"
    profile = PROFILES["e2b"]
    paused: ClassVar[set[str]] = set()

    async def pause(self, handle):  # type: ignore[no-untyped-def]
        self.paused.add(handle.external_id)

    async def resume(self, handle):  # type: ignore[no-untyped-def]
        self.paused.discard(handle.external_id)


class MeteredPausingProvider(PausingProvider):
    """Modal's profile: warm standby is billed, paused or not."""

    name = "metered-pausing"
    profile = PROFILES["modal"]


@pytest.mark.parametrize(("provider", "billed_while_paused"), [("pausing", False), ("metered-pausing", True)])
async def test_paused_time_is_billed_as_the_profiles_idle_cost_model_says(
    provider: str, billed_while_paused: bool
) -> None:
    classes = {"pausing": "PausingProvider", "metered-pausing": "MeteredPausingProvider"}
    config = {
        "providers": [{"name": provider, "class": f"tests.test_lifecycle:{classes[provider]}"}],
        "pools": [{"name": provider, "provider": provider}],
    }
    fleet = Fleet(config=config)
    try:
        box = await fleet.create(Request(pool=provider))
        await fleet.pause(box.id)
        assert fleet.ledger.get(box.id).status == "paused"
        await asyncio.sleep(0.6)
        await fleet.resume(box.id)
        assert fleet.ledger.get(box.id).status == "running"
        await fleet.pause(box.id)  # a pause still under way when the sandbox ends counts too
        await asyncio.sleep(0.6)
        await box.destroy()
        record, event = fleet.ledger.get(box.id), fleet.ledger.cost_event(box.id)
        assert record.terminated_at is not None and event is not None
        wall = record.terminated_at - record.created_at
        assert wall >= 1.2
        if billed_while_paused:
            assert event.seconds == pytest.approx(wall, abs=0.01)
        else:
            assert 0 <= event.seconds <= wall - 1.2
        assert event.billing_model == "wall-clock"
    finally:
        await fleet.close()


class GpuProvider(LocalProvider):
    """This machine with RunPod's profile and pool config: two A100s, billed by the GPU-hour."""

    name = "gpu-test"
    profile = PROFILES["runpod"]
    config_model = RunPodPoolConfig


async def test_a_gpu_sandbox_is_billed_in_gpu_seconds_at_its_pools_rate() -> None:
    config = {
        "providers": [{"name": "gpu-test", "class": "tests.test_lifecycle:GpuProvider"}],
        "pools": [{"name": "a100s", "provider": "gpu-test", "config": {"gpuCount": 2, "rateUsdPerHour": 1.8}}],
    }
    fleet = Fleet(config=config)
    try:
        box = await fleet.create(Request(pool="a100s"))
        await asyncio.sleep(0.5)
        event = await box.destroy()
        assert (event.gpu_type, event.billing_model) == ("NVIDIA A100 80GB PCIe", "wall-clock")
        assert event.seconds >= 0.5 and event.gpu_seconds == pytest.approx(2 * event.seconds)
        assert event.estimated_usd == pytest.approx(1.8 * event.gpu_seconds / 3600)
        assert fleet.ledger.cost_event(box.id) == event
    finally:
        await fleet.close()


def test_gpu_rates_are_found_under_the_names_providers_give_gpus() -> None:
    from providers.fleet import _gpu_rate_key
    from providers.profiles import GPU_RATES_USD_PER_HOUR

    rates = GPU_RATES_USD_PER_HOUR["runpod"]
    for name in ("NVIDIA A100 80GB PCIe", "A100-80GB", "a100", "NVIDIA A100-SXM4-80GB"):
        assert _gpu_rate_key(name, rates) == "a100", name
    assert _gpu_rate_key("NVIDIA H100 PCIe", rates) is None
