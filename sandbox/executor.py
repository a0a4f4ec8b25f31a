"""Running commands in a sandbox: cwd and env per call, timeouts, output caps, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
import shlex
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncssh

from .channels import CHANNEL_GONE, SFTPChannel, ShellPool
from .errors import CommandTimeout, ConnectionLost, FileNotFound, InvalidArgument, PermissionDenied
from .follow import OnOutput, OutputFollower
from .heldoutput import HeldOutput
from .sftpio import read_prefix, read_range
from .shell import KILL_TREE, Finished, PersistentShell, ShellDied, ShellInfo, Stream
from .tasks import task_group

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_OUTPUT_CHARS = 30_000
KILL_GRACE_SECONDS = 10
COUNT_TIMEOUT_S = 120.0  # wc -l of a large file (a reader waits for it: see window.py)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Names the shells hold read-only: an export of one fails inside the shell, and the variable is
# not set (bash: UID, EUID, PPID, SHELLOPTS, BASHOPTS, BASHPID, BASH_VERSINFO).
_READ_ONLY_NAMES = frozenset({"UID", "EUID", "PPID", "SHELLOPTS", "BASHOPTS", "BASHPID", "BASH_VERSINFO"})
SIGNALS = ("HUP", "INT", "QUIT", "KILL", "TERM", "USR1", "USR2", "CONT", "STOP")
_SIGNAL_NUMBERS = {"1": "HUP", "2": "INT", "3": "QUIT", "9": "KILL", "15": "TERM"}  # (the ones POSIX fixes)


def signal_name(signal: str) -> str:
    """A signal as `kill -NAME` wants it, from "TERM", "SIGTERM", "sigterm" or "15"."""
    name = signal.strip().upper() if isinstance(signal, str) else ""
    name = _SIGNAL_NUMBERS.get(name, name.removeprefix("SIG"))
    if name not in SIGNALS:
        raise InvalidArgument(f"unknown signal {signal!r}; use one of {', '.join(SIGNALS)}")
    return name


@dataclass
class RunResult:
    """What `run` returns. `stdout_path`/`stderr_path` name the remote file with the whole stream
    when it was cut to the cap."""

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    duration_ms: float
    cwd: str
    stdout_path: str | None = None
    stderr_path: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass
class RawResult:
    """`exec_raw`'s result: whole streams as bytes, for tether's own tools (grep, glob, jobs)."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool


def quote_word(text: str) -> str:
    """`text` as one single-quoted shell word, always. (shlex.quote leaves "safe" words bare, and
    zsh reads a bare `=ls` as the path of ls.)"""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def build_script(command: str | Sequence[str]) -> str:
    """The text the child evaluates.

    A string is shell code (it is what the agent asked to run). A sequence is an argv whose every
    element is quoted, so no part of it is ever interpreted by a shell.
    """
    if isinstance(command, str):
        text = command
    elif not isinstance(command, (list, tuple)):
        raise InvalidArgument(f"a command is shell code (str) or an argv (list of str), not {type(command).__name__}")
    else:
        if not command:
            raise InvalidArgument("empty command")
        text = " ".join(quote_word(str(part)) for part in command)
    if not text.strip():
        raise InvalidArgument("empty command")
    if "\0" in text:
        raise InvalidArgument("a command cannot contain NUL bytes")
    return text


def build_env(env: Mapping[str, str] | None) -> str:
    """`export NAME='value'` lines. They reach the command through the shell's memory or a private
    file, never through a process's arguments (which `ps` shows to every user of the box)."""
    exports = []
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise InvalidArgument(
                f"invalid environment variable name {name!r}: use letters, digits and '_', not starting with a digit"
            )
        if name in _READ_ONLY_NAMES:
            raise InvalidArgument(f"environment variable {name} is read-only in the sandbox's shell and cannot be set")
        if not isinstance(value, str):
            raise InvalidArgument(f"environment variable {name}'s value must be text (str), not {type(value).__name__}")
        if "\0" in value:
            raise InvalidArgument(f"environment variable {name} contains a NUL byte")
        exports.append(f"export {name}={quote_word(value)}")
    return "\n".join(exports)


def _raise_if_cwd_refused(cwd: str | None, finished: Finished, stderr: str) -> None:
    """A named `cwd` that is missing: the shell ran nothing and said why (see shell._NO_CWD)."""
    if not cwd or finished.exit_code != 125 or finished.cwd is not None:
        return
    if stderr == f"tether: cwd {cwd} does not exist\n":
        raise FileNotFound(cwd, "; the command did not run: create the directory, or pass an existing cwd")
    if stderr == f"tether: cwd {cwd} is not a directory\n":
        raise InvalidArgument(f"cwd {cwd} is not a directory; the command did not run")
    if stderr == f"tether: cwd {cwd} cannot be entered\n":
        raise PermissionDenied(cwd, " (a directory it may not enter); the command did not run")


