"""`tether host`: serve, status, drain, stop, and the service files for systemd and launchd."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from providers import DispatchError, Fleet, Request
from providers import host as host_daemon
from providers.local_server import host_state_path
from tests.mcp_support import ROOT, tether


def start_daemon() -> subprocess.Popen[str]:
    """`tether host serve` as a subprocess, once its host.json says it serves."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "host", "serve"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while host_daemon.daemon_state() is None:
        assert daemon.poll() is None, daemon.stdout.read() if daemon.stdout else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return daemon


async def test_serve_status_drain_and_stop() -> None:
    assert tether("host", "status", "--json").returncode == 0
    daemon = start_daemon()
    drain = None
    try:
        port = host_daemon.read_state()["port"]

        fleet = Fleet(config={})
        box = await fleet.create(Request(provider="local", name="on-the-daemon"))
        assert box.endpoint.port == port  # served by the daemon, not by this process
        assert (await box.run("echo served")).stdout == "served\n"

        status = json.loads(tether("host", "status", "--json").stdout)
        assert status["state"] == "running" and status["pid"] == daemon.pid and box.id in status["sandboxes"]
        assert status["capacity"]["cpus"] == os.cpu_count()

        drain = subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "host", "drain"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        while host_daemon.read_state()["status"] != "draining":
            await asyncio.sleep(0.05)
        with pytest.raises(DispatchError, match="draining"):
            await fleet.create(Request(provider="local"))
        assert (await box.run("echo still served")).stdout == "still served\n"  # running ones carry on
        assert drain.poll() is None  # waiting for the sandbox to end
        await box.destroy()
        out, _ = drain.communicate(timeout=20)
        assert drain.returncode == 0 and "drained" in out
        await fleet.close()

        assert tether("host", "stop").returncode == 0
        assert daemon.wait(10) == 0
        assert not host_state_path().exists()
        assert json.loads(tether("host", "status", "--json").stdout)["state"] == "stopped"
    finally:
        for process in (drain, daemon):
            if process is not None and process.poll() is None:
                process.kill()
        host_state_path().unlink(missing_ok=True)


