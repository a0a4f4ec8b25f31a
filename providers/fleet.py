"""The fleet: the sandboxes tether knows about, and their lifecycle.

create: dispatch to a pool → ledger row → provider.provision → the engine's Sandbox on its endpoint.
destroy: ledger marked ending → provider.terminate → ledger terminated + exactly one cost event.
reap: terminate what outlived its TTL or idle timeout (the MCP server runs this periodically).
activity: while an open sandbox has an operation in flight, its last activity is written through to
the ledger (the heartbeat), where every process's reaper reads it.
gc: reap, then reconcile the ledger with each provider's own listing — terminate orphans and
interrupted provisions, mark vanished sandboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError

from sandbox import ConnectionPool, Sandbox, SSHEndpoint, default_pool
from sandbox.errors import InvalidArgument
from sandbox.state import StateStore

from . import registry
from .base import Capacity, Handle, ListedResource, Progress, Provider, ProvisionSpec, Request, no_progress
from .config import (
    CONFIG_MODELS,
    Defaults,
    LocalPoolConfig,
    Pool,
    credentials_missing,
    gpu_type_and_count,
    implicit_pools,
    load_defaults,
    load_pools,
)
from .dispatch import choose_pool
from .errors import EndedWithLeftovers, ProviderError, ProviderUnavailable, SandboxGone, Unsupported
from .ledger import LEFTOVERS, CostEvent, Ledger, SandboxRecord, new_sandbox_id
from .profiles import GPU_RATES_USD_PER_HOUR, LOCAL_AUTH_MODES, CapabilityProfile

log = logging.getLogger(__name__)
T = TypeVar("T")
LABEL = "tether-id"
INSTALLATION_LABEL = "tether-installation"  # which state dir's ledger the sandbox is in (Ledger.installation_id)
LEDGER_RECHECK_SECONDS = 1.0
# How often an open sandbox's last activity is written through to the ledger, where other
# processes' reapers read it (far below any sensible idle timeout; a third of a shorter one).
ACTIVITY_FLUSH_SECONDS = 5.0
HEARTBEAT_TASK = "tether-activity-heartbeat"  # (its asyncio task's name)
# How long the reaper waits for a sandbox to say whether tether's background jobs still run in it:
# one that does not answer in time is idle.
JOB_PROBE_TIMEOUT_S = 20.0
CLEANUP_GRACE_S = 30.0  # how long closing waits for a failed provision's cleanup
ENDING_WAIT_S = 120.0  # how long a destroy waits for another process's ending of the same sandbox


# The endings under way in this process, whichever Fleet began them (the ledger's claim names a
# process, and a process may hold several fleets).
_ENDINGS: dict[str, asyncio.Future[bool]] = {}


def _ending_here(sandbox_id: str) -> asyncio.Future[bool] | None:
    """This process's ending of the sandbox under way in this event loop, if any (one left by a
    loop that has gone is no ending: the ledger's claim of it is this process's to take over)."""
    ending = _ENDINGS.get(sandbox_id)
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    return ending if ending is not None and ending.get_loop() is here and not ending.done() else None


def _ending_started(sandbox_id: str, ending: asyncio.Future[Any]) -> None:
    """Note this process's ending of the sandbox, under way until `ending` is done (_ending_here)."""
    _ENDINGS[sandbox_id] = ending
    ending.add_done_callback(lambda _: _ENDINGS.pop(sandbox_id, None) if _ENDINGS.get(sandbox_id) is ending else None)


def activity_flush_every(idle_timeout: float | None) -> float:
    """How stale the ledger's last_activity may grow while a sandbox is in use: every
    ACTIVITY_FLUSH_SECONDS, or a third of a shorter idle timeout (so that another process's
    reaper never sees a sandbox in use as idle)."""
    if idle_timeout is None:
        return ACTIVITY_FLUSH_SECONDS
    return min(ACTIVITY_FLUSH_SECONDS, idle_timeout / 3)


def summary(record: SandboxRecord) -> dict[str, Any]:
    """What events say about a sandbox (no handle, no request: nothing secret)."""
    return {
        "id": record.id,
        "name": record.name,
        "provider": record.provider,
        "pool": record.pool,
        "status": record.status,
    }


class ManagedSandbox(Sandbox):
    """A sandbox tether provisioned: every engine operation, plus its lifecycle.

    As an async context manager it is destroyed on exit, unless it was created with `keep`.
    """

    def __init__(
        self, fleet: Fleet, record: SandboxRecord, endpoint: SSHEndpoint, tether_dir: str, env: dict[str, str]
    ) -> None:
        super().__init__(endpoint, pool=fleet.connections, tether_dir=tether_dir, env=env, name=record.name)
        self.fleet = fleet
        self.id = record.id
        self.provider = record.provider
        self.pool_name = record.pool
        self.keep = record.keep
        self.idle_timeout = record.idle_timeout
        self.verified_at = time.monotonic()  # when the ledger last said it is live
        self.notes: list[str] = []  # what its creation had to say (a request's sizing not applied)
        # The last use, and the last_activity the ledger has: opening it is not using it.
        self.last_used = self.flushed_activity = record.last_activity

    @property
    def flush_every(self) -> float:
        return activity_flush_every(self.idle_timeout)

    @property
    def _p(self):  # type: ignore[no-untyped-def]
        parts = super()._p  # (marks the moment of use)
        if self.last_used - self.flushed_activity >= self.flush_every:
            self.fleet.flush_activity(self)
        return parts

    @contextlib.asynccontextmanager
    async def _in_flight(self) -> AsyncIterator[None]:
        async with super()._in_flight():
            # A command, job wait or transfer starts: the heartbeat covers it while it runs.
            self.fleet.keep_beating(self)
            yield

    @property
    def record(self) -> SandboxRecord:
        return self.fleet.ledger.get(self.id)

    async def ended_elsewhere(self) -> str | None:
        """Why the ledger says it ended or is ending (another process's `tether down`, gc, a
        reaper), if it does. Asked when a connection died under a command: whoever ends a sandbox
        records that before the provider is asked (Fleet._terminate), so one read tells."""
        try:
            record = self.record
        except Exception:  # (no answer from the ledger is no news)
            return None
        why = (record.status_reason or "terminated elsewhere") if record.status == "terminated" else record.ending()
        if why is not None:
            self.verified_at = -math.inf  # (the fleet's next get() reads the ledger, and says it ended)
        return why

    async def destroy(self) -> CostEvent:
        return await self.fleet.destroy(self.id)

    async def pause(self) -> None:
        await self.fleet.pause(self.id)

    async def resume(self) -> None:
        await self.fleet.resume(self.id)

    async def snapshot(self) -> str:
        return await self.fleet.snapshot(self.id)

    async def capacity(self) -> Capacity:
        return await self.fleet.capacity(self.id)

    async def __aexit__(self, *exc_info: object) -> None:
        if self.keep:
            await self.close()
        else:
            await self.destroy()