def cap_text(data: bytes, max_chars: int, note: str = "") -> tuple[str, bool]:
    """Decode and keep the head and tail when longer than `max_chars` characters."""
    text = data.decode("utf-8", "replace")
    if len(text) <= max_chars:
        return text, False
    return _head_tail(text, text, len(data), max_chars, note), True


def _head_tail(head_source: str, tail_source: str, size: int, max_chars: int, note: str = "") -> str:
    """The head and tail of a stream, how many bytes of `size` lie between, and `note`: at most
    `max_chars` characters in all (the markers count too)."""
    widest_marker = len(f"\n… [{size} bytes not shown] …\n")
    half = max(0, (max_chars - widest_marker - len(note)) // 2)
    head, tail = head_source[:half], tail_source[-half:] if half else ""
    hidden = max(0, size - len(head.encode()) - len(tail.encode()))
    return f"{head}\n… [{hidden} bytes not shown] …\n{tail}{note}"


# At least this long (or the command's timeout, if longer) for a shell to report a command started.
START_BOUND_S = 10.0


class Executor:
    """Runs commands through a sandbox's shell pool; output files are read back over SFTP."""

    def __init__(self, shells: ShellPool, sftp: SFTPChannel) -> None:
        self._shells = shells
        self._sftp = sftp
        self.cwd: str | None = None
        self._cleanup: set[asyncio.Task[None]] = set()
        self._held_output: weakref.WeakKeyDictionary[PersistentShell, HeldOutput] = weakref.WeakKeyDictionary()

    # -- public --------------------------------------------------------------------------------------

    async def run(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 120.0,
        max_chars: int = MAX_OUTPUT_CHARS,
        keep_output: bool = False,
        on_output: OnOutput | None = None,
    ) -> RunResult:
        """Run a command; see `Sandbox.run`."""
        script, exports = build_script(command), build_env(env)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
        started = time.monotonic()
        async with self._shells.borrow(timeout) as shell:
            start_dir, fallback = self._start_dir(shell, cwd)
            command_id = secrets.token_hex(8)
            execute = functools.partial(self._execute, shell, command_id, start_dir, script, timeout, exports, fallback)
            if on_output is not None:
                finished, timed_out, stderr_head = await self._streaming(shell, execute, on_output)
                stdout = stderr = ""
                out_path = err_path = None
                said = stderr_head.decode("utf-8", "replace")
            else:
                finished, timed_out = await execute()
                # Read before the shell takes its next command: it empties these files first.
                kept = f"{shell.info.run_dir}/{command_id}"
                (stdout, out_path), (stderr, err_path) = await asyncio.gather(
                    self._collect(shell, finished, "stdout", max_chars, f"{kept}.o", keep_output),
                    self._collect(shell, finished, "stderr", max_chars, f"{kept}.e", keep_output),
                )
                said = stderr
        _raise_if_cwd_refused(cwd, finished, said)
        ended_in = finished.cwd or start_dir
        if cwd is not None or ended_in != start_dir:
            # (a command that stayed where it started says nothing of where the sandbox is: one
            # running beside it may have moved, and its cd must stand)
            self.cwd = ended_in
        return RunResult(
            exit_code=None if timed_out else finished.exit_code,
            stdout=stdout,
            stderr=stderr,
            timed_out=timed_out,
            truncated=not keep_output and bool(out_path or err_path),
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            cwd=ended_in,
            stdout_path=out_path,
            stderr_path=err_path,
        )

    async def _streaming(
        self,
        shell: PersistentShell,
        execute: Callable[[asyncio.Event], Awaitable[tuple[Finished, bool]]],
        on_output: OnOutput,
    ) -> tuple[Finished, bool, bytes]:
        """`execute` with its output handed to `on_output` as it comes, the rest once it ended; and
        the start of stderr. Should `on_output` fail (its reader went away), the command is stopped
        as on a cancel."""
        paths: dict[Stream, str] = {"stdout": shell.output_path("stdout"), "stderr": shell.output_path("stderr")}
        follower, began, ended = OutputFollower(self._sftp, paths, on_output), asyncio.Event(), asyncio.Event()
        try:
            async with task_group() as group:  # (one error at a time, as without the follower)
                group.create_task(follower.follow(began, ended))
                try:
                    finished, timed_out = await execute(began)
                finally:
                    ended.set()  # (a delivery under way is finished, not cut off)
            # Read before the shell takes its next command: it empties these files first.
            await follower.drain()
        finally:
            follower.release()
        return finished, timed_out, follower.stderr_head

    async def exec_raw(
        self, argv: Sequence[str], *, cwd: str | None = None, timeout: float = 120.0, max_bytes: int = 8 << 20
    ) -> RawResult:
        """Run an argv for tether itself; the session cwd is neither used nor changed unless `cwd` is None.

        The program replaces the command's shell (`exec`): one fork fewer, and the box's PATH
        binary runs even where the profile defines a function of that name."""
        script = "exec " + build_script(argv)
        async with self._shells.borrow(timeout) as shell:
            start_dir, fallback = self._start_dir(shell, cwd)
            finished, timed_out = await self._execute(
                shell, secrets.token_hex(8), start_dir, script, timeout, fallback=fallback
            )
            (stdout, cut), (stderr, _) = await asyncio.gather(
                self._read_head(shell, finished, "stdout", max_bytes),
                self._read_head(shell, finished, "stderr", 64 << 10),
            )
        _raise_if_cwd_refused(cwd, finished, stderr.decode("utf-8", "replace"))
        if timed_out:
            raise CommandTimeout(shlex.join(argv), timeout)
        return RawResult(finished.exit_code, stdout, stderr, cut)

    async def count_newlines(self, path: str) -> int:
        """The newlines in a file, counted on the box: a large file's line count without fetching
        it. Raises ValueError when `wc` gave no count."""
        raw = await self.exec_raw(["sh", "-c", 'exec wc -l < "$1"', "sh", path], cwd="/", timeout=COUNT_TIMEOUT_S)
        if raw.exit_code != 0:
            raise ValueError(f"wc -l exited {raw.exit_code}")
        return int(raw.stdout)  # (macOS pads it with spaces, which int() allows)

    async def signal_group(self, pid: int, signal: str = "KILL") -> None:
        """Send `signal` to the process group `pid` leads (and to `pid` itself, should it lead none)."""
        signal = signal_name(signal)
        # Through /bin/sh explicitly: the exec request is read by the login shell, which may be csh or fish.
        script = f"exec /bin/sh -c {shlex.quote(KILL_TREE)} sh {signal} {int(pid)}"
        slot = self._shells.try_borrow_idle()
        if slot is None:
            # Every shell is busy: one exec channel, whatever the user's shell start-up costs; or,
            # should the server have no session left for it, the first shell given back.
            slot = await self._shells.exec_or_idle(script)
            if slot is None:
                return
        healthy = False
        try:
            await slot.shell.call("kill", signal, str(int(pid)))
            healthy = True
        except CHANNEL_GONE:
            await self._shells.exec_once(script)
        finally:
            await self._shells.give_back(slot, healthy)

    async def info(self) -> ShellInfo:
        """What the shells learned about the box (starts one if none has yet)."""
        if self._shells.info is None:
            async with self._shells.borrow():
                pass
        assert self._shells.info is not None
        return self._shells.info

    async def close(self) -> None:
        if self._cleanup:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*self._cleanup, return_exceptions=True), 5)

    # -- internals -----------------------------------------------------------------------------------

    def _start_dir(self, shell: PersistentShell, cwd: str | None) -> tuple[str, str]:
        """Where the command starts, and where it runs should that be gone: a `cwd` the caller named
        (already absolute: the Sandbox resolved it) has no fallback, the command must not run
        elsewhere; where the last command ended falls back to where the login landed."""
        if cwd:
            return cwd, ""
        return self.cwd or shell.info.start_dir, shell.info.start_dir

    async def _execute(
        self,
        shell: PersistentShell,
        command_id: str,
        cwd: str,
        script: str,
        timeout: float,
        exports: str = "",
        fallback: str = "",
        began: asyncio.Event | None = None,
    ) -> tuple[Finished, bool]:
        pid: int | None = None
        try:
            # A start takes a round trip: one not reported in time means a connection that stopped
            # answering (keepalive may take a minute to say so), not a command that ran long.
            bound = max(timeout, START_BOUND_S)
            try:
                async with asyncio.timeout(bound):
                    pid = await shell.begin(command_id, cwd, script, exports, fallback)
            except TimeoutError:
                # It may start yet: then it is killed, before the discarded shell closes.
                shell.before_close = functools.partial(self._kill_when_started, shell, command_id)
                raise ConnectionLost(
                    f"the command was not even started within {bound:g}s: the box or the connection is not "
                    "answering; its shell was discarded (try again)"
                ) from None
            if began is not None:
                began.set()
            try:
                async with asyncio.timeout(timeout):
                    return await shell.finish(command_id), False
            except TimeoutError:
                await self.signal_group(pid, "KILL")
                try:
                    async with asyncio.timeout(KILL_GRACE_SECONDS):
                        return await shell.finish(command_id), True
                except TimeoutError:
                    # The shell never reported the end: give up on it (the borrow discards it).
                    raise ConnectionLost(
                        f"the command timed out and did not end within {KILL_GRACE_SECONDS}s of being killed "
                        f"(process {pid}); its shell was discarded"
                    ) from None
        except asyncio.CancelledError:
            # The caller gave up (an MCP cancel, a KeyboardInterrupt): the remote work must stop too.
            # The borrowed shell is discarded (its record would arrive late); a background task kills
            # the process group through another shell.
            if pid is not None:
                task = asyncio.get_running_loop().create_task(self._kill_quietly(pid))
                self._cleanup.add(task)
                task.add_done_callback(self._cleanup.discard)
            else:
                # Cancelled before the pid came back: the command may start all the same. Its shell
                # waits for the pid before it is closed (in the background), and the group is killed.
                shell.before_close = functools.partial(self._kill_when_started, shell, command_id)
            raise
        except CHANNEL_GONE as exc:
            if isinstance(exc, ShellDied) and shell.connection_alive:
                raise ConnectionLost(
                    "the shell running the command exited before it finished (did the command kill its "
                    "parent shell, e.g. `kill $$`?); the next command gets a fresh shell"
                ) from None
            raise ConnectionLost(
                f"connection lost while the command was running; it may have been cut short "
                f"or may still be running on the box ({exc})"
            ) from None

    async def _kill_when_started(self, shell: PersistentShell, command_id: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(KILL_GRACE_SECONDS):
                pid = await shell.started(command_id)
            await self._kill_quietly(pid)

    async def _kill_quietly(self, pid: int) -> None:
        try:
            await self.signal_group(pid, "KILL")
        except Exception as exc:  # the connection may be gone too; nothing else can be done from here
            log.warning("could not kill process group %d after cancellation: %s", pid, exc)

    async def _collect(
        self, shell: PersistentShell, finished: Finished, stream: Stream, max_chars: int, keep_as: str, keep: bool
    ) -> tuple[str, str | None]:
        """The stream's text capped to `max_chars` (head + tail). When it was cut (or `keep` asks for
        it unread), the whole stream is moved to `keep_as` (its path is returned) so the shell's next
        command cannot empty it."""
        path = shell.output_path(stream)
        if not finished.wrote(stream):
            return "", None
        if keep:
            if not await self._kept(path, keep_as):
                return "", None
            return "", keep_as

        async def read(f: asyncssh.SFTPClientFile) -> tuple[str, bool]:
            # One read decides: up to 4 × max_chars bytes (a character is at most 4) is enough.
            limit = 4 * max_chars
            note = f"\n[output cut to {max_chars} characters; the whole stream is in {keep_as}: read it in windows]"
            head, size = await read_prefix(f, limit + 1)
            if len(head) <= limit:
                return cap_text(head, max_chars, note)
            tail = await read_range(f, limit, max(size - limit, 0))
            return _head_tail(
                head.decode("utf-8", "replace"), tail.decode("utf-8", "replace"), size, max_chars, note
            ), True

        text, cut = await self._read_output(shell, finished.files_generation, path, read, ("", False))
        if not cut or not await self._kept(path, keep_as):
            return text, None
        return text, keep_as

    async def _kept(self, path: str, keep_as: str) -> bool:
        """Move a stream's file to `keep_as`; False when no path names it any more (the command
        removed tether's directory: what it wrote is read through the handle held open on it)."""
        try:
            await self._sftp.once(lambda sftp: sftp.posix_rename(path, keep_as))
        except asyncssh.SFTPNoSuchFile:
            return False
        return True

    async def _read_head(
        self, shell: PersistentShell, finished: Finished, stream: Stream, max_bytes: int
    ) -> tuple[bytes, bool]:
        if not finished.wrote(stream):
            return b"", False

        async def read(f: asyncssh.SFTPClientFile) -> tuple[bytes, bool]:
            data, _ = await read_prefix(f, max_bytes + 1)
            return data[:max_bytes], len(data) > max_bytes

        return await self._read_output(shell, finished.files_generation, shell.output_path(stream), read, (b"", False))

    async def _read_output(
        self,
        shell: PersistentShell,
        generation: int,
        path: str,
        read: Callable[[asyncssh.SFTPClientFile], Awaitable[T]],
        gone: T,
    ) -> T:
        """`read` applied to one of the shell's output files, through the handle held open for it;
        `gone` when there is none and no path names the file any more (the command removed
        tether's directory before this stream's handle was ever opened)."""
        held = self._held_output.get(shell)
        if held is None:
            held = self._held_output[shell] = HeldOutput(self._sftp, (shell.stdout_path, shell.stderr_path))
            shell.on_close.append(held.release)

        async def attempt(sftp: asyncssh.SFTPClient) -> T:
            try:
                f = await held.open(sftp, path, generation)
            except asyncssh.SFTPNoSuchFile:
                return gone
            try:
                return await read(f)
            except asyncssh.SFTPError:
                held.forget(path)  # a handle the server no longer honours: once more, opened anew
                return await read(await held.open(sftp, path, generation))

        return await self._sftp.retrying(attempt)
