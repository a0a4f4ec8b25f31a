"""`tether host`: this machine serving itself as a local pool, with the seed's daemon lifecycle.

`serve` runs the local provider's SSH server in the foreground and publishes it in
<state>/local/host.json, so every tether process on the machine uses it instead of starting its own.
`drain` marks the host draining (the local provider refuses new sandboxes) and waits for the live
ones to end. `install` writes a systemd user unit (Linux) or a LaunchAgent (macOS); `start`, `stop`
and `restart` go through that service manager when it is installed and reachable, and otherwise
manage the daemon process directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.state import config_path, process_running, state_dir

from .ledger import Ledger
from .local_server import LocalSSHServer, daemon_state, host_state_path, local_dir

SERVICE_NAME = "tether-host"
LAUNCH_LABEL = "dev.tether.host"


# -- state ------------------------------------------------------------------------------------------


def read_state() -> dict[str, Any] | None:
    try:
        return json.loads(host_state_path().read_text())
    except (OSError, ValueError):
        return None


def write_state(state: dict[str, Any]) -> None:
    path = host_state_path()
    temp = path.with_name(f".host.{os.getpid()}.tmp")
    temp.write_text(json.dumps(state))
    os.replace(temp, path)


# -- serve ------------------------------------------------------------------------------------------


def lock_path() -> Path:
    return local_dir() / "host.lock"


def _hold_daemon_lock() -> int:
    """Take the daemon's lock (held until its process ends, and released with it however it ends);
    the open descriptor. Checking host.json and then writing it is no guard by itself: two daemons
    started at the same moment would both find none and both serve, and `host stop` stops one."""
    fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o600)  # (not inherited: sandboxes' shells don't hold it)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()  # (empty: it is just starting)
        os.close(fd)
        pid = f" (pid {holder})" if holder else ""
        raise RuntimeError(f"a tether host daemon already runs{pid}; stop it first (tether host stop)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


async def serve(port: int = 0) -> None:
    """Run the daemon until SIGTERM or SIGINT. The draining flag survives only until the next start."""
    lock = _hold_daemon_lock()
    try:
        await _serve(port)
    finally:
        os.close(lock)  # (after host.json is gone: the next daemon's is never removed by this one)


async def _serve(port: int) -> None:
    server = LocalSSHServer()  # (no other daemon runs: serve holds the lock)
    last_port = local_dir() / "host.port"
    running = None
    if not port:
        # The port the last run served on, when it is free: processes that knew it keep working
        # through a restart (and the others ask again: Provider.endpoint_moves).
        with contextlib.suppress(OSError, ValueError, OverflowError):
            running = server.start(int(last_port.read_text()))
    running = running or server.start(port)
    last_port.write_text(str(running.port))
    write_state(
        {
            "pid": os.getpid(),
            "port": running.port,
            "host_key": running.host_key,
            "status": "running",
            "started_at": time.time(),
        }
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"tether host: serving local sandboxes on 127.0.0.1:{running.port} (pid {os.getpid()})", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        server.stop()
        state = read_state()
        if state and state.get("pid") == os.getpid():
            host_state_path().unlink(missing_ok=True)
        print("tether host: stopped", flush=True)


def live_local_sandboxes(ledger: Ledger | None = None) -> list[str]:
    """Local sandboxes that run or are being provisioned (an abandoned provision is gc's to
    collect, not something to wait for)."""
    ledger = ledger or Ledger()
    return [r.id for r in ledger.list() if r.provider == "local" and not r.provision_abandoned()]


async def drain(wait: bool = True, poll: float = 1.0, report: Any = print) -> list[str]:
    """Refuse new local sandboxes; with `wait`, return once none is live. Returns those still live.

    While it waits it reaps (TTL, idle timeout, creator gone), as the MCP server's reaper would."""
    from .fleet import Fleet

    state = daemon_state()
    if state is None:
        raise RuntimeError("no tether host daemon runs here; start it with `tether host start`")
    write_state({**state, "status": "draining"})
    ledger = Ledger()
    remaining = live_local_sandboxes(ledger)
    if remaining:
        report(f"draining: waiting for {len(remaining)} sandbox(es) to end: {', '.join(remaining)}")
    reaper = Fleet(store=ledger.store)
    try:
        while wait and remaining:
            await asyncio.sleep(poll)
            await reaper.reap()
            now = live_local_sandboxes(ledger)
            if now != remaining:
                report(f"draining: {len(now)} left")
            remaining = now
    finally:
        await reaper.close()
    if not remaining:
        report("drained: no local sandboxes are running")
    return remaining


# -- status -----------------------------------------------------------------------------------------


@dataclass
class HostStatus:
    state: str  # running, draining, stopped
    pid: int | None
    port: int | None
    service: str  # how it is managed: systemd, launchd, or direct
    installed: bool
    sandboxes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def status() -> HostStatus:
    state = daemon_state()
    return HostStatus(
        state=(state or {}).get("status", "stopped") if state else "stopped",
        pid=state["pid"] if state else None,
        port=state["port"] if state else None,
        service=service_manager(),
        installed=unit_path().exists(),
        sandboxes=live_local_sandboxes(),
    )


# -- service files ----------------------------------------------------------------------------------


def serve_command() -> list[str]:
    return [sys.executable, "-m", "tools.cli", "host", "serve"]


