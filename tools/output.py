"""Printing for the CLI: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import errno
import io
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO


class ClosedOutput(io.TextIOBase):
    """Standard output for a command started with it closed: what is printed fails as a write to a
    closed descriptor does (EBADF), so that `tether up >&-` says so and ends what it made, where
    Python would have dropped its id without a word."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "standard output is closed")

    def flush(self) -> None:  # (nothing is ever held; and Python flushes stdout once more as it exits)
        pass

    @property
    def buffer(self) -> ClosedOutput:  # (for bytes passed on as they are: tether exec)
        return self


def print_json(value: Any, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout  # (as it is now, not as it was on import: see ClosedOutput)
    stream.write(json.dumps(value, indent=2, default=str) + "\n")
    # Flushed: a command that goes on running after it prints (`tether tunnel --json` holds its
    # tunnel until Ctrl-C) would otherwise leave a pipe's reader waiting for the end.
    stream.flush()


def print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], stream: TextIO | None = None, empty: str = "(none)"
) -> None:
    stream = stream or sys.stdout
    if not rows:
        stream.write(empty + "\n")
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    stream.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    for row in cells:
        stream.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def when(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    except (OverflowError, ValueError, OSError):  # (a row from before TTLs were bounded)
        return "never"


def duration(seconds: float) -> str:
    if seconds < 10:  # (a sandbox that lived a second must not read as 0s)
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressBar:
    """A one-line progress bar on stderr, for people waiting on a copy (silent when not a terminal)."""

    def __init__(self, label: str, enabled: bool = True, stream: TextIO = sys.stderr) -> None:
        self.label, self.enabled, self.stream = label, enabled, stream
        self._started = time.monotonic()
        self._last_draw = 0.0

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw < 0.1 and done < total:
            return
        self._last_draw = now
        fraction = done / total if total else 1.0
        filled = int(fraction * 30)
        rate = done / max(now - self._started, 1e-6) / 1e6
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {fraction:6.1%} "
            f"{done / 1e6:8.1f}/{total / 1e6:.1f} MB {rate:7.1f} MB/s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