async def test_a_long_running_process_follows_its_local_sandboxes_when_the_daemon_stops_and_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An MCP server keeps its sandboxes open for hours; the daemon serving them may be restarted."""
    from providers import fleet as fleet_module

    monkeypatch.setattr(fleet_module, "LEDGER_RECHECK_SECONDS", 0)  # (the fleet asks where a sandbox is every time)
    daemon = start_daemon()
    fleet = Fleet(config={})
    try:
        port = host_daemon.read_state()["port"]
        box = await fleet.create(Request(provider="local"))
        assert box.endpoint.port == port
        await box.run("mkdir -p deeper && cd deeper")

        assert tether("host", "stop").returncode == 0 and daemon.wait(10) == 0
        same = await fleet.get(box.id)
        assert same is box and box.endpoint.port != port  # this process serves it now
        assert (await box.run("echo here")).stdout == "here\n"
        assert (await box.run("pwd")).stdout.endswith("/deeper\n")  # where the last command ended
        assert fleet.record(box.id).endpoint["port"] == box.endpoint.port  # what `tether info` shows

        daemon = start_daemon()
        assert host_daemon.read_state()["port"] == port  # back on the port it had
        assert (await fleet.get(box.id)).endpoint.port == port
        assert (await box.run("echo back")).stdout == "back\n"
        await box.destroy()
    finally:
        await fleet.close()
        tether("host", "stop")
        if daemon.poll() is None:
            daemon.kill()
        host_state_path().unlink(missing_ok=True)


def test_start_and_stop_without_a_service_manager(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    started = tether("host", "start", "--json", env=env)
    try:
        assert started.returncode == 0, started.stderr
        status = json.loads(started.stdout)
        assert status["state"] == "running" and status["service"] == "direct"
        assert tether("host", "restart", "--json", env=env).returncode == 0
        assert json.loads(tether("host", "status", "--json", env=env).stdout)["pid"] != status["pid"]
    finally:
        stopped = tether("host", "stop", "--json", env=env)
    assert json.loads(stopped.stdout)["state"] == "stopped"


def test_install_writes_a_systemd_user_unit(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    installed = tether("host", "install", env=env)
    assert installed.returncode == 0, installed.stderr
    unit = tmp_path / "systemd" / "user" / "tether-host.service"
    text = unit.read_text()
    assert f"ExecStart={sys.executable} -m tools.cli host serve" in text
    assert f'Environment="TETHER_STATE_DIR={os.environ["TETHER_STATE_DIR"]}"' in text
    assert "WantedBy=default.target" in text
    assert f'Environment="PYTHONPATH={ROOT}"' in text  # this checkout's code, wherever systemd starts it
    assert json.loads(tether("host", "status", "--json", env=env).stdout)["installed"] is True
    assert tether("host", "uninstall", env=env).returncode == 0 and not unit.exists()
    # a state dir found through XDG_STATE_HOME (which a service manager would not pass on) is pinned
    xdg = {k: v for k, v in env.items() if k != "TETHER_STATE_DIR"} | {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert tether("host", "install", env=xdg).returncode == 0
    assert f'Environment="TETHER_STATE_DIR={tmp_path / "xdg" / "tether"}"' in unit.read_text()
    assert tether("host", "uninstall", env=xdg).returncode == 0


def test_launch_agent_plist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(host_daemon.platform, "system", lambda: "Darwin")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert host_daemon.unit_path() == tmp_path / "Library" / "LaunchAgents" / "dev.tether.host.plist"
    plist = host_daemon.unit_text()
    assert "<string>dev.tether.host</string>" in plist and "<key>RunAtLoad</key><true/>" in plist
    assert f"<string>{sys.executable}</string>" in plist and "<string>serve</string>" in plist
    # restarted after a crash, not after `tether host stop`
    assert "<key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>" in plist


def test_a_stale_host_file_neither_drains_nor_gets_its_pid_signalled() -> None:
    """A daemon killed with -9 leaves host.json behind; its pid may since belong to anything."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    path = host_state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # the pid runs, but nothing answers on the port: not a daemon
        path.write_text(json.dumps({"pid": bystander.pid, "port": 9, "host_key": "x", "status": "draining"}))
        from providers.local import LocalProvider

        assert LocalProvider.unavailable_reason() is None
        host_daemon.stop(timeout=1)
        assert bystander.poll() is None and not path.exists()
    finally:
        bystander.kill()
        bystander.wait()
        path.unlink(missing_ok=True)


def test_of_daemons_started_at_the_same_moment_exactly_one_serves() -> None:
    """Both used to find no host.json and both serve (and `tether host stop` stopped one); the
    daemon's lock now lets one in, and the others say so and exit."""
    # `tether host serve`, each started once its imports are done and a line arrives: all at once.
    ready = (
        "import sys, tools.cli; print('ready', flush=True); sys.stdin.readline(); "
        "sys.exit(tools.cli.main(['host', 'serve']))"
    )
    serves = [
        subprocess.Popen(
            [sys.executable, "-c", ready],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for process in serves:  # (each has done its imports: go at once)
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        for process in serves:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        deadline = time.monotonic() + 20
        while sum(p.poll() is None for p in serves) > 1 or host_daemon.daemon_state() is None:
            assert time.monotonic() < deadline, "more than one daemon kept running"
            time.sleep(0.05)
        [serving] = [p for p in serves if p.poll() is None]
        assert host_daemon.daemon_state()["pid"] == serving.pid
        for refused in (p for p in serves if p is not serving):
            assert refused.returncode != 0
            assert "a tether host daemon already runs" in refused.stderr.read(), refused.stdout.read()
        assert tether("host", "stop").returncode == 0
        assert serving.wait(10) == 0 and host_daemon.daemon_state() is None
    finally:
        for process in serves:
            if process.poll() is None:
                process.kill()
            process.wait()
        host_state_path().unlink(missing_ok=True)