def daemon_env() -> dict[str, str]:
    """What the daemon needs to be this very tether: the code it runs (this checkout or install,
    whatever the directory it starts in), the state dir and config this CLI resolved (from
    TETHER_*, or XDG_* variables a service manager would not pass on), and PATH."""
    code = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONPATH": code, "TETHER_STATE_DIR": str(state_dir()), "TETHER_CONFIG": str(config_path())}
    if os.environ.get("PATH"):
        env["PATH"] = os.environ["PATH"]
    return env


def unit_path() -> Path:
    if platform.system() == "Darwin":
        return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCH_LABEL}.plist"
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "systemd" / "user" / f"{SERVICE_NAME}.service"


def unit_text() -> str:
    command = serve_command()
    env = daemon_env()
    if platform.system() == "Darwin":
        args = "".join(f"    <string>{_xml(a)}</string>\n" for a in command)
        env_xml = "".join(f"    <key>{k}</key><string>{_xml(v)}</string>\n" for k, v in env.items())
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n'
            '<plist version="1.0">\n<dict>\n'
            f"  <key>Label</key><string>{LAUNCH_LABEL}</string>\n"
            f"  <key>ProgramArguments</key>\n  <array>\n{args}  </array>\n"
            f"  <key>EnvironmentVariables</key>\n  <dict>\n{env_xml}  </dict>\n"
            # Restarted after a crash, not after `tether host stop` (a clean exit), like systemd's on-failure.
            "  <key>RunAtLoad</key><true/>\n"
            "  <key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>\n"
            f"  <key>StandardOutPath</key><string>{_xml(str(log_path()))}</string>\n"
            f"  <key>StandardErrorPath</key><string>{_xml(str(log_path()))}</string>\n"
            "</dict>\n</plist>\n"
        )
    env_lines = "".join(f'Environment="{k}={_systemd_escape(v)}"\n' for k, v in env.items())
    exec_line = " ".join(_systemd_quote(a) for a in command)
    return (
        "[Unit]\nDescription=tether host: this machine as a local sandbox pool\n\n"
        f"[Service]\nExecStart={exec_line}\n{env_lines}Restart=on-failure\n\n"
        "[Install]\nWantedBy=default.target\n"
    )


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _systemd_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


def _systemd_quote(text: str) -> str:
    return f'"{_systemd_escape(text)}"' if any(c in text for c in ' "\\%') else text


def log_path() -> Path:
    return local_dir() / "host.log"


def service_manager() -> str:
    """The service manager `start`/`stop` use: systemd or launchd when usable, else direct."""
    if not unit_path().exists():
        return "direct"
    if platform.system() == "Darwin" and shutil.which("launchctl"):
        return "launchd"
    if shutil.which("systemctl"):
        probe = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True, check=False)
        if probe.returncode == 0:
            return "systemd"
    return "direct"


def install() -> tuple[Path, str]:
    """Write the unit and enable it where the service manager is reachable. Returns (path, what happened)."""
    path = unit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit_text())
    manager = service_manager()
    if manager == "systemd":
        _run(["systemctl", "--user", "daemon-reload"])
        _run(["systemctl", "--user", "enable", "--now", f"{SERVICE_NAME}.service"])
        return path, "enabled and started with systemd (starts at login)"
    if manager == "launchd":
        _run(["launchctl", "load", "-w", str(path)])
        return path, "loaded with launchd (starts at login)"
    return path, "written; no user service manager is reachable here, so use `tether host start`"


def uninstall() -> tuple[Path, str]:
    path = unit_path()
    if not path.exists():
        return path, "was not installed"
    manager = service_manager()
    if manager == "systemd":
        _run(["systemctl", "--user", "disable", "--now", f"{SERVICE_NAME}.service"], check=False)
    elif manager == "launchd":
        _run(["launchctl", "unload", "-w", str(path)], check=False)
    else:
        stop()
    path.unlink()
    if manager == "systemd":
        _run(["systemctl", "--user", "daemon-reload"], check=False)
    return path, "removed"


def start(timeout: float = 15.0) -> HostStatus:
    manager = service_manager()
    if daemon_state() is None:
        if manager == "systemd":
            _run(["systemctl", "--user", "start", f"{SERVICE_NAME}.service"])
        elif manager == "launchd":
            _run(["launchctl", "start", LAUNCH_LABEL])
        else:
            with log_path().open("ab") as log:
                subprocess.Popen(
                    serve_command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    cwd=str(Path.home()),
                    # (not a sandbox's own: started from a local sandbox's shell, it would carry its
                    # TETHER_SANDBOX, and ending that sandbox kills what carries it)
                    env={**{k: v for k, v in os.environ.items() if k != "TETHER_SANDBOX"}, **daemon_env()},
                )
    deadline = time.monotonic() + timeout
    while daemon_state() is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not come up within {timeout:g}s; see {log_path()}")
        time.sleep(0.1)
    return status()


def stop(timeout: float = 15.0) -> HostStatus:
    manager = service_manager()
    if manager == "systemd":
        _run(["systemctl", "--user", "stop", f"{SERVICE_NAME}.service"], check=False)
    elif manager == "launchd":
        _run(["launchctl", "stop", LAUNCH_LABEL], check=False)
    state = daemon_state()  # (a stale host.json's pid may since belong to another process)
    if state and state.get("pid"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(state["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process_running(int(state["pid"])) and time.monotonic() < deadline:
            time.sleep(0.1)
    host_state_path().unlink(missing_ok=True)
    return status()


def restart() -> HostStatus:
    stop()
    return start()


def _run(argv: list[str], check: bool = True) -> None:
    subprocess.run(argv, check=check, capture_output=True)
