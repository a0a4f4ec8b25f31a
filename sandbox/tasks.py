"""Tasks run together, failing as one error: what tether's callers know how to handle.

asyncio.TaskGroup raises an ExceptionGroup even for one failure. tether's work in parallel (a
copy's pieces, grep's batches, a command and the follower of its output) fails together when the
connection goes, and a caller is to see that as ConnectionLost, a timeout as CommandTimeout: the
first failure, as itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """An asyncio.TaskGroup whose first failure is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
