"""Port forwarding that closes what it pairs once both directions have ended.

asyncssh's SSHForwarder half-closes: the first end of file is passed on and both sides stay open;
on the second, `eof_received` returns False. That closes a TCP transport, but not an SSH channel
(asyncssh only answers it with an end of file of its own). So when the second end of file arrived
on the channel side (a dev server that answers and hangs up at once, then the client's end), the
channel and the socket stayed open for good: one of each leaked per forwarded connection.
"""

from __future__ import annotations

import asyncio

import asyncssh
from asyncssh.forward import SSHForwarder


class ClosingForwarder(SSHForwarder):
    def eof_received(self) -> bool:
        keep_open = super().eof_received()
        if not keep_open:  # both directions have ended
            self.close()
        return keep_open


async def forward_to(host: str, port: int) -> ClosingForwarder:
    """A session for an accepted direct-tcpip channel: a TCP connection to host:port, paired."""
    try:
        _, peer = await asyncio.get_running_loop().create_connection(ClosingForwarder, host, port)
    except OSError as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
    return ClosingForwarder(peer)
