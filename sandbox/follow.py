"""A running command's output, delivered as it grows (what `tether exec` shows a person).

The shell sends a command's stdout and stderr to two files on the box (see shell.py); following
them is reading each from where the last read ended, every POLL_FIRST_S at first and backing off to
POLL_LAST_S while nothing new comes. Bytes are delivered unchanged, each exactly once: an offset
moves only once its bytes were handed over, so a read cut short (the command ended, the follower
was stopped) is simply read again by `drain`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncssh

from .channels import SFTPChannel
from .heldoutput import HeldOutput
from .sftpio import SMALL, read_upto
from .shell import Stream

POLL_FIRST_S = 0.05
POLL_LAST_S = 0.5
PER_POLL_BYTES = 4 << 20  # at most this much per stream before the other stream gets its turn
HEAD_BYTES = 256  # how much of each stream's start is kept (tether's own cwd message is shorter)

OnOutput = Callable[[Stream, bytes], None]


class OutputFollower:
    def __init__(self, channel: SFTPChannel, paths: dict[Stream, str], deliver: OnOutput) -> None:
        self._paths = paths
        self._deliver = deliver
        self._held = HeldOutput(channel)  # (its own handles, on the session of the moment)
        self._channel = channel
        self._offsets: dict[Stream, int] = dict.fromkeys(paths, 0)
        self.heads: dict[Stream, bytes] = dict.fromkeys(paths, b"")

    async def follow(self, started: asyncio.Event) -> None:
        """Deliver output until cancelled; starts once the command has (its files are emptied first)."""
        await started.wait()
        delay = POLL_FIRST_S
        while True:
            await asyncio.sleep(delay)
            delay = POLL_FIRST_S if await self._read_new() else min(delay * 2, POLL_LAST_S)

    async def drain(self) -> None:
        """Deliver the rest, up to the ends of both files, and let go of them."""
        try:
            while await self._read_new():
                pass
        finally:
            self._held.release()

    async def _read_new(self) -> bool:
        """Read and deliver what each file gained since the last read; whether anything came."""

        async def read(sftp: asyncssh.SFTPClient, stream: Stream) -> bytes:
            f = await self._held.open(sftp, self._paths[stream], 0)
            chunks, size, offset = [], 0, self._offsets[stream]
            while size < PER_POLL_BYTES:
                # (one request at a time: a short answer may be the server's limit, not the end)
                chunk = await read_upto(f, SMALL, offset + size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)

        async def both(sftp: asyncssh.SFTPClient) -> list[bytes]:
            return await asyncio.gather(*(read(sftp, stream) for stream in self._paths))

        grew = False
        for stream, data in zip(self._paths, await self._channel.retrying(both), strict=True):
            if data:
                grew = True
                head = self.heads[stream]
                if len(head) < HEAD_BYTES:
                    self.heads[stream] = head + data[: HEAD_BYTES - len(head)]
                self._offsets[stream] += len(data)
                self._deliver(stream, data)
        return grew
