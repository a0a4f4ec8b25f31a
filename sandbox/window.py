"""A window of lines from a large file, without fetching the whole file.

An agent reads a big log or data file a window at a time. Fetching all of it to show 2000 lines
costs the whole transfer (seconds over a real link) and its size in memory. Instead the file is
read in order only until the window is complete, and the total line count the result reports is
asked of the box (`wc -l`, through `count_newlines`) at the same time. Where that cannot answer,
the rest of the file is read, counting its newlines, as before.

Lines are split on b"\\n" before decoding: in UTF-8 no character's bytes contain 0x0A, so a line
decoded alone is what decoding the whole file and splitting it gives. A line far longer than can
be shown keeps only its head (decoded as it comes, to count its characters).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncssh

from .errors import FileTooLarge
from .sftpio import read_range

CHUNK = 4 << 20  # bytes per read; each is pipelined by asyncssh

CountNewlines = Callable[[str], Awaitable[int]]


@dataclass
class Window:
    """What `read_window` found: the window's lines (each cut to `keep_chars` plus one, with its
    full length in characters) and the file's line count; or that it is binary (a NUL byte in its
    first `sniff_bytes`), and nothing more."""

    lines: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    total_lines: int = 0
    binary: bool = False


class _Line:
    """A line of the window being assembled across chunks: the characters of it that can be
    shown (and one more, to tell that it goes on), and its length."""

    def __init__(self, keep_chars: int) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._keep = keep_chars + 1
        self._head: list[str] = []
        self.chars = 0
        self.empty = True

    def add(self, piece: bytes) -> None:
        self.empty = self.empty and not piece
        self._take(self._decoder.decode(piece))

    def finish(self) -> tuple[str, int]:
        self._take(self._decoder.decode(b"", final=True))
        return "".join(self._head), self.chars

    def _take(self, text: str) -> None:
        if self.chars < self._keep:
            self._head.append(text[: self._keep - self.chars])
        self.chars += len(text)


async def read_window(
    f: asyncssh.SFTPClientFile,
    path: str,
    size: int,
    first: int,
    count: int,
    count_newlines: CountNewlines | None,
    *,
    keep_chars: int,
    max_chars: int,
    sniff_bytes: int,
    max_uncounted: int,
) -> Window:
    """Lines `first`.. (1-based) of the file open as `f`, at most `count` of them and no more than
    `max_chars` characters in all (the reader shows no more), and the file's total line count.

    `size` is what a stat said, and as far as the file is read (a log growing as fast as it is
    read would otherwise be read for ever). Where the box cannot count lines, a file over
    `max_uncounted` bytes is refused (FileTooLarge) rather than read whole to count them."""
    window = Window()
    if count_newlines is None and size > max_uncounted:
        raise FileTooLarge(path, size, max_uncounted)
    counting = asyncio.ensure_future(_count_lines(f, path, size, count_newlines)) if count_newlines else None
    if counting is not None:  # (its failure is an answer here, not an error to log)
        counting.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        last = first + count - 1
        number, newlines, offset, chars = 1, 0, 0, 0
        line: _Line | None = None  # (only for lines in the window)
        ends_with_newline = True
        while offset < size:
            chunk = await read_range(f, min(CHUNK, size - offset), offset)
            if not chunk:  # (it shrank)
                break
            if offset == 0 and b"\0" in chunk[:sniff_bytes]:
                window.binary = True
                return window
            offset += len(chunk)
            ends_with_newline = chunk.endswith(b"\n")
            found = chunk.count(b"\n")
            newlines += found
            if number > last or number + found < first:  # (nothing of this chunk is in the window)
                number += found
            else:
                pieces = chunk.split(b"\n")
                for index, piece in enumerate(pieces):
                    if first <= number <= last:
                        line = line or _Line(keep_chars)
                        line.add(piece)
                    if index < len(pieces) - 1:  # (the line ends here)
                        if line is not None:
                            text, length = line.finish()
                            window.lines.append(text)
                            window.lengths.append(length)
                            chars += min(length, keep_chars) + 8
                            line = None
                            if chars > max_chars:
                                last = number  # (no more would be shown)
                        number += 1
            if counting is not None and (number > last or _past_the_end(counting, first)):
                total = await _answer(counting)
                if total is not None:
                    window.total_lines = max(total, number - 1)
                    return window
                counting = None  # (the box could not say: read on, counting)
                if size > max_uncounted:
                    raise FileTooLarge(path, size, max_uncounted)
        if line is not None and not line.empty:  # (a last line with no newline after it)
            text, length = line.finish()
            window.lines.append(text)
            window.lengths.append(length)
        window.total_lines = newlines + (0 if ends_with_newline or offset == 0 else 1)
        return window
    finally:
        if counting is not None and not counting.done():
            counting.cancel()


async def _count_lines(f: asyncssh.SFTPClientFile, path: str, size: int, count_newlines: CountNewlines) -> int:
    """The file's lines as `split_lines` counts them: its newlines, and one more for a last line
    that has none after it."""
    # (f.read itself, not read_upto, which turns off the handle's parallel reads while it waits)
    newlines, last_byte = await asyncio.gather(count_newlines(path), f.read(1, size - 1))
    return newlines + (0 if last_byte in (b"\n", b"") else 1)


def _past_the_end(counting: asyncio.Future[int], first: int) -> bool:
    """Whether the box's count came, and says the window begins after the last line."""
    if not counting.done() or counting.cancelled() or counting.exception() is not None:
        return False
    return first > counting.result()


async def _answer(counting: asyncio.Future[int]) -> int | None:
    with contextlib.suppress(Exception):
        return await counting
    return None
