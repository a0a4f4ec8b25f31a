"""Port forwarding that closes what it pairs once both directions have ended.

asyncssh's SSHForwarder half-closes: the first end of file is passed on and both sides stay open;
on the second, `eof_received` returns False. That closes a TCP transport, but not an SSH channel
(asyncssh only answers it with an end of file of its own). So when the second end of file arrived
on the channel side (a dev server that answers and hangs up at once, then the client's end), the
channel and the socket stayed open for good: one of each leaked per forwarded connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncssh
from asyncssh.forward import SSHForwarder

# The window and packet size of the channels `forward_over` opens (asyncssh's defaults: 2 MiB and
# 32 KiB). Each forwarded byte goes through asyncssh's per-packet Python code: bigger packets and
# windows mean fewer trips through it. (Also for channels accepted to pair with them, e.g. a relay's.)
FORWARD_WINDOW = 8 * 1024 * 1024
FORWARD_PACKET = 256 * 1024


class ClosingForwarder(SSHForwarder):
    def __init__(self, peer: SSHForwarder | None = None) -> None:
        super().__init__(peer)
        self.closed = False  # closed for good (not: not connected yet)

    def eof_received(self) -> bool:
        keep_open = super().eof_received()
        if not keep_open:  # both directions have ended
            self.close()
        return keep_open

    def close(self) -> None:
        self.closed = True
        super().close()


async def forward_to(host: str, port: int) -> ClosingForwarder:
    """A session for an accepted direct-tcpip channel: a TCP connection to host:port, paired."""
    try:
        _, peer = await asyncio.get_running_loop().create_connection(ClosingForwarder, host, port)
    except OSError as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
    return ClosingForwarder(peer)


async def forward_over(
    connection: Callable[[], Awaitable[asyncssh.SSHClientConnection]],
    host: str,
    port: int,
    local: ClosingForwarder | None = None,
) -> ClosingForwarder:
    """`local` paired with a direct-tcpip channel to host:port over the connection `connection()`
    gives; returns `local`. `local` is a connection this side accepted (its reading best paused
    until this returns), or, when None, a new forwarder: the session for a channel an SSH peer
    opened (as `forward_to` is, with a TCP connection on the other end instead).

    Raises ChannelOpenError (what asyncssh needs from a session factory to refuse the peer's
    channel) when there is no connection, the channel is refused, or `local` closed while the
    channel opened (its client hung up): a channel that did open is closed then. So is one whose
    open this call was cancelled during (asyncssh would keep it open for good, with nothing on it).
    """
    local = ClosingForwarder() if local is None else local
    try:
        conn = await connection()
        opening = asyncio.ensure_future(
            conn.create_connection(
                lambda: ClosingForwarder(local), host, port, window=FORWARD_WINDOW, max_pktsize=FORWARD_PACKET
            )
        )
        try:
            _, channel = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise
    except asyncssh.ChannelOpenError:
        raise
    except Exception as exc:  # (asyncssh's, an OSError, the connection's own: no connection, no channel)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, f"{host} port {port}: {exc}") from None
    if local.closed:
        channel.close()  # (and `local` with it: paired)
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_CONNECT_FAILED, f"{host} port {port}: the other end closed while the channel opened"
        )
    return local


def _close_opened(opening: asyncio.Future[tuple[asyncssh.SSHTCPChannel[bytes], ClosingForwarder]]) -> None:
    """Close the channel of an open that was cancelled, once it opened after all."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result()[1].close()
