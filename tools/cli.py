"""The `tether` command line: tables for people, `--json` for scripts.

Exit codes: 0 success; `exec` passes the remote command's through; 2 a tether error (the message says
what to do); 130 interrupted.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import fcntl
import functools
import logging
import math
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from providers import Fleet, Request, SandboxRecord
from providers import host as host_daemon
from providers.capacity import host_capacity
from providers.errors import ProviderError
from providers.fleet import ManagedSandbox, activity_flush_every, summary
from providers.local_server import keep_environment_private, local_dir, work_dir
from providers.registry import profile_of
from sandbox import Sandbox, SSHEndpoint
from sandbox.errors import FileNotFound, SandboxError, validation_problems
from sandbox.hostkeys import HostKeyPins
from sandbox.state import default_store, read_config, state_dir
from sandbox.transfer import Progress
from sandbox.trees import TreeCopy, contents_of
from tunnels import Notifier

from . import results as R
from . import tether_version
from .config import section_problems
from .links import ENDED_CHECK_SECONDS, close_tunnels_of_ended_sandboxes, fleet_notifier, preview_source, tunnel_manager
from .output import ClosedOutput, ProgressBar, duration, print_json, print_table, when

T = TypeVar("T")
# How long a command waits at its end for chat deliveries still in flight.
CLI_CHANNEL_WAIT_S = 2.0
Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return register


# Signals that end a command as Ctrl-C does: SIGTERM (a supervisor, `kill`) and SIGHUP (the terminal
# closed, the SSH session to this machine dropped), whose default action would end the process at
# once and leave what it started running, and billing, until a gc.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_stopped_by: list[signal.Signals] = []  # for the exit status: 128 + the signal, as a shell reports it


def stop_signals_cancel() -> None:
    """SIGTERM and SIGHUP end the running command as Ctrl-C does (asyncio.run turns SIGINT into
    cancelling the main task): what it started on a box is killed, its temporary files removed, the
    sandboxes it created and would tear down torn down."""
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()

    def stop(sig: signal.Signals) -> None:
        _stopped_by.append(sig)
        main_task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):  # (not the main thread: no handler)
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop, sig)


def with_fleet(work: Callable[[Fleet], Awaitable[T]]) -> T:
    """Run `work` on the command's fleet (see `command_fleet`), closing its connections (never
    tearing anything down) afterwards. Chat channels hear of the sandboxes it creates and
    terminates (up, attach, down, gc)."""
    return with_fleet_and_channels(lambda fleet, _: work(fleet))


def with_fleet_and_channels(work: Callable[[Fleet, Notifier], Awaitable[T]], fleet: Fleet | None = None) -> T:
    """As `with_fleet`, handing `work` the chat channels' notifier too (for its tunnels); on
    `fleet` when the command has made it already."""

    async def run() -> T:
        stop_signals_cancel()
        used = fleet or command_fleet()
        try:
            notifier = fleet_notifier(used)
        except ValueError:  # (a channel that cannot be read: none hears of this command's work)
            if _whole_config:
                raise
            notifier = Notifier([])  # (command_fleet has warned of it)
        try:
            return await work(used, notifier)
        finally:
            await used.close()
            # A person waits on this: a first attempt and a retry or two, not a dead channel's
            # whole backoff.
            await notifier.drain(CLI_CHANNEL_WAIT_S)

    return asyncio.run(run())


# The commands that refuse to run on a config.toml with a mistake in it: they make something new
# from it. (doctor reports the mistakes; the others work on sandboxes that exist.)
NEEDS_WHOLE_CONFIG = {"mcp", "up", "attach", "pools", "tunnel", "host"}
_whole_config = True  # whether the running command is one of them (set by main)


def command_fleet() -> Fleet:
    """The running command's fleet. For work on sandboxes that exist (ls, info, exec, cp, down,
    gc, …), a part of config.toml that cannot be read is left out, with a warning, not refused:
    machines that run, and cost, can always be used and torn down."""
    if _whole_config:
        return Fleet()
    fleet = Fleet(lenient=True)
    fleet.config_problems += section_problems(fleet.config)
    warn_config(fleet.config_problems)
    return fleet


def warn_config(problems: list[str]) -> None:
    for problem in problems:
        print(f"tether: warning: {problem} (left out; `tether doctor` checks the config)", file=sys.stderr)


def record_json(record: SandboxRecord, fleet: Fleet) -> dict[str, Any]:
    """A sandbox for scripts: the fields and formats of MCP's sandbox_list (ISO 8601 UTC times,
    the cost so far), plus its SSH endpoint as an object."""
    summary = R.SandboxSummary.of(record, fleet.cost_so_far(record)).model_dump(mode="json")
    return {**summary, "status_reason": record.status_reason, "ssh": R.SSHInfo.of(record).model_dump()}


def cost_text(record: SandboxRecord, fleet: Fleet) -> str:
    """`4m12s (per-second, ~$0.0021)`: final once it ended, else so far."""
    return R.Cost.of(fleet.cost_so_far(record)).text() + (" so far" if record.live else "")


def record_row(record: SandboxRecord) -> dict[str, Any]:
    """A sandbox for people: local times, `user@host:port`."""
    endpoint = record.endpoint or {}
    return {
        "id": record.id,
        "name": record.name,
        "provider": record.provider,
        "pool": record.pool,
        "status": record.status,
        "created_at": when(record.created_at),
        "expires_at": when(record.expires_at),
        "ssh": f"{endpoint.get('user')}@{endpoint.get('host')}:{endpoint.get('port')}" if endpoint else None,
    }


# -- the agent-facing server and the demo ---------------------------------------------------------------


@command("mcp")
def mcp_command(args: argparse.Namespace) -> int:
    from .http import resolve_token, serve_http
    from .server import ServerState, build_server
    from .stdio import serve_stdio

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr, format="tether: %(message)s"
    )
    http = args.transport == "http"
    token = resolve_token(args.host, args.generate_token, allowed_hosts=args.allow_host) if http else None
    if args.identity and not args.attach:
        raise ValueError("--identity is the key for --attach; give the host too")
    state = ServerState(
        provider=args.provider, attach=args.attach, identity=args.identity, reap_interval=args.reap_interval
    )
    server = build_server(state)
    if http:
        asyncio.run(serve_http(server, args.host, args.port, token, args.allow_host))
        return 0

    async def stdio() -> None:
        # SIGINT/SIGTERM/SIGHUP end the session like a closed stdin does: the lifespan tears down. Once the
        # teardown is under way, further signals are ignored: clients close stdin and send SIGTERM
        # a moment later, and cancelling then would leave machines running.
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        signalled = asyncio.Event()

        def stop() -> None:
            if state.stopping or signalled.is_set():
                with contextlib.suppress(OSError):  # (after SIGHUP the terminal may be gone)
                    print("tether mcp: stopping; tearing down the sandboxes it created", file=sys.stderr, flush=True)
                return
            signalled.set()
            task.cancel()

        for sig in (signal.SIGINT, *STOP_SIGNALS):
            loop.add_signal_handler(sig, stop)
        try:
            await serve_stdio(server)
        except asyncio.CancelledError:
            pass
        except BaseExceptionGroup as group:
            # Stopped as a request came in: the SDK's relay of it may then find its stream closed
            # (anyio's BrokenResourceError), which is the stop, not a failure to report.
            if not signalled.is_set() or group.split(_closed_stream)[1] is not None:
                raise

    asyncio.run(stdio())
    return 0


def _closed_stream(exc: BaseException) -> bool:
    import anyio

    return isinstance(exc, (anyio.BrokenResourceError, anyio.ClosedResourceError, asyncio.CancelledError))


@command("demo")
def demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    async def demo() -> int:
        stop_signals_cancel()
        return await run_demo()

    return asyncio.run(demo())


# -- sandboxes ------------------------------------------------------------------------------------------


# `tether up`'s options by the Request field each sets: an invalid value's error names the option.
UP_OPTIONS = {
    "pool": "--pool",
    "gpu": "--gpu",
    "cpu": "--cpu",
    "memory_mb": "--memory-mb",
    "timeout_s": "--ttl",
    "name": "--name",
}


@command("up")
def up_command(args: argparse.Namespace) -> int:
    try:
        request = Request(
            provider=args.provider,
            pool=args.pool,
            gpu=args.gpu,
            cpu=args.cpu,
            memory_mb=args.memory_mb,
            timeout_s=args.ttl,
            name=args.name,
            keep=True,
        )
    except ValidationError as exc:
        raise ValueError(f"invalid arguments: {validation_problems(exc, UP_OPTIONS)}; see `tether up --help`") from None

    async def up(fleet: Fleet) -> None:
        nonlocal request
        if not (request.pool or request.provider or request.gpu or fleet.defaults.says_where):
            # As `tether mcp` has it: this machine, never a cloud pool picked for a bare request.
            # (A GPU asked for is left to dispatch: it picks a pool that has one.)
            request = request.model_copy(update={"provider": "local"})

        async def progress(message: str, fraction: float | None = None) -> None:
            if not args.json:
                print(f"  {message}", file=sys.stderr)

        await print_created(await fleet.create(request, progress), fleet, args.json)

    with_fleet(up)
    return 0


async def print_created(box: ManagedSandbox, fleet: Fleet, as_json: bool) -> None:
    """What `up` and `attach` print: the id, or the sandbox as JSON (sandbox_create's shape, with
    the cost so far and status_reason as `ls --json` has them, and what of the request was not
    applied, which `up` otherwise says as it goes). Should it not get out (stdout closed, a full
    disk, a reader gone), the sandbox is ended: no one would know its id to end it."""
    record = box.record
    try:
        if as_json:
            capabilities = R.sandbox_capabilities(fleet, record)
            print_json({**record_json(record, fleet), "capabilities": capabilities, "notes": box.notes})
        else:
            print(record.id, flush=True)
    except OSError:
        await fleet.destroy(record.id, "its id could not be printed")
        raise


@command("attach")
def attach_command(args: argparse.Namespace) -> int:
    request = Request(
        provider="ssh",
        name=args.name,
        keep=True,
        options={"host": args.target, **({"key_path": args.identity} if args.identity else {})},
    )

    async def attach(fleet: Fleet) -> None:
        await print_created(await fleet.create(request), fleet, args.json)

    with_fleet(attach)
    return 0


@command("ls")
def ls_command(args: argparse.Namespace) -> int:
    fleet = command_fleet()
    records = fleet.list(include_terminated=args.all)
    if args.json:
        print_json([record_json(r, fleet) for r in records])
    else:
        rows = [{**record_row(r), "cost": cost_text(r, fleet)} for r in records]
        expired = [row for row, r in zip(rows, records, strict=True) if r.live and r.expired()]
        for row in expired:  # (it runs, and costs, until something ends it: say so)
            row["status"] += " (expired)"
        print_table(
            rows,
            ["id", "name", "provider", "pool", "status", "created_at", "expires_at", "cost"],
            empty="no sandboxes; create one with `tether up local`",
        )
        if expired:
            print("(expired: ended at its next use, by a running `tether mcp`, or by `tether gc`)", file=sys.stderr)
    return 0


@command("info")
def info_command(args: argparse.Namespace) -> int:
    async def info(fleet: Fleet) -> dict[str, Any]:
        record = fleet.record(args.id)
        box, unreachable = None, None
        if record.status == "running":
            try:
                box = await fleet.get(record.id)
            except (SandboxError, ProviderError) as exc:
                unreachable = str(exc)
            record = fleet.record(record.id)  # (as get found it: its endpoint now, or its end)
        try:
            capabilities = R.sandbox_capabilities(fleet, record)  # (MCP's shape, as sandbox_info's)
        except ProviderError as exc:  # (its provider's plugin gone from the config, say)
            capabilities, unreachable = None, unreachable or str(exc)
        row: dict[str, Any] = {
            **(record_json(record, fleet) if args.json else record_row(record)),
            "status_reason": record.status_reason,
            "external_id": record.external_id,
            "capabilities": capabilities,
        }
        if box is not None:
            try:
                jobs = await box.job_list()
            except (SandboxError, ProviderError) as exc:
                unreachable = str(exc)  # (what the ledger knows is shown all the same)
            else:
                row["jobs"] = [R.JobInfo.of(job).model_dump(mode="json") for job in jobs]
                if profile_of(record.provider).supports_capacity_query:
                    with contextlib.suppress(SandboxError, ProviderError):
                        row["capacity"] = (await box.capacity()).model_dump()
        if unreachable is not None:
            row["unreachable"] = unreachable
        fleet.ledger.close_abandoned_tunnels()
        # (MCP's shapes; a tunnel is held by whichever process opened it)
        row["tunnels"] = [R.TunnelResult.held_elsewhere(t).model_dump() for t in fleet.ledger.tunnels(record.id)]
        if not args.json:  # (the JSON has the cost, so far or final, in MCP's shape)
            row["cost"] = cost_text(record, fleet)
        return row

    row = with_fleet(info)
    if args.json:
        print_json(row)
        return 0
    if row.get("provider") == "local" and row.get("ssh") and row.get("status") == "running":
        # (the embedded server lives in whichever tether process serves the sandbox at the moment)
        row["ssh"] = f"{row['ssh']} while a tether process serves it (`tether ssh {row['id']}` works any time)"
    for key in ("id", "name", "provider", "pool", "status", "status_reason", "ssh", "created_at", "expires_at"):
        if row.get(key) is not None:
            print(f"{key + ':':15}{row[key]}")
    if row.get("unreachable"):
        print(f"{'unreachable:':15}{row['unreachable']} (its jobs and capacity are not known)")
    if "capacity" in row:
        c = row["capacity"]
        print(
            f"{'capacity:':15}{c['cpus']} CPUs, {c['memory_mb']} MiB, {c['disk_free_gb']} GiB free, "
            f"{len(c['gpus'])} GPU(s)"
        )
    for job in row.get("jobs", []):
        print(f"{'job:':15}{job['job_id']} {job['status']} {job['command']}")
    for tunnel in row["tunnels"]:
        print(f"{'tunnel:':15}{tunnel['tunnel_id']} port {tunnel['port']} -> {tunnel['url']}")
    if "cost" in row:
        print(f"{'cost:':15}{row['cost']}")
    return 0


@command("down")
def down_command(args: argparse.Namespace) -> int:
    async def down(fleet: Fleet) -> tuple[R.DestroyResult, bool]:
        event, ended = await fleet.end(args.id)
        return R.DestroyResult.of(fleet.ledger.get(event.sandbox_id), event), ended  # (MCP's)

    result, ended = with_fleet(down)
    if args.json:
        print_json(result.model_dump(mode="json"))
    else:
        print(result.text(already=not ended))
    return 0


@command("pause")
def pause_command(args: argparse.Namespace) -> int:
    return _pause_or_resume(args, "pause")


@command("resume")
def resume_command(args: argparse.Namespace) -> int:
    return _pause_or_resume(args, "resume")


def _pause_or_resume(args: argparse.Namespace, action: str) -> int:
    async def act(fleet: Fleet) -> SandboxRecord:
        await getattr(fleet, action)(args.id)
        return fleet.record(args.id)

    record = with_fleet(act)
    if args.json:
        print_json({"id": record.id, "name": record.name, "status": record.status})
    else:
        print(f"{action}d {record.name} ({record.id}): {record.status}")
    return 0


def _data_on_stdin() -> bool:
    """Whether data was piped or redirected in (`echo x | tether exec …`): it would go nowhere."""
    try:
        info = os.fstat(sys.stdin.fileno())
        if stat.S_ISREG(info.st_mode):
            return info.st_size > 0
        if not stat.S_ISFIFO(info.st_mode):
            return False  # (a terminal, /dev/null)
        waiting = array.array("i", [0])  # (bytes in the pipe now: a pipe at its end has none)
        fcntl.ioctl(sys.stdin.fileno(), termios.FIONREAD, waiting)
        return waiting[0] > 0
    except (OSError, ValueError):  # (no stdin at all)
        return False


@command("exec")
def exec_command(args: argparse.Namespace) -> int:
    # `tether exec ID --timeout 5 -- CMD`: options after ID land in the remainder; take them out.
    # Without a `--` (see main) what is left is the command, which then cannot start with a dash.
    rest = list(args.cmd)
    while rest and rest[0].startswith("--timeout"):
        flag = rest.pop(0)
        value = flag.partition("=")[2] if "=" in flag else (rest.pop(0) if rest else "")
        args.timeout = seconds(value)
    if rest and rest[0].startswith("-"):
        raise ValueError(f"tether exec has no option {rest[0]} (only --timeout); the command goes after --")
    if rest and args.after_dashes is not None:
        raise ValueError(f"{rest[0]!r} before --: the whole command goes after it, `tether exec ID -- CMD...`")
    argv = rest if args.after_dashes is None else args.after_dashes
    if not argv:
        raise ValueError("nothing to run: `tether exec ID -- CMD...`")
    # One word is shell code ('make && ./run'); several are an argv, each word quoted.
    command_text: str | list[str] = argv[0] if len(argv) == 1 else argv
    if _data_on_stdin():
        print("tether: exec's command reads /dev/null, not this stdin; copy data in with `tether cp`", file=sys.stderr)

    async def execute(fleet: Fleet) -> int:
        box = await fleet.get(args.id)
        # No longer than the sandbox's TTL allows: then it ends, command and all (no reaper runs here).
        expires_at = fleet.record(box.id).expires_at
        ttl_left = expires_at - time.time() if expires_at is not None else math.inf
        # Byte for byte, as it comes (`tether exec ID -- make`, `… -- cat image.png > copy.png`).
        limit = max(min(args.timeout, ttl_left), 0.001)
        result = await box.run(command_text, timeout=limit, on_output=write_raw)
        if result.timed_out and limit < args.timeout:
            await fleet.get(box.id)  # (which ends it, its TTL having run out, and says so)
        if result.timed_out:
            print(f"tether: timed out after {limit:g}s; the process group was killed", file=sys.stderr)
            return 124
        return result.exit_code or 0

    return with_fleet(execute)


async def write_raw(stream: str, data: bytes) -> None:
    """Part of a remote command's output, passed on unchanged to ours. In a thread: a reader that
    is slow to take it (`| less`) holds up the next piece, not timeouts, keepalives and signals."""
    out = sys.stdout if stream == "stdout" else sys.stderr

    def write() -> None:
        out.flush()  # (whatever was printed as text goes first)
        out.buffer.write(data)
        out.buffer.flush()

    await asyncio.to_thread(write)


@command("ssh")
def ssh_command(args: argparse.Namespace) -> int:
    fleet = command_fleet()
    record = fleet.record(args.id)
    if record.status == "running" and record.expired():
        # (ends it, as any use would: SandboxGone says so)
        with_fleet_and_channels(lambda used, _: used.get(record.id), fleet)
    if record.status != "running":
        raise ValueError(f"sandbox {args.id} is {record.status}")
    if record.provider == "local":
        # The local provider is this machine: a login shell in the sandbox's work dir is the real thing.
        shell = os.environ.get("SHELL") or "/bin/sh"
        if args.print:
            print(f"cd {shlex.quote(str(work_dir(record.id)))} && TETHER_SANDBOX={record.id} {shell} -l")
            return 0
        print(f"tether: shell in {work_dir(record.id)} (exit to leave)", file=sys.stderr)
        argv, cwd, env = [shell, "-l"], work_dir(record.id), {**os.environ, "TETHER_SANDBOX": record.id}
    else:
        if unpinned(record):
            # A host tether never dialed, or whose pin `forget-host` dropped: dialed through tether
            # first, which pins its key on first use (OpenSSH is told to trust no other).
            with_fleet(lambda fleet: _dial(fleet, record.id))
        argv, cwd, env = ssh_argv(record), None, None
        if args.print or not shutil.which("ssh"):
            print(shlex.join(argv))
            return 0
    return run_as_activity(fleet, record, argv, cwd, env)


def run_as_activity(
    fleet: Fleet, record: SandboxRecord, argv: list[str], cwd: Path | None, env: dict[str, str] | None
) -> int:
    """Run a person's session (a shell, ssh) in the foreground until it ends; its exit code. While
    it is open the sandbox is in use: its last activity is written on, as a command's is, so that
    no reaper takes it for idle. (Ctrl-C and Ctrl-Z are the session's: not this process's.)"""
    every = activity_flush_every(record.idle_timeout)
    ended = threading.Event()

    def beat() -> None:
        while not ended.wait(every):
            with contextlib.suppress(Exception):  # (a locked database: the next beat)
                fleet.ledger.touch(record.id)

    fleet.ledger.touch(record.id)
    session = subprocess.Popen(argv, cwd=cwd, env=env)
    # (ignored here only once it runs: a child would inherit the ignoring, and pass it on to
    # every command run in the shell)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=beat, daemon=True).start()
    try:
        return session.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
        ended.set()


async def _dial(fleet: Fleet, sandbox_id: str) -> None:
    await (await fleet.get(sandbox_id)).connection()


def _hops(record: SandboxRecord) -> list[dict[str, Any]]:
    """The attached host's address data, and each of its ProxyJump hops'."""
    data = (record.handle or {}).get("data", {})
    return [data, *data.get("jump", [])]


def _pinned_keys(record: SandboxRecord, pins: HostKeyPins | None) -> list[tuple[dict[str, Any], str | None]]:
    """Each hop of an attached sandbox's path (see _hops), with the host key tether pinned for it."""
    pins = pins or HostKeyPins(default_store())
    return [(hop, pins.get(hop["host"], int(hop["port"]))) for hop in _hops(record)]