@dataclass
class GcReport:
    reaped: list[tuple[str, str]] = field(default_factory=list)  # (sandbox id, reason)
    orphans: list[str] = field(default_factory=list)  # tether-id labels of resources killed with no live ledger row
    interrupted: list[str] = field(default_factory=list)  # sandbox ids whose provisioning was cut short
    vanished: list[str] = field(default_factory=list)  # sandbox ids the provider no longer has
    tunnels_closed: list[str] = field(default_factory=list)  # rows of tunnels whose process is gone
    errors: list[str] = field(default_factory=list)


class Fleet:
    def __init__(
        self,
        *,
        config: dict[str, Any] | None = None,
        store: StateStore | None = None,
        connections: ConnectionPool | None = None,
        lenient: bool = False,
    ) -> None:
        """`lenient`: for work on sandboxes that exist (listing, using, ending them), a part of
        config.toml that cannot be read is left out, and said in `config_problems`, instead of
        refused: a typo in a pool must not keep anyone from tearing down what runs and costs."""
        from sandbox.state import read_config

        self.config_problems: list[str] = []

        def loaded(load: Callable[[], T], instead: Callable[[], T]) -> T:
            if not lenient:
                return load()
            try:
                return load()
            except ValueError as exc:  # (ConfigError is one; so is config.toml that is not TOML)
                self.config_problems.append(str(exc))
                return instead()

        self.config = config if config is not None else loaded(read_config, dict)
        # ([[providers]] are registered by load_pools: a broken one is one problem, said once)
        self.pools = loaded(lambda: load_pools(self.config), lambda: implicit_pools(os.environ))
        self.defaults = loaded(lambda: load_defaults(self.config), Defaults)
        self.ledger = Ledger(store)
        self._connections = connections
        self._providers: dict[str, Provider] = {}
        self._open: dict[str, ManagedSandbox] = {}
        self._cleanups: set[asyncio.Future[bool]] = set()
        self.created_here: set[str] = set()
        self._heartbeat: asyncio.Task[None] | None = None  # runs while an open sandbox is busy
        self._heartbeat_wake = asyncio.Event()  # (set: look again now, not at _heartbeat_due)
        self._heartbeat_due = math.inf  # when the heartbeat looks next (time.time())
        # Called with ("sandbox.created" | "sandbox.terminated", payload): chat channels, tunnel cleanup.
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    @property
    def connections(self) -> ConnectionPool:
        if self._connections is None:
            self._connections = default_pool()
        return self._connections

    # -- pools and providers -------------------------------------------------------------------------

    def availability(self, pool: Pool) -> str | None:
        """Why `pool` can't be used right now, or None."""
        try:
            provider_class = registry.provider_class(pool.provider)
        except ProviderError as exc:
            return str(exc)
        missing = credentials_missing(pool.provider)
        if missing:
            return f"missing credentials: set {', '.join(missing)}"
        return provider_class.unavailable_reason()

    def provider_for(self, pool: Pool) -> Provider:
        provider = self._providers.get(pool.name)
        if provider is None or provider.pool != pool:
            provider = registry.provider_class(pool.provider)(pool, self.connections)
            self._providers[pool.name] = provider
        return provider

    def pool_of(self, record: SandboxRecord) -> Pool:
        """The pool a sandbox was made in (an implicit one of its provider when config.toml has it no more)."""
        for pool in self.pools:
            if pool.name == record.pool and pool.provider == record.provider:
                return pool
        # Not in the config (an ad-hoc attach, or a pool since removed): the handle has what we need.
        try:
            return Pool(name=record.pool, provider=record.provider, implicit=True)
        except ValidationError:
            raise ProviderUnavailable(
                f"sandbox {record.id} belongs to provider {record.provider!r}, which is no longer configured; "
                "add its [[providers]] entry back to config.toml to reach or terminate it"
            ) from None

    def _provider_of(self, record: SandboxRecord) -> Provider:
        return self.provider_for(self.pool_of(record))

    def profile(self, provider: str) -> CapabilityProfile:
        return registry.profile_of(provider)

    # -- create / get / destroy ----------------------------------------------------------------------

    async def create(self, request: Request, progress: Progress = no_progress) -> ManagedSandbox:
        """Provision a sandbox where dispatch says, recording it in the ledger first.

        Raises: AuthPinError, DispatchError (per-pool reasons), ProviderError, ConnectError.
        """
        request = self._with_defaults(request)
        pool = self._choose(request)
        provider = self.provider_for(pool)
        provider.check_request(request)  # (before the row: a refused request leaves no trace)
        unapplied = provider.unapplied(request)
        gpu_type, gpu_count = _gpu_of(request, pool) if "gpu" not in unapplied else (None, 0)
        sandbox_id = new_sandbox_id()
        name = request.name or f"{pool.provider}-{sandbox_id[3:9]}"
        self.ledger.insert(
            sandbox_id=sandbox_id,
            name=name,
            provider=pool.provider,
            pool=pool.name,
            # env values may be secrets: the ledger keeps only their names
            request={**request.model_dump(mode="json", exclude={"env"}), "env_names": sorted(request.env)},
            expires_at=self._expiry(request, pool),
            idle_timeout=request.idle_timeout_s,
            keep=request.keep,
            gpu_type=gpu_type,
            gpu_count=gpu_count,
        )
        self.created_here.add(sandbox_id)
        # From the row on, whatever ends this call early (an error, or the caller's cancellation at
        # any await) leaves nothing behind: see _abandon.
        try:
            await progress(f"provisioning {name} on pool {pool.name} ({pool.provider})", 0.05)
            notes = []
            if unapplied:
                notes.append(f"note: {pool.provider} uses the machine as it is; {', '.join(unapplied)} not applied")
                log.info("%s: %s", sandbox_id, notes[-1])
                await progress(notes[-1], 0.05)
            spec = ProvisionSpec(
                sandbox_id=sandbox_id,
                name=name,
                request=request,
                labels={LABEL: sandbox_id, INSTALLATION_LABEL: self.ledger.installation_id},
            )

            async def provider_progress(message: str, fraction: float | None = None) -> None:
                # The provider reports its own 0..1; it is one stretch (5%..85%) of the whole create.
                await progress(message, None if fraction is None else 0.05 + 0.8 * min(max(fraction, 0.0), 1.0))

            handle = await provider.provision(spec, provider_progress)
            endpoint = await provider.endpoint(handle)
            if not self.ledger.set_provisioned(
                sandbox_id,
                handle.external_id,
                handle.model_dump(),
                {"host": endpoint.host, "port": endpoint.port, "user": endpoint.user},
            ):
                # Destroyed (or collected) by another process while it was being provisioned.
                with contextlib.suppress(Exception):
                    await provider.terminate(handle)
                why = self.ledger.get(sandbox_id).status_reason
                raise SandboxGone(sandbox_id, f"terminated while it was being provisioned ({why})")
            box = ManagedSandbox(
                self, self.ledger.get(sandbox_id), endpoint, provider.tether_dir(sandbox_id), request.env
            )
            box.notes = notes
            self._open[sandbox_id] = box
            await progress(f"connecting to {name}", 0.9)
            await box.connect()
            await progress(f"{name} is running", 1.0)
        except BaseException as exc:
            cleanup = self._abandon(sandbox_id, exc)
            if cleanup is not None:
                # Awaited shielded, so that a plain task.cancel() returns once it is done; under an
                # anyio scope (MCP's cancelled tool calls), which cancels every later await, this
                # await ends at once but the task goes on (close() waits for it).
                with contextlib.suppress(Exception):
                    await asyncio.shield(cleanup)
            raise
        self._emit("sandbox.created", {"sandbox": summary(box.record)})
        return box

    def _abandon(self, sandbox_id: str, exc: BaseException) -> asyncio.Future[Any] | None:
        """Undo a create that ended early: the task that ends what it made, or None when nothing
        needs ending. The task is one of its own, so the caller's cancellation can't cut it short.
        Should this process die first, the row says what the reaper or gc must finish."""
        record = self.ledger.get(sandbox_id)
        interrupted = not isinstance(exc, Exception)
        if record.status == "provisioning":
            # No handle recorded: the provider cleans up what it can; the rest is found by its label.
            reason = "provisioning interrupted" if interrupted else f"provisioning failed: {exc}"
            self.ledger.set_status(sandbox_id, "failed", reason[:500])
            # Claimed as any ending is: a destroy meanwhile (a server stopping, `tether down`, gc)
            # waits for this one instead of asking the provider to end it a second time.
            self.ledger.claim_ending(sandbox_id, reason[:500])
            work: Any = self._terminate(self.ledger.get(sandbox_id), reason[:500])
        elif record.live:  # provisioned: ended by its handle, with its cost event, like any other
            reason = "creation interrupted" if interrupted else "could not connect after provisioning"
            work = self.destroy(sandbox_id, reason)
        else:
            return None
        cleanup = asyncio.ensure_future(work)
        self._cleanups.add(cleanup)
        cleanup.add_done_callback(self._cleanup_done)
        if record.status == "provisioning":
            _ending_started(sandbox_id, cleanup)
        return cleanup

    def _with_defaults(self, request: Request) -> Request:
        """[defaults] fills in what the request leaves open: where (a pool, else a provider, when it
        names neither) and its idle timeout. (Its TTL: see `_expiry`.)"""
        update: dict[str, Any] = {"idle_timeout_s": request.idle_timeout_s or self.defaults.idle_timeout_s}
        if not request.pool and not request.provider and not _says_what_it_needs(request):
            # (a default pool wins over a default provider, which is for when no pool is named)
            update.update(pool=self.defaults.pool, provider=None if self.defaults.pool else self.defaults.provider)
        return request.model_copy(update=update)

    def _cleanup_done(self, cleanup: asyncio.Future[bool]) -> None:
        """(For a task finishing what its caller gave up on: a failed create's undoing, an ending.)"""
        self._cleanups.discard(cleanup)
        if not cleanup.cancelled() and cleanup.exception() is not None:
            log.warning("could not finish ending a sandbox (gc will retry): %s", cleanup.exception())

    def _choose(self, request: Request) -> Pool:
        pools = list(self.pools)
        wanted = request.provider
        if not request.pool and not request.provider and (self.defaults.pool or self.defaults.provider):
            # A request that says what it needs is dispatched over every pool, the default's first
            # (a default provider with no pool configured gets its implicit one, as when named).
            pools.sort(key=lambda p: p.name != self.defaults.pool and p.provider != self.defaults.provider)
            wanted = None if self.defaults.pool else self.defaults.provider
        if request.provider == "ssh" and request.options.get("host") and not request.pool:
            # An ad-hoc attach (`create("ssh", host=...)`): the request's options say where.
            pools.insert(0, Pool(name=request.provider, provider=request.provider, implicit=True))
        elif wanted and not any(p.provider == wanted for p in pools):
            if request.auth_mode in LOCAL_AUTH_MODES:
                # The pin asks for a local pool the config activates: one made up here would
                # bypass it (the seed: with none active, dispatch fails at validation).
                return choose_pool(request, pools, self.availability)
            if why := registry.unknown_provider(wanted):
                raise InvalidArgument(why)
            model = CONFIG_MODELS.get(wanted)
            config = model() if model is not None and wanted != "ssh" else None
            implicit = Pool(name=wanted, provider=wanted, config=config, implicit=True)
            pools.insert(len(pools) if request.provider else 0, implicit)  # (a default's goes first)
        return choose_pool(request, pools, self.availability)

    def _expiry(self, request: Request, pool: Pool) -> float | None:
        """The TTL: the request's, else the one its pool's config sets, else [defaults] ttl_s, else
        the pool config's default. Only a provider whose page gives its sandboxes a timeout has a
        pool TTL (Modal: resources.timeoutSec, default 3600; its config's `ttl`): Daytona's
        timeoutSec is an auto-stop interval, and E2B, RunPod, ssh and local pools have none."""
        ttl_of = pool_setting(pool, "ttl")
        pool_ttl, pool_set = ttl_of() if ttl_of is not None else (None, False)
        ttl = request.timeout_s or (pool_ttl if pool_set else None) or self.defaults.ttl_s or pool_ttl
        return time.time() + ttl if ttl else None

    def record(self, ref: str) -> SandboxRecord:
        return self.ledger.get(ref)

    def list(self, include_terminated: bool = False) -> list[SandboxRecord]:
        return self.ledger.list(include_terminated)

    async def get(self, ref: str) -> ManagedSandbox:
        """A live sandbox by id or name (connected on first use).

        An open sandbox is re-checked against the ledger at most once a second: another process may
        have terminated it, but an agent's every call should not pay for a database query. Then too
        a provider whose endpoints move (local) is asked where the sandbox is now.
        """
        box = self._open.get(ref) or next((b for b in self._open.values() if b.name == ref), None)
        if box is not None and time.monotonic() - box.verified_at < LEDGER_RECHECK_SECONDS:
            return box
        record = self.ledger.get(ref)
        if record.status == "terminated":
            self._open.pop(record.id, None)
            raise SandboxGone(ref, f"terminated ({record.status_reason})")
        ending = record.ending()  # (by this process or another: each claims it in the ledger first)
        if ending is not None:
            raise SandboxGone(ref, f"being terminated ({ending})")
        if record.status in ("provisioning", "failed"):
            raise ProviderError(f"sandbox {ref!r} is {record.status}; wait, or destroy it and create another")
        if await self.end_if_expired(record):
            raise SandboxGone(ref, "expired (its TTL ran out)")
        box = self._open.get(record.id)
        provider = self._provider_of(record)
        if box is None or provider.endpoint_moves:
            endpoint = await provider.endpoint(Handle.model_validate(record.handle))
            where = {"host": endpoint.host, "port": endpoint.port, "user": endpoint.user}
            if where != record.endpoint:  # what `tether info` and sandbox_info show must work
                self.ledger.set_endpoint(record.id, where)
                record = self.ledger.get(record.id)
            if box is not None:
                await box.move_to(endpoint)
            else:
                # Another call may have opened it while we waited for the endpoint: share that one. (env
                # given at creation lives only in the creating process: the ledger has no values.)
                box = self._open.setdefault(
                    record.id, ManagedSandbox(self, record, endpoint, provider.tether_dir(record.id), {})
                )
        assert box is not None
        box.verified_at = time.monotonic()
        return box

    async def end_if_expired(self, record: SandboxRecord) -> bool:
        """End the sandbox if it is past its TTL, not when a reaper comes by (a CLI command runs
        none); whether it was. A failure to end it is logged, and gc retries."""
        if not record.expired():
            return False
        try:
            await self.destroy(record.id, "expired (TTL)")
        except ProviderError as exc:
            log.warning("could not terminate expired sandbox %s (gc will retry): %s", record.id, exc)
        return True

    async def destroy(self, ref: str, reason: str = "destroyed") -> CostEvent:
        """Terminate a sandbox and record its cost event (idempotent: a second call returns the first
        event). Raises ProviderError when the provider could not terminate it (try again, or gc)."""
        return (await self.end(ref, reason))[0]

    async def end(self, ref: str, reason: str = "destroyed") -> tuple[CostEvent, bool]:
        """destroy, and whether this call was the one that recorded the termination (False: it
        had ended already, or another call or process ended it meanwhile: this one waited for it)."""
        record = self.ledger.get(ref)
        recorded = await self._end(record, reason)
        event = self.ledger.cost_event(record.id)
        if event is None:  # (the other process's termination failed: it is running still)
            raise ProviderError(f"sandbox {ref} could not be terminated by the process that tried; try again")
        return event, recorded

    async def _end(
        self, record: SandboxRecord, reason: str, idle_since: float | None = None, wait: bool = True
    ) -> bool:
        """End the sandbox unless it has ended; whether this call recorded its termination.

        The ledger is claimed first (Ledger.claim_ending), so that no two calls or processes ask
        the provider to end one sandbox. One being ended elsewhere is waited for (`wait`), or left
        to that. `idle_since`: end it only if nothing was done in it after that (the reaper's idle
        timeout; this fleet's own activity is written through first, a command in flight is now).

        The ending runs as a task of its own: a caller cancelled half way (a cancelled tool call,
        Ctrl-C) does not leave a machine half gone and recorded as running; it is finished here
        in the background (close() waits for it), or, should this process die first, by a reaper."""
        deadline = time.monotonic() + ENDING_WAIT_S
        while True:
            if record.status == "terminated":
                return False
            ending = _ending_here(record.id)
            if ending is None:
                box = self._open.get(record.id)
                if box is not None:
                    self.flush_activity(box)
                claim = self.ledger.claim_ending(record.id, reason, idle_since)
                if claim == "claimed":
                    break
                if claim != "ending elsewhere" or not wait:
                    return False
                if time.monotonic() > deadline:
                    raise ProviderError(
                        f"sandbox {record.id} is being terminated by another process that has not finished in "
                        f"{ENDING_WAIT_S:.0f}s; try again later, or `tether gc`"
                    )
                await asyncio.sleep(0.2)
            elif not wait:
                return False
            else:
                with contextlib.suppress(Exception):  # (its failure is its caller's to report; see end())
                    await asyncio.shield(ending)
            record = self.ledger.get(record.id)
        # Claimed: from here on, nothing opens the sandbox again (get() reads the claim).
        work = asyncio.ensure_future(self._finish_ending(record, reason, self._open.pop(record.id, None)))
        _ending_started(record.id, work)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if not work.done():
                self._cleanups.add(work)
                work.add_done_callback(self._cleanup_done)
            raise

    async def _finish_ending(self, record: SandboxRecord, reason: str, box: ManagedSandbox | None) -> bool:
        """The ending itself, once claimed: whether it recorded the termination. Should the provider
        fail, the claim is withdrawn (the sandbox is as it was: try again); should this task be
        cancelled (the process is going away), the claim stays, for a reaper to finish."""
        try:
            if box is not None:
                # A command still running is stopped first, while the machine is there to kill
                # it on: it would run on (a local one) or end unseen, its output gone with the box.
                await box.end_operations(reason)
                with contextlib.suppress(Exception):
                    await box.close()  # its own channels only: other sandboxes may share the connection
            return await self._terminate(record, reason)
        except Exception:
            with contextlib.suppress(sqlite3.Error):
                self.ledger.clear_ending(record.id)
            raise

    async def _terminate(self, record: SandboxRecord, reason: str) -> bool:
        """Have the provider end the sandbox, then record that with its cost event; whether this
        call recorded it. (A sandbox with a handle is claimed first, see _end: a process whose
        connection to the machine dies meanwhile reads why at once, ManagedSandbox.ended_elsewhere.)

        A row with no handle is a provision cut short (it failed, or its process died) or one
        another process is still making. As gc does, the provider's listing says what it left: that
        is removed here and billed from the provision's start (nothing found: nothing billed). A
        process still provisioning finds the row terminated and removes what it gets; should it
        finish first, the sandbox is ended by its handle like any other.
        """
        for _ in range(3):  # (provisioning → running or failed → terminated: the row changes twice at most)
            if record.status == "terminated":
                return False
            if record.handle:
                provider = self._provider_of(record)
                try:
                    await provider.terminate(Handle.model_validate(record.handle))
                except EndedWithLeftovers as exc:
                    # Ended, but not cleanly (an attached host that could not be reached): the
                    # ledger's reason says what is left where, as nothing will find it later.
                    log.warning("%s ended with leftovers: %s", record.id, exc)
                    reason = f"{reason}{LEFTOVERS}{exc}"[:1000]
                return self._record_termination(record, reason)
            found = await self._remove_leftovers(record)
            if self._record_termination(record, reason, found=found, only_if=record.status):
                return True
            record = self.ledger.get(record.id)  # (it changed meanwhile: look again)
        return False

    def _record_termination(
        self,
        record: SandboxRecord,
        reason: str,
        ended: float | None = None,
        found: bool = False,
        only_if: str | None = None,
    ) -> bool:
        """Mark it terminated with its cost event, once; whether this call did. `ended` is when it
        stopped costing, if not now; `found`: a provision cut short left a machine behind;
        `only_if`: only while its status is still this."""
        event = self._cost(record, time.time(), ended, found)
        recorded = self.ledger.terminate(record.id, reason, event, only_if=only_if)
        if recorded:
            self._emit(
                "sandbox.terminated",
                {
                    "sandbox": {**summary(record), "status": "terminated", "status_reason": reason},
                    "cost": event.as_dict(),
                },
            )
        return recorded

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(event, payload)
            except Exception:  # a listener's trouble is not the sandbox's
                log.exception("listener failed on %s", event)

    async def preview_url(self, ref: str, port: int) -> tuple[str, dict[str, str]] | None:
        """The provider's own URL for a port of this sandbox, or None."""
        record = self.ledger.get(ref)
        if record.handle is None:
            return None
        return await self._provider_of(record).preview_url(Handle.model_validate(record.handle), port)

    def cost_so_far(self, record: SandboxRecord) -> CostEvent:
        """A terminated sandbox's cost event; for a live one, what it has cost until now."""
        final = self.ledger.cost_event(record.id) if not record.live else None  # (only an ended one has one)
        return final or self._cost(record, time.time())

    def _cost(self, record: SandboxRecord, now: float, ended: float | None = None, found: bool = False) -> CostEvent:
        """The cost event of a sandbox that stopped costing at `ended` (default: now). A provision
        that never produced anything (no handle, and no machine `found` by its label) cost nothing;
        one that did ran, and was billed, from its start until it was removed."""
        end = now if ended is None else ended
        seconds = max(0.0, end - record.created_at) if record.handle or found else 0.0
        try:
            profile = self.profile(record.provider)
            billing, idle_cost = profile.billing_model, profile.idle_cost_model
        except ProviderError:
            billing, idle_cost = "unknown", "metered"
        if idle_cost != "metered":
            # Billed while running only: paused time costs nothing (E2B) or storage alone (Daytona),
            # not sandbox-seconds. Modal's warm standby is metered and stays in.
            seconds = max(0.0, seconds - record.paused_until(end))
        gpu_seconds = seconds * record.gpu_count
        estimate: float | None = None
        if billing == "fixed":
            estimate = 0.0
        else:
            rate = self._hourly_rate(record)
            if rate is not None:
                estimate = rate * (gpu_seconds or seconds) / 3600
        return CostEvent(record.id, "sandbox-seconds", seconds, gpu_seconds, record.gpu_type, billing, estimate, now)

    def _hourly_rate(self, record: SandboxRecord) -> float | None:
        with contextlib.suppress(ProviderError):
            own = pool_setting(self.pool_of(record), "rateUsdPerHour")
            if own is not None:
                return float(own)
        if record.gpu_type:
            rates = GPU_RATES_USD_PER_HOUR.get(record.provider, {})
            return rates.get(_gpu_rate_key(record.gpu_type, rates))
        return None

    # -- optional operations -------------------------------------------------------------------------

    async def pause(self, ref: str) -> None:
        record = self.ledger.get(ref)
        self._require(record, "supports_pause_resume", "pause")
        await self._provider_of(record).pause(Handle.model_validate(record.handle))
        self.ledger.set_paused(record.id, True)

    async def resume(self, ref: str) -> None:
        record = self.ledger.get(ref)
        self._require(record, "supports_pause_resume", "resume")
        await self._provider_of(record).resume(Handle.model_validate(record.handle))
        self.ledger.set_paused(record.id, False)

    async def snapshot(self, ref: str) -> str:
        record = self.ledger.get(ref)
        self._require(record, "supports_fs_snapshot", "snapshot")
        return await self._provider_of(record).snapshot(Handle.model_validate(record.handle))

    async def capacity(self, ref: str) -> Capacity:
        record = self.ledger.get(ref)
        self._require(record, "supports_capacity_query", "report capacity")
        return await self._provider_of(record).capacity(Handle.model_validate(record.handle))

    def _require(self, record: SandboxRecord, capability: str, operation: str) -> None:
        if record.status == "terminated":
            raise SandboxGone(record.id, "terminated")
        profile = self.profile(record.provider)
        if not getattr(profile, capability):
            alias = type(profile).model_fields[capability].alias
            raise Unsupported(record.provider, operation, f"its profile says {alias}: false")

    # -- lifecycle -----------------------------------------------------------------------------------

    def flush_activity(self, box: ManagedSandbox) -> None:
        """Write a sandbox's last activity to the ledger (when it has news); a command still running
        counts as now. A failed write (a locked database) is logged, not raised: it runs in the
        middle of tool calls, and the next flush tries again."""
        if box.busy:
            box.last_used = time.time()
        if box.last_used == box.flushed_activity:
            return
        try:
            self.ledger.touch(box.id, box.last_used)
        except sqlite3.Error as exc:
            log.warning("could not record %s's last activity: %s", box.id, exc)
            return
        box.flushed_activity = box.last_used

    def keep_beating(self, box: ManagedSandbox) -> None:
        """An operation starts in `box`: make sure the heartbeat runs, and that it looks at `box`
        before the ledger's last activity of it grows stale (it may be asleep until another box is due)."""
        if self._heartbeat is not None and not self._heartbeat.done():
            if box.flushed_activity + box.flush_every * 0.9 < self._heartbeat_due:
                self._heartbeat_wake.set()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (no loop, no operation in flight either)
            return
        self._heartbeat_wake = asyncio.Event()  # (of this loop)
        self._heartbeat = loop.create_task(self._beat(), name=HEARTBEAT_TASK)

    async def _beat(self) -> None:
        """The heartbeat: while some open sandbox has an operation in flight (a command, a job wait,
        a transfer), write its activity through to the ledger before it is `flush_every` stale, so
        that no process's reaper takes it for idle however long the operation runs (the operation
        itself only marks its start); once more when the operation ends. Returns when no open
        sandbox is busy; `close` cancels it."""
        while True:
            boxes = list(self._open.values())
            for box in boxes:
                if not box.busy or time.time() >= box.flushed_activity + box.flush_every * 0.9:
                    self.flush_activity(box)  # (not busy: news only when its operation ended since the last look)
            busy = [box for box in boxes if box.busy]
            if not busy:
                return
            due = min(box.flushed_activity + box.flush_every * 0.9 for box in busy)
            # (a write that failed left its box due already: try again a little later, not at once)
            self._heartbeat_due = max(due, time.time() + min(box.flush_every for box in busy) / 10)
            self._heartbeat_wake.clear()
            with contextlib.suppress(TimeoutError):  # (or sooner: woken for a box that became busy)
                await asyncio.wait_for(self._heartbeat_wake.wait(), self._heartbeat_due - time.time())

    async def _jobs_running(self, record: SandboxRecord) -> bool:
        """Whether any of tether's background jobs still runs in the sandbox: one look, through a
        sandbox object of its own (the look is not activity). A box that cannot be reached or does
        not answer within JOB_PROBE_TIMEOUT_S runs nothing tether can see: False."""
        if record.handle is None:
            return False
        try:
            provider = self._provider_of(record)
            handle = Handle.model_validate(record.handle)

            async def look() -> bool:
                endpoint = await provider.endpoint(handle)
                async with Sandbox(endpoint, pool=self.connections, tether_dir=provider.tether_dir(record.id)) as probe:
                    return any(job.status == "running" for job in await probe.job_list())

            return await asyncio.wait_for(look(), JOB_PROBE_TIMEOUT_S)
        except Exception as exc:  # (unreachable, gone, timed out: idle)
            log.info("could not look for %s's background jobs (taken as idle): %s", record.id, exc)
            return False

    async def reap(self, now: float | None = None, errors: list[str] | None = None) -> list[tuple[str, str]]:
        """Terminate sandboxes past their TTL or idle timeout; returns (id, reason) for each this
        call terminated, and appends to `errors` what could not be.

        Activity, for the idle timeout: an operation in flight in any process (a command, a job
        wait, a transfer: the heartbeat writes it through), any other operation when it was made,
        and a background job of tether's still running in the sandbox (asked of the sandbox, only
        when it would otherwise be reaped as idle; finding one counts as activity now).

        A termination another process began and did not live to record is finished."""
        for box in list(self._open.values()):
            self.flush_activity(box)
        now = time.time() if now is None else now
        reaped = []

        def lag(record: SandboxRecord) -> float:
            """How late the ledger may hear of the sandbox's last use: a process writes a use
            through only once it is flush_every newer than the last it wrote (this one's are
            written above)."""
            return 0.0 if record.id in self._open else activity_flush_every(record.idle_timeout)

        for record in self.ledger.list():
            if record.status not in ("running", "paused"):
                continue
            reason, idle_since = None, None
            if record.ending_interrupted():
                reason = f"{record.ending_reason} (finished here: the process ending it died first)"
            elif record.expired(now):
                reason = "expired (TTL)"
            elif record.idle_timeout is not None and now - record.last_activity >= record.idle_timeout + lag(record):
                reason, idle_since = f"idle for {now - record.last_activity:.0f}s", record.last_activity
                # (a paused sandbox runs nothing, and asking it could resume it; one whose creator
                # ended without tearing it down is reaped all the same)
                spared = record.keep or record.owner_alive()
                if record.status == "running" and spared and await self._jobs_running(record):
                    reason = None
                    with contextlib.suppress(sqlite3.Error):  # (not idle either way; the next pass retries)
                        self.ledger.touch(record.id)
            if reason is None and not record.keep and not record.owner_alive():
                reason, idle_since = f"its creator (pid {record.owner_pid}) ended without tearing it down", None
            if reason is None:
                continue
            try:
                # The row was read before the awaits above: ended only if, now, it is still idle
                # and no one else is ending it (another process's reaper, a destroy).
                if await self._end(record, reason, idle_since=idle_since, wait=False):
                    reaped.append((record.id, reason))
            except Exception as exc:  # keep reaping the others; this one is retried next time
                log.warning("could not reap %s (%s): %s", record.id, reason, exc)
                if errors is not None:
                    errors.append(f"{record.id}: could not reap ({reason}): {exc}")
        return reaped

    async def gc(self) -> GcReport:
        """Reap expired sandboxes, then reconcile the ledger with every provider's own listing.

        Each provider's rows are read twice: before its listing (a row already provisioned then
        whose resource is not listed has vanished) and after it (a listed resource with no row is
        an orphan: rows are committed before anything is provisioned). A sandbox created while
        gc runs is therefore neither an orphan nor vanished.
        """
        report = GcReport()
        report.reaped = await self.reap(errors=report.errors)
        names = {r.provider for r in self.ledger.list(include_terminated=True)} | {p.provider for p in self.pools}
        for provider_name in sorted(names):
            before = [r for r in self.ledger.list(include_terminated=True) if r.provider == provider_name]
            try:
                provider = self._listing_provider(provider_name, before)
                listed = await provider.list() if provider is not None else None
            except Exception as exc:
                report.errors.append(f"{provider_name}: cannot list: {exc}")
                continue
            if listed is None and provider is None:
                continue  # (unavailable here, credentials missing say: its rows wait for a gc that can)
            if listed is None:  # (the provider keeps no listing, e.g. ssh: nothing to compare)
                for record in before:
                    reason = "provisioning interrupted; the provider has no listing to look for leftovers in"
                    if record.provision_abandoned() and self._record_termination(record, reason):
                        report.interrupted.append(record.id)
                continue
            rows = self.ledger.list(include_terminated=True)
            after = [r for r in rows if r.provider == provider_name]
            others = {r.id for r in rows if r.provider != provider_name}
            await self._reconcile(provider, listed, before, after, others, report)
        report.tunnels_closed = self.ledger.close_abandoned_tunnels()
        return report

    def _listing_provider(self, provider_name: str, records: list[SandboxRecord]) -> Provider | None:
        for pool in self.pools:
            if pool.provider == provider_name and self.availability(pool) is None:
                return self.provider_for(pool)
        for record in records:
            if record.provider == provider_name:
                try:
                    return self._provider_of(record)
                except ProviderUnavailable:
                    return None
        return None

    async def _reconcile(
        self,
        provider: Provider,
        listed: list[ListedResource],
        before: list[SandboxRecord],
        after: list[SandboxRecord],
        others: set[str],
        report: GcReport,
    ) -> None:
        """One provider's listing against its ledger rows (read before and after the listing).
        `others`: the ids of other providers' rows, whose resources a provider that shares where it
        keeps them (a LocalProvider subclass lists every local sandbox) may list too: never orphans.
        Nor is what another installation made (another state dir, on a shared account)."""
        by_id = {r.id: r for r in after}
        seen = set()
        mine = self.ledger.installation_id
        for resource in listed:
            if not resource.tether_id or resource.tether_id in others:
                continue  # not labelled by tether, or another provider's: not this one's to remove
            if resource.installation not in (None, mine):
                continue  # another installation's: its own gc's to reconcile
            record = by_id.get(resource.tether_id)
            if record is not None:
                seen.add(record.id)
            if record is not None and record.status != "terminated" and not record.provision_abandoned():
                continue
            handle = Handle(external_id=resource.external_id, data=resource.data)
            try:
                await provider.terminate(handle)
            except Exception as exc:  # the others still get reconciled; this one next time
                report.errors.append(f"{resource.tether_id}: could not terminate: {exc}")
                continue
            if record is None or record.status == "terminated":
                report.orphans.append(resource.tether_id)
            elif self._record_termination(record, "provisioning interrupted; gc removed what it left", found=True):
                report.interrupted.append(record.id)
        for record in before:
            current = by_id.get(record.id, record)
            if record.id in seen or current.status == "terminated":
                continue
            if current.provision_abandoned():
                if self._record_termination(current, "provisioning interrupted; nothing was left behind"):
                    report.interrupted.append(record.id)
            elif current.ending() is not None:
                continue  # (not listed, as the process ending it has had it removed: it records that)
            elif record.status in ("running", "paused"):  # it existed before the listing began
                ended = max(current.last_activity, current.created_at)
                if self._record_termination(current, "vanished: the provider no longer has it", ended):
                    report.vanished.append(record.id)

    async def _remove_leftovers(self, record: SandboxRecord) -> bool:
        """Terminate what the provider's listing shows labelled with this sandbox's id (a provision
        that left no handle); whether there was anything. A provider with no listing: nothing."""
        provider = self._provider_of(record)
        found = False
        for resource in await provider.list() or []:
            if resource.tether_id == record.id:
                await provider.terminate(Handle(external_id=resource.external_id, data=resource.data))
                found = True
        return found

    def costs(self) -> list[tuple[SandboxRecord, CostEvent]]:
        return self.ledger.cost_events()

    async def close(self, teardown_created: bool = False) -> list[str]:
        """Close connections; with `teardown_created`, destroy the sandboxes this fleet created
        (except those created with keep). Returns the ids destroyed."""
        destroyed = []
        if teardown_created:
            for sandbox_id in sorted(self.created_here):
                record = self.ledger.get(sandbox_id)
                if record.live and not record.keep and record.status != "provisioning":
                    try:
                        await self.destroy(sandbox_id, "tether stopped")
                        destroyed.append(sandbox_id)
                    except Exception as exc:
                        log.warning("could not tear down %s: %s", sandbox_id, exc)
        if self._cleanups:  # failed provisions being undone, endings a caller gave up on: let them finish
            await asyncio.wait(set(self._cleanups), timeout=CLEANUP_GRACE_S)
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None and not heartbeat.done():
            heartbeat.cancel()
            await asyncio.wait({heartbeat})  # (its cancellation is not ours: not raised here)
        for box in list(self._open.values()):
            self.flush_activity(box)
            with contextlib.suppress(Exception):
                await box.close()
        self._open.clear()
        for provider in self._providers.values():
            with contextlib.suppress(Exception):
                await provider.close()
        return destroyed


