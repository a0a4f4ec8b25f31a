"""One caller at a time per path, within this process.

An edit reads, checks and renames in separate SFTP requests; two edits of one file sent together
would both pass their checks before either renames, and one change would be lost while both
report success. Agents do send edits in parallel, so a sandbox lets them through one by one. (Other
processes writing the file are what the edit's conflict check is for.) Reads of a job's output
take turns the same way, so that no output is returned twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class PathLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # path -> (lock, callers holding or waiting)

    @contextlib.asynccontextmanager
    async def hold(self, path: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(path, (asyncio.Lock(), 0))
        self._locks[path] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[path]
            if users == 1:
                del self._locks[path]
            else:
                self._locks[path] = (lock, users - 1)
