"""Warm SSH connections shared by every caller, with a session-channel budget per connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncssh

from .budget import DEFAULT_SESSION_LIMIT, ChannelBudget
from .connect import dial
from .endpoint import SSHEndpoint
from .errors import ConnectError, ConnectionLost, Unreachable
from .hostkeys import HostKeyPins
from .state import default_store

log = logging.getLogger(__name__)
T = TypeVar("T")

# Re-dial delays after a connection died. The first dial of an endpoint is not retried: a wrong
# address should fail at once, while a box that was reachable a moment ago is worth waiting for.
REDIAL_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
# Errors meaning "this connection is gone", as opposed to "the server refused this one channel".
CONNECTION_GONE = (asyncssh.ConnectionLost, asyncssh.DisconnectError, BrokenPipeError, ConnectionError)


@dataclass(eq=False)
class PooledConnection:
    conn: asyncssh.SSHClientConnection
    group: _EndpointConnections
    budget: ChannelBudget = field(default_factory=ChannelBudget)
    alive: bool = True
    idle_timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        # A held endpoint keeps the connection its port forwards go over (see Hold).
        return self.budget.in_use == 0 and not (self.group.holds and self.group.forwarding() is self)


@dataclass(eq=False)
class Lease:
    """One session-channel slot on one connection. Release it after the channel has closed."""

    pooled: PooledConnection
    _release: Callable[[Any], None]
    released: bool = False

    @property
    def conn(self) -> asyncssh.SSHClientConnection:
        return self.pooled.conn

    @property
    def alive(self) -> bool:
        return self.pooled.alive and not self.released

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release(self)


@dataclass(eq=False)
class Hold:
    """Keeps an endpoint's forwarding connection (the one port forwards go over) from being closed
    as idle while tunnels use it: they are channels but not sessions, so they take no slot. The
    hold is on the endpoint, not on one connection: when that connection dies, the one dialed in
    its place is held as well, with no one having to take the hold again."""

    group: _EndpointConnections
    _release: Callable[[Hold], None]
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release(self)


class _EndpointConnections:
    """The connections to one endpoint and the callers waiting for a free slot."""

    def __init__(self, endpoint: SSHEndpoint) -> None:
        self.endpoint = endpoint
        self.connections: list[PooledConnection] = []
        self.changed = asyncio.Condition()
        self.dialing = 0
        # Whether a dial retries through REDIAL_BACKOFF: once a connection was had (a drop is often
        # a moment's: sshd restarting), until a re-dial failed all the way through it (the host is
        # down: each caller then learns so at the first refusal, not after seconds of retries).
        self.redial_backoff = False
        self.holds = 0  # tunnels using the forwarding connection (see Hold)
        # Learned from refusals; every connection to the same server shares it.
        self.session_limit = DEFAULT_SESSION_LIMIT

    def forwarding(self) -> PooledConnection | None:
        """The connection port forwards go over: the first live one (ConnectionPool.connection)."""
        # is_closed() too: a connection can close before its watcher has run and marked it dead.
        return next((p for p in self.connections if p.alive and not p.conn.is_closed()), None)


class ConnectionPool:
    """Shares connections between callers; opens more (or queues) when a connection's budget is spent.

    Session channels (shells, exec, SFTP) count against a per-connection budget learned from the
    server. Port forwards don't: OpenSSH's MaxSessions only limits sessions.
    """

    def __init__(
        self,
        pins: HostKeyPins | None = None,
        *,
        max_connections: int = 4,
        idle_close: float = 300.0,
    ) -> None:
        self._pins = pins
        self.max_connections = max_connections
        self.idle_close = idle_close
        self._groups: dict[tuple[Any, ...], _EndpointConnections] = {}
        self._closed = False

    @property
    def pins(self) -> HostKeyPins:
        if self._pins is None:
            self._pins = HostKeyPins(default_store())
        return self._pins

    # -- public --------------------------------------------------------------------------------------

    async def connection(self, endpoint: SSHEndpoint) -> asyncssh.SSHClientConnection:
        """A live connection to `endpoint` for channels outside the session budget (port forwards)."""
        return (await self._live(endpoint)).conn

    async def hold(self, endpoint: SSHEndpoint) -> Hold:
        """Keep `endpoint`'s forwarding connection open (not closed as idle) until the hold is
        released: a tunnel's. The connection is dialed now, if there is none."""
        pooled = await self._live(endpoint)
        pooled.group.holds += 1
        self._cancel_idle_timer(pooled)
        return Hold(pooled.group, self._release_hold)

    def holds(self, endpoint: SSHEndpoint) -> int:
        """How many holds keep `endpoint`'s forwarding connection open: for tests."""
        group = self._groups.get(endpoint.pool_key())
        return group.holds if group else 0

    async def _live(self, endpoint: SSHEndpoint) -> PooledConnection:
        group = self._group(endpoint)
        async with group.changed:
            while True:
                for pooled in [p for p in group.connections if p.conn.is_closed()]:
                    self._forget(group, pooled)
                pooled = group.forwarding()
                if pooled is not None:
                    return pooled
                if not group.dialing:
                    break
                # A burst of forwards after the connection died (a page's requests through a
                # tunnel) waits for the one dial under way, instead of each dialing its own.
                await group.changed.wait()
            pooled = await self._dial(group)
            self._maybe_idle(pooled)  # (no session may ever come to arm its idle close)
            return pooled

    async def open_session(
        self, endpoint: SSHEndpoint, opener: Callable[[asyncssh.SSHClientConnection], Awaitable[T]]
    ) -> tuple[T, Lease]:
        """Reserve a session slot, then call `opener(conn)` to open the channel on it.

        A refusal from the server (MaxSessions reached) never reaches the caller: the budget is
        lowered and the open is retried on a connection with room, waiting for one if necessary.

        Raises:
            ConnectError (and subclasses): the endpoint cannot be reached or logged in to.
            ConnectionLost: the connection died repeatedly while the channel was being opened.
        """
        group = self._group(endpoint)
        lost = refused_alone = 0
        while True:
            pooled = await self._reserve(group)
            lease = Lease(pooled, self._release)
            try:
                result = await opener(pooled.conn)
            except asyncssh.ChannelOpenError as exc:
                if not pooled.alive or pooled.conn.is_closed():
                    lease.release()
                    self._forget(group, pooled)
                    continue
                if exc.code != asyncssh.OPEN_CONNECT_FAILED:
                    # Not "too many sessions" (OpenSSH answers that with CONNECT_FAILED): nothing to
                    # learn, and nothing a retry would change.
                    lease.release()
                    raise ConnectError(f"{endpoint.display} refused to open a session: {exc.reason}") from None
                if pooled.budget.in_use == 1 and refused_alone < 10:
                    # Refused with nothing else of ours open: the server still counts a session we
                    # closed a moment ago (until its processes exit). Not a limit: wait and retry.
                    lease.release()
                    refused_alone += 1
                    await asyncio.sleep(0.05 * refused_alone)
                    continue
                lease.released = True
                pooled.budget.learn_refusal()
                group.session_limit = min(group.session_limit, pooled.budget.limit)
                for other in group.connections:
                    other.budget.limit = min(other.budget.limit, group.session_limit)
                log.debug(
                    "%s refused a session with %d open: limit now %d",
                    endpoint.display,
                    pooled.budget.in_use,
                    group.session_limit,
                )
                if pooled.budget.in_use == 0:
                    raise ConnectError(f"{endpoint.display} refused to open a session: {exc.reason}") from None
                await self._notify(group)
                continue
            except CONNECTION_GONE:
                lease.release()
                self._forget(group, pooled)
                lost += 1
                if lost > 2:
                    raise ConnectionLost(f"{endpoint.display}: the connection keeps dropping") from None
                continue
            except BaseException:
                lease.release()
                raise
            return result, lease

    async def close(self) -> None:
        self._closed = True
        for group in list(self._groups.values()):
            closing = list(group.connections)  # (a closed connection's watcher removes it from the list)
            for pooled in closing:
                pooled.alive = False
                pooled.conn.close()
            for pooled in closing:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pooled.conn.wait_closed(), 2)
        self._groups.clear()

    def stats(self, endpoint: SSHEndpoint) -> list[tuple[int, int]]:
        """(in use, limit) per live connection to `endpoint`: for tests and `sandbox_info`."""
        group = self._groups.get(endpoint.pool_key())
        return [(p.budget.in_use, p.budget.limit) for p in group.connections if p.alive] if group else []

    # -- internals -----------------------------------------------------------------------------------

    def _group(self, endpoint: SSHEndpoint) -> _EndpointConnections:
        if self._closed:
            raise ConnectError("the connection pool is closed")
        key = endpoint.pool_key()
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _EndpointConnections(endpoint)
        return group

    async def _reserve(self, group: _EndpointConnections) -> PooledConnection:
        async with group.changed:
            while True:
                for dead in [p for p in group.connections if p.alive and p.conn.is_closed()]:
                    self._forget(group, dead)
                live = [p for p in group.connections if p.alive]
                # Fill the busiest connection that still has room, so idle ones can be closed.
                for pooled in sorted(live, key=lambda p: p.budget.available):
                    if pooled.budget.try_acquire():
                        self._cancel_idle_timer(pooled)
                        return pooled
                if len(live) + group.dialing < self.max_connections:
                    pooled = await self._dial(group)
                    if pooled.budget.try_acquire():
                        return pooled
                    continue
                await group.changed.wait()

    async def _dial(self, group: _EndpointConnections) -> PooledConnection:
        """Dial a new connection; called with `group.changed` held (released while dialing)."""
        group.dialing += 1
        group.changed.release()
        try:
            conn = await self._dial_with_backoff(group)
        finally:
            await group.changed.acquire()
            group.dialing -= 1
            # Whether it worked or not, callers that waited because a dial was under way must look again.
            group.changed.notify_all()
        pooled = PooledConnection(conn, group, ChannelBudget(group.session_limit))
        group.connections.append(pooled)
        group.redial_backoff = True
        # Others waiting for room may fit on the new connection too.
        group.changed.notify_all()
        asyncio.get_running_loop().create_task(self._watch(group, pooled))
        return pooled

    async def _dial_with_backoff(self, group: _EndpointConnections) -> asyncssh.SSHClientConnection:
        delays = REDIAL_BACKOFF if group.redial_backoff else ()
        for delay in delays:
            try:
                return await dial(group.endpoint, self.pins)
            except (Unreachable, ConnectionLost) as exc:
                log.info("re-dial of %s failed (%s); retrying in %.2fs", group.endpoint.display, exc, delay)
                await asyncio.sleep(delay)
        try:
            return await dial(group.endpoint, self.pins)
        except (Unreachable, ConnectionLost):
            group.redial_backoff = False
            raise

    async def _watch(self, group: _EndpointConnections, pooled: PooledConnection) -> None:
        with contextlib.suppress(Exception):
            await pooled.conn.wait_closed()
        if pooled.alive:
            log.info("connection to %s closed", group.endpoint.display)
        self._forget(group, pooled)
        await self._notify(group)

    def _forget(self, group: _EndpointConnections, pooled: PooledConnection) -> None:
        pooled.alive = False
        self._cancel_idle_timer(pooled)
        if pooled in group.connections:
            group.connections.remove(pooled)
        pooled.conn.close()

    def _release(self, lease: Lease) -> None:
        pooled = lease.pooled
        pooled.budget.release()
        self._maybe_idle(pooled)
        asyncio.get_running_loop().create_task(self._notify(pooled.group))

    def _release_hold(self, hold: Hold) -> None:
        hold.group.holds = max(0, hold.group.holds - 1)
        for pooled in hold.group.connections:
            self._maybe_idle(pooled)

    def _maybe_idle(self, pooled: PooledConnection) -> None:
        if pooled.alive and pooled.idle and self.idle_close > 0 and pooled.idle_timer is None:
            loop = asyncio.get_running_loop()
            pooled.idle_timer = loop.call_later(self.idle_close, self._close_if_idle, pooled.group, pooled)

    def _close_if_idle(self, group: _EndpointConnections, pooled: PooledConnection) -> None:
        pooled.idle_timer = None
        if pooled.alive and pooled.idle:
            log.debug("closing idle connection to %s", group.endpoint.display)
            self._forget(group, pooled)

    def _cancel_idle_timer(self, pooled: PooledConnection) -> None:
        if pooled.idle_timer is not None:
            pooled.idle_timer.cancel()
            pooled.idle_timer = None

    @staticmethod
    async def _notify(group: _EndpointConnections) -> None:
        async with group.changed:
            group.changed.notify_all()


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ConnectionPool] = weakref.WeakKeyDictionary()


def default_pool() -> ConnectionPool:
    """The pool shared by every sandbox on the running event loop."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None or pool._closed:
        pool = _pools[loop] = ConnectionPool()
    return pool
