"""Processes on this machine (the test sshd and the local provider run here), found by a marker in
their command line; waiting for a background job's end; and a fake nvidia-smi to put on a PATH."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Self


def leaf_sleep() -> str:
    """`sleep 1000.NNNNNNNN`: a command that is its own marker, so the process that must die is
    the one found (a marker on a parent `sh -c` would pass once the parent alone is killed)."""
    return f"sleep 1000.{secrets.randbelow(10**8):08d}"


def running(pid: int) -> bool:
    """Alive and not a zombie (a container's pid 1 may never reap what it inherits)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


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


class Watcher:
    """Runs `watch_once` over and over in a thread while the `with` block runs: what a watcher of
    another user, on this machine, would see meanwhile."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def watch_once(self) -> None:
        raise NotImplementedError

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.watch_once()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class ArgvWatch(Watcher):
    """Reads every process's command line (/proc/*/cmdline, what `ps` shows every user) over and
    over while the block runs, keeping each one that contains `needle`: a process that lives a
    millisecond is still seen."""

    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle.encode()
        self.seen: list[str] = []
        self.scans = 0

    def watch_once(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    argv = f.read()
            except OSError:
                continue
            if self.needle in argv:
                self.seen.append(argv.replace(b"\0", b" ").decode(errors="replace"))
        self.scans += 1


async def output_until_exit(box: Any, job_id: str, seconds: float = 30.0) -> Any:
    """A job's JobOutput once it exited, with all of its stdout and stderr: each read returns what
    came since the previous one, and returns as soon as either stream has some, so one read may see
    a job's stderr and not yet its stdout or its end. An AssertionError if it still runs after
    `seconds`."""
    deadline = time.monotonic() + seconds
    out = await box.job_output(job_id, wait_ms=500)
    stdout, stderr = out.stdout, out.stderr
    while out.status == "running":
        assert time.monotonic() < deadline, f"{job_id} still running after {seconds:g}s"
        out = await box.job_output(job_id, wait_ms=500)
        stdout, stderr = stdout + out.stdout, stderr + out.stderr
    return dataclasses.replace(out, stdout=stdout, stderr=stderr)


FAKE_NVIDIA_SMI = """#!/bin/sh
# nvidia-smi as two A100s answer tether's query (and nothing else)
[ "$1" = "--query-gpu=name,memory.total" ] && [ "$2" = "--format=csv,noheader,nounits" ] || exit 2
printf 'NVIDIA A100-SXM4-80GB, 81920\\nNVIDIA A100-SXM4-80GB, 81920\\n'
"""
TWO_A100S = [{"name": "NVIDIA A100-SXM4-80GB", "memory_mb": 81920}] * 2  # (what it reports, as tether reads it)


def fake_nvidia_smi(directory: Path) -> Path:
    """An executable `nvidia-smi` in `directory` that reports TWO_A100S."""
    fake = directory / "nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI)
    fake.chmod(0o755)
    return fake
