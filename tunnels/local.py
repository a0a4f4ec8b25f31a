"""The local backend: an SSH local forward, giving http://127.0.0.1:PORT on tether's own host."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncssh

from sandbox import Sandbox
from sandbox.pool import Hold

from .base import BackendName, reopen
from .ports import loopback_for

log = logging.getLogger(__name__)


class LocalForward:
    """A listener on 127.0.0.1 whose connections become direct-tcpip channels to the sandbox's port.

    When the sandbox's connection dies, the forward is re-opened on a new one, on the same local
    port, so the URL stays valid.
    """

    def __init__(self, box: Sandbox, port: int, host: str = "127.0.0.1") -> None:
        self._box = box
        self._port = port
        self._host = host  # the sandbox's loopback address the port listens on
        self._listener: asyncssh.SSHListener | None = None
        self._hold: Hold | None = None  # keeps the connection from being closed as idle
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self._local_port = 0
        self.url = ""
        self.headers: dict[str, str] = {}

    async def start(self) -> None:
        self._listener = await self._listen(0)
        self._local_port = self._listener.get_port()
        self.url = f"http://127.0.0.1:{self._local_port}"
        self._supervisor = asyncio.get_running_loop().create_task(self._keep_open())

    async def _listen(self, local_port: int) -> asyncssh.SSHListener:
        hold = await self._box.hold_connection()
        try:
            listener = await hold.conn.forward_local_port("127.0.0.1", local_port, self._host, self._port)
        except BaseException:
            hold.release()
            raise
        if self._hold is not None:
            self._hold.release()
        self._hold = hold
        return listener

    async def _keep_open(self) -> None:
        while not self._closed:
            assert self._listener is not None
            await self._listener.wait_closed()
            if not await reopen(self._listen_again, lambda: self._closed, f"tunnel {self.url}"):
                return

    async def _listen_again(self) -> None:
        self._listener = await self._listen(self._local_port)  # the same port: the URL stays valid

    async def close(self) -> None:
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 2)
        if self._hold is not None:
            self._hold.release()


class LocalBackend:
    name: BackendName = "local"

    async def open(self, box: Sandbox, port: int) -> LocalForward:
        forward = LocalForward(box, port, await loopback_for(box, port))
        await forward.start()
        return forward
