"""The local provider: this machine. No cloud account, no sshd, no root.

Provisioning returns at once with the seeds' marker handle (externalId `user-managed`) after making
the sandbox's directory under the state dir: `work/` (where it starts) and `tether/` (its command
output and background jobs). The SSH endpoint is the embedded server (local_server.py): the
`tether host serve` daemon's when one runs, else one this process starts on first use.

This is not an isolation boundary: commands run as you, with your PATH and home (host-binary).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from sandbox import SSHEndpoint
from sandbox.jobs import STOP_ALL_JOBS
from sandbox.state import proc_stat, process_running

from .base import (
    Capacity,
    Handle,
    ListedResource,
    Progress,
    Provider,
    ProvisionSpec,
    Request,
    SandboxStatus,
    no_progress,
)
from .capacity import host_capacity
from .config import LocalPoolConfig
from .errors import ProviderError, ProviderUnavailable, SandboxGone
from .ledger import SANDBOX_ID
from .local_server import (
    EOF_GRACE_S,
    TERM_GRACE_S,
    RunningServer,
    daemon_state,
    ensure_server,
    known_server,
    local_dir,
    sandbox_root,
    work_dir,
)
from .profiles import PROFILES, SUBSTRATES

USER_MANAGED = "user-managed"

log = logging.getLogger(__name__)


def host_draining() -> bool:
    """Whether a `tether host` daemon runs here and drains."""
    state = daemon_state()
    return state is not None and state.get("status") == "draining"


class LocalProvider(Provider):
    name = "local"
    profile = PROFILES["local"]
    substrate = SUBSTRATES["local"]
    config_model = LocalPoolConfig
    endpoint_moves = True  # the daemon's server, or this process's own when none runs
    option_names = ()
    sizes_by = ()  # (the machine as it is)

    def unapplied(self, request: Request) -> list[str]:
        """As any provider's, and a GPU asked of a machine that has none (no nvidia-smi): the
        sandbox gets none, and is billed for none."""
        missing_gpu = request.gpu is not None and shutil.which("nvidia-smi") is None
        return [*super().unapplied(request), *(["gpu"] if missing_gpu else [])]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if host_draining():
            return "this host is draining (`tether host drain`); `tether host restart` to accept new sandboxes"
        return None

    async def provision(self, spec: ProvisionSpec, progress: Progress = no_progress) -> Handle:
        reason = self.unavailable_reason()
        if reason:
            raise ProviderUnavailable(reason)
        root = sandbox_root(spec.sandbox_id)
        (root / "work").mkdir(parents=True, exist_ok=True)
        (root / "tether").mkdir(exist_ok=True)
        # The label every remote resource carries, so gc can match it to the ledger.
        (root / "labels.json").write_text(json.dumps({**spec.labels, "created_at": time.time()}))
        await progress("local sandbox ready", 1.0)
        return Handle(external_id=USER_MANAGED, data={"dir": str(root)})

    async def endpoint(self, handle: Handle) -> SSHEndpoint:
        """Where the sandbox is served now. The fleet asks at every ledger recheck (endpoint_moves),
        so this is cheap: the server found last is kept while host.json is unchanged, the daemon it
        named still runs and a live connection reaches the sandbox there. Otherwise (the daemon
        started, stopped or moved; no connection yet, or the last one failed or was lost) it is looked
        for again, asking the daemon whether it answers, off the event loop."""
        sandbox_id = _sandbox_id(handle)
        if not work_dir(sandbox_id).is_dir():  # (the server would refuse the login: not a key problem)
            raise SandboxGone(
                sandbox_id,
                "gone",
                f"sandbox {sandbox_id}'s directory {work_dir(sandbox_id)} is gone (removed outside tether); "
                f"`tether down {sandbox_id}` records its end (`tether gc` finds all such)",
            )
        known = known_server()
        if known is not None and self.connections is not None:
            endpoint = _endpoint(handle, known)
            if self.connections.stats(endpoint):
                return endpoint
        return _endpoint(handle, await asyncio.to_thread(ensure_server))

    def tether_dir(self, sandbox_id: str) -> str:
        return str(sandbox_root(sandbox_id) / "tether")

    async def status(self, handle: Handle) -> SandboxStatus:
        return "running" if work_dir(_sandbox_id(handle)).is_dir() else "terminated"

    async def terminate(self, handle: Handle) -> None:
        """Stop the sandbox's background jobs and whatever else still runs in it, then remove its
        directory."""
        root = Path(handle.data["dir"])
        jobs = root / "tether" / "jobs"
        if jobs.is_dir():
            stop = await asyncio.create_subprocess_exec("/bin/sh", "-c", STOP_ALL_JOBS, "sh", str(jobs))
            await stop.wait()
        await asyncio.to_thread(kill_processes_of, _sandbox_id(handle))
        await asyncio.to_thread(remove_tree, root)

    async def capacity(self, handle: Handle | None) -> Capacity:
        return await host_capacity(local_dir())

    async def list(self) -> list[ListedResource]:
        root = local_dir() / "sandboxes"
        if not root.is_dir():
            return []
        return [
            ListedResource(external_id=USER_MANAGED, tether_id=entry.name, status="running", data={"dir": str(entry)})
            for entry in root.iterdir()
            if SANDBOX_ID.match(entry.name)
        ]


def kill_processes_of(sandbox_id: str) -> None:
    """Stop this user's processes that belong to the sandbox: every session of the embedded
    server starts with TETHER_SANDBOX set, and whatever runs in it inherits that (a command another
    tether process is running in it, say). Where there is no /proc, jobs alone were stopped.

    A login shell still running its profile is let finish it first, and then TERM, then KILL:
    `pyenv rehash` (in many a profile) takes a lock and only then sets the EXIT trap that releases
    it, and a signal in between, or a KILL at all, leaves the lock for every later login shell of
    this user, tether's or not, to stall a minute on."""
    marker = f"TETHER_SANDBOX={sandbox_id}".encode()
    daemon = daemon_state()
    spared = {os.getpid(), int(daemon["pid"]) if daemon else 0}  # (tether's own servers, whatever they carry)

    def members() -> list[int]:
        found = []
        with contextlib.suppress(OSError):
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit() or int(entry.name) in spared:
                    continue
                try:
                    environment = Path(entry.path, "environ").read_bytes()
                except OSError:  # (gone, or another user's)
                    continue
                if marker in environment.split(b"\0"):
                    found.append(int(entry.name))
        return found

    def send(pids: list[int], sent: signal.Signals) -> None:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sent)

    # Each process gets its TERM, and TERM_GRACE_S, before a KILL: one forked after the first pass
    # too. What runs in a login shell's own process group besides the shell is its profile (tether's
    # commands and jobs run in groups of their own): it is spared for up to EOF_GRACE_S, after which
    # the shell waits on its input alone. Bounded: what is still there after a few graces (forking
    # as fast as it is killed) is KILLed whatever it was sent.
    termed: dict[int, float] = {}
    started = time.monotonic()
    give_up = started + 4 * TERM_GRACE_S
    while pids := [pid for pid in members() if process_running(pid)]:
        now = time.monotonic()
        profiles = _profiles_running(pids) if now < started + EOF_GRACE_S else set()
        fresh = [pid for pid in pids if pid not in termed and pid not in profiles]
        send(fresh, signal.SIGTERM)
        termed.update(dict.fromkeys(fresh, now))
        send([pid for pid in pids if now - termed.get(pid, now) >= TERM_GRACE_S or now >= give_up], signal.SIGKILL)
        if now >= give_up + TERM_GRACE_S:
            log.warning("processes of %s would not end: %s", sandbox_id, pids)  # (stuck in the kernel)
            return
        time.sleep(0.05)