def _says_what_it_needs(request: Request) -> bool:
    """Requirement or runtime kinds, or an auth mode: then dispatch chooses among all pools
    ([defaults] only goes first), instead of the default pool being the only candidate."""
    return bool(request.requirement_kinds() or request.runtime_kinds or request.auth_mode)


def pool_setting(pool: Pool, name: str) -> Any:
    """A setting of the pool's provider config, or None. A local pool's config is metadata for
    people, never read (the seed), whatever keys it holds."""
    if isinstance(pool.config, LocalPoolConfig):
        return None
    return getattr(pool.config, name, None)


def _gpu_of(request: Request, pool: Pool) -> tuple[str | None, int]:
    """The GPU type and count a sandbox will have: the request's ("h100", or "h100:2" for two),
    else its pool config's (the configs of GPU providers have `gpu_spec`). A request that names a
    type and no count takes the pool's count."""
    spec = pool_setting(pool, "gpu_spec")
    kind, count = spec() if spec is not None else (None, 0)
    if request.gpu:
        asked, asked_count = gpu_type_and_count(request.gpu)
        return asked, asked_count if ":" in request.gpu else max(1, count)
    return (kind, count) if kind else (None, 0)


def _gpu_rate_key(gpu_type: str, rates: dict[str, float]) -> str | None:
    """The rate table's key for a GPU named as a provider names it ("NVIDIA A100 80GB PCIe",
    "A100-80GB", "a100"): the longest key that appears in the name."""
    name = gpu_type.lower().replace("-", " ").replace("_", " ")
    found = [key for key in rates if key.replace("-", " ") in name]
    return max(found, key=len, default=None)
