"""`Sandbox`: everything an agent does on one machine, as coroutines over one SSH endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import posixpath
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncssh

from .channels import DEFAULT_IDLE_TIMEOUT, SFTPChannel, ShellPool
from .endpoint import SSHEndpoint
from .errors import ConnectionLost, FileNotFound, FileOperationError, InvalidArgument, SandboxEnded, edit_label
from .executor import MAX_OUTPUT_CHARS, Executor, RawResult, RunResult
from .files import Edit, EditResult, Files, FileStat, Image, ReadResult, WriteResult
from .follow import OnOutput
from .jobs import Job, JobOutput, Jobs
from .pool import ConnectionPool, Hold, default_pool
from .search import GlobResult, GrepResult, Search
from .shell import DEFAULT_TETHER_DIR, wire_bytes
from .transfer import Progress, Transfers
from .trees import TreeCopies, TreeCopy, contents_of


class Sandbox:
    """A machine reachable over SSH, and what an agent can do on it.

    Commands run in a small pool of persistent shells; files move over one SFTP channel; both share
    a pooled connection; channels unused for `idle_timeout` seconds are closed and reopened on the
    next use. Relative paths (and `cwd` arguments) are relative to the sandbox's current
    directory: where the last `run` ended, initially the login user's home.

    Use it as an async context manager, or call `close()`.
    """

    def __init__(
        self,
        endpoint: SSHEndpoint,
        *,
        pool: ConnectionPool | None = None,
        shells: int = 4,
        boot_timeout: float = 60.0,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        tether_dir: str = DEFAULT_TETHER_DIR,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.name = name or endpoint.display
        # Environment every command and job starts with (per-call env wins).
        self.env = dict(env or {})
        self._pool = pool
        self._options = _Options(shells, boot_timeout, idle_timeout, tether_dir)
        self.last_used = time.time()
        self._busy = 0  # long operations (commands, job waits, transfers) in flight
        self._operations: set[asyncio.Task[Any]] = set()  # the tasks running them
        self._ended: str | None = None  # why the machine ended under them (end_operations)
        self._ending: set[asyncio.Task[Any]] = set()  # those end_operations cancelled
        self._parts: _Parts | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    async def __aenter__(self) -> Sandbox:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection and the SFTP channel now (otherwise the first operation does).

        Raises: HostKeyMismatch, AuthFailed, ConnectTimeout, Unreachable.
        """
        await self._p.sftp.client()

    async def close(self) -> None:
        """Close this sandbox's shells and SFTP channel. Background jobs keep running on the box."""
        parts, self._parts = self._parts, None
        if parts is None:
            return
        await parts.executor.close()
        await parts.shells.close()
        await parts.sftp.close()

    async def move_to(self, endpoint: SSHEndpoint) -> None:
        """The machine is now reached at `endpoint` (its SSH server came back elsewhere): later
        operations go there. What was open on the old address is closed; jobs are on the box."""
        if endpoint == self.endpoint:
            return
        cwd = self._parts.executor.cwd if self._parts is not None else None
        self.endpoint = endpoint
        await self.close()
        self._p.executor.cwd = cwd  # (the same machine: the next command starts where the last ended)

    @property
    def busy(self) -> bool:
        """Whether a command, job wait or transfer is in flight: the sandbox is not idle, however
        long ago that operation started."""
        return self._busy > 0

    @contextlib.asynccontextmanager
    async def _in_flight(self) -> AsyncIterator[None]:
        if self._ended is not None:
            raise SandboxEnded(self.name, self._ended)
        task = asyncio.current_task()
        self._busy += 1
        if task is not None:
            self._operations.add(task)
        try:
            yield
        except asyncio.CancelledError:
            # Cancelled by end_operations alone (not by its caller too): the caller learns why.
            if task is not None and task in self._ending and task.uncancel() == 0:
                raise SandboxEnded(self.name, self._ended or "ended") from None
            raise
        except (ConnectionLost, FileOperationError) as exc:
            # A shell or connection that died under a command, or a transfer's file gone from under
            # it: say so if the machine was ended elsewhere (another process destroyed it), not
            # that the command killed its shell or that the path does not exist.
            why = await self.ended_elsewhere()
            if why is not None:
                raise SandboxEnded(self.name, why) from exc
            raise
        finally:
            self._busy -= 1
            self._operations.discard(task)  # type: ignore[arg-type]
            self._ending.discard(task)  # type: ignore[arg-type]
            self.last_used = time.time()

    async def ended_elsewhere(self) -> str | None:
        """Why the machine ended, when something other than this object ended it; None while it
        lives (or when nothing can tell: a plain Sandbox). Owners that keep records override it."""
        return None

    async def end_operations(self, why: str, grace: float = 10.0) -> None:
        """The machine is about to end (destroyed, expired): stop the commands, job waits and
        transfers in flight as a cancelled call would (a command's process group is killed), and
        have each raise SandboxEnded(why) to its caller. Waits up to `grace` seconds for them."""
        self._ended = why
        running = [t for t in self._operations if t is not asyncio.current_task() and not t.done()]
        self._ending.update(running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=grace)

    @property
    def _p(self) -> _Parts:
        # Every operation passes here: the moment of last use, for idle timeouts.
        self.last_used = time.time()
        if self._parts is None:
            self._parts = _Parts(self.endpoint, self._pool or default_pool(), self._options)
        return self._parts

    # -- paths ---------------------------------------------------------------------------------------

    async def home(self) -> str:
        """The login user's home directory on the box (what `~` means)."""
        return (await self._p.executor.info()).home

    async def cwd(self) -> str:
        """Where the next `run` starts, and what relative paths are relative to: where the last
        command ended, initially where the login lands (the home directory under OpenSSH)."""
        parts = self._p
        if parts.executor.cwd:
            return parts.executor.cwd
        # Where a login shell lands, which a profile may move (`cd ~/project`): SFTP's "." is the
        # home directory whatever the profile does, so the first relative path starts a shell.
        return (await parts.executor.info()).start_dir

    async def resolve(self, path: str) -> str:
        """An absolute remote path: `~` expanded, relative paths joined to `cwd()`."""
        if not isinstance(path, str) or not path:
            raise InvalidArgument("path must be a non-empty string")
        if "\0" in path:
            raise InvalidArgument("a path cannot contain NUL bytes")
        wire_bytes(path)  # (a lone surrogate: no name on the box has it)
        path = await self._expand_home(path)
        if not path.startswith("/"):
            path = posixpath.join(await self.cwd(), path)
        normalized = posixpath.normpath(path)
        # normpath turns '//x' into '//x' on POSIX; a single leading slash is what SFTP servers expect.
        return "/" + normalized.lstrip("/")

    async def _expand_home(self, path: str) -> str:
        """`~` and `~/…` as the home directory; anything else as it is."""
        return await self.home() + path[1:] if path == "~" or path.startswith("~/") else path

    async def resolve_file(self, path: str) -> str:
        """As `resolve`, for a path that must name a file: one ending in '/', '.' or '..' is refused
        (normalized away, `write("app/")` would otherwise create a file named `app`)."""
        if isinstance(path, str) and path and posixpath.basename(path) in ("", ".", ".."):
            raise InvalidArgument(
                f"{path!r} names a directory (it ends in '/', '.' or '..'); give a file's path (glob, pattern *, "
                f"path {path}, lists its files)"
            )
        return await self.resolve(path)

    # -- commands ------------------------------------------------------------------------------------

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
        """Run a command in a persistent shell and wait for it.

        `command` is shell code as a string, or an argv (each element quoted, never interpreted).
        It runs in its own process group with stdin from /dev/null. On timeout the whole group is
        killed and the output so far returned with `timed_out`; cancelling the coroutine kills it too.
        Each stream is capped at `max_chars` characters (head + tail); the whole stream then stays
        in the remote file named by `stdout_path`/`stderr_path`. The directory the command ends in
        becomes `cwd()`. A `cwd` given here must exist: otherwise nothing runs (FileNotFound, or
        InvalidArgument for a file); a saved cwd removed since falls back to where the login landed.
        With `keep_output`, neither stream is read back: both stay, as bytes, in the remote files
        named by `stdout_path`/`stderr_path` (empty streams: None), the caller's to read and remove.
        With `on_output`, both streams are handed to it as bytes while the command runs (every 50 to
        500 ms, the whole of each stream, uncapped) and the result's are empty. It may be a
        coroutine function (awaited before the next piece); should it raise, the command is
        stopped and the error raised here.

        Raises: ConnectionLost (the connection died while the command ran), InvalidArgument,
        FileNotFound, ShellsBusy.
        """
        merged = {**self.env, **(env or {})}
        where = await self.resolve(cwd) if cwd is not None else None
        async with self._in_flight():
            return await self._p.executor.run(
                command,
                cwd=where,
                env=merged,
                timeout=timeout,
                max_chars=max_chars,
                keep_output=keep_output,
                on_output=on_output,
            )

    async def exec_raw(
        self, argv: Sequence[str], *, cwd: str | None = None, timeout: float = 120.0, max_bytes: int = 8 << 20
    ) -> RawResult:
        """Run an argv for tether itself (probes, listings): whole streams as bytes, and the sandbox's
        cwd is left alone. argv[0] is a program on the box's PATH: it replaces the shell (`exec`), so
        shell builtins and functions are not found (exit code 127). Raises CommandTimeout (a TimeoutError) when it does
        not finish in time (it is killed)."""
        where = await self.resolve(cwd) if cwd else None
        async with self._in_flight():
            return await self._p.executor.exec_raw(argv, cwd=where, timeout=timeout, max_bytes=max_bytes)

    # -- files ---------------------------------------------------------------------------------------

    async def read(self, path: str, offset: int = 1, limit: int = 2000) -> ReadResult | Image:
        """Numbered lines `offset`..`offset+limit-1` of a text file, or an image's bytes.

        Raises: FileNotFound, IsADirectory, BinaryFile, FileTooLarge, PermissionDenied.
        """
        return await self._p.files.read(await self.resolve_file(path), offset, limit)

    async def read_text(self, path: str) -> str:
        """The whole file as text (UTF-8, undecodable bytes replaced)."""
        return (await self.read_bytes(path)).decode("utf-8", "replace")

    async def read_bytes(self, path: str) -> bytes:
        return await self._p.files.read_bytes(await self.resolve_file(path))

    async def write(self, path: str, content: str | bytes) -> WriteResult:
        """Create or atomically replace a file; parents are created and an existing mode kept."""
        return await self._p.files.write(await self.resolve_file(path), content)

    async def edit(self, path: str, old_string: str, new_string: str, replace_all: bool = False) -> EditResult:
        """Replace an exact, unique occurrence of `old_string` (every one with `replace_all`).

        Raises: NoMatch, NotUnique (with the matching line numbers), InvalidEdit, EditConflict,
        FileNotFound, BinaryFile.
        """
        return await self._p.files.edit(await self.resolve_file(path), old_string, new_string, replace_all)

    async def multi_edit(self, path: str, edits: Sequence[Edit | Mapping[str, Any]]) -> EditResult:
        """Apply several edits in order, all or nothing; errors name the failing edit's index."""
        parsed = [e if isinstance(e, Edit) else _edit_from(index, e) for index, e in enumerate(edits)]
        return await self._p.files.multi_edit(await self.resolve_file(path), parsed)

    async def stat(self, path: str) -> FileStat:
        return await self._p.files.stat(await self.resolve(path))

    async def exists(self, path: str) -> bool:
        return await self._p.files.exists(await self.resolve(path))

    async def list_dir(self, path: str = ".") -> list[FileStat]:
        return await self._p.files.list_dir(await self.resolve(path))

    async def remove(self, path: str) -> None:
        await self._p.files.remove(await self.resolve(path))

    async def makedirs(self, path: str) -> None:
        await self._p.files.makedirs(await self.resolve(path))

    # -- search --------------------------------------------------------------------------------------

    async def glob(self, pattern: str, path: str | None = None) -> GlobResult:
        """Files matching `pattern` under `path` (default: cwd), newest first, at most 100."""
        where = await self.resolve(path or ".")
        if isinstance(pattern, str):
            pattern = await self._expand_home(pattern)  # (as in any path: not a directory named '~')
        async with self._in_flight():  # (a search of a big tree is long work, as a command is)
            return await self._p.search.glob(pattern, where)

    async def grep(self, pattern: str, path: str | None = None, **options: Any) -> GrepResult:
        """Search file contents; see `Search.grep` for the options (ripgrep semantics)."""
        where = await self.resolve(path or ".")
        async with self._in_flight():
            return await self._p.search.grep(pattern, where, **options)

    # -- background jobs -----------------------------------------------------------------------------

    async def start_job(self, command: str, *, cwd: str | None = None, env: Mapping[str, str] | None = None) -> Job:
        """Start `command` detached (setsid), its output in files under ~/.tether/jobs/<id>/."""
        return await self._p.jobs.start(
            command,
            cwd=await self.resolve(cwd) if cwd else await self.cwd(),
            env={**self.env, **(env or {})},
            cwd_named=bool(cwd),
        )

    async def job_output(self, job_id: str, wait_ms: int = 0) -> JobOutput:
        """Output since the previous call, waiting up to `wait_ms` for more; status and exit code."""
        async with self._in_flight():
            return await self._p.jobs.output(job_id, wait_ms)

    async def job_list(self) -> list[Job]:
        return await self._p.jobs.list()

    async def job_kill(self, job_id: str, signal: str = "TERM") -> Job:
        return await self._p.jobs.kill(job_id, signal)

    # -- transfers -----------------------------------------------------------------------------------

    async def upload(self, local: str | Path, remote: str, progress: Progress | None = None) -> int:
        """Copy a local file to the box (pipelined SFTP, atomic rename at the end). Returns bytes sent.

        As with cp, a `remote` that is a directory, or ends in '/' (created when missing), gets the
        file under its own name; an empty `remote` means the current directory."""
        into = not remote or posixpath.basename(remote) in ("", ".", "..")
        where = await self.resolve(remote or ".")
        async with self._in_flight():
            return await self._p.transfers.upload(Path(local), where, progress, into_directory=into)

    async def download(
        self, remote: str, local: str | Path, progress: Progress | None = None, *, umask: int | None = None
    ) -> int:
        """Copy a file from the box (pipelined SFTP, atomic rename at the end). Returns bytes received.

        As with cp, a `local` that is a directory, or ends in '/' (created when missing), gets the
        file under its own name; a new file gets the remote one's mode less `umask` (None: this
        process's), a file copied over keeps its own."""
        where = await self.resolve(remote)
        into = str(local).endswith(("/", os.sep))
        async with self._in_flight():
            return await self._p.transfers.download(where, Path(local), progress, into_directory=into, umask=umask)

    async def upload_dir(self, local: str | Path, remote: str, progress: Progress | None = None) -> TreeCopy:
        """Copy a local directory to the box, as `cp -r` does: into `remote` when that is a directory
        already (under the local directory's name; a `local` ending in "/." puts what it holds
        there instead), else to `remote` itself (created). See sandbox/trees.py."""
        where = await self.resolve(remote or ".")
        if not contents_of(local):
            with contextlib.suppress(FileNotFound):
                if (await self.stat(where)).type == "directory":
                    where = posixpath.join(where, os.path.basename(os.path.abspath(local)))
        async with self._in_flight():
            return await self._p.trees.upload_tree(Path(local), where, progress)

    async def download_dir(
        self, remote: str, local: str | Path, progress: Progress | None = None, *, umask: int | None = None
    ) -> TreeCopy:
        """Copy a directory of the box here, as `cp -r` does: into `local` when that is a directory
        already (under the remote directory's name; a `remote` ending in "/." puts what it holds
        there instead), else to `local` itself (created). Modes as `download` gives them."""
        where = await self.resolve(remote or ".")
        target = Path(local)
        if target.is_dir() and not contents_of(remote or "."):
            target = target / (posixpath.basename(where.rstrip("/")) or "root")
        async with self._in_flight():
            return await self._p.trees.download_tree(where, target, progress, umask)

    # -- low level -----------------------------------------------------------------------------------

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The pooled connection, for port forwards (they don't count against the session budget)."""
        return await self._p.pool.connection(self.endpoint)

    async def hold_connection(self) -> Hold:
        """The pooled connection, kept open (not closed as idle) until the hold is released."""
        return await self._p.pool.hold(self.endpoint)

    async def signal_group(self, pid: int, signal: str = "KILL") -> None:
        await self._p.executor.signal_group(pid, signal)


def _edit_from(index: int, fields: Mapping[str, Any]) -> Edit:
    """An Edit from a mapping (as JSON gives it), or InvalidArgument naming what is wrong."""
    if not isinstance(fields, Mapping):
        raise InvalidArgument(
            f"{edit_label(index)}expected an Edit or a mapping with old_string and new_string, "
            f"not {type(fields).__name__}"
        )
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Edit)})
    missing = sorted({"old_string", "new_string"} - set(fields))
    if unknown or missing:
        problem = f"unknown keys {unknown}" if unknown else f"missing {missing}"
        raise InvalidArgument(f"{edit_label(index)}{problem}; each edit has old_string, new_string and replace_all")
    old, new, replace_all = fields["old_string"], fields["new_string"], fields.get("replace_all", False)
    if not (isinstance(old, str) and isinstance(new, str) and isinstance(replace_all, bool)):
        raise InvalidArgument(f"{edit_label(index)}old_string and new_string are text, replace_all true or false")
    return Edit(old, new, replace_all)


@dataclass(frozen=True)
class _Options:
    shells: int
    boot_timeout: float
    idle_timeout: float
    tether_dir: str


class _Parts:
    """The objects a connected sandbox is made of, created on first use."""

    def __init__(self, endpoint: SSHEndpoint, pool: ConnectionPool, options: _Options) -> None:
        self.pool = pool
        self.sftp = SFTPChannel(endpoint, pool, options.idle_timeout)
        self.shells = ShellPool(
            endpoint, pool, options.shells, options.boot_timeout, options.idle_timeout, options.tether_dir
        )
        self.executor = Executor(self.shells, self.sftp)
        self.files = Files(self.sftp, self.executor.count_newlines)
        self.search = Search(self.executor, self.files)
        self.jobs = Jobs(self.executor, self.shells, self.sftp)
        self.transfers = Transfers(self.sftp, self.files.temp_facts)
        self.trees = TreeCopies(self.transfers)
