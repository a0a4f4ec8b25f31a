"""The MCP tool server: the tools of shared/contract.md on top of the fleet and the engine.

Every tool that acts on a machine takes `sandbox` (id or name). When it is omitted the server's
default is used: the sandbox given at start (`--provider` / `--attach`, created on first use), else
the only live sandbox, else a local sandbox created on first use. Failures are `isError` results
whose message says what to do next; cancelling a call kills its remote work. The reaper runs while
the server does; when the server stops it tears down the sandboxes it created, except those
created with `keep`.
"""

import asyncio
import contextlib
import contextvars
import difflib
import functools
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Annotated, Any, Literal, TypeVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp_types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError

from providers import Fleet, ManagedSandbox, Request, SandboxGone, SandboxRecord, registry
from providers.config import MAX_TIMEOUT_S
from providers.errors import ProviderError
from providers.fleet import summary
from providers.registry import profile_of
from sandbox import SSHEndpoint
from sandbox.errors import InvalidArgument, JobNotFound, SandboxError, validation_problems
from sandbox.executor import MAX_OUTPUT_CHARS, cap_text, signal_name
from sandbox.files import MAX_READ_CHARS, Edit, EditResult, Image, shorten_diff_lines
from tunnels import Tunnel

from . import results as R
from . import tether_version
from .links import ENDED_CHECK_SECONDS, close_tunnels_of_ended_sandboxes, fleet_notifier, preview_source, tunnel_manager

log = logging.getLogger(__name__)
T = TypeVar("T")

INSTRUCTIONS = """tether gives you real computers over SSH. Tools act on a sandbox (a machine): pass `sandbox`
(id or name) or omit it to use the default one: the machine the server was started with, else the only
sandbox there is (sandbox_list shows which), else a local sandbox created on first use. `run` executes
shell commands in a persistent shell whose working directory carries over between calls; relative paths in
every tool are relative to it. Prefer read/write/edit/grep/glob over shell equivalents. Use
run_in_background for servers and other long-running processes, then job_output to read their output."""

DEFAULT_TIMEOUT_MS = 120_000
MAX_TIMEOUT_MS = 600_000


def _text(text: str) -> list[TextContent]:
    return [TextContent(type="text", text=json_safe(text))]


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # (a str holds pairs as one character: any here is alone)


def json_safe(value: T) -> T:
    """`value` with every string made encodable as UTF-8: a file name that is not UTF-8 reaches
    us with lone surrogates for its odd bytes (os.fsdecode's way), which JSON cannot carry; they
    become U+FFFD, as grep shows such names. (Unhandled, one such name would end the server.)"""
    if isinstance(value, str):
        if value.isascii():
            return value
        return _LONE_SURROGATE.sub("\ufffd", value)  # type: ignore[return-value]
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, list):
        return [json_safe(v) for v in value]  # type: ignore[return-value]
    return value


def ok(model: BaseModel, text: str | None = None) -> CallToolResult:
    structured = json_safe(model.model_dump(mode="json"))
    if text is None:
        text = model.text() if hasattr(model, "text") else json.dumps(structured, indent=2, ensure_ascii=False)
    return CallToolResult(content=_text(text), structured_content=structured)


def failure(message: str) -> CallToolResult:
    return CallToolResult(content=_text(message), is_error=True)


def guarded(fn: Callable[..., Awaitable[CallToolResult]]) -> Callable[..., Awaitable[CallToolResult]]:
    """Turn tether's errors into isError results with their message (the SDK would hide it)."""

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> CallToolResult:
        try:
            return await fn(*args, **kwargs)
        except (SandboxError, ProviderError) as exc:
            return failure(str(exc))
        except ValidationError as exc:
            return failure(f"invalid arguments: {validation_problems(exc)}")
        except (ValueError, TimeoutError) as exc:
            return failure(str(exc) or type(exc).__name__)
        except Exception as exc:  # a bug of ours: say so, and keep the details in the server log
            log.exception("tool %s failed", fn.__name__)
            return failure(f"internal error in tether ({type(exc).__name__}: {exc}); the server log has details")

    return call


class NoSandboxYet(InvalidArgument):
    """No sandbox was named, and there is none a call without one could use."""


