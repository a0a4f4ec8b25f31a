"""The last content tether read or wrote of small files, so that an edit can skip reading a file
it has just read or written (agents read a file before they edit it, and edit it again and again).

A remembered copy is never trusted on its own. An edit computed from one is written only after
the file's current content, read through the handle the edit opened, is found to be exactly that
copy: the check every edit makes anyway before its rename. A stale copy costs that edit a second
attempt that reads the file; it never decides what lands.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_FILE_BYTES = 256 * 1024
MAX_TOTAL_BYTES = 8 * 1024 * 1024


class KnownContents:
    """Least recently used copies, by absolute path, within a byte budget."""

    def __init__(self, max_file_bytes: int = MAX_FILE_BYTES, max_total_bytes: int = MAX_TOTAL_BYTES) -> None:
        self._max_file, self._max_total = max_file_bytes, max_total_bytes
        self._copies: OrderedDict[str, bytes] = OrderedDict()
        self._total = 0

    def remember(self, path: str, data: bytes) -> None:
        self.forget(path)
        if len(data) > self._max_file:
            return
        self._copies[path] = data
        self._total += len(data)
        while self._total > self._max_total:
            _, dropped = self._copies.popitem(last=False)
            self._total -= len(dropped)

    def get(self, path: str, size: int | None) -> bytes | None:
        """The copy of `path`, if there is one of the file's current `size`."""
        data = self._copies.get(path)
        if data is None or len(data) != size:
            return None
        self._copies.move_to_end(path)
        return data

    def forget(self, path: str) -> None:
        data = self._copies.pop(path, None)
        if data is not None:
            self._total -= len(data)
