"""The local provider's SSH endpoint: an embedded asyncssh server on 127.0.0.1.

It needs no sshd and no root. Host and client keys are generated once in the state dir; only the
client key is accepted (no passwords). The SSH user name is the sandbox id: sessions start in that
sandbox's work dir, run the user's login shell as this user, and SFTP's relative paths resolve there
too. Port forwards reach localhost only. The server runs on its own event loop in a thread, so
blocking SFTP disk I/O never stalls the process that uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import io
import json
import logging
import os
import pwd
import signal
import socket
import sys
import threading
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncssh

from sandbox.connect import streamline
from sandbox.forwarding import ClosingForwarder, forward_to
from sandbox.state import process_running, read_config, state_dir

from .config import CREDENTIAL_ENV
from .identity import generated_key, public_key_line, tether_key
from .ledger import SANDBOX_ID

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# At most, between the TERM and the KILL of what runs in a local sandbox that ends (a session's
# login shell left running, or everything in a sandbox being terminated).
TERM_GRACE_S = 1.0
# At most, between a session the client closed and a TERM to what it still runs: time for a login
# shell still reading its profile to finish it and exit on the end of its input.
EOF_GRACE_S = 2.0
# At most, between a session's command exiting and its exit status being sent while something it
# left running still holds its stdout or stderr open.
OUTPUT_GRACE_S = 1.0


def local_dir() -> Path:
    path = state_dir() / "local"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def sandbox_root(sandbox_id: str) -> Path:
    return local_dir() / "sandboxes" / sandbox_id


def work_dir(sandbox_id: str) -> Path:
    return sandbox_root(sandbox_id) / "work"


def host_key() -> Path:
    return generated_key(local_dir() / "host_ed25519", "tether local host")


def login_shell() -> str:
    shell = os.environ.get("SHELL") or pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    return shell if os.path.exists(shell) else "/bin/sh"


def secret_env_names() -> set[str]:
    """Variables holding tether's own credentials: they must not leak into the shells agents get.
    Provider keys, tether's (TETHER_*), and the ones config.toml names for channels and the relay."""
    return {n for group in CREDENTIAL_ENV.values() for n in group} | _configured_secret_names()


_config_secret_names: set[str] = set()  # every variable config.toml has named so far


def _configured_secret_names() -> set[str]:
    """The variables config.toml names as holding secrets, read at each session's start (an edit
    applies at once). Names are only ever added: a config broken mid-edit (not TOML, a section of
    the wrong shape) neither stops the shells nor lets through a secret that it held back before."""
    try:
        config = read_config()
    except (OSError, ValueError) as exc:
        log.warning("%s; sessions keep the secret variable names it gave before", exc)
        config = {}
    channels = config.get("channels")
    for section in [*(channels if isinstance(channels, list) else []), config.get("relay")]:
        if isinstance(section, dict):
            named = (section.get(key) for key in ("url_env", "secret_env"))
            _config_secret_names.update(name for name in named if isinstance(name, str))
    return set(_config_secret_names)


def session_env(sandbox_id: str) -> dict[str, str]:
    secret = secret_env_names()
    env = {k: v for k, v in os.environ.items() if k not in secret and not k.startswith("TETHER_")}
    user = pwd.getpwuid(os.getuid())
    env.update(
        HOME=user.pw_dir,
        USER=user.pw_name,
        LOGNAME=user.pw_name,
        SHELL=login_shell(),
        PWD=str(work_dir(sandbox_id)),
        TETHER_SANDBOX=sandbox_id,
    )
    return env


class _WorkdirSFTPServer(asyncssh.SFTPServer):
    """Relative paths resolve against the sandbox's work dir, as they would against an sshd's home."""

    def __init__(self, chan: asyncssh.SSHServerChannel, base: bytes) -> None:
        super().__init__(chan)
        self._base = base

    def map_path(self, path: bytes) -> bytes:
        return path if path.startswith(b"/") else os.path.join(self._base, path)

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        """All of `data`, or an error. (asyncssh's own write takes one os.write's word for it, and
        on a full disk that writes part, says so, and the rest was lost without a word.)"""
        f = cast(io.RawIOBase, file_obj)
        f.seek(offset)
        view, done = memoryview(data), 0
        while done < len(data):
            written = f.write(view[done:])
            if not written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += written
        return done


class _Server(asyncssh.SSHServer):
    def __init__(self, authorized: asyncssh.SSHAuthorizedKeys) -> None:
        self._authorized = authorized

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        streamline(conn)  # (fewer sends, no empty MSG_IGNOREs: as tether's own client does)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if not SANDBOX_ID.match(username) or not work_dir(username).is_dir():
            return False
        return self._authorized.validate(key, "127.0.0.1", "127.0.0.1") is not None

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool | Awaitable[ClosingForwarder]:
        if dest_host not in LOOPBACK:
            return False
        return forward_to(dest_host, dest_port)  # (asyncssh's own forwarding leaks half-closed pairs)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return listen_host in LOOPBACK