def _profiles_running(pids: list[int]) -> set[int]:
    """Those of `pids` in the process group of a login shell (which the embedded server starts as a
    session leader) with more in it than the shell: the shell and what its profile runs."""
    groups: dict[int, list[int]] = {}
    for pid in pids:
        if stat := proc_stat(pid):
            groups.setdefault(int(stat[2]), []).append(pid)  # (state, ppid, pgrp, ...)
    return {pid for group, members in groups.items() if len(members) > 1 and _is_login_shell(group) for pid in members}


def _is_login_shell(pid: int) -> bool:
    """`SHELL -l`, as a session's shell runs, or `SHELL -l -c ...`, as tether's own shells start in
    a shell that is not sh-like (zsh, fish: see sandbox.shell.BOOT_COMMAND)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:2] == [b"-l"]
    except OSError:
        return False


def remove_tree(root: Path) -> None:
    """rm -rf, including what a command made read-only (Go's module cache is, for one): rmtree
    alone cannot empty a directory without write permission, and would leave the sandbox behind."""
    shutil.rmtree(root, ignore_errors=True)
    if not root.exists():
        return
    pending = [root]
    while pending:
        directory = pending.pop()
        with contextlib.suppress(OSError):
            directory.chmod(0o700)
            pending.extend(Path(e.path) for e in os.scandir(directory) if e.is_dir(follow_symlinks=False))
    try:
        shutil.rmtree(root)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ProviderError(f"could not remove the local sandbox's directory {root}: {exc}") from None


def _endpoint(handle: Handle, server: RunningServer) -> SSHEndpoint:
    return SSHEndpoint(
        host="127.0.0.1",
        port=server.port,
        user=_sandbox_id(handle),
        key_paths=(str(server.client_key),),
        use_agent=False,
        host_key=server.host_key,
        keepalive_interval=0,
    )


def _sandbox_id(handle: Handle) -> str:
    return Path(handle.data["dir"]).name