class ServerState:
    """What the tools share: the fleet, the default sandbox, the reaper."""

    def __init__(
        self,
        fleet: Fleet | None = None,
        *,
        provider: str | None = None,
        attach: str | None = None,
        identity: str | None = None,
        reap_interval: float = 30.0,
        progress_interval: float = 5.0,
    ) -> None:
        self.fleet = fleet or Fleet()
        self.default_request: Request | None = None
        if attach:
            SSHEndpoint.resolve(attach)  # an address it cannot use is refused now, not blamed on each call
            # Kept: stopping the server must not kill what runs on someone's own machine.
            options = {"host": attach, **({"key_path": identity} if identity else {})}
            self.default_request = Request(provider="ssh", keep=True, options=options)
        elif provider == "ssh" and not any(p.provider == "ssh" for p in self.fleet.pools):
            raise ValueError("--provider ssh needs a host: --attach USER@HOST[:PORT], or an ssh pool in config.toml")
        elif provider:
            registry.provider_class(provider)  # an unknown one is refused now, not blamed on each call
            self.default_request = Request(provider=provider)
        elif self.fleet.defaults.says_where:
            self.default_request = Request()  # ([defaults] says where: the fleet fills it in)
        self.default_id: str | None = None
        self.stopping = False  # the teardown began: signals no longer cancel it
        self._default_lock = asyncio.Lock()
        self.reap_interval = reap_interval
        self.progress_interval = progress_interval
        self._reaper: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.notifier = fleet_notifier(self.fleet)
        self.tunnels = tunnel_manager(self.fleet, self.notifier)
        self.fleet.listeners.append(self._close_tunnels_of_terminated)
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.reap_interval > 0:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())
        self._watcher = asyncio.get_running_loop().create_task(self._watch_tunnels())

    async def shutdown(self) -> list[str]:
        self.stopping = True
        for task in (self._reaper, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.tunnels.close_all()
        destroyed = await self.fleet.close(teardown_created=True)
        if destroyed:
            log.info("tore down %s", ", ".join(destroyed))
        await self.notifier.drain()
        return destroyed

    def _close_tunnels_of_terminated(self, event: str, payload: dict[str, Any]) -> None:
        if event == "sandbox.terminated":
            # Whoever terminated it (a tool, the reaper), its tunnels end with it.
            closing = self.tunnels.close_for_sandbox(payload["sandbox"]["id"])
            task = asyncio.get_running_loop().create_task(closing)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _watch_tunnels(self) -> None:
        """Tunnels whose sandbox another process ended (`tether down`, its reaper) close too."""
        while True:
            await asyncio.sleep(ENDED_CHECK_SECONDS)
            try:
                for sandbox_id in await close_tunnels_of_ended_sandboxes(self.fleet, self.tunnels):
                    log.info("closed the tunnels of %s: the sandbox ended elsewhere", sandbox_id)
            except Exception:
                log.exception("tunnel watch failed")

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            await self.reap()

    async def reap(self) -> None:
        """One reaper pass: what outlived its TTL or idle timeout ends. A failed pass is logged,
        not raised (the reaper must outlive it; the next pass retries)."""
        try:
            for sandbox_id, reason in await self.fleet.reap():
                log.info("reaped %s: %s", sandbox_id, reason)
        except Exception:
            log.exception("reaper pass failed")

    # -- sandboxes -----------------------------------------------------------------------------------

    async def sandbox(self, ref: str | None, ctx: Context | None = None) -> ManagedSandbox:
        if ref:
            return await self.fleet.get(ref)
        if self.default_id is not None:
            try:
                return await self.fleet.get(self.default_id)
            except SandboxGone:
                # Ended behind the agent's back (another process's `tether down`, the reaper): say
                # so once, rather than go on in a new, empty machine as if it were the same.
                gone, self.default_id = self.fleet.ledger.get(self.default_id), None
                reason = gone.status_reason or gone.ending()  # (ended, or being ended by another process)
                why = f" ({reason})" if reason else ""
                raise SandboxGone(
                    gone.id,
                    gone.status,
                    f"the default sandbox {gone.name} ({gone.id}) ended{why}, and its files and processes with it; "
                    "call again to get a new one, or name another from sandbox_list",
                ) from None
        async with self._default_lock:
            found = self.current_default()
            if found is not None:
                self.default_id = found  # (from now on the default, as sandbox_list shows)
                return await self.fleet.get(found)
            self.refuse_if_ambiguous()
            request = self.default_request or Request(provider="local")
            box = await self.fleet.create(request, progress_reporter(ctx))
            self.default_id = box.id
            return box

    async def existing(self, ref: str | None) -> ManagedSandbox:
        """As `sandbox`, but never creating one: for tools that report on a sandbox or change its
        state, where a new machine (maybe a billed one) would be no answer. A default that ended is
        said so, once, as `sandbox` says it. Raises NoSandboxYet when there is none to use."""
        if ref or self.default_id is not None:
            return await self.sandbox(ref)  # (with a default made or named, it creates nothing)
        found = self.current_default()
        if found is None:
            self.refuse_if_ambiguous()
            makes = f"attaches {self.default_host}, the default" if self.default_host else "makes the default one"
            raise NoSandboxYet(
                f"there is no sandbox yet: create one with sandbox_create (or any file or shell tool {makes}), "
                "or name one from sandbox_list"
            )
        return await self.fleet.get(found)

    @property
    def default_host(self) -> str | None:
        """The host `--attach` named, if any."""
        return self.default_request.options.get("host") if self.default_request is not None else None

    def what_the_next_default_is(self) -> str:
        """What a call naming no sandbox will use now that the default ended, said to the agent
        that ended it (a new machine must not pass for the old one, whose files are gone)."""
        if (found := self.current_default()) is not None:
            record = self.fleet.ledger.get(found)
            then = f"uses {record.name} ({record.id})"
        elif self.default_request is None and len(self._default_candidates()) > 1:
            return "a call must now name its sandbox (several exist)"
        else:
            then = f"attaches {self.default_host} again" if self.default_host else "makes a new, empty one"
        return f"a call that names no sandbox now {then}"

    def refuse_if_ambiguous(self) -> None:
        """With nothing named at start and several sandboxes to choose from, the caller must choose."""
        if self.default_request is None and len(live := self._default_candidates()) > 1:
            names = ", ".join(f"{r.name} ({r.id})" for r in live)
            raise InvalidArgument(f"several sandboxes exist ({names}); say which one with `sandbox`")

    def current_default(self) -> str | None:
        """The live sandbox a call without `sandbox` uses, or None when it would create one (or
        must be told which): the default made or named so far; else, for `--attach HOST`, a kept
        attachment of that host (a previous server's); else, with nothing given at start, the only
        live candidate."""
        if self.default_id is not None and self.fleet.ledger.get(self.default_id).live:
            return self.default_id
        host = self.default_host
        if host:
            for record in self.fleet.list():
                if (
                    record.provider == "ssh"
                    and record.status == "running"
                    and record.keep
                    and record.request.get("options", {}).get("host") == host
                ):
                    return record.id
        if self.default_request is None:
            live = self._default_candidates()
            return live[0].id if len(live) == 1 else None
        return None

    def _default_candidates(self) -> list[SandboxRecord]:
        """Live sandboxes a call without `sandbox` may use when no default was named or made: kept
        ones, and this server's own (another running server's throwaway ones end with it)."""
        return [
            r
            for r in self.fleet.list()
            if r.status in ("running", "paused") and (r.keep or r.id in self.fleet.created_here)
        ]

    def open_tunnels(self, sandbox_id: str | None = None) -> list[R.TunnelResult]:
        """Open tunnels (of one sandbox when given): this server's, then those other tether
        processes hold (`tether tunnel`, another server), from the ledger."""
        mine = [tunnel_result(t) for t in self.tunnels.list(sandbox_id)]
        ours = {t.tunnel_id for t in mine}
        self.fleet.ledger.close_abandoned_tunnels()
        others = [R.TunnelResult.held_elsewhere(row) for row in self.fleet.ledger.tunnels(sandbox_id)]
        return mine + [t for t in others if t.tunnel_id not in ours]


class TetherServer(MCPServer):
    """MCPServer whose argument errors read like tether's other errors: what is wrong with which
    parameter, and what to do, instead of pydantic's report with its documentation links."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        tool = self._tool_manager.get_tool(name)
        if tool is None:
            names = [t.name for t in self._tool_manager.list_tools()]
            close = difflib.get_close_matches(name, names, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            raise ToolError(f"unknown tool {name!r}{guess}; the tools are: {', '.join(sorted(names))}")
        if isinstance(arguments, dict):
            # pydantic would drop them without a word: an agent used to another tool set's names
            # (file_path, timeout, -i) would get a call that quietly does something else.
            properties = tool.parameters.get("properties", {})
            known = list(properties)
            unknown = [key for key in arguments if key not in known]
            if unknown:
                raise ToolError(f"invalid arguments for {name}: {unknown_parameters(unknown, known)}")
            # An explicit null is what a client that fills every field sends for "not given".
            arguments = {key: value for key, value in arguments.items() if value is not None}
            arguments = truth_values_spelled_out(arguments, properties)
            if mistyped := truth_values_mistyped(arguments, properties):
                raise ToolError(f"invalid arguments for {name}: {mistyped}. Fix them and call again")
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if not isinstance(exc.__cause__, ValidationError) or isinstance(exc, UnexpectedToolError):
                raise
            problems = validation_problems(exc.__cause__)
            raise ToolError(
                f"invalid arguments for {name}: {problems}. Fix them (the tool's input schema describes each "
                "parameter) and call again"
            ) from exc.__cause__


# What agents trained on other tool sets send, and what tether calls it (in the tools that have it).
_SAID_ELSEWHERE = {
    "file_path": ("path",),
    "timeout": ("timeout_ms", "wait_ms"),
    "replaceAll": ("replace_all",),
    "-i": ("case_insensitive",),
    "-n": ("line_numbers",),
    "-A": ("after",),
    "-B": ("before",),
    "-C": ("context",),
    "run_in_bg": ("run_in_background",),
}


def _types(schema: dict[str, Any]) -> set[Any]:
    return {schema.get("type")} | {option.get("type") for option in schema.get("anyOf", [])}


def spelled_truth(value: object) -> object:
    """ "true" or "false" (any case, blanks around) as the boolean meant: some clients send every
    argument as a string (Claude Code, at times). Anything else is returned as it came."""
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower(), value)
    return value


def truth_values_spelled_out(arguments: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    """A boolean parameter's "true" or "false" taken as meant. Other strings stay refused."""
    taken = dict(arguments)
    for key, value in arguments.items():
        if "boolean" in _types(properties.get(key, {})):
            taken[key] = spelled_truth(value)
    return taken


def truth_values_mistyped(arguments: dict[str, Any], properties: dict[str, Any]) -> str:
    """What pydantic would take, and should not: true as a number (timeout_ms: true is a 1 ms
    timeout), or "yes" as true. (A number sent as a string, "100", is taken as meant.)"""
    problems = []
    for key, value in arguments.items():
        types = _types(properties.get(key, {}))
        if isinstance(value, bool) and "boolean" not in types and types & {"integer", "number"}:
            problems.append(f"{key}: a number, not {json.dumps(value)}")
        elif "boolean" in types and not isinstance(value, bool):  # (nulls are gone by now)
            problems.append(f"{key}: true or false, not {json.dumps(value)}")
    return "; ".join(problems)


def unknown_parameters(unknown: list[str], known: list[str]) -> str:
    """What is wrong, with the likely meant name for each, and the tool's parameters."""
    parts = []
    for key in unknown:
        guess = next((name for name in _SAID_ELSEWHERE.get(key, ()) if name in known), None)
        if guess is None:
            close = difflib.get_close_matches(key, known, n=1)
            guess = close[0] if close else None
        parts.append(f"unknown parameter {key!r}" + (f" (did you mean {guess!r}?)" if guess else ""))
    return "; ".join(parts) + f". Its parameters: {', '.join(known) or 'none'}"


def forbid_unknown_parameters(server: MCPServer) -> None:
    """Say so in every input schema, for clients that check arguments before sending them."""
    for tool in server._tool_manager.list_tools():
        tool.parameters["additionalProperties"] = False


Reporter = Callable[[str, float | None], Awaitable[None]]
# The reporter of the tool call this task serves: a call that first creates the default sandbox and
# then runs a command reports both through one, so its values keep increasing.
_call_reporter: contextvars.ContextVar[tuple[Context | None, Reporter] | None] = contextvars.ContextVar(
    "call_reporter", default=None
)


def progress_reporter(ctx: Context | None) -> Reporter:
    """Progress notifications for one call. MCP requires each value to be greater than the last:
    fractions are reported as percent of 100 while they grow; a step without one, or one that would
    go back (a run after the default sandbox was created in the same call), counts on by one with
    the total left unknown."""
    current = _call_reporter.get()
    if current is not None and current[0] is ctx:
        return current[1]
    last, bounded = -1.0, True

    async def report(message: str, fraction: float | None = None) -> None:
        nonlocal last, bounded
        value = round(min(max(fraction, 0.0), 1.0) * 100, 1) if fraction is not None else -1.0
        if not bounded or value <= last:
            value, bounded = math.floor(last) + 1, False
        last = value
        if ctx is not None:
            with contextlib.suppress(Exception):  # progress is best effort
                await ctx.report_progress(value, 100 if bounded else None, message)

    _call_reporter.set((ctx, report))
    return report


@contextlib.contextmanager
def progress_while_running(ctx: Context, label: str, interval: float, expected_s: float) -> Iterator[None]:
    """Report progress every `interval` seconds while the block runs. A quick call costs one timer
    handle: the reporting task starts only once `interval` has passed."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    report = progress_reporter(ctx)
    ticker: asyncio.Task[None] | None = None

    async def tick() -> None:
        while True:
            elapsed = time.monotonic() - started
            await report(f"{label}: running for {elapsed:.0f}s", elapsed / expected_s)
            await asyncio.sleep(interval)

    def begin() -> None:
        nonlocal ticker
        ticker = loop.create_task(tick())

    timer = loop.call_later(interval, begin)
    try:
        yield
    finally:
        timer.cancel()
        if ticker is not None:
            ticker.cancel()


# -- the server ------------------------------------------------------------------------------------------

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True)
CREATES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False)
# Changes nothing on the box, but each call moves a read position: asking again gives other output.
CONSUMES = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=False)

SandboxArg = Annotated[
    str | None,
    Field(
        min_length=1,
        description="Sandbox id or name. Omit it for the default sandbox (the file, shell and tunnel tools create "
        "a local one when there is none; the others never create one).",
    ),
]
JobSandboxArg = Annotated[
    str | None,
    Field(min_length=1, description="Sandbox id or name; may be omitted: a job id leads to its sandbox"),
]


def edited(result: EditResult) -> CallToolResult:
    """An edit's answer; a diff longer than a command's output may be (a replace_all across a big
    file) keeps its head and tail."""
    # (surrogateescape: a path that is not UTF-8 is in the diff's header as os.fsdecode spells it)
    diff, _ = cap_text(
        shorten_diff_lines(result.diff).encode("utf-8", "surrogateescape"),
        MAX_OUTPUT_CHARS,
        "\n[diff cut; read the file for the rest]",
    )
    return ok(
        R.EditResult(path=result.path, replacements=result.replacements, diff=diff),
        f"{result.replacements} replacement(s) in {result.path}\n{diff}",
    )


def tunnel_result(tunnel: Tunnel) -> R.TunnelResult:
    """One of this server's tunnels, as the tunnel tools give it."""
    return R.TunnelResult(
        tunnel_id=tunnel.id,
        url=tunnel.url,
        backend=tunnel.backend,
        headers=tunnel.headers,
        port=tunnel.port,
        sandbox=tunnel.sandbox_id,
    )


def build_server(state: ServerState) -> MCPServer:
    """The MCPServer with tether's tools, bound to `state`."""

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[ServerState]:
        await state.start()
        try:
            yield state
        finally:
            # Shielded: on SIGINT/SIGTERM the surrounding scope is cancelled, and anyio would cancel
            # every await of the teardown too.
            with anyio.CancelScope(shield=True):
                await state.shutdown()

    server = TetherServer(
        "tether", version=tether_version(), instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING"
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)  # its INFO is a line per channel
    # httpx logs each request's full URL at INFO, and a chat webhook's URL is its secret.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    register_lifecycle_tools(server, state)
    register_file_tools(server, state)
    register_shell_tools(server, state)
    register_tunnel_tools(server, state)
    forbid_unknown_parameters(server)
    return server


def register_lifecycle_tools(server: MCPServer, state: ServerState) -> None:
    @server.tool(annotations=CREATES)
    @guarded
    async def sandbox_create(
        ctx: Context,
        provider: Annotated[
            str | None,
            Field(
                description="local (this machine), ssh (a host configured as a pool; attach others with "
                "host_attach) or a plugin's; see pools_list"
            ),
        ] = None,
        pool: Annotated[str | None, Field(description="A pool name from pools_list")] = None,
        image: Annotated[str | None, Field(description="Container image, where the provider uses one")] = None,
        gpu: Annotated[
            str | None, Field(description="GPU type (e.g. a10g, a100), a100:2 for two; implies the gpu requirement")
        ] = None,
        cpu: Annotated[float | None, Field(gt=0, description="vCPUs")] = None,
        memory_mb: Annotated[int | None, Field(gt=0, description="Memory in MiB")] = None,
        disk_gb: Annotated[int | None, Field(gt=0, description="Disk in GB")] = None,
        timeout_s: Annotated[
            float | None,
            Field(
                gt=0,
                le=MAX_TIMEOUT_S,
                description="TTL in seconds (a year at most): terminated this long after",
            ),
        ] = None,
        idle_timeout_s: Annotated[
            float | None, Field(gt=0, le=MAX_TIMEOUT_S, description="Terminate after this many seconds unused")
        ] = None,
        requirements: Annotated[
            list[str] | None, Field(description="Requirement kinds, e.g. toolchain:go, gpu, host-binary")
        ] = None,
        auth_mode: Annotated[
            str | None, Field(description="host-session and local auth modes run only on local pools")
        ] = None,
        name: Annotated[str | None, Field(description="A name to refer to it by (letters, digits, . _ -)")] = None,
        env: Annotated[dict[str, str] | None, Field(description="Environment for every command in it")] = None,
        keep: Annotated[bool, Field(description="Keep it when this server stops (default: torn down)")] = False,
    ) -> Annotated[CallToolResult, R.SandboxResult]:
        """Create a sandbox (a machine to work on). Dispatch picks a pool that meets the requirements;
        progress is reported while it is provisioned."""
        request = Request(
            provider=provider,
            pool=pool,
            image=image,
            gpu=gpu,
            cpu=cpu,
            memory_mb=memory_mb,
            disk_gb=disk_gb,
            timeout_s=timeout_s,
            idle_timeout_s=idle_timeout_s,
            requirements=requirements or [],
            auth_mode=auth_mode,
            name=name,
            env=env or {},
            keep=keep,
        )
        box = await state.fleet.create(request, progress_reporter(ctx))
        result = R.SandboxResult.of(box.record, R.sandbox_capabilities(state.fleet, box.record))
        return ok(result, "\n".join([result.text(), *box.notes]))  # (notes: in the answer, not only as progress)

    @server.tool(annotations=CREATES)
    @guarded
    async def host_attach(
        ctx: Context,
        host: Annotated[str, Field(description="user@host[:port] or an ~/.ssh/config alias (ProxyJump works)")],
        user: Annotated[str | None, Field(description="Login name, if not in host")] = None,
        port: Annotated[int | None, Field(ge=1, le=65535, description="SSH port, if not 22 or in host")] = None,
        name: Annotated[str | None, Field(description="A name to refer to it by")] = None,
        key_path: Annotated[
            str | None, Field(description="Private key; default: tether's key, ~/.ssh keys and the agent")
        ] = None,
    ) -> Annotated[CallToolResult, R.SandboxResult]:
        """Attach a machine you have SSH access to. Its host key is pinned on first use; detaching
        (sandbox_destroy) removes only tether's own files and jobs there."""
        options = {k: v for k, v in {"host": host, "user": user, "port": port, "key_path": key_path}.items() if v}
        box = await state.fleet.create(
            Request(provider="ssh", name=name, keep=True, options=options), progress_reporter(ctx)
        )
        record = box.record
        return ok(R.SandboxResult.of(record, R.sandbox_capabilities(state.fleet, record)))

    @server.tool(annotations=READ_ONLY)
    @guarded
    async def sandbox_list() -> Annotated[CallToolResult, R.SandboxList]:
        """List sandboxes that are not terminated, with the default one marked."""
        # The reaper's pass first, as it would come by later: a list must not show running what a
        # call to it would find expired.
        await state.reap()
        summaries = [R.SandboxSummary.of(r, state.fleet.cost_so_far(r)) for r in state.fleet.list()]
        return ok(R.SandboxList(sandboxes=summaries, default=state.current_default()))

    @server.tool(annotations=READ_ONLY)
    @guarded
    async def sandbox_info(sandbox: SandboxArg = None) -> Annotated[CallToolResult, R.SandboxInfo]:
        """Status, SSH endpoint, capability profile, capacity, background jobs and tunnels of a sandbox."""
        box = await state.existing(sandbox)
        record = box.record
        running = record.status == "running"  # (a paused or unreachable machine still has a status to show)

        async def ask_capacity() -> dict[str, Any] | None:
            return (await box.capacity()).model_dump() if profile_of(record.provider).supports_capacity_query else None

        async def ask_jobs() -> list[R.JobInfo]:
            return [R.JobInfo.of(job) for job in await box.job_list()] if running else []

        async def ask_cwd() -> str | None:
            return await box.cwd() if running else None

        async def ask_ports() -> list[int]:
            return await state.tunnels.listening(box) if running else []

        # Asked together (each is a round trip or more); what the box cannot answer is left out.
        answers = await asyncio.gather(ask_capacity(), ask_jobs(), ask_cwd(), ask_ports(), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, (SandboxError, ProviderError)):
                raise answer
        capacity, jobs, cwd, ports = (None if isinstance(a, BaseException) else a for a in answers)
        failures = [str(a) for a in answers if isinstance(a, BaseException)]
        info = R.SandboxInfo(
            id=record.id,
            name=record.name,
            provider=record.provider,
            pool=record.pool,
            status=record.status,
            status_reason=record.status_reason,
            created_at=R.iso(record.created_at) or "",
            expires_at=R.iso(record.expires_at),
            ssh=R.SSHInfo.of(record),
            capabilities=R.sandbox_capabilities(state.fleet, record),
            capacity=capacity,
            cwd=cwd,
            jobs=jobs or [],
            tunnels=state.open_tunnels(record.id),
            listening_ports=ports or [],
            unreachable=failures[0] if failures else None,  # (the same trouble each time, as a rule)
        )
        return ok(info)

    @server.tool(annotations=DESTRUCTIVE)
    @guarded
    async def sandbox_destroy(
        sandbox: Annotated[
            str | None,
            Field(
                min_length=1, description="Sandbox id or name. Omit to destroy the default sandbox, when there is one."
            ),
        ] = None,
    ) -> Annotated[CallToolResult, R.DestroyResult]:
        """Terminate a sandbox (an attached host is only detached) and report its cost."""
        default = state.current_default()
        if sandbox is None and default is None:  # (none is created just to be destroyed)
            raise InvalidArgument("there is no default sandbox; name the one to destroy (see sandbox_list)")
        record = state.fleet.ledger.get(sandbox or default or "")
        event, ended = await state.fleet.end(record.id)
        result = R.DestroyResult.of(state.fleet.ledger.get(record.id), event)
        text = result.text(already=not ended)
        if record.id in (state.default_id, default):  # (made or named, or the only one there was)
            state.default_id = None
            text += f"; it was the default sandbox: {state.what_the_next_default_is()}"
        return ok(result, text)

    @server.tool(annotations=DESTRUCTIVE)
    @guarded
    async def sandbox_pause(sandbox: SandboxArg = None) -> Annotated[CallToolResult, R.StatusResult]:
        """Pause a sandbox, where its provider can (see capabilities.supportsPauseResume)."""
        box = await state.existing(sandbox)
        await box.pause()
        return ok(R.StatusResult(id=box.id, status="paused"), f"{box.name} is paused")

    @server.tool(annotations=CREATES)
    @guarded
    async def sandbox_resume(sandbox: SandboxArg = None) -> Annotated[CallToolResult, R.StatusResult]:
        """Resume a paused sandbox."""
        ref = sandbox or state.current_default()
        if ref is None:
            state.refuse_if_ambiguous()
            raise InvalidArgument("there is no sandbox to resume; name one from sandbox_list")
        record = state.fleet.ledger.get(ref)
        await state.fleet.resume(record.id)
        return ok(R.StatusResult(id=record.id, status="running"), f"{record.name} is running")

    @server.tool(annotations=CREATES)
    @guarded
    async def sandbox_snapshot(sandbox: SandboxArg = None) -> Annotated[CallToolResult, R.SnapshotResult]:
        """Snapshot a sandbox's filesystem, where its provider can (capabilities.supportsFsSnapshot)."""
        box = await state.existing(sandbox)
        return ok(R.SnapshotResult(snapshot_id=await box.snapshot()))

    @server.tool(annotations=READ_ONLY)
    @guarded
    async def pools_list() -> Annotated[CallToolResult, R.PoolList]:
        """Pools sandboxes can be created in: provider, active flag, capability profile, runtime and
        requirement kinds."""
        return ok(R.PoolList(pools=[R.PoolInfo.of(pool, state.fleet) for pool in state.fleet.pools]))


def register_file_tools(server: MCPServer, state: ServerState) -> None:
    @server.tool(annotations=READ_ONLY, structured_output=False)
    @guarded
    async def read(
        path: Annotated[str, Field(description="File to read (absolute, or relative to the sandbox's cwd)")],
        offset: Annotated[int, Field(ge=0, description="1-based line to start at (0 is the start too)")] = 1,
        limit: Annotated[int, Field(ge=1, description="Number of lines to read")] = 2000,
        sandbox: SandboxArg = None,
    ) -> CallToolResult:
        """Read a text file as numbered lines (cat -n). Lines over 2000 characters are cut; says when more
        lines follow. PNG, JPEG, GIF and WebP images (up to 5 MB) come back as images."""
        box = await state.sandbox(sandbox)
        result = await box.read(path, max(offset, 1), limit)  # (agents send 0 for "from the start")
        if isinstance(result, Image):
            import base64

            return CallToolResult(
                content=[
                    ImageContent(type="image", data=base64.b64encode(result.data).decode(), mime_type=result.mime_type)
                ]
            )
        text = result.text
        if result.total_lines == 0:
            text = f"({result.path} is empty)"
        elif result.more_after:
            shown = result.end_line - result.start_line + 1
            why = f" (an answer stops at {MAX_READ_CHARS} characters)" if shown < limit else ""
            text += (
                f"\n\n[lines {result.start_line}-{result.end_line} of {result.total_lines}{why}; "
                f"read on with offset={result.end_line + 1}]"
            )
        elif result.start_line > result.total_lines:
            text = f"({result.path} has only {result.total_lines} lines; offset {result.start_line} is past its end)"
        return CallToolResult(content=_text(text))

    @server.tool(annotations=DESTRUCTIVE)
    @guarded
    async def write(
        path: Annotated[str, Field(description="File to create or replace; parent directories are created")],
        content: Annotated[str, Field(description="The whole new content")],
        sandbox: SandboxArg = None,
    ) -> Annotated[CallToolResult, R.WriteResult]:
        """Write a file atomically (temporary file + rename), keeping an existing file's mode."""
        box = await state.sandbox(sandbox)
        result = await box.write(path, content)
        done = R.WriteResult(path=result.path, bytes=result.bytes, created=result.created)
        return ok(done, f"{'created' if result.created else 'wrote'} {result.path} ({result.bytes} bytes)")

    @server.tool(annotations=DESTRUCTIVE)
    @guarded
    async def edit(
        path: Annotated[str, Field(description="File to edit")],
        old_string: Annotated[str, Field(description="Exact text to replace (must be unique unless replace_all)")],
        new_string: Annotated[str, Field(description="Replacement text (must differ from old_string)")],
        replace_all: Annotated[bool, Field(description="Replace every occurrence")] = False,
        sandbox: SandboxArg = None,
    ) -> Annotated[CallToolResult, R.EditResult]:
        """Replace an exact string in a file and return the unified diff. Fails (naming the matching lines)
        when old_string is missing or not unique, and when the file changed while the edit was applied."""
        box = await state.sandbox(sandbox)
        return edited(await box.edit(path, old_string, new_string, replace_all))

    class EditSpec(BaseModel):
        model_config = ConfigDict(extra="forbid")  # (a misspelt replaceAll must not be dropped silently)

        old_string: str = Field(description="Exact text to replace")
        new_string: str = Field(description="Replacement text")
        # (as the top-level flags: "true" taken, "yes" or 1 refused rather than read as true)
        replace_all: Annotated[StrictBool, BeforeValidator(spelled_truth)] = Field(
            False, description="Replace every occurrence"
        )

    @server.tool(annotations=DESTRUCTIVE)
    @guarded
    async def multi_edit(
        path: Annotated[str, Field(description="File to edit")],
        edits: Annotated[list[EditSpec], Field(min_length=1, description="Applied in order; all or nothing")],
        sandbox: SandboxArg = None,
    ) -> Annotated[CallToolResult, R.EditResult]:
        """Apply several exact-string edits to one file in order, atomically: either all apply or none
        does (the error names the failing edit as edits[i], i counted from 0)."""
        box = await state.sandbox(sandbox)
        return edited(await box.multi_edit(path, [Edit(e.old_string, e.new_string, e.replace_all) for e in edits]))

    @server.tool(annotations=READ_ONLY)
    @guarded
    async def glob(
        pattern: Annotated[str, Field(description="Glob such as **/*.py or src/*.{ts,tsx}; * stays in one directory")],
        path: Annotated[str | None, Field(description="Directory to search (default: the sandbox's cwd)")] = None,
        sandbox: SandboxArg = None,
    ) -> Annotated[CallToolResult, R.GlobResult]:
        """Find files by name pattern, newest first, at most 100."""
        box = await state.sandbox(sandbox)
        result = await box.glob(pattern, path)
        text = "\n".join(result.files) or "no files match"
        if result.listing_cut:
            text += (
                "\n[the tree holds too many files to list whole, so files that match may be missing; narrow the path]"
            )
        elif result.truncated:
            text += "\n[more than 100 files match; narrow the pattern or the path]"
        return ok(R.GlobResult(files=result.files, truncated=result.truncated), text)

    @server.tool(annotations=READ_ONLY)
    @guarded
    async def grep(
        pattern: Annotated[str, Field(description="Regular expression (ripgrep syntax; POSIX ERE without rg)")],
        path: Annotated[str | None, Field(description="File or directory (default: the sandbox's cwd)")] = None,
        glob: Annotated[str | None, Field(description="Only files matching this glob, e.g. *.py")] = None,
        type: Annotated[str | None, Field(description="ripgrep file type, e.g. py, js, rust")] = None,
        output_mode: Annotated[
            Literal["files_with_matches", "content", "count"],
            Field(description="files_with_matches (paths, newest first), content (path:line:text) or count"),
        ] = "files_with_matches",
        before: Annotated[int | None, Field(ge=0, description="Context lines before each match (content)")] = None,
        after: Annotated[int | None, Field(ge=0, description="Context lines after each match (content)")] = None,
        context: Annotated[int | None, Field(ge=0, description="Context lines around each match (content)")] = None,
        line_numbers: Annotated[bool, Field(description="Show line numbers (content)")] = True,
        case_insensitive: Annotated[bool, Field(description="Ignore case")] = False,
        multiline: Annotated[bool, Field(description="Let . and patterns span lines (needs rg)")] = False,
        head_limit: Annotated[
            int | None, Field(ge=0, description="Keep only the first N lines of output (0: all of them)")
        ] = None,
        sandbox: SandboxArg = None,
    ) -> Annotated[CallToolResult, R.GrepResult]:
        """Search file contents with ripgrep semantics (hidden files included, .gitignore respected)."""
        box = await state.sandbox(sandbox)
        result = await box.grep(
            pattern,
            path,
            glob=glob,
            type=type,
            output_mode=output_mode,
            before=before,
            after=after,
            context=context,
            line_numbers=line_numbers,
            case_insensitive=case_insensitive,
            multiline=multiline,
            head_limit=head_limit or None,
        )
        text = result.text or "no matches"
        if result.limited:
            text += "\n[head_limit reached; more lines follow: raise head_limit to see them]"
        elif result.truncated:
            text += "\n[output cut; use head_limit, a narrower path, or glob]"
        return ok(
            R.GrepResult(
                mode=result.mode,
                lines=result.lines,
                truncated=result.truncated,
                output=result.text,
                engine=result.engine,
            ),
            text,
        )


def register_shell_tools(server: MCPServer, state: ServerState) -> None:
    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=True))
    @guarded
    async def run(
        ctx: Context,
        command: Annotated[str, Field(description="Shell command, run in the user's login shell")],
        timeout_ms: Annotated[
            int,
            Field(
                ge=1,
                le=MAX_TIMEOUT_MS,
                description="Kill the command after this long (max 600000); a background job has no timeout "
                "(stop it with job_kill)",
            ),
        ] = DEFAULT_TIMEOUT_MS,
        cwd: Annotated[str | None, Field(description="Directory to run in (default: where the last one ended)")] = None,
        env: Annotated[dict[str, str] | None, Field(description="Extra environment for this command")] = None,
        run_in_background: Annotated[
            bool, Field(description="Start it as a background job and return its job_id at once")
        ] = False,
        description: Annotated[str | None, Field(description="What the command does, in a few words")] = None,
        sandbox: SandboxArg = None,
    ) -> Annotated[CallToolResult, R.RunResult]:
        """Run a shell command and wait for it. stdout and stderr come back separately, each capped at 30000
        characters (head and tail; the whole stream's path is given when cut). The directory the command ends
        in is where the next one starts. On timeout the whole process group is killed and the output so far is
        returned. Use run_in_background for servers and watchers."""
        box = await state.sandbox(sandbox, ctx)
        if run_in_background:
            job = await box.start_job(command, cwd=cwd, env=env)
            state.fleet.ledger.add_job(box.id, job.id, command, job.started_at)
            return ok(
                R.RunResult(
                    exit_code=None,
                    stdout="",
                    stderr="",
                    timed_out=False,
                    truncated=False,
                    duration_ms=0,
                    cwd=job.cwd,
                    job_id=job.id,
                )
            )
        label = description or command[:60]
        with progress_while_running(ctx, label, state.progress_interval, timeout_ms / 1000):
            # Awaited directly: when the call is cancelled, so is the run, which kills the remote process group.
            r = await box.run(command, cwd=cwd, env=env, timeout=timeout_ms / 1000)
        return ok(R.RunResult.model_validate(r, from_attributes=True))

    async def job_sandbox(job_id: str, sandbox: str | None) -> ManagedSandbox:
        if sandbox:
            return await state.sandbox(sandbox)
        owner = state.fleet.ledger.job_owner(job_id) or state.current_default()
        if owner is None:  # (no sandbox is created, nor one asked for, to say a job is unknown)
            raise JobNotFound(job_id, "; list jobs with job_list, or name the sandbox it runs in")
        return await state.fleet.get(owner)

    @server.tool(annotations=CONSUMES)
    @guarded
    async def job_output(
        job_id: Annotated[str, Field(description="From run with run_in_background")],
        wait_ms: Annotated[int, Field(ge=0, le=MAX_TIMEOUT_MS, description="Wait up to this long for new output")] = 0,
        sandbox: JobSandboxArg = None,
    ) -> Annotated[CallToolResult, R.JobOutputResult]:
        """New output of a background job since the previous call, its status and exit code."""
        box = await job_sandbox(job_id, sandbox)
        out = await box.job_output(job_id, wait_ms)
        return ok(
            R.JobOutputResult(
                job_id=job_id,
                stdout=out.stdout,
                stderr=out.stderr,
                status=out.status,
                exit_code=out.exit_code,
                more=out.more,
            )
        )

    @server.tool(annotations=READ_ONLY)
    @guarded
    async def job_list(sandbox: SandboxArg = None) -> Annotated[CallToolResult, R.JobList]:
        """Background jobs of a sandbox with command, status and start time."""
        try:
            box = await state.existing(sandbox)
        except NoSandboxYet:
            return ok(R.JobList(jobs=[]))  # (no sandbox yet: none has jobs)
        jobs = [R.JobInfo.of(job) for job in await box.job_list()]
        return ok(R.JobList(jobs=jobs))

    @server.tool(annotations=DESTRUCTIVE)
    @guarded
    async def job_kill(
        job_id: Annotated[str, Field(description="The job to stop")],
        signal: Annotated[
            str,
            Field(
                description="TERM, KILL, INT, HUP, QUIT, USR1, USR2, STOP or CONT (SIGKILL and 9 are understood too)"
            ),
        ] = "TERM",
        sandbox: JobSandboxArg = None,
    ) -> Annotated[CallToolResult, R.JobKillResult]:
        """Send a signal to a background job's whole process group."""
        signal = signal_name(signal)
        box = await job_sandbox(job_id, sandbox)
        job = await box.job_kill(job_id, signal)
        if not job.sent:  # (it had ended before this call)
            text = f"{job_id} had already exited ({job.exit_code}); nothing was signalled"
        else:
            now = f"exited ({job.exit_code})" if job.status == "exited" else "running"
            text = f"sent {signal} to {job_id}: {now}"
        sent = signal if job.sent else None
        return ok(R.JobKillResult(job_id=job_id, status=job.status, exit_code=job.exit_code, signal=sent), text)