async def _run_session(process: asyncssh.SSHServerProcess[bytes]) -> None:
    if process.subsystem:  # (sftp has its own handler: any other name would get a login shell)
        process.stderr.write(f"tether: no subsystem {process.subsystem!r} here (only sftp)\n".encode())
        process.exit(1)
        return
    sandbox_id = process.get_extra_info("username")
    shell = login_shell()
    argv = [shell, "-l"] if process.command is None else [shell, "-c", process.command]
    try:
        child = await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(work_dir(sandbox_id)),
            env=session_env(sandbox_id),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        if not process.channel.is_closing():
            process.stderr.write(f"tether: cannot start {shell}: {exc}\n".encode())
            process.exit(127)
        return
    # The child's output is copied here rather than by asyncssh's redirect: asyncssh sends the
    # channel's EOF at the first pipe's EOF and lets exit() close the channel while the other pipe
    # is still being copied; its next write then raises ("Channel not open for sending"), and
    # asyncssh closes the whole connection (SFTP, shells, forwards) on a session task's error.
    output = asyncio.ensure_future(_deliver_output(child, process))
    exited = asyncio.ensure_future(child.wait())
    closed = asyncio.ensure_future(process.channel.wait_closed())  # (by the client)
    try:
        if process.channel.is_closing():
            # The client closed the session while the child started. asyncssh's redirect would
            # fail on the closed channel, and it closes the whole connection (SFTP, shells,
            # forwards) on a session task's error.
            return
        await process.redirect(stdin=child.stdin)
        await asyncio.wait([output, exited, closed], return_when=asyncio.FIRST_COMPLETED)
        if exited.done() and not output.done():
            # Everything the child wrote reaches the client before its exit status. (Something it
            # left running may hold its pipes open: sshd would wait for that forever; not us.)
            await asyncio.wait([output, closed], timeout=OUTPUT_GRACE_S, return_when=asyncio.FIRST_COMPLETED)
        elif output.done() and not exited.done():
            await asyncio.wait([exited, closed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (output, exited, closed):
            task.cancel()
        if child.returncode is None:  # the session ended first (the client closed it)
            ending = asyncio.ensure_future(_end_left_running(child))
            _ending.add(ending)
            ending.add_done_callback(_ending.discard)
    code = child.returncode
    if code is None:
        process.close()
    elif code < 0:
        process.exit_with_signal(_signal_name(-code))
    else:
        process.exit(code)
    with contextlib.suppress(Exception):
        await process.wait_closed()  # runs asyncssh's cleanup of the redirected stdin


async def _deliver_output(child: asyncio.subprocess.Process, process: asyncssh.SSHServerProcess[bytes]) -> None:
    await asyncio.gather(
        _deliver(cast(asyncio.StreamReader, child.stdout), process.stdout),
        _deliver(cast(asyncio.StreamReader, child.stderr), process.stderr),
    )


async def _deliver(pipe: asyncio.StreamReader, channel: asyncssh.SSHWriter[bytes]) -> None:
    """Copy one of the child's output pipes to the channel until the pipe's EOF, or until the
    channel takes no more (the client closed it): a late write must never raise out of the session."""
    while data := await pipe.read(1 << 16):
        try:
            channel.write(data)
            await channel.drain()  # (the client's window: a fast writer waits for a slow reader)
        except (OSError, asyncssh.Error):
            return


_ending: set[asyncio.Future[None]] = set()  # (the server's shutdown waits for them)


async def _end_left_running(child: asyncio.subprocess.Process) -> None:
    """End a session's child that outlived the session. First, as sshd does, the end of its input:
    a login shell still reading its profile finishes it and then exits. Interrupting a profile is
    not harmless: `pyenv rehash` takes a lock and only then sets the EXIT trap that releases it, and
    a signal in between leaves the lock for every later login shell to stall on. What still runs
    after a moment (an exec request's `sleep 100; echo`, a profile that hangs) gets TERM to its
    whole process group (tether's commands and jobs run in groups of their own), then KILL."""
    if child.stdin is not None:
        child.stdin.close()
    if await _exits_within(child, EOF_GRACE_S):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGTERM)
    if not await _exits_within(child, TERM_GRACE_S):
        with contextlib.suppress(ProcessLookupError):
            child.kill()


async def _exits_within(child: asyncio.subprocess.Process, seconds: float) -> bool:
    try:
        await asyncio.wait_for(child.wait(), seconds)
    except TimeoutError:
        return False
    return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name.removeprefix("SIG")
    except ValueError:
        return "KILL"


@dataclass
class RunningServer:
    port: int
    host_key: str  # OpenSSH public key line, for the endpoint's pinned key
    client_key: Path


def keep_environment_private() -> None:
    """Keep local sandboxes' shells (this process's, or a `tether host` daemon's: the same user)
    from reading its environment (tether's credentials, which session_env keeps out of theirs) in
    /proc/PID/environ, or its memory through ptrace: on
    Linux the process is made non-dumpable, which leaves those to root alone. (A local sandbox is
    not an isolation boundary: it runs as you. This closes the one-line way to what tether holds.)"""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


PR_SET_DUMPABLE = 4  # (linux/prctl.h)


class LocalSSHServer:
    """One embedded server, on a thread of its own."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self.running: RunningServer | None = None

    def start(self, port: int = 0) -> RunningServer:
        """Start listening (idempotent); returns where."""
        if self.running is not None:
            return self.running
        keep_environment_private()
        ready: asyncio.Future[RunningServer] | None = None
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            nonlocal ready
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self.running = loop.run_until_complete(self._listen(port))
            except BaseException as exc:  # report to the starting thread
                failure.append(exc)
                loop.close()
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=serve, name="tether-local-sshd", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._loop = self._thread = None
            raise failure[0]
        assert self.running is not None
        return self.running

    async def _listen(self, port: int) -> RunningServer:
        client = tether_key()
        authorized = asyncssh.import_authorized_keys(public_key_line(client) + "\n")
        key = host_key()
        self._acceptor = await asyncssh.listen(
            "127.0.0.1",
            port,
            server_factory=lambda: _Server(authorized),
            server_host_keys=[str(key)],
            process_factory=_run_session,
            sftp_factory=lambda chan: _WorkdirSFTPServer(
                chan, str(work_dir(chan.get_connection().get_extra_info("username"))).encode()
            ),
            encoding=None,
            password_auth=False,
            kbdint_auth=False,
            # (asyncssh offers Kerberos by default when python-gssapi and a keytab are there: tether's
            # key is the one way in)
            gss_host=None,
            gss_kex=False,
            gss_auth=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
            keepalive_interval=30,
        )
        bound = self._acceptor.sockets[0].getsockname()[1]
        return RunningServer(port=bound, host_key=public_key_line(key), client_key=client)

    async def _shutdown(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._acceptor.wait_closed(), 2)
        if _ending:  # (shells left to end: they are past their EOF soon after the sessions closed)
            await asyncio.wait(list(_ending), timeout=2)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop = self._thread = self._acceptor = None
        self.running = None


_in_process: LocalSSHServer | None = None
_lock = threading.Lock()


def host_state_path() -> Path:
    return local_dir() / "host.json"


def daemon_state() -> dict[str, Any] | None:
    """host.json, when the `tether host serve` daemon it describes runs on this machine and answers
    (a stale one, left by a daemon that died, does not count)."""
    try:
        state = json.loads(host_state_path().read_text())
        if not process_running(int(state["pid"])):
            return None
        with socket.create_connection(("127.0.0.1", int(state["port"])), timeout=0.5):
            pass
    except (OSError, ValueError, KeyError):
        return None
    return state  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Found:
    """Where local sandboxes were last found to be served, and what that rested on."""

    host_file: tuple[int, int, int] | None  # host.json's (inode, mtime, size) then; None: there was none
    daemon_pid: int | None  # the daemon's, when it was the daemon's server (None: this process's own)
    server: RunningServer


_found: _Found | None = None


def _host_file() -> tuple[int, int, int] | None:
    try:
        info = os.stat(host_state_path())
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def ensure_server() -> RunningServer:
    """The daemon's server if it runs and answers, else this process's own (started on first use)."""
    global _found, _in_process
    seen = _host_file()  # (before it is read: a change meanwhile is seen by the next known_server)
    state = daemon_state()
    if state is not None:
        server = RunningServer(port=int(state["port"]), host_key=state["host_key"], client_key=tether_key())
    else:
        with _lock:
            if _in_process is None:
                _in_process = LocalSSHServer()
            server = _in_process.start()
    _found = _Found(seen, int(state["pid"]) if state is not None else None, server)
    return server


def known_server() -> RunningServer | None:
    """The server ensure_server found last, while host.json is as it was then and the daemon it
    named still runs: a stat and a pid check, no connection (one that fails tells the rest). None
    when it must be looked for again."""
    found = _found
    if found is None or found.host_file != _host_file():
        return None
    if found.daemon_pid is not None and not process_running(found.daemon_pid):
        return None
    return found.server
