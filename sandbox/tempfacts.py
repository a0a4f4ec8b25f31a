"""What a fresh temp file on the box tells: the clock its filesystem stamps files with, and the
owner new files get in its directory.

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
    """Per directory (each may be on another filesystem, with another clock and other rules for a
    new file's group): the box's clock as that filesystem stamps files, and a new file's owner."""

    def __init__(self) -> None:
        # directory → (time.monotonic() when learned, box time minus ours, (uid, gid) of a new file)
        self._facts: dict[str, tuple[float, float, tuple[int, int]]] = {}

    def learn(self, directory: str, temp_attrs: asyncssh.SFTPAttrs) -> None:
        """Record an fstat of a temp file just created in `directory`."""
        if temp_attrs.mtime is None or temp_attrs.uid is None or temp_attrs.gid is None:
            return
        if len(self._facts) >= 1000:
            self._facts.clear()
        # (the box's second had begun at most a second before its mtime says, and the answer took
        # time to arrive: the estimate of the box's clock that this gives is never ahead of it)
        offset = temp_attrs.mtime - time.time()
        self._facts[directory] = (time.monotonic(), offset, (temp_attrs.uid, temp_attrs.gid))

    def owner(self, directory: str) -> tuple[int, int] | None:
        """The owner and group a file created in `directory` gets, when known."""
        facts = self._fresh(directory)
        return facts[2] if facts else None

    def written_recently(self, directory: str, mtime: int | float | None, at: float) -> bool | None:
        """Whether a file in `directory` with this mtime may have been written within the box's
        second at our time `at` (time.time()); None when the clock there is not known."""
        facts = self._fresh(directory)
        if facts is None:
            return None
        return mtime is None or mtime + CLOCK_MARGIN_S > at + facts[1]

    def _fresh(self, directory: str) -> tuple[float, float, tuple[int, int]] | None:
        facts = self._facts.get(directory)
        return facts if facts is not None and time.monotonic() - facts[0] < FRESH_FOR_S else None