def unpinned(record: SandboxRecord, pins: HostKeyPins | None = None) -> list[str]:
    """The hosts (host:port) of an attached sandbox's path that tether has no host key pinned for."""
    return _without_keys(_pinned_keys(record, pins))


def _without_keys(keys: list[tuple[dict[str, Any], str | None]]) -> list[str]:
    return [f"{hop['host']}:{hop['port']}" for hop, key in keys if key is None]


def ssh_argv(record: SandboxRecord, pins: HostKeyPins | None = None) -> list[str]:
    """An OpenSSH command line for an attached host that verifies the host keys tether pinned, its
    ProxyJump hops' included, and accepts no other. (OpenSSH's own -J passes none of -o and -i to
    the ssh it runs for a hop, which would check the hop against ~/.ssh/known_hosts instead: each
    hop is an explicit ProxyCommand with the same options.) A host with no pin is refused: OpenSSH
    would leave its key to the user's own settings (accept-new takes any)."""
    data = (record.handle or {}).get("data", {})
    known = state_dir() / "known_hosts" / record.id  # 0700 state dir, not a predictable name in /tmp
    keys = _pinned_keys(record, pins)
    if missing := _without_keys(keys):
        raise ValueError(
            f"tether has no host key pinned for {', '.join(missing)}; reach the sandbox through tether once "
            f"(`tether exec {record.id} -- true` pins it on first use), then run tether ssh again"
        )
    lines = []
    for where, key in keys:
        port = int(where["port"])
        host_field = where["host"] if port == 22 else f"[{where['host']}]:{port}"
        lines.append(f"{host_field} {key}\n")
    known.parent.mkdir(mode=0o700, exist_ok=True)
    known.write_text("".join(lines))
    checks = [
        *("-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null"),
        *("-o", "StrictHostKeyChecking=yes"),
    ]

    def reach(where: dict[str, Any]) -> list[str]:
        argv = ["-p", str(where["port"]), *checks]
        for key in where.get("key_paths", []):
            argv += ["-i", key]
        return argv + (["-l", where["user"]] if where.get("user") else [])

    def through(hops: list[dict[str, Any]], host: str, port: int) -> list[str]:
        """-o ProxyCommand reaching host:port through `hops` (outermost first), or nothing."""
        if not hops:
            return []
        hop = hops[-1]
        inner = through(hops[:-1], hop["host"], int(hop["port"]))
        command = shlex.join(["ssh", *reach(hop), *inner, "-W", f"[{host}]:{port}", "--", hop["host"]])
        return ["-o", "ProxyCommand=" + command.replace("%", "%%")]  # (ssh expands % tokens once)

    return ["ssh", *reach(data), *through(data.get("jump", []), data["host"], int(data["port"])), "--", data["host"]]


