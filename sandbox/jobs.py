"""Background jobs: detached (setsid) commands whose state lives in files on the box.

Each job has a directory ~/.tether/jobs/<id>/ with `meta.json` (command, cwd, start time), `pid`
(its process group, and when that process started: shell.PROC_STAMP_FN), `stdout`, `stderr`, once
it ended `exit`, and once its output was read `read` (how far, in bytes, per stream). Because all of
it is on the box, jobs survive tether disconnecting, re-dialing, or restarting, and a restarted
tether goes on where the last read ended.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import asyncssh

from .channels import CHANNEL_GONE, SFTPChannel, ShellPool
from .errors import ConnectionLost, FileNotFound, InvalidArgument, JobNotFound, SandboxError
from .executor import MAX_OUTPUT_CHARS, Executor, build_env, build_script, signal_name
from .files import file_kind
from .pathlocks import PathLocks
from .sftpio import read_upto
from .shell import KILL_TREE_FN, PROC_STAMP_FN, wire_bytes

log = logging.getLogger(__name__)

JobStatus = Literal["running", "exited"]

# `__t_stopjobs DIR` stops every job in a jobs directory that has not ended, with its whole tree,
# and what ended jobs left running in their groups. A job with an `exit` file has ended, and its pid
# may belong to another process by now: only a group still holding what it left (__t_leftof) is
# stopped, as is a running job's pid only while its start stamp is the job's (PROC_STAMP_FN); each
# job stopped here gets an `exit` file, so its pid is never trusted again. POSIX sh, for any box
# (and this machine).
STOP_JOBS_FN = (
    KILL_TREE_FN
    + "\n"
    + PROC_STAMP_FN
    + """
