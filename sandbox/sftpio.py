"""Reading and writing an open SFTP file: one request when it is small, pipelined when it is large.

asyncssh sends every read and write through its parallel machinery (tasks and asyncio.wait), which
costs more CPU than the request itself for the small files agents mostly touch. A file whose
read_len/write_len is 0 does a single direct request instead.
"""

from __future__ import annotations

import asyncssh

SMALL = 128 * 1024  # below OpenSSH's 255 KiB per-request limit


async def read_exactly(f: asyncssh.SFTPClientFile, size: int) -> bytes:
    """`size` bytes from offset 0 (fewer at end of file)."""
    if size > SMALL:
        return await f.read(size, 0)  # type: ignore[no-any-return]
    f.read_len = 0
    chunks, offset = [], 0
    while offset < size:
        chunk: bytes = await f.read(size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


async def write_all(f: asyncssh.SFTPClientFile, data: bytes) -> None:
    if len(data) <= SMALL:
        f.write_len = 0
    await f.write(data, 0)


async def read_upto(f: asyncssh.SFTPClientFile, size: int, offset: int = 0) -> bytes:
    """One read request of `size` bytes at `offset` (`size` within the server's per-request limit).
    Servers answer a read of a regular file in full up to its end, so fewer bytes means the end."""
    f.read_len = 0
    return await f.read(size, offset)  # type: ignore[no-any-return]


async def read_prefix(f: asyncssh.SFTPClientFile, max_bytes: int) -> bytes:
    """Up to `max_bytes` from offset 0. One request when the file is small (most are); only when that
    request comes back full does the file's size decide how much more to read, in parallel."""
    first = min(SMALL, max_bytes)
    parallel_len = f.read_len
    head = await read_upto(f, first)
    if len(head) < first:
        return head
    rest = min((await f.stat()).size or 0, max_bytes) - len(head)
    if rest <= 0:
        return head
    f.read_len = parallel_len
    return head + await f.read(rest, len(head))