Location = tuple[str | None, str]  # (sandbox id or None for this machine, path)


@command("cp")
def cp_command(args: argparse.Namespace) -> int:
    source, target = _split_location(args.src), _split_location(args.dst)
    if source[0] is None and target[0] is None:
        raise ValueError("one side must be in a sandbox: ID:path")
    if (None, "") in (source, target):
        raise ValueError("an empty path names no file (cp refuses it too); for this directory give .")
    if (None, "-") in (source, target):  # (scp has no '-' either; a file of that name would surprise)
        raise ValueError(
            "tether cp copies files, not standard input or output: for a stream use "
            "`tether exec ID -- cat PATH`; for a file named '-' write ./-"
        )

    async def transfer(fleet: Fleet) -> TreeCopy:
        bar = ProgressBar(f"{args.src} -> {args.dst}", enabled=sys.stderr.isatty() and not args.json)
        try:
            whole = args.recursive and await _is_directory(fleet, *source)
            if whole and source[0] is not None and source[0] == target[0]:
                await _refuse_copy_into_itself(await fleet.get(source[0]), source, target)
            if source[0] and target[0]:  # sandbox to sandbox, through this machine
                # Staged into a private directory, as a copy into a directory goes (under the
                # source's name, or what `dir/.` holds), with no umask: the modes arrive as they left.
                with tempfile.TemporaryDirectory() as scratch:
                    staging = (None, f"{scratch}/")
                    await _copy(fleet, source, staging, whole, lambda d, t: bar.update(d, 2 * t), umask=0)
                    if whole and contents_of(source[1] or "."):
                        staged = f"{scratch}/."  # (what it holds, as from the source)
                    else:
                        [staged] = map(str, Path(scratch).iterdir())  # (the source, under its name)
                    return await _copy(fleet, (None, staged), target, whole, lambda d, t: bar.update(t + d, 2 * t))
            return await _copy(fleet, source, target, whole, bar.update)
        finally:
            bar.close()

    copy = with_fleet(transfer)
    if args.json:
        print_json({"bytes": copy.bytes, "files": copy.files, "skipped": copy.skipped})
    else:
        print(f"copied {copy.bytes} bytes" + (f" in {copy.files} files" if copy.files != 1 else ""))
        for skipped in copy.skipped:
            print(f"  skipped {skipped}", file=sys.stderr)
    return 0


