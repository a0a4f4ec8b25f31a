"""Lifecycle: TTL and idle reaping, gc reconciliation, crash safety, and exactly one cost event each."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from providers import Fleet, Request
from providers.ledger import Ledger
from providers.local_server import local_dir

ROOT = Path(__file__).resolve().parents[1]


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


def tether(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )


def test_a_crash_mid_provision_is_reconciled_by_gc(tmp_path: Path) -> None:
    cloud = tmp_path / "cloud"
    cloud.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        '[[providers]]\nname = "hang"\nclass = "tests.hang_provider:HangProvider"\n\n'
        '[[pools]]\nname = "flaky"\nprovider = "hang"\n'
    )
    env = {**os.environ, "TETHER_CONFIG": str(config), "TETHER_TEST_CLOUD": str(cloud), "PYTHONPATH": str(ROOT)}
    name = f"crashy-{os.getpid()}"
    process = subprocess.Popen([sys.executable, "-c", HANGING_CREATE.format(name=name)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not list(cloud.iterdir()):
            assert process.poll() is None, "the provisioning process exited early"
            assert time.monotonic() < deadline, "the provider never created its machine"
            time.sleep(0.05)
        record = Ledger().get(name)
        assert record.status == "provisioning"  # written before the provider was asked
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()

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
    assert [c["billing_model"] for c in costs if c["id"] == record.id] == ["wall-clock"]
