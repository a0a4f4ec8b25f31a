"""A running command's output, delivered as it grows (what `tether exec` shows a person).

The shell sends a command's stdout and stderr to two files on the box (see shell.py); following
them is reading each from where the last read ended, every POLL_FIRST_S at first and backing off to
POLL_LAST_S while nothing new comes. A poll reads up to the size the file had when it began, and
the last read once the command ended up to the size it had then: output that never pauses (or a
background process the command left writing to the file) can neither hold a delivery back nor keep
the run from returning. Bytes are delivered unchanged, each exactly once: an offset moves as its
bytes are handed over, and a read cut short is read again from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable

import asyncssh

from .channels import SFTPChannel
from .heldoutput import HeldOutput
from .sftpio import SMALL, read_upto
from .shell import Stream

POLL_FIRST_S = 0.05
POLL_LAST_S = 0.5
# How much of stderr's start is kept (for tether's own message of a missing cwd, whose path may be long).
HEAD_BYTES = 8192

# Called with each new piece of a stream; may be a coroutine function, which is awaited (a writer
# to a pipe that may be slow to drain, say), and the next piece waits for it.
OnOutput = Callable[[Stream, bytes], Awaitable[None] | None]


class OutputFollower:
    def __init__(self, channel: SFTPChannel, paths: dict[Stream, str], deliver: OnOutput) -> None:
        self._paths = paths
        self._deliver = deliver
        self._held = HeldOutput(channel)  # (its own handles, on the session of the moment)
        self._channel = channel
        self._offsets: dict[Stream, int] = dict.fromkeys(paths, 0)
        self.stderr_head = b""

    async def follow(self, began: asyncio.Event, ended: asyncio.Event) -> None:
        """Deliver output from when the command began (its files are emptied first) until it ended.
        A delivery under way when it ends is finished first: nothing is cut in the middle."""
        await began.wait()
        delay = POLL_FIRST_S
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), delay)
            if ended.is_set():
                return  # (the rest is drain's)
            delay = POLL_FIRST_S if await self._read_new() else min(delay * 2, POLL_LAST_S)

    async def drain(self) -> None:
        """Deliver the rest: up to where each file ends now."""
        await self._read_new()

    def release(self) -> None:
        """Let go of the files (whatever ended the run)."""
        self._held.release()

    async def _read_new(self) -> bool:
        """Read and deliver what each file gained since the last read, up to its size as of now;
        whether anything came. Reads are retried on a new session should the connection die (the
        offsets say where to go on from); deliveries are not reads: their errors are the caller's."""
        ends = await self._channel.retrying(
            lambda sftp: asyncio.gather(*(self._end(sftp, stream) for stream in self._paths))
        )
        came = False
        for stream, end in zip(self._paths, ends, strict=True):
            while end is not None and self._offsets[stream] < end:
                offset = self._offsets[stream]
                read = functools.partial(self._read, stream=stream, offset=offset, most=end - offset)
                chunk = await self._channel.retrying(read)
                if not chunk:
                    break  # (the file was cut shorter meanwhile, or cannot be read now)
                came = True
                await self._hand_over(stream, chunk)
        return came

    async def _end(self, sftp: asyncssh.SFTPClient, stream: Stream) -> int | None:
        """Where the stream's file ends now; None when it cannot be followed (not now, or at all)."""
        try:
            return (await (await self._held.open(sftp, self._paths[stream], 0)).stat()).size or 0
        except asyncssh.SFTPNoSuchFile:
            return None  # (the command removed tether's directory: nothing of it to follow)
        except asyncssh.SFTPError:
            self._held.forget(self._paths[stream])  # (opened anew by the next poll)
            return None

    async def _read(self, sftp: asyncssh.SFTPClient, stream: Stream, offset: int, most: int) -> bytes:
        """One request's worth from `offset` (an answer shorter than asked may be the server's limit)."""
        try:
            return await read_upto(await self._held.open(sftp, self._paths[stream], 0), min(SMALL, most), offset)
        except asyncssh.SFTPError:
            self._held.forget(self._paths[stream])
            return b""

    async def _hand_over(self, stream: Stream, data: bytes) -> None:
        if stream == "stderr" and len(self.stderr_head) < HEAD_BYTES:
            self.stderr_head += data[: HEAD_BYTES - len(self.stderr_head)]
        self._offsets[stream] += len(data)
        delivered = self._deliver(stream, data)
        if inspect.isawaitable(delivered):
            await delivered