async def _refuse_copy_into_itself(box: Sandbox, source: Location, target: Location) -> None:
    """As cp -r: a directory is not copied into itself (the copy would hold a copy of the tree)."""
    directory = (await box.resolve(source[1])).rstrip("/") + "/"
    if ((await box.resolve(target[1])).rstrip("/") + "/").startswith(directory):
        raise ValueError(f"cannot copy a directory, {source[1]}, into itself, {target[1]} (cp -r refuses it too)")


async def _is_directory(fleet: Fleet, sandbox: str | None, path: str) -> bool:
    if sandbox is None:
        return Path(path).is_dir()
    try:
        return (await (await fleet.get(sandbox)).stat(path)).type == "directory"
    except FileNotFound:
        return False  # (the copy says so)


async def _copy(
    fleet: Fleet,
    source: Location,
    target: Location,
    whole: bool,
    progress: Progress,
    umask: int | None = None,
) -> TreeCopy:
    """One copy between this machine and a sandbox: a file, or (`whole`) a directory as cp -r.
    `umask`: what new files here lose of their modes (None: this process's umask)."""
    if source[0] is not None:
        box = await fleet.get(source[0])
        if whole:
            return await box.download_dir(source[1], target[1], progress, umask=umask)
        return TreeCopy(1, await box.download(source[1], target[1], progress, umask=umask))  # ('dir/' kept)
    assert target[0] is not None
    box = await fleet.get(target[0])
    if whole:
        return await box.upload_dir(source[1], target[1], progress)
    return TreeCopy(1, await box.upload(Path(source[1]), target[1], progress))


