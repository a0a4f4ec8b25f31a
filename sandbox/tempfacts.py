"""What a fresh temp file on the box tells: the box's clock, and the owner new files get there.

An edit needs both. Whether the file it read was written within the box's current second decides
how it checks for a conflict (SFTP mtimes are whole seconds: only a file that recent can be replaced
by a same-size one without its mtime showing it), and whether the temp file already has the edited
file's owner decides whether a chown is sent. An fstat of a temp file answers both; remembered for a
minute, it saves that request on the edits and writes that follow.
"""

from __future__ import annotations

import time

import asyncssh

FRESH_FOR_S = 60.0  # after this, ask again (the box's clock may have been stepped, a directory chgrp'ed)
CLOCK_MARGIN_S = 2  # whole-second mtimes, our own estimate up to a second behind, some drift


class TempFileFacts:
    def __init__(self) -> None:
        self._learned_at: float | None = None  # time.monotonic() of the last fstat
        self._clock_offset = 0.0  # box time minus ours, never more than the real offset
        self._owners: dict[str, tuple[int, int]] = {}  # directory → (uid, gid) a new file gets there

    def learn(self, directory: str, temp_attrs: asyncssh.SFTPAttrs) -> None:
        """Record an fstat of a temp file just created in `directory`."""
        if temp_attrs.mtime is None or temp_attrs.uid is None or temp_attrs.gid is None:
            return
        if not self._fresh() or len(self._owners) >= 1000:
            self._owners.clear()
        # (the box's second had begun at most a second before its mtime says, and the answer took
        # time to arrive: the estimate of the box's clock that this gives is never ahead of it)
        self._clock_offset = temp_attrs.mtime - time.time()
        self._owners[directory] = (temp_attrs.uid, temp_attrs.gid)
        self._learned_at = time.monotonic()

    def owner(self, directory: str) -> tuple[int, int] | None:
        """The owner and group a file created in `directory` gets, when known."""
        return self._owners.get(directory) if self._fresh() else None

    def written_recently(self, mtime: int | float | None, at: float) -> bool | None:
        """Whether a file with this mtime may have been written within the box's second at our
        time `at` (time.time()); None when the box's clock is not known."""
        if not self._fresh():
            return None
        return mtime is None or mtime + CLOCK_MARGIN_S > at + self._clock_offset

    def _fresh(self) -> bool:
        return self._learned_at is not None and time.monotonic() - self._learned_at < FRESH_FOR_S
