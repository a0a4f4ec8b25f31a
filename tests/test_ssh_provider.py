"""The ssh provider (bring your own host) against real sshd instances, ProxyJump included."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers import Fleet, Request, Unsupported
from providers.capacity import host_capacity
from tests.mcp_support import tether
from tests.processes import TWO_A100S, fake_nvidia_smi
from tests.sshd import SSHD, Account, ensure_account
from tools.cli import ssh_argv


async def test_a_relative_key_path_keeps_working_from_another_directory(
    sshd: SSHD, client_key: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger keeps the key's path for later commands, which may run from anywhere."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id").write_bytes(client_key.read_bytes())
    (tmp_path / "keys" / "id").chmod(0o600)
    monkeypatch.chdir(tmp_path)
    fleet = Fleet(config={})
    try:
        box = await fleet.create(Request(provider="ssh", options={"host": sshd.address, "key_path": "keys/id"}))
        assert box.record.handle["data"]["key_paths"] == [str(tmp_path / "keys" / "id")]
        await box.close()
        monkeypatch.chdir("/")
        again = await fleet.get(box.id)
        assert (await again.run("whoami")).stdout.strip() == sshd.account.name
        await again.destroy()
    finally:
        await fleet.close()


async def test_attach_run_capacity_and_detach(sshd: SSHD, client_key: Path) -> None:
    fleet = Fleet(config={})
    try:
        box = await fleet.create(Request(provider="ssh", options={"host": sshd.address, "key_path": str(client_key)}))
        record = box.record
        assert (record.provider, record.status, record.external_id) == ("ssh", "running", sshd.address)
        assert (await box.run("whoami")).stdout.strip() == sshd.account.name
        # the host key was pinned on first use
        assert any(port == sshd.port for _, port, _ in fleet.connections.pins.all())
        capacity = await box.capacity()
        assert capacity.cpus and capacity.memory_mb and capacity.disk_total_gb and capacity.gpus == []
        for operation in (box.pause, box.snapshot):
            with pytest.raises(Unsupported):
                await operation()
        # the user's files stay; tether's own directory and jobs go
        home = await box.home()
        await box.write(f"{home}/keep-me.txt", "mine")
        job = await box.start_job("sleep 1000")
        own_dir = record.handle["data"]["tether_dir"]
        assert own_dir == f"{home}/.tether/sandboxes/{box.id}" and await box.exists(f"{own_dir}/labels.json")
        event = await box.destroy()
        assert event.billing_model == "fixed" and event.estimated_usd == 0.0
        async with await fleet.create(
            Request(provider="ssh", options={"host": sshd.address, "key_path": str(client_key)})
        ) as other:
            assert await other.read_text(f"{home}/keep-me.txt") == "mine"
            assert not await other.exists(own_dir)
            live = await other.run(f"ps -o stat= -p {job.pid} | grep -v Z || echo gone")
            assert live.stdout.strip() == "gone"
            await other.remove(f"{home}/keep-me.txt")
    finally:
        await fleet.close()


async def test_ssh_pools_from_config(sshd: SSHD, client_key: Path) -> None:
    config = {
        "pools": [
            {"name": "laptop", "provider": "local"},
            {
                "name": "gpu-box",
                "provider": "ssh",
                "config": {"host": sshd.address, "identityFile": str(client_key)},
                "runtime_provides": {"runtimeKinds": ["native"], "requirementKinds": ["gpu", "long-running"]},
            },
        ]
    }
    fleet = Fleet(config=config)
    try:
        async with await fleet.create(Request(requirements=["gpu"])) as box:
            assert box.pool_name == "gpu-box" and box.provider == "ssh"
            assert (await box.run("echo on the gpu box")).stdout == "on the gpu box\n"
    finally:
        await fleet.close()


@pytest.fixture
def jump_host(client_key: Path) -> Iterator[SSHD]:
    server = SSHD(ensure_account("tether-jump", "/bin/bash", {".profile": ""}), client_key).start()
    yield server
    server.cleanup()


async def test_attach_through_proxyjump(
    sshd: SSHD, jump_host: SSHD, client_key: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        f"Host jump\n  HostName 127.0.0.1\n  Port {jump_host.port}\n  User {jump_host.account.name}\n"
        f"  IdentityFile {client_key}\n"
        f"Host behind-jump\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.account.name}\n"
        f"  IdentityFile {client_key}\n  ProxyJump jump\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.ssh/config is read from $HOME
    fleet = Fleet(config={})
    try:
        box = await fleet.create(Request(provider="ssh", options={"host": "behind-jump"}))
        assert box.endpoint.jump and box.endpoint.jump[0].port == jump_host.port
        assert (await box.run("whoami")).stdout.strip() == sshd.account.name
        assert jump_host.connection_pids(), "the connection did not go through the jump host"

        # `tether ssh`'s command checks every hop against tether's pins, not ~/.ssh/known_hosts
        def openssh(*command: str) -> subprocess.CompletedProcess[str]:
            argv = ssh_argv(fleet.record(box.id), fleet.connections.pins)  # (the pins it dialed with)
            run = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", *argv[1:], *command]
            return subprocess.run(run, capture_output=True, text=True, timeout=30)

        works = openssh("whoami")
        assert works.stdout.strip() == sshd.account.name, works.stderr
        jump_host.restart(new_host_key=True)
        refused = openssh("whoami")
        assert refused.returncode == 255 and "Host key verification failed" in refused.stderr, refused.stderr
        await box.destroy()
    finally:
        await fleet.close()


async def test_attach_to_an_unreachable_host_fails_and_leaves_a_closed_record() -> None:
    fleet = Fleet(config={})
    try:
        with pytest.raises(Exception, match="cannot connect"):
            await fleet.create(Request(provider="ssh", name="nowhere", options={"host": "me@127.0.0.1:1"}))
        record = fleet.ledger.get("nowhere")
        assert record.status == "terminated" and record.status_reason.startswith("provisioning failed")
        assert fleet.ledger.cost_event(record.id) is not None
    finally:
        await fleet.close()


async def test_gpus_come_from_nvidia_smi_over_ssh_and_on_this_machine(
    dash_sshd: SSHD, client_key: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # over SSH: on the account's PATH (its .profile puts ~/bin first)
    remote_bin = dash_sshd.account.home / "bin"
    remote_bin.mkdir(exist_ok=True)
    os.chown(remote_bin, dash_sshd.account.uid, dash_sshd.account.gid)
    fake = fake_nvidia_smi(remote_bin)
    fleet = Fleet(config={})
    try:
        box = await fleet.create(
            Request(provider="ssh", options={"host": dash_sshd.address, "key_path": str(client_key)})
        )
        assert (await box.capacity()).gpus == TWO_A100S
        await box.destroy()
    finally:
        fake.unlink()
        await fleet.close()
    # on this machine (the local provider's capacity)
    local_bin = tmp_path / "bin"
    local_bin.mkdir()
    fake_nvidia_smi(local_bin)
    monkeypatch.setenv("PATH", f"{local_bin}:{os.environ['PATH']}")
    assert (await host_capacity(tmp_path)).gpus == TWO_A100S


async def test_detaching_from_a_host_that_is_down_says_what_it_left_there(
    bash_account: Account, client_key: Path
) -> None:
    """The attachment ends (a host gone for good must not keep `tether down` failing), but its end
    says plainly that tether's jobs may still run there: no listing lets gc find them later."""
    server = SSHD(bash_account, client_key).start()
    fleet = Fleet(config={})
    job_pid = None
    try:
        box = await fleet.create(Request(provider="ssh", options={"host": server.address, "key_path": str(client_key)}))
        job = await box.start_job("sleep 300")
        job_pid, own_dir = job.pid, box.record.handle["data"]["tether_dir"]
        server.stop()
        down = await asyncio.to_thread(tether, "down", box.id, "--json")  # (MCP's sandbox_destroy result)
        assert down.returncode == 0, down.stderr
        left = json.loads(down.stdout)["left_behind"]
        assert left.startswith(f"could not clean up on {server.address}") and own_dir in left, left
        record = fleet.ledger.get(box.id)
        assert record.status == "terminated" and fleet.ledger.cost_event(box.id) is not None
        reason = record.status_reason or ""
        assert reason.startswith("destroyed") and f"could not clean up on {server.address}" in reason, reason
        assert "jobs there may still run" in reason and own_dir in reason, reason
        assert job_pid is not None and Path(f"/proc/{job_pid}").exists()  # (what it warns of is so)
    finally:
        if job_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(job_pid, signal.SIGKILL)
        await fleet.close()
        server.cleanup()