def _split_location(text: str) -> Location:
    """'ID:path' -> (ID, path); a local path (even one with ':' after a '/') -> (None, path)."""
    head, sep, tail = text.partition(":")
    if sep and head and "/" not in head and not Path(text).exists():
        return head, tail or "."
    return None, text


@command("tunnel")
def tunnel_command(args: argparse.Namespace) -> int:
    """Open a tunnel, print its URL, keep it open until Ctrl-C (or SIGTERM, SIGHUP)."""

    async def hold(fleet: Fleet, notifier: Notifier) -> int:
        tunnels = tunnel_manager(fleet, notifier)
        box = await fleet.get(args.id)
        if not args.json:  # (a port that does not speak HTTP is only known once the check gives up)
            print(f"opening port {args.port} of {box.name}; checking that it answers HTTP", file=sys.stderr, flush=True)
        tunnel = await tunnels.open(
            box,
            args.port,
            args.backend,
            args.path,
            preview=preview_source(fleet, box.id),
            sandbox=summary(box.record),  # (as channels hear of the sandbox's own events)
        )
        if args.json:
            print_json(tunnel.public())
        else:
            headers = "".join(f"\n  header {k}: {v}" for k, v in tunnel.headers.items())
            print(f"{tunnel.url}{headers}", flush=True)
            print("(Ctrl-C closes the tunnel)", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, *STOP_SIGNALS):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ENDED_CHECK_SECONDS)
            if await close_tunnels_of_ended_sandboxes(fleet, tunnels):
                why = fleet.ledger.get(box.id).status_reason
                why = f" ({why})" if why else ""
                print(f"sandbox {box.name} ({box.id}) ended{why}; tunnel closed", file=sys.stderr)
                return 1
        await tunnels.close_all()
        print("tunnel closed", file=sys.stderr)
        return 0

    return with_fleet_and_channels(hold)


