"""Connections a tunnel accepts, each paired with a channel to the sandbox's port.

Both forwarding backends take connections in (the local one on its own port, the relay one as the
channels the relay opens) and open, for each, a direct-tcpip channel to the sandbox's port over
the sandbox's own connection (re-dialed by the pool if it died); asyncssh's forwarders then pipe
the two at the protocol level, as its own port forwarding does. A connection is accepted at once
and its channel opened meanwhile: accepting only once that was open made a relay's request wait
for the two channel opens one after the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sandbox import Sandbox
from sandbox.forwarding import ClosingForwarder, forward_over


class Accepted(ClosingForwarder):
    """A connection taken in before its channel to the sandbox's port is open. What it sends
    meanwhile is kept and passed on once they are paired (`paired`); reading pauses at the first
    data, so that is at most one read's worth (a socket's) or the channel's window (an SSH
    channel's: pausing at once would not hold there, as asyncssh resumes a new channel's reading
    itself once its session has started)."""

    def __init__(self, pairings: Pairings) -> None:
        super().__init__()
        self._pairings = pairings

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._pairings.accepted(self)

    def data_received(self, data: bytes, datatype: int | None = None) -> None:
        if self._peer is None:
            self.pause_reading()
        super().data_received(data, datatype)  # (kept in _inpbuf until paired)

    def paired(self) -> None:
        """Pass on what came before the channel to the sandbox's port opened, and read on."""
        if self.closed or self._peer is None:
            return
        if self._inpbuf:
            self._peer.write(self._inpbuf)
            self._inpbuf = b""
        if self._eof_received:
            self._peer.write_eof()
        self.resume_reading()

    def close(self) -> None:
        self._pairings.connections.discard(self)
        super().close()


class Pairings:
    """A tunnel's accepted connections and the channels being opened for them. `failed` hears why
    a connection's channel could not be opened (the connection is then closed, with no reason
    given to whoever made it)."""

    def __init__(self, box: Sandbox, host: str, port: int, failed: Callable[[Exception], None]) -> None:
        self._box, self._host, self._port, self._failed = box, host, port, failed
        self.connections: set[Accepted] = set()  # accepted and not yet closed
        self.pairing: set[asyncio.Task[None]] = set()  # their channels being opened
        self.closed = False

    def new(self) -> Accepted:
        """A protocol (or an SSH session) for a connection about to be accepted."""
        return Accepted(self)

    def accepted(self, connection: Accepted) -> None:
        if self.closed:
            connection.close()
            return
        self.connections.add(connection)
        task = asyncio.get_running_loop().create_task(self._pair(connection))
        self.pairing.add(task)
        task.add_done_callback(self.pairing.discard)

    async def _pair(self, connection: Accepted) -> None:
        """Should the connection close while its channel opens (its client hung up, the tunnel
        closed), forward_over closes the channel too."""
        try:
            await forward_over(self._box.connection, self._host, self._port, connection)
        except Exception as exc:
            self._failed(exc)
            connection.close()
            return
        except BaseException:
            connection.close()
            raise
        connection.paired()

    def close_connections(self) -> None:
        """Close every connection accepted so far (and its channel with it)."""
        for connection in list(self.connections):
            connection.close()
        self.connections.clear()

    def close(self) -> None:
        """Accept no more, and let go of everything (before any await: a close that is itself
        cancelled still leaves nothing open)."""
        self.closed = True
        for task in list(self.pairing):
            task.cancel()
        self.close_connections()