def register_tunnel_tools(server: MCPServer, state: ServerState) -> None:
    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=True))
    @guarded
    async def tunnel_open(
        port: Annotated[int, Field(ge=1, le=65535, description="Port a server listens on inside the sandbox")],
        backend: Annotated[
            Literal["auto", "provider", "relay", "local"],
            Field(description="auto: the provider's URL, else the configured relay, else a local forward"),
        ] = "auto",
        path: Annotated[str | None, Field(description="Path to check and to put in the URL, e.g. /health")] = None,
        sandbox: SandboxArg = None,
    ) -> Annotated[CallToolResult, R.TunnelResult]:
        """Give a port inside the sandbox a URL. It is returned only after an HTTP request through it got an
        answer; if nothing listens on the port the error says which ports do. Chat channels get the URL."""
        box = await state.sandbox(sandbox)
        tunnel = await state.tunnels.open(
            box,
            port,
            backend,
            path,
            preview=preview_source(state.fleet, box.id),
            sandbox=summary(box.record),  # (as channels hear of the sandbox's own events)
        )
        return ok(tunnel_result(tunnel))

    @server.tool(annotations=READ_ONLY)
    @guarded
    async def tunnel_list(
        sandbox: Annotated[
            str | None, Field(min_length=1, description="Only this sandbox's tunnels (id or name); omit it for all")
        ] = None,
    ) -> Annotated[CallToolResult, R.TunnelList]:
        """Open tunnels (of one sandbox when given), this server's and other tether processes'."""
        sandbox_id = state.fleet.record(sandbox).id if sandbox else None  # (the ledger's: no connection)
        return ok(R.TunnelList(tunnels=state.open_tunnels(sandbox_id)))

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True))
    @guarded
    async def tunnel_close(
        tunnel_id: Annotated[str, Field(description="From tunnel_open or tunnel_list")],
    ) -> Annotated[CallToolResult, R.TunnelClosed]:
        """Close a tunnel this server opened."""
        if tunnel_id not in {t.id for t in state.tunnels.list()}:
            # Not open here: another live process's (which alone can close it), one closed already, or none.
            state.fleet.ledger.close_abandoned_tunnels()
            held = state.fleet.ledger.tunnel(tunnel_id)
            if held and held["status"] == "open":
                raise InvalidArgument(
                    f"tunnel {tunnel_id} is held by another tether process (pid {held['owner_pid']}); close "
                    "it there (Ctrl-C on `tether tunnel`, or that server's tunnel_close)"
                )
            if held:  # closed already: closing again changes nothing, as the tool's idempotent hint promises
                return ok(R.TunnelClosed(tunnel_id=tunnel_id), f"{tunnel_id} was already closed")
        tunnel = await state.tunnels.close(tunnel_id)
        return ok(R.TunnelClosed(tunnel_id=tunnel.id), f"closed {tunnel.id} (port {tunnel.port})")