__t_stopjobs() {
  for d in "$1"/*/; do
    [ -f "$d/pid" ] || continue
    __r=; read -r __r 2>/dev/null <"$d/pid"
    if [ -f "$d/exit" ]; then
      __t_leftof "$d" "${__r%%:*}" && __t_killtree KILL "${__r%%:*}"
    else
      [ -n "$__r" ] && __t_ours "$__r" && __t_killtree KILL "$__p"
      printf '137\\n' >"$d/exit"
    fi
  done
}"""
)
STOP_ALL_JOBS = STOP_JOBS_FN + '\n__t_stopjobs "$1"'  # a script: $1 is the jobs directory
_JOB_ID = re.compile(r"j-[0-9a-f]{8}\Z")
_PID_FILE = re.compile(r"(\d+)(?::\d+)?\Z")
POLL_INTERVAL = 0.05
START_GRACE_SECONDS = 30.0  # a job with no pid this long after it was prepared never started
# Job directories read at once by `list`, four small files each: a box with hundreds of jobs must not
# run sftp-server out of descriptors (its limit is the process's, often 1024).
LIST_IN_FLIGHT = 64
SIGNAL_NUMBERS = {"HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "TERM": 15}  # the same on every POSIX box
OUTLIVED = ("STOP", "CONT", "USR1", "USR2")  # signals a job does not end by: job_kill waits for no end


@dataclass
class Job:
    id: str
    command: str
    cwd: str
    started_at: float
    status: JobStatus
    exit_code: int | None = None
    pid: int | None = None
    signal: str | None = None  # the last signal job_kill sent
    sent: bool = False  # (job_kill's answer only) whether that call signalled the job


@dataclass
class JobOutput:
    job_id: str
    stdout: str
    stderr: str
    status: JobStatus
    exit_code: int | None
    more: bool = False  # output remains beyond what this call returned (capped); call again


@dataclass
class _Cursor:
    """How far each stream has been read, in bytes; kept in the job's `read` file as "OUT ERR"."""

    stdout: int = 0
    stderr: int = 0
    # How far the last reads went, this process only: past the cursor by the bytes of a character
    # still incomplete, which are no reason to stop waiting for output, nor "more" to read.
    seen_stdout: int = 0
    seen_stderr: int = 0

    @classmethod
    def parse(cls, text: str | None) -> _Cursor:
        fields = (text or "").split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            return cls()  # none yet (or cut short by a crash): from the start
        return cls(int(fields[0]), int(fields[1]))

    def __str__(self) -> str:
        return f"{self.stdout} {self.stderr}\n"


@dataclass
class _Files:
    meta: dict[str, object] = field(default_factory=dict)
    exit_code: int | None = None
    signal: str | None = None
    process: str | None = None  # the pid file as written, "PID:STAMP" (PROC_STAMP_FN), for `alive`

    @property
    def pid(self) -> int | None:
        return int(self.process.split(":", 1)[0]) if self.process else None


def _pid_file(text: str | None) -> str | None:
    """The process as `alive` checks it ("PID" or "PID:STAMP") from a job's pid file."""
    match = _PID_FILE.match((text or "").strip())
    return match.group(0) if match else None


class Jobs:
    def __init__(self, executor: Executor, shells: ShellPool, sftp: SFTPChannel) -> None:
        self._executor = executor
        self._shells = shells
        self._sftp = sftp
        self._cursors: dict[str, _Cursor] = {}
        self._readers = PathLocks()
        self._saving: dict[str, asyncio.Task[None]] = {}  # job → its latest save of the read position

    async def _jobs_dir(self) -> str:
        return (await self._executor.info()).jobs_dir

    async def start(
        self, command: str, *, cwd: str, env: Mapping[str, str] | None = None, cwd_named: bool = False
    ) -> Job:
        """Start `command` in its own session; returns once it has a pid. A `cwd` the caller named
        (`cwd_named`) must be a directory, or nothing starts (as with `run`)."""
        script, exports = build_script(command), build_env(env)
        wire_bytes(cwd + script + exports)  # (refused before anything is made on the box)
        job_id = f"j-{secrets.token_hex(4)}"
        directory = f"{await self._jobs_dir()}/{job_id}"
        started = time.time()
        meta = {"command": command, "cwd": cwd, "started_at": started}

        async def prepare(sftp: asyncssh.SFTPClient) -> None:
            # (the named cwd is looked at in the same round trip as the job's directory is made)
            looked = sftp.stat(cwd) if cwd_named else asyncio.sleep(0)
            made, attrs = await asyncio.gather(_make_directory(sftp, directory), looked, return_exceptions=True)
            if isinstance(made, BaseException):
                raise made
            problem = _cwd_problem(cwd, attrs) if cwd_named else None
            if problem is not None:
                with contextlib.suppress(asyncssh.SFTPError):
                    await sftp.rmdir(directory)
                raise problem
            async with sftp.open(f"{directory}/meta.json", "w") as f:
                await f.write(json.dumps(meta))

        await self._sftp.once(prepare)
        async with self._shells.borrow() as shell:
            try:
                # (a session cwd removed since: the job runs where the login landed, as run does)
                fallback = "" if cwd_named else shell.info.start_dir
                reply = await shell.call("job", directory, cwd, script, exports, fallback)
            except CHANNEL_GONE as exc:
                raise ConnectionLost(f"connection lost while starting the job; check job_list ({exc})") from None
        self._cursors[job_id] = _Cursor()
        return Job(job_id, command, cwd, started, "running", pid=int(reply[0]))

    async def output(self, job_id: str, wait_ms: int = 0, max_chars: int = MAX_OUTPUT_CHARS) -> JobOutput:
        """New output since the previous call, waiting up to `wait_ms` for some when there is none.

        Each look costs one round of SFTP requests sent together (the exit file, the pid until it is
        known, both output sizes) and, while the job runs, one builtin-only call to a shell.
        """
        deadline = time.monotonic() + max(0, wait_ms) / 1000  # (from the call: the wait below counts)
        directory = await self._directory(job_id)
        # One reader at a time per job: two calls sent together would both read from the same
        # position and return the same output twice.
        async with self._readers.hold(directory):
            return await self._output(job_id, directory, deadline, max_chars)

    async def _output(self, job_id: str, directory: str, deadline: float, max_chars: int) -> JobOutput:
        cursor = self._cursors.setdefault(job_id, _Cursor())
        read_before = (cursor.stdout, cursor.stderr)
        process: str | None = None
        while True:
            exit_code, process, out_size, err_size = await self._sftp.retrying(
                lambda sftp, known=process: _look(sftp, directory, known)
            )
            if process is None:  # starting, unless that began long ago (the start failed or was cut off)
                running = exit_code is None and (await self.get(job_id)).status == "running"
            else:
                running = exit_code is None and bool(await self._alive([process]))
            if exit_code is None and not running:
                state = _Files()
                await self._settle(state, directory)  # it may have ended between the two looks
                exit_code = state.exit_code
            if not running:
                # The sizes went out in the same round as the exit file: read them again now that
                # the job is known to have ended, so its last output is in this answer.
                _, _, out_size, err_size = await self._sftp.retrying(
                    lambda sftp, known=process or "0": _look(sftp, directory, known)
                )
                break
            fresh = out_size > max(cursor.stdout, cursor.seen_stdout) or err_size > max(
                cursor.stderr, cursor.seen_stderr
            )
            if fresh or time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL_INTERVAL)
        # Both streams are read before the cursor moves: should one read fail, neither stream's
        # output is lost to the next call.
        (stdout, out_at, out_seen), (stderr, err_at, err_seen) = await asyncio.gather(
            self._read_from(f"{directory}/stdout", cursor.stdout, out_size, max_chars, ended=not running),
            self._read_from(f"{directory}/stderr", cursor.stderr, err_size, max_chars, ended=not running),
        )
        cursor.stdout, cursor.stderr = out_at, err_at
        cursor.seen_stdout, cursor.seen_stderr = out_seen, err_seen
        if (out_at, err_at) != read_before:
            self._save_soon(job_id, directory, str(cursor))
        return JobOutput(
            job_id,
            stdout,
            stderr,
            "running" if running else "exited",
            None if running else exit_code,
            out_seen < out_size or err_seen < err_size,
        )

    async def list(self) -> list[Job]:
        """Every job tether started on this box, newest first."""
        root = await self._jobs_dir()

        async def names(sftp: asyncssh.SFTPClient) -> list[str]:
            try:
                return [n for n in await sftp.listdir(root) if _JOB_ID.match(n)]
            except asyncssh.SFTPNoSuchFile:
                return []

        ids = await self._sftp.retrying(names)
        gate = asyncio.Semaphore(LIST_IN_FLIGHT)

        async def state_of(job_id: str) -> _Files:
            async with gate:
                return await self._read_state(f"{root}/{job_id}")

        states = await asyncio.gather(*(state_of(i) for i in ids))
        alive = await self._alive([s.process for s in states if s.exit_code is None])
        await asyncio.gather(
            *(
                self._settle(s, f"{root}/{i}")
                for i, s in zip(ids, states, strict=True)
                if s.exit_code is None and s.process and s.process not in alive
            )
        )
        jobs = [self._job(i, s, alive) for i, s in zip(ids, states, strict=True)]
        return sorted(jobs, key=lambda j: j.started_at, reverse=True)

    async def get(self, job_id: str) -> Job:
        directory = await self._directory(job_id)
        state = await self._read_state(directory)
        alive = await self._alive([state.process] if state.exit_code is None else [])
        if state.exit_code is None and state.process and state.process not in alive:
            await self._settle(state, directory)
        return self._job(job_id, state, alive)

    async def kill(self, job_id: str, signal: str = "TERM") -> Job:
        """Send `signal` to the job's process group and wait briefly for it to end; to a job that
        ended, what its command left running in its group (see shell._LEFT_FN), if anything."""
        signal = signal_name(signal)
        directory = await self._directory(job_id)
        state = await self._read_state(directory)
        deadline = time.monotonic() + 2
        while state.pid is None and self._job(job_id, state, set()).status == "running":
            if time.monotonic() > deadline:  # (started by another process a moment ago)
                raise SandboxError(f"{job_id} is still starting (it has no process yet); call job_kill again")
            await asyncio.sleep(POLL_INTERVAL)
            state = await self._read_state(directory)
        if state.pid is None:
            return self._job(job_id, state, set())  # it never started (or was cut off): nothing to signal
        if state.exit_code is not None:
            return await self._kill_left(job_id, directory, state, signal)
        # One call: the pid is checked to be still the job's (its wrapper may be gone without a
        # word, a reboot, the OOM killer, and the pid another process's by now), the signal
        # noted, and sent.
        assert state.process is not None
        async with self._shells.borrow() as shell:
            reply = await shell.call("jobkill", signal, state.process, f"{directory}/signal")
        if reply == ["gone"]:
            return await self.get(job_id)
        deadline = time.monotonic() + 2
        while True:
            job = await self.get(job_id)
            if job.status == "exited" or signal in OUTLIVED or time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL_INTERVAL)
        if job.status == "exited" and job.exit_code is None:
            # Killed too hard to record its own status (KILL): record it, so its pid, which
            # another process may get later, is never trusted again.
            await self._record_exit(directory, 128 + SIGNAL_NUMBERS.get(signal, 9))
            job = await self.get(job_id)
        job.sent = True
        return job

    async def _kill_left(self, job_id: str, directory: str, state: _Files, signal: str) -> Job:
        """A job that ended: signal what its command left running in its group (`server &`), if
        anything, and wait briefly for that to end."""
        assert state.pid is not None
        async with self._shells.borrow() as shell:
            reply = await shell.call("leftkill", signal, str(state.pid), directory)
        deadline = time.monotonic() + 2
        while reply == ["sent"] and signal not in OUTLIVED:
            if time.monotonic() >= deadline or not await self._alive([str(state.pid)]):
                break
            await asyncio.sleep(POLL_INTERVAL)
        job = await self.get(job_id)
        job.sent = reply == ["sent"]
        return job

    async def _record_exit(self, directory: str, code: int) -> None:
        async def write(sftp: asyncssh.SFTPClient) -> None:
            async with sftp.open(f"{directory}/exit", "w") as f:
                await f.write(f"{code}\n")

        await self._sftp.once(write)

    # -- internals -----------------------------------------------------------------------------------

    async def _directory(self, job_id: str) -> str:
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            raise JobNotFound(str(job_id))
        directory = f"{await self._jobs_dir()}/{job_id}"
        if job_id in self._cursors:
            return directory  # seen before: no need to ask the box again

        async def look(sftp: asyncssh.SFTPClient) -> tuple[bool, str | None]:
            return await asyncio.gather(sftp.exists(f"{directory}/meta.json"), _read_small(sftp, f"{directory}/read"))

        exists, read = await self._sftp.retrying(look)
        if not exists:
            raise JobNotFound(job_id)
        self._cursors.setdefault(job_id, _Cursor.parse(read))
        return directory

    def _save_soon(self, job_id: str, directory: str, position: str) -> None:
        """Keep how far the output was read on the box, for the next tether process that asks: in
        the background, off the reply's path (closing the sandbox waits for it), each save after
        the job's previous one so that an older position never lands last. Written in place (one
        small write); should it fail, a later reader starts from the last position saved."""
        previous = self._saving.get(job_id)

        async def save() -> None:
            if previous is not None:
                await asyncio.wait({previous})

            async def write(sftp: asyncssh.SFTPClient) -> None:
                f = await sftp.open(f"{directory}/read", "w")
                try:
                    await f.write(position)
                finally:
                    self._sftp.close_later(f)

            try:
                await self._sftp.once(write)
            except (SandboxError, asyncssh.Error, OSError) as exc:  # (a re-dial may fail in many ways)
                log.info("could not save the read position of %s: %s", directory, exc)

        self._saving[job_id] = self._sftp.in_background(save())

    async def _read_state(self, directory: str) -> _Files:
        async def read(sftp: asyncssh.SFTPClient) -> _Files:
            meta, pid, exit_code, signal = await asyncio.gather(
                *(_read_small(sftp, f"{directory}/{name}") for name in ("meta.json", "pid", "exit", "signal"))
            )
            files = _Files()
            try:
                files.meta = json.loads(meta) if meta else {}
            except ValueError:
                files.meta = {}
            files.process = _pid_file(pid)
            files.exit_code = int(exit_code) if exit_code and exit_code.strip().lstrip("-").isdigit() else None
            files.signal = signal.strip() or None if signal else None
            return files

        return await self._sftp.retrying(read)

    async def _running(self, state: _Files, directory: str) -> bool:
        if state.exit_code is not None:
            return False
        if state.pid is None:
            return True  # started a moment ago: the wrapper has not written its pid yet
        if await self._alive([state.process]):
            return False if await self._settle(state, directory) else True
        await self._settle(state, directory)
        return False

    async def _settle(self, state: _Files, directory: str) -> bool:
        """Re-read `exit` after finding the wrapper gone (it may have ended between the two reads).

        Returns whether an exit code is known now.
        """
        text = await self._sftp.retrying(lambda sftp: _read_small(sftp, f"{directory}/exit"))
        if text and text.strip().lstrip("-").isdigit():
            state.exit_code = int(text)
        return state.exit_code is not None

    async def _alive(self, processes: list[str | None]) -> set[str]:
        """Those of `processes` (pid files' contents) that still run as themselves. (Compared whole:
        two jobs may have had the same pid, one long gone.)"""
        wanted = [p for p in processes if p]
        if not wanted:
            return set()
        async with self._shells.borrow() as shell:
            reply = await shell.call("alive", *wanted)
        return {p for p in reply if p}

    def _job(self, job_id: str, state: _Files, alive: set[str]) -> Job:
        meta = state.meta
        started_at = float(meta.get("started_at", 0) or 0)  # type: ignore[arg-type]
        # No pid yet: starting, unless that began long ago (the start failed, or was cut off).
        starting = state.pid is None and time.time() - started_at < START_GRACE_SECONDS
        running = state.exit_code is None and (starting or state.process in alive)
        return Job(
            id=job_id,
            command=str(meta.get("command", "")),
            cwd=str(meta.get("cwd", "")),
            started_at=started_at,
            status="running" if running else "exited",
            exit_code=None if running else state.exit_code,
            pid=state.pid,
            signal=state.signal,
        )

    async def _read_from(self, path: str, offset: int, size: int, max_chars: int, ended: bool) -> tuple[str, int, int]:
        """Text from `offset` on, at most `max_chars` bytes (so at most that many characters), the
        offset the next read starts at, and the offset this one read up to.

        An incomplete UTF-8 sequence at the end stays unread until the next call, unless the job
        has ended and this read reaches the end of the stream (it never will be completed).
        """
        if size <= offset:
            return "", offset, offset

        async def read(sftp: asyncssh.SFTPClient) -> bytes:
            try:
                async with sftp.open(path, "rb") as f:
                    await f.seek(offset)
                    return await f.read(max_chars)
            except asyncssh.SFTPNoSuchFile:
                return b""

        data = await self._sftp.retrying(read)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(data, final=ended and offset + len(data) >= size)
        consumed = len(data) - len(decoder.getstate()[0])
        return text, offset + consumed, offset + len(data)


def _cwd_problem(cwd: str, looked: object) -> BaseException | None:
    """Why a job cannot start in `cwd`, from its stat (attributes, or the error): as `run` says it."""
    if isinstance(looked, asyncssh.SFTPNoSuchFile):
        return FileNotFound(cwd, "; the job did not start: create the directory, or pass an existing cwd")
    if isinstance(looked, BaseException):
        return looked
    if isinstance(looked, asyncssh.SFTPAttrs) and file_kind(looked) != "directory":
        return InvalidArgument(f"cwd {cwd} is not a directory; the job did not start")
    return None


async def _read_small(sftp: asyncssh.SFTPClient, path: str) -> str | None:
    try:
        f = await sftp.open(path, "rb")
    except asyncssh.SFTPNoSuchFile:
        return None
    try:
        return (await read_upto(f, 64 << 10)).decode("utf-8", "replace")
    finally:
        await f.close()


async def _look(
    sftp: asyncssh.SFTPClient, directory: str, process: str | None
) -> tuple[int | None, str | None, int, int]:
    """(exit code, the pid file's process, stdout size, stderr size) in one round of requests sent
    together; the pid file only while `process` is not known yet."""

    async def size(name: str) -> int:
        try:
            return (await sftp.stat(f"{directory}/{name}")).size or 0
        except asyncssh.SFTPNoSuchFile:
            return 0

    async def number(name: str) -> int | None:
        text = await _read_small(sftp, f"{directory}/{name}")
        return int(text) if text and text.strip().lstrip("-").isdigit() else None

    async def pid_file() -> str | None:
        return _pid_file(await _read_small(sftp, f"{directory}/pid"))

    exit_code, found, out, err = await asyncio.gather(
        number("exit"), pid_file() if process is None else asyncio.sleep(0, process), size("stdout"), size("stderr")
    )
    return exit_code, found, out, err


async def _make_directory(sftp: asyncssh.SFTPClient, path: str) -> None:
    """mkdir `path`, and its parents only should they be missing (the jobs directory is there
    after the first job: asyncssh's makedirs costs two round trips per component of the path)."""
    try:
        await sftp.mkdir(path)
    except asyncssh.SFTPNoSuchFile:
        await sftp.makedirs(path, exist_ok=True)
