"""The local backend: an SSH local forward, giving http://127.0.0.1:PORT on tether's own host."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sandbox import Sandbox
from sandbox.pool import Hold

from .base import BackendName
from .pairing import Pairings

log = logging.getLogger(__name__)


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
        self._server: asyncio.Server | None = None
        self._hold: Hold | None = None  # keeps the sandbox's connection from being closed as idle
        self._pairings = Pairings(box, host, port, self._failed)  # (host: the sandbox's loopback address)
        self.local_port = 0  # the listener's
        self.url = ""
        self.headers: dict[str, str] = {}

    async def start(self) -> None:
        self._hold = await self._box.hold_connection()
        try:
            self._server = await asyncio.get_running_loop().create_server(self._pairings.new, "127.0.0.1", 0)
        except BaseException:
            self._hold.release()
            self._hold = None
            raise
        self.local_port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.local_port}"

    def _failed(self, exc: Exception) -> None:  # (the client sees a hang-up)
        log.debug("tunnel %s: no channel to port %d: %s", self.url, self._port, exc)

    async def close(self) -> None:
        # Everything is let go before the first await, so a close that is itself cancelled still
        # leaves nothing open.
        self._pairings.close()
        if self._server is not None:
            self._server.close()
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
