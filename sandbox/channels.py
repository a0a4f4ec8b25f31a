"""The long-lived channels of one sandbox: its SFTP client and its pool of persistent shells."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import asyncssh

from .endpoint import SSHEndpoint
from .errors import ConnectionLost, ConnectTimeout, ShellsBusy
from .pool import CONNECTION_GONE, ConnectionPool, Lease
from .shell import DEFAULT_TETHER_DIR, PersistentShell, ShellDied, ShellInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors after which an SFTP client or shell is dead and must be reopened.
CHANNEL_GONE = (
    *CONNECTION_GONE,
    ShellDied,
    ConnectionLost,
    asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection,
    asyncssh.SFTPEOFError,
)


# Channels unused this long are closed (and reopened on the next use); once a connection has no
# channels left, the pool closes it after its own idle timeout.
DEFAULT_IDLE_TIMEOUT = 300.0
# A caller that waited this long for one of a sandbox's shells (each busy with a long command) gets
# a shell of its own, up to ShellPool.max_size: a short command must not wait for a long one to end.
# (Shorter waits are a busy moment, when a shell comes back sooner than a new one would start.)
BURST_AFTER_S = 1.0


class _IdleTimer:
    """Calls `close_idle` once nothing used the owner for `timeout` seconds."""

    def __init__(self, timeout: float, close_idle: Callable[[], Awaitable[None]]) -> None:
        self.timeout = timeout
        self._close_idle = close_idle
        self._last_used = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def touch(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_used = loop.time()
        if self.timeout > 0 and self._handle is None:
            self._handle = loop.call_later(self.timeout, self._fire)

    def _fire(self) -> None:
        self._handle = None
        loop = asyncio.get_running_loop()
        remaining = self._last_used + self.timeout - loop.time()
        if remaining > 0.001:
            self._handle = loop.call_later(remaining, self._fire)
            return
        self._task = loop.create_task(self._close_idle())  # referenced so it is not garbage-collected

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class SFTPChannel:
    """One SFTP client per sandbox, opened on first use and reopened after its connection died."""

    def __init__(self, endpoint: SSHEndpoint, pool: ConnectionPool, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self._endpoint = endpoint
        self._pool = pool
        self._client: asyncssh.SFTPClient | None = None
        self._lease: Lease | None = None
        self._lock = asyncio.Lock()
        self._active = 0
        self._idle = _IdleTimer(idle_timeout, self._close_if_idle)
        self._background: set[asyncio.Task[None]] = set()

    async def client(self) -> asyncssh.SFTPClient:
        client = self._client
        if client is not None and self._lease is not None and self._lease.alive:
            return client
        async with self._lock:
            if self._client is None or self._lease is None or not self._lease.alive:
                self._discard()
                self._client, self._lease = await self._pool.open_session(
                    # A name that is not UTF-8 comes through as os.fsdecode gives it (lone surrogates
                    # for its odd bytes) and goes back as the same bytes: one such file must not
                    # fail a whole listing, and it stays addressable from Python.
                    self._endpoint,
                    lambda conn: conn.start_sftp_client(path_errors="surrogateescape"),
                )
            return self._client

    @property
    def current(self) -> asyncssh.SFTPClient | None:
        """The session in use now, if one is open."""
        return self._client

    async def retrying(self, operation: Callable[[asyncssh.SFTPClient], Awaitable[T]]) -> T:
        """Run a read-only operation, retrying once on a fresh connection if the old one died."""
        self._active += 1
        try:
            try:
                return await operation(await self.client())
            except CHANNEL_GONE:
                log.info("SFTP to %s lost; re-dialing", self._endpoint.display)
                self._discard()
                try:
                    return await operation(await self.client())
                except CHANNEL_GONE as exc:
                    self._discard()
                    raise ConnectionLost(f"{self._endpoint.display}: connection lost: {exc}") from None
        finally:
            self._done()

    async def once(self, operation: Callable[[asyncssh.SFTPClient], Awaitable[T]]) -> T:
        """Run an operation with side effects; a dead connection becomes ConnectionLost."""
        self._active += 1
        try:
            return await operation(await self.client())
        except CHANNEL_GONE as exc:
            self._discard()
            raise ConnectionLost(
                f"{self._endpoint.display}: connection lost during the operation; it may or may not "
                f"have taken effect, check before retrying ({exc})"
            ) from None
        finally:
            self._done()

    async def release_fifo(self, path: str, opening: asyncio.Future[object]) -> None:
        """Free the SFTP session from an open of a named pipe (`opening`, still pending): the server
        serves one request at a time, and the open blocks it until something opens the pipe for
        writing. A second session does (read-write, which never blocks on a pipe) and lets go at
        once. Should that not free it (a pipe this user may not write), the blocked session is
        dropped: the next operation opens a new one."""
        if opening.done():
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                sftp, lease = await self._pool.open_session(self._endpoint, lambda conn: conn.start_sftp_client())
                try:
                    await (await sftp.open(path, "r+b")).close()
                finally:
                    sftp.exit()
                    lease.release()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(opening), 2)
        if not opening.done():
            log.warning(
                "%s: SFTP session blocked opening the named pipe %s; opening a new one", self._endpoint.display, path
            )
            self._discard()

    def close_later(self, f: asyncssh.SFTPClientFile) -> None:
        """Close a handle without making the caller wait for the server's reply."""
        self.in_background(f.close())

    def remove_later(self, *paths: str) -> None:
        """Remove files off the hot path; a failure only leaves a small file behind."""

        async def remove() -> None:
            sftp = await self.client()
            await asyncio.gather(*(sftp.remove(p) for p in paths), return_exceptions=True)

        self.in_background(remove())

    def in_background(self, work: Awaitable[object]) -> asyncio.Task[None]:
        """Run SFTP work off the hot path (closing the channel waits for it); failures are logged."""

        async def quietly() -> None:
            try:
                await work
            except Exception as exc:  # best effort by design: log, never raise
                log.debug("background SFTP work failed: %s", exc)

        task = asyncio.get_running_loop().create_task(quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _done(self) -> None:
        self._active -= 1
        self._idle.touch()

    async def _close_if_idle(self) -> None:
        if self._active == 0 and not self._background and self._client is not None:
            log.debug("closing idle SFTP channel to %s", self._endpoint.display)
            await self.close()

    def _discard(self) -> None:
        if self._client is not None:
            self._client.exit()
        if self._lease is not None:
            self._lease.release()
        self._client, self._lease = None, None

    async def close(self) -> None:
        self._idle.cancel()
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)
        client, lease = self._client, self._lease
        self._client, self._lease = None, None
        if client is not None:
            client.exit()
            with contextlib.suppress(Exception):
                # Release the slot only once the server freed the session, or it may refuse the next.
                await asyncio.wait_for(client.wait_closed(), 2)
        if lease is not None:
            lease.release()


