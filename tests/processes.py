"""Processes on this machine (the test sshd and the local provider run here), found by a marker in
their command line."""

from __future__ import annotations

import asyncio
import subprocess
import time


def processes_matching(marker: str) -> list[str]:
    """Lines of `ps` whose command line contains `marker`."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


async def wait_until_running(marker: str, seconds: float = 5.0) -> list[str]:
    """The processes matching `marker` once there are some; an AssertionError if none appears."""
    deadline = time.monotonic() + seconds
    while not (found := processes_matching(marker)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert found, f"no process matching {marker!r} started within {seconds:g}s"
    return found


async def wait_until_gone(marker: str, seconds: float = 5.0) -> list[str]:
    """The processes still matching `marker` after up to `seconds` (empty once all are gone)."""
    deadline = time.monotonic() + seconds
    while (left := processes_matching(marker)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left
