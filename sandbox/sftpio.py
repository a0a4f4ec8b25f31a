"""Reading and writing an open SFTP file: one request when it is small, pipelined when it is large.

asyncssh sends every read and write through its parallel machinery (tasks and asyncio.wait), which
costs more CPU than the request itself for the small files agents mostly touch. Small transfers
here are single direct requests instead (read_len/write_len 0 for their duration). A server may
answer a read with fewer bytes than asked before the end of the file (Go's pkg/sftp sends 32 KiB
at most), so a short answer is never taken for the end unless the file's size says so.
"""

from __future__ import annotations

import asyncio

import asyncssh

SMALL = 128 * 1024  # below OpenSSH's 255 KiB per-request limit
GUARANTEED = 32 * 1024  # the least per-request limit servers have (RFC draft minimum; Go's pkg/sftp)


async def read_range(f: asyncssh.SFTPClientFile, size: int, offset: int = 0) -> bytes:
    """`size` bytes from `offset`, fewer only at the end of the file."""
    if size > SMALL:
        return await f.read(size, offset)  # type: ignore[no-any-return]  # asyncssh re-asks for short answers
    chunks, done = [], 0
    while done < size:
        chunk = await read_upto(f, size - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


async def read_exactly(f: asyncssh.SFTPClientFile, size: int) -> bytes:
    """`size` bytes from offset 0 (fewer at end of file)."""
    return await read_range(f, size)


async def read_prefix(f: asyncssh.SFTPClientFile, max_bytes: int) -> tuple[bytes, int]:
    """Up to `max_bytes` from offset 0, and the file's size. The first read and a stat travel
    together, so a small file costs one round trip; more is read only when the size says the first
    answer was not all of it."""
    head, attrs = await asyncio.gather(read_upto(f, min(SMALL, max_bytes)), f.stat())
    size = attrs.size or 0
    want = min(size, max_bytes)
    if len(head) >= want:
        return head, max(size, len(head))
    return head + await read_range(f, want - len(head), len(head)), size


async def read_whole(f: asyncssh.SFTPClientFile, size: int, max_bytes: int) -> bytes:
    """A whole file whose stat gave `size`: those bytes, or, when it says 0 (which /proc's files
    say whatever they hold), whatever is there, up to `max_bytes` + 1 (the caller says too large)."""
    return await read_exactly(f, size) if size else await read_to_eof(f, max_bytes)


async def read_to_eof(f: asyncssh.SFTPClientFile, max_bytes: int) -> bytes:
    """Everything up to the end of a file whose size says nothing (an empty file, or /proc's, which
    say 0), up to `max_bytes` + 1 bytes: one request at a time (a parallel read of `max_bytes`
    would send a hundred requests for what is mostly nothing)."""
    chunks, done = [], 0
    while done <= max_bytes:
        chunk = await read_upto(f, SMALL, done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


async def holds_exactly(f: asyncssh.SFTPClientFile, expected: bytes) -> bool:
    """Whether the file open as `f` holds `expected` and nothing more. A small file takes one
    request (for a disk file a server answers a read in full up to the end; below GUARANTEED it
    is within every server's per-request limit); a larger one a read and an fstat together."""
    if len(expected) < GUARANTEED:
        return await read_upto(f, len(expected) + 1) == expected
    current, attrs = await asyncio.gather(read_exactly(f, len(expected)), f.stat())
    return current == expected and attrs.size == len(expected)


async def read_upto(f: asyncssh.SFTPClientFile, size: int, offset: int = 0) -> bytes:
    """One read request of up to `size` bytes at `offset` (`size` within the server's per-request
    limit); the answer may be shorter than the rest of the file."""
    parallel, f.read_len = f.read_len, 0
    try:
        return await f.read(size, offset)  # type: ignore[no-any-return]
    finally:
        f.read_len = parallel


async def write_all(f: asyncssh.SFTPClientFile, data: bytes) -> None:
    parallel = f.write_len
    if len(data) <= SMALL:
        f.write_len = 0
    try:
        await f.write(data, 0)
    finally:
        f.write_len = parallel
