"""The local backend: an SSH local forward, giving http://127.0.0.1:PORT on tether's own host."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sandbox import Sandbox
from sandbox.forwarding import ClosingForwarder, forward_over
from sandbox.pool import Hold

from .base import BackendName

log = logging.getLogger(__name__)


class _Accepted(ClosingForwarder):
    """A connection accepted on the tunnel's local port. Reading waits until its channel to the
    sandbox's port is open (nothing arrives before there is somewhere to send it)."""

    def __init__(self, forward: LocalForward) -> None:
        super().__init__()
        self._forward = forward

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.pause_reading()
        self._forward._accepted(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forward._connections.discard(self)
        super().connection_lost(exc)


class LocalForward:
    """A listener on 127.0.0.1 whose connections become direct-tcpip channels to the sandbox's port.

    The listener is tether's own (not asyncssh's), so the tunnel knows every connection it accepted
    and closing it closes them too, with their channels: a kept-alive HTTP connection ends with
    the tunnel. When the sandbox's connection dies, new connections go over the pool's new one
    (which the tunnel's hold keeps open too), and the local port (so the URL) stays the same.
    """

    def __init__(self, box: Sandbox, port: int, host: str = "127.0.0.1") -> None:
        self._box = box
        self._port = port
        self._host = host  # the sandbox's loopback address the port listens on
        self._server: asyncio.Server | None = None
        self._hold: Hold | None = None  # keeps the sandbox's connection from being closed as idle
        self._connections: set[_Accepted] = set()  # accepted and not yet closed
        self._pairing: set[asyncio.Task[None]] = set()  # channels being opened for them
        self._closed = False
        self.local_port = 0  # the listener's
        self.url = ""
        self.headers: dict[str, str] = {}

    async def start(self) -> None:
        self._hold = await self._box.hold_connection()
        try:
            self._server = await asyncio.get_running_loop().create_server(lambda: _Accepted(self), "127.0.0.1", 0)
        except BaseException:
            self._hold.release()
            self._hold = None
            raise
        self.local_port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.local_port}"

    def _accepted(self, local: _Accepted) -> None:
        if self._closed:
            local.close()
            return
        self._connections.add(local)
        task = asyncio.get_running_loop().create_task(self._pair(local))
        self._pairing.add(task)
        task.add_done_callback(self._pairing.discard)

    async def _pair(self, local: _Accepted) -> None:
        """Open the accepted connection's channel to the sandbox's port (over the pool's live
        connection, re-dialed if the held one died), then let the data flow."""
        try:
            await forward_over(self._box.connection, self._host, self._port, local)
        except Exception as exc:  # (no connection, the port refused, the client gone: the client sees a hang-up)
            log.debug("tunnel %s: no channel to port %d: %s", self.url, self._port, exc)
            local.close()
            return
        except BaseException:
            local.close()
            raise
        local.resume_reading()

    async def close(self) -> None:
        # Everything is let go before the first await, so a close that is itself cancelled still
        # leaves nothing open.
        self._closed = True
        for task in list(self._pairing):
            task.cancel()
        if self._server is not None:
            self._server.close()
        for local in list(self._connections):
            local.close()  # (and its channel with it)
        self._connections.clear()
        if self._hold is not None:
            self._hold.release()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


class LocalBackend:
    name: BackendName = "local"
    forwards = True

    async def open(self, box: Sandbox, port: int, host: str = "127.0.0.1") -> LocalForward:
        forward = LocalForward(box, port, host)
        try:
            await forward.start()
        except BaseException:
            await forward.close()
            raise
        return forward