class _Slot:
    def __init__(self, shell: PersistentShell, lease: Lease) -> None:
        self.shell, self.lease = shell, lease

    @property
    def alive(self) -> bool:
        return self.lease.alive and self.shell.alive


class ShellPool:
    """Persistent shells for one sandbox; callers borrow one for each command.

    Up to `size` shells are opened as callers need them. Beyond that, a caller that has waited
    BURST_AFTER_S opens one more, up to `max_size`; such a surplus is closed when it is given back
    while another shell is idle (the burst is over)."""

    def __init__(
        self,
        endpoint: SSHEndpoint,
        pool: ConnectionPool,
        size: int = 4,
        boot_timeout: float = 60,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        tether_dir: str = DEFAULT_TETHER_DIR,
        max_size: int = 16,
    ) -> None:
        self._endpoint = endpoint
        self._pool = pool
        self.size = size
        self.max_size = max(size, max_size)
        self.boot_timeout = boot_timeout
        self.tether_dir = tether_dir
        self._idle_timer = _IdleTimer(idle_timeout, self._close_idle)
        self._idle: list[_Slot] = []
        self._count = 0  # open or opening
        self._starting = 0  # login shells given a session and not yet ready
        self._changed = asyncio.Condition()
        self._closing: set[asyncio.Task[None]] = set()
        self.info: ShellInfo | None = None

    @contextlib.asynccontextmanager
    async def borrow(self, timeout: float | None = None) -> AsyncIterator[PersistentShell]:
        """A shell for one command. A shell that failed is closed rather than returned. Raises
        ShellsBusy when none is free within `timeout` seconds (every session the server allows in
        use: its MaxSessions, shared with other sandboxes on the same endpoint), ConnectTimeout when
        a login shell was still starting then; a shell that is booting gets the boot timeout,
        however short `timeout` is."""
        wait = None if timeout is None else max(timeout, self.boot_timeout)
        slot = self.try_borrow_idle() or await self._acquire_within(wait)
        healthy = False
        try:
            yield slot.shell
            healthy = True
        finally:
            await self.give_back(slot, healthy)

    def try_borrow_idle(self) -> _Slot | None:
        """An idle shell right now, or None (used to send signals without waiting)."""
        while self._idle:
            slot = self._idle.pop()
            if slot.alive:
                return slot
            self._drop(slot)
        return None

    async def exec_once(self, command: str) -> asyncssh.SSHCompletedProcess:
        """Run `command` on a fresh exec channel: for when every shell is busy."""
        result, lease = await self._pool.open_session(self._endpoint, lambda conn: conn.run(command, check=False))
        lease.release()
        return result

    async def exec_or_idle(self, command: str) -> _Slot | None:
        """Run `command` on an exec channel (None), or, if an idle shell turns up first, stop
        waiting for a session and return that shell instead (borrowed: give it back)."""
        running = asyncio.ensure_future(self.exec_once(command))
        await self._until_done_or_given_back(running)
        if running.done():
            running.result()
            return None
        slot = self.try_borrow_idle()
        if slot is None:  # (taken by someone else meanwhile: the exec channel it is)
            await running
            return None
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
        return slot

    async def _acquire_within(self, wait: float | None) -> _Slot:
        """`_acquire`, or after `wait` seconds the error that says why there was none. Whether a
        login shell was starting is asked before the cancel, which ends the start."""
        acquiring = asyncio.ensure_future(self._acquire())
        try:
            done, _ = await asyncio.wait({acquiring}, timeout=wait)
            if done:
                return acquiring.result()
            if self._starting:
                raise ConnectTimeout(
                    f"no shell on {self._endpoint.display} was ready within {wait:g}s: a login shell was still "
                    "starting (its start-up files hang or wait on something: a stale lock, say "
                    "~/.pyenv/shims/.pyenv-shim); the command did not run"
                )
            raise ShellsBusy(
                f"no shell on {self._endpoint.display} became free within {wait:g}s: every session the "
                "server allows (its MaxSessions) is in use, or the server is not answering; the command "
                "did not run. Try again, or end background work that holds sessions"
            )
        finally:
            if not acquiring.done():
                acquiring.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acquiring

    async def _acquire(self) -> _Slot:
        loop = asyncio.get_running_loop()
        burst_at = loop.time() + BURST_AFTER_S
        async with self._changed:
            while True:
                slot = self.try_borrow_idle()
                if slot is not None:
                    return slot
                bursting = loop.time() >= burst_at
                if self._count < (self.max_size if bursting else self.size):
                    self._count += 1
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), None if bursting else burst_at - loop.time())
        # Opening a shell may wait for a session (the server's MaxSessions); a shell another caller
        # gives back meanwhile is taken instead, and the opening, if it still completes, goes idle.
        opening = asyncio.ensure_future(self._pool.open_session(self._endpoint, self._start_shell))
        try:
            while True:
                await self._until_done_or_given_back(opening)
                if opening.done():
                    shell, lease = opening.result()
                    self.info = shell.info
                    return _Slot(shell, lease)
                slot = self.try_borrow_idle()
                if slot is not None:
                    opening.cancel()
                    opening.add_done_callback(self._opened_late)
                    return slot
        except BaseException:
            # Cancelled (or failed) while opening, or just as the opening completed: either way the
            # shell, if there is one, goes idle and a failed opening frees its count.
            if not opening.done():
                opening.cancel()
            opening.add_done_callback(self._opened_late)
            raise

    async def _start_shell(self, conn: asyncssh.SSHClientConnection) -> PersistentShell:
        """A new shell; while its login shell runs its start-up files, it counts as starting (a
        session that never opens, on a connection that stopped answering, does not)."""
        counted = False

        def channel_open() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self._starting += 1

        try:
            return await PersistentShell.start(conn, self.boot_timeout, self.tether_dir, channel_open)
        finally:
            if counted:
                self._starting -= 1

    async def _until_done_or_given_back(self, waiting: asyncio.Future[object]) -> None:
        """Wait until `waiting` is done or an idle shell is there, whichever comes first."""

        async def idle() -> None:
            async with self._changed:
                while not self._idle:
                    await self._changed.wait()

        given_back = asyncio.ensure_future(idle())
        try:
            await asyncio.wait({waiting, given_back}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            given_back.cancel()

    def _opened_late(self, opening: asyncio.Future[tuple[PersistentShell, Lease]]) -> None:
        """An opening nobody waits for any more: its shell goes idle; a failure frees its count."""
        if opening.cancelled() or opening.exception() is not None:
            self._uncount()
            return
        shell, lease = opening.result()
        self.info = shell.info
        self._idle.append(_Slot(shell, lease))
        self._notify_soon()

    def _uncount(self) -> None:
        self._count -= 1
        self._notify_soon()

    def _notify_soon(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def give_back(self, slot: _Slot, healthy: bool) -> None:
        self._idle_timer.touch()
        if healthy and slot.alive and self._count > self.size and any(idle.alive for idle in self._idle):
            await self._close_slot(slot)  # a burst's surplus: another shell is idle already
        elif healthy and slot.alive:
            self._idle.append(slot)
            async with self._changed:
                self._changed.notify_all()  # (a caller waiting to open a shell may take this one)
        elif slot.shell.before_close is not None:
            self._drop(slot)  # (in the background: the caller is leaving, cancelled)
        else:
            await self._close_slot(slot)

    def _drop(self, slot: _Slot) -> None:
        task = asyncio.get_running_loop().create_task(self._close_slot(slot))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_slot(self, slot: _Slot) -> None:
        self._count -= 1
        try:
            if slot.shell.before_close is not None:
                with contextlib.suppress(Exception):
                    await slot.shell.before_close()
            await slot.shell.close()
        finally:
            slot.lease.release()
            async with self._changed:
                self._changed.notify()

    async def _close_idle(self) -> None:
        """Close the shells nobody borrowed for the idle timeout (busy ones are not in `_idle`)."""
        idle, self._idle = self._idle, []
        if idle:
            log.debug("closing %d idle shells to %s", len(idle), self._endpoint.display)
        for slot in idle:
            await self._close_slot(slot)

    async def close(self) -> None:
        self._idle_timer.cancel()
        await self._close_idle()