@command("doctor")
def doctor_command(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    checks = asyncio.run(run_doctor())
    if args.json:
        print_json([c.__dict__ for c in checks])
    else:
        for check in checks:
            mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[check.status]
            print(f"[{mark}] {check.name}: {check.detail}")
    return 1 if any(c.status == "fail" for c in checks) else 0


# -- pools, gc, costs, host keys -------------------------------------------------------------------------


@command("pools")
def pools_command(args: argparse.Namespace) -> int:
    fleet = Fleet()
    rows = [R.PoolInfo.of(pool, fleet).model_dump(mode="json") for pool in fleet.pools]  # (as pools_list)
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            row["available"] = row.pop("unavailable_reason") or "yes"
        print_table(rows, ["name", "provider", "active", "available", "requirement_kinds"])
    return 0


@command("gc")
def gc_command(args: argparse.Namespace) -> int:
    report = with_fleet(lambda fleet: fleet.gc())
    if args.json:
        print_json(report.__dict__)
    else:
        for sandbox_id, reason in report.reaped:
            print(f"reaped {sandbox_id}: {reason}")
        for name in report.orphans:
            print(f"terminated orphan {name}")
        for sandbox_id in report.interrupted:
            print(f"cleaned up interrupted provisioning {sandbox_id}")
        for sandbox_id in report.vanished:
            print(f"marked vanished {sandbox_id}")
        for tunnel_id in report.tunnels_closed:
            print(f"closed the record of tunnel {tunnel_id} (its process is gone)")
        for error in report.errors:
            print(f"error: {error}", file=sys.stderr)
        if not any(report.__dict__.values()):
            print("nothing to collect")
    return 1 if report.errors else 0


@command("costs")
def costs_command(args: argparse.Namespace) -> int:
    rows = []
    for record, event in command_fleet().costs():
        rows.append(
            {
                "id": record.id,
                "name": record.name,
                "provider": record.provider,
                "pool": record.pool,
                # for scripts ISO 8601 UTC, as everywhere in --json; for people the local time
                "terminated": R.iso(event.created_at) if args.json else when(event.created_at),
                # the cost's fields and values as `down --json` and MCP give them (not rounded)
                **R.Cost.of(event).model_dump(mode="json"),
            }
        )
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        row["duration"] = duration(row["seconds"])
    print_table(
        rows,
        ["id", "name", "provider", "terminated", "duration", "gpu_seconds", "billing_model", "estimated_usd"],
        empty="no cost events yet",
    )
    known = [r["estimated_usd"] for r in rows if r["estimated_usd"] is not None]
    if rows:
        print(
            f"total: {duration(sum(r['seconds'] for r in rows))} sandbox time, "
            f"{sum(r['gpu_seconds'] for r in rows):.0f} GPU-seconds, ~${sum(known):.2f} estimated"
            + (" (some providers have no known rate)" if len(known) < len(rows) else "")
        )
    return 0


@command("forget-host")
def forget_host_command(args: argparse.Namespace) -> int:
    host, port = _host_and_port(args.target)
    pins = HostKeyPins(default_store())
    if pins.forget(host, port):
        print(f"forgot the pinned host key of {host}:{port}; the next connection pins the key it presents")
        return 0
    raise ValueError(f"no host key pinned for {host}:{port}, so nothing was forgotten (is the port right?)")


def _host_and_port(target: str) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` (an SSH address, as SSHEndpoint parses it) or a bare IPv6
    address (`::1`) -> (host, port)."""
    if target.count(":") > 1 and not target.startswith("["):  # an IPv6 address without brackets
        return target, 22
    try:
        endpoint = SSHEndpoint.parse(target)
    except ValueError:
        raise ValueError(f"expected HOST, HOST:PORT or [IPv6]:PORT (port 1-65535), not {target!r}") from None
    return endpoint.host, endpoint.port


def _argparse_seconds(text: str) -> float:
    try:
        return seconds(text)
    except ValueError:
        # (argparse's message names the option: "argument --reap-interval: expected ...")
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}") from None


def _argparse_port(text: str) -> int:
    """A TCP port, 1-65535 (refused before anything is opened)."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port, 1-65535, not {text!r}")
    return int(text)


def seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse's type for timeouts)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--timeout takes a positive number of seconds, not {text!r}")
    return value


@command("host")
def host_command(args: argparse.Namespace) -> int:
    action = args.action
    if action == "serve":
        asyncio.run(host_daemon.serve(args.port))
        return 0
    if action == "drain":
        to_stderr = functools.partial(print, file=sys.stderr)  # stdout is the JSON's alone
        remaining = asyncio.run(host_daemon.drain(wait=not args.no_wait, report=to_stderr if args.json else print))
        if args.json:
            print_json({"draining": True, "remaining": remaining})
        return 0 if not remaining else 3
    if action in ("install", "uninstall"):
        path, outcome = getattr(host_daemon, action)()
        if args.json:
            print_json({"path": str(path), "outcome": outcome})
        else:
            print(f"{path}: {outcome}")
        return 0
    if action in ("start", "stop", "restart"):
        getattr(host_daemon, action)()
    state = host_daemon.status()
    capacity = asyncio.run(host_capacity(local_dir()))
    if args.json:
        print_json({**state.as_dict(), "capacity": capacity.model_dump()})
        return 0
    where = f" on 127.0.0.1:{state.port} (pid {state.pid})" if state.pid else ""
    print(f"state:     {state.state}{where}")
    print(f"service:   {state.service}{' (installed)' if state.installed else ''}")
    print(f"sandboxes: {len(state.sandboxes)}{': ' + ', '.join(state.sandboxes) if state.sandboxes else ''}")
    gpus = ", ".join(str(g["name"]) for g in capacity.gpus) or "none"
    print(
        f"capacity:  {capacity.cpus} CPUs, {capacity.memory_mb} MiB memory, "
        f"{capacity.disk_free_gb} GiB disk free, GPUs: {gpus}"
    )
    return 0


# -- the parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Give AI agents real computers over SSH.",
        epilog="environment: TETHER_STATE_DIR (state: the ledger, keys; default $XDG_STATE_HOME/tether, else "
        "~/.local/state/tether), TETHER_CONFIG (default ~/.config/tether/config.toml), "
        "TETHER_MCP_TOKEN (tether mcp over HTTP). `tether COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"tether {tether_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    mcp = add("mcp", "serve the MCP tools to an agent (stdio or streamable HTTP)", json_flag=False)
    mcp.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    mcp.add_argument("--host", default="127.0.0.1", help="HTTP bind address (non-loopback needs a token)")
    mcp.add_argument("--port", type=port_number, default=8765, help="HTTP port (0: any free one, printed)")
    mcp.add_argument("--provider", help="default sandbox's provider, created on first use (default: local)")
    mcp.add_argument("--attach", metavar="USER@HOST[:PORT]", help="use this SSH host as the default sandbox")
    mcp.add_argument("--identity", metavar="KEY", help="private key for --attach (default: tether's, ~/.ssh, agent)")
    mcp.add_argument("--generate-token", action="store_true", help="HTTP: generate a bearer token, print it once")
    mcp.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="HTTP: another Host header to accept (DNS-rebinding protection): HOST:PORT exactly that, a bare "
        "HOST with or without any port (as a reverse proxy may pass it on); http and https origins of it too",
    )
    mcp.add_argument("--reap-interval", type=_argparse_seconds, default=30.0, help="seconds between reaper passes")
    mcp.add_argument("--verbose", action="store_true", help="log lifecycle events to stderr")
    add("demo", "the whole story on this machine: write, edit, grep, test, serve, fetch, tear down", json_flag=False)

    up = add("up", "create a sandbox and print its id")
    up.add_argument("provider", nargs="?", help="local or ssh (daytona, e2b, modal, runpod: named, not usable yet)")
    up.add_argument("--pool", help="a pool of config.toml (`tether pools` lists them)")
    up.add_argument(
        "--gpu", metavar="TYPE", help="a GPU of this type, e.g. a100, or a100:2 for two (picks a pool that has GPUs)"
    )
    up.add_argument("--cpu", type=float, metavar="N", help="CPUs, where the provider sizes machines")
    up.add_argument("--memory-mb", type=int, metavar="N", help="memory in MiB, where the provider sizes machines")
    up.add_argument("--ttl", type=float, metavar="SECONDS", help="terminate after this many seconds (at most a year)")
    up.add_argument("--name", help="a name to refer to it by: letters, digits, . _ -")
    attach = add("attach", "attach a machine you can SSH to, and print its sandbox id")
    attach.add_argument("target", metavar="[USER@]HOST[:PORT]", help="or an ~/.ssh/config alias")
    attach.add_argument("--name")
    attach.add_argument("--identity", metavar="KEY", help="private key (default: tether's, ~/.ssh keys, agent)")
    ls = add("ls", "list sandboxes")
    ls.add_argument("--all", action="store_true", help="include terminated ones")
    for name, help_text in (
        ("info", "a sandbox's status, endpoint, capacity, jobs and tunnels"),
        ("down", "terminate a sandbox (detach an attached host) and show its cost"),
        ("pause", "pause a sandbox where its provider can"),
        ("resume", "resume a paused sandbox"),
    ):
        add(name, help_text).add_argument("id", metavar="ID")
    exe = add("exec", "run a command in a sandbox; its exit code is tether's", json_flag=False)
    exe.add_argument("id", metavar="ID")
    exe.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    exe.add_argument("--timeout", type=_argparse_seconds, default=24 * 3600.0, help="seconds (default: a day)")
    ssh = add("ssh", "an interactive shell in a sandbox", json_flag=False)
    ssh.add_argument("id", metavar="ID")
    ssh.add_argument("--print", action="store_true", help="print the ssh command instead of running it")
    cp = add("cp", "copy files to, from or between sandboxes (ID:path on either side)")
    cp.add_argument("src")
    cp.add_argument("dst")
    cp.add_argument("-r", "--recursive", action="store_true", help="copy a directory whole, as cp -r")
    tunnel = add("tunnel", "give a port in a sandbox a URL and keep it open until Ctrl-C")
    tunnel.add_argument("id", metavar="ID")
    tunnel.add_argument("port", type=_argparse_port, metavar="PORT")
    tunnel.add_argument("--backend", choices=["auto", "provider", "relay", "local"], default="auto")
    tunnel.add_argument("--path", help="path to check and put in the URL, e.g. /health")
    add("doctor", "check configured providers' credentials and reachability")
    add("pools", "list pools with their provider, state and capability profile")
    add("gc", "terminate expired and orphaned sandboxes; reconcile the ledger with each provider")
    add("costs", "cost events of terminated sandboxes")
    forget = add("forget-host", "remove a pinned host key (after a host was rebuilt)", json_flag=False)
    forget.add_argument("target", metavar="HOST[:PORT]")
    host = add("host", "run this machine as a local pool: serve, install, start, stop, status, drain")
    host.add_argument(
        "action", choices=["serve", "install", "uninstall", "start", "stop", "restart", "status", "drain"]
    )
    host.add_argument("--port", type=port_number, default=0, help="port for `serve` (default: any free one)")
    host.add_argument("--no-wait", action="store_true", help="`drain`: mark draining and return at once")
    return parser


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def main(argv: list[str] | None = None) -> int:
    global _whole_config
    # Whatever this command does, it may hold credentials while local sandboxes' shells run as the
    # same user (here, or served by a `tether host` daemon): /proc/PID/environ is not theirs to read.
    keep_environment_private()
    if sys.stdout is None:  # (started with it closed, `>&-`: Python would drop what is printed, silently)
        sys.stdout = ClosedOutput()
    argv = sys.argv[1:] if argv is None else list(argv)
    # `tether exec ID [--timeout N] -- CMD...`: what follows the first `--` is the command, whatever
    # it looks like (argparse would eat that `--`, and then take a command's `-n` for an option).
    after_dashes = None
    if argv[:1] == ["exec"] and "--" in argv:
        argv, after_dashes = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = build_parser()
    if not argv:  # (what a newcomer types first: the commands, not argparse's complaint)
        parser.print_help(sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # (said by the command's own parser, whose usage is the one that helps)
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        before = argv[: argv.index(args.command)] if args.command in argv else []
        if misplaced := [option for option in unknown if option in before]:
            parser.error(f"{' '.join(misplaced)} goes after the command: tether {args.command} {' '.join(misplaced)}")
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.after_dashes = after_dashes
    if args.command != "mcp":  # (which sets its own, with --verbose)
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="tether: %(message)s")
    try:
        _whole_config = args.command in NEEDS_WHOLE_CONFIG
        # Those that make something new refuse any mistake in config.toml; the others leave out what
        # they cannot read (command_fleet).
        if _whole_config and (problems := section_problems(read_config())):
            raise ValueError("; ".join(problems))
        return COMMANDS[args.command](args)
    except ValidationError as exc:
        problems = validation_problems(exc)
        print(f"tether: invalid arguments: {problems}; see `tether {args.command} --help`", file=sys.stderr)
        return 2
    except BrokenPipeError:  # (`tether exec … | head -1`: the reader went away; as other tools do)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (SandboxError, ProviderError, RuntimeError, ValueError, OSError) as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:  # SIGTERM or SIGHUP (see stop_signals_cancel)
        return 128 + (_stopped_by[0] if _stopped_by else signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
