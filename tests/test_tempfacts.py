"""What tether infers from a fresh temp file's attributes: the box's clock and new files' owner."""

from __future__ import annotations

import time

import asyncssh
import pytest

from sandbox import tempfacts
from sandbox.tempfacts import TempFileFacts


@pytest.mark.parametrize("box_ahead_s", [0, 3600, -3600])
def test_a_file_is_recent_only_within_a_margin_of_the_boxs_clock(box_ahead_s: int) -> None:
    facts = TempFileFacts()
    now = time.time()
    box_now = int(now + box_ahead_s)
    assert facts.written_recently("/w", box_now, now) is None  # nothing learned yet
    facts.learn("/w", asyncssh.SFTPAttrs(mtime=box_now, uid=1000, gid=1000))
    assert facts.written_recently("/w", box_now, now) is True
    assert facts.written_recently("/w", box_now - 1, now) is True  # (whole seconds: within the margin)
    assert facts.written_recently("/w", box_now - 5, now) is False
    assert facts.written_recently("/w", None, now) is True  # no mtime: assume the worst


def test_each_directory_has_its_own_clock_and_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory may be another filesystem (NFS, a bind mount) with a clock of its own and its own
    rule for a new file's group (setgid): nothing learned in one is taken for another."""
    facts = TempFileFacts()
    now = time.time()
    facts.learn("/home/u", asyncssh.SFTPAttrs(mtime=int(now), uid=1000, gid=1000))
    facts.learn("/mnt/nfs", asyncssh.SFTPAttrs(mtime=int(now) + 30, uid=1000, gid=50))
    assert facts.owner("/home/u") == (1000, 1000) and facts.owner("/mnt/nfs") == (1000, 50)
    assert facts.written_recently("/home/u", int(now) - 10, now) is False
    assert facts.written_recently("/mnt/nfs", int(now) + 25, now) is False
    assert facts.written_recently("/mnt/nfs", int(now) + 29, now) is True
    assert facts.owner("/tmp") is None and facts.written_recently("/tmp", 0, now) is None
    monkeypatch.setattr(tempfacts, "FRESH_FOR_S", 0.0)  # and after a while, everything is asked again
    assert facts.owner("/home/u") is None and facts.written_recently("/home/u", 0, now) is None


def test_attributes_without_times_or_owner_teach_nothing() -> None:
    facts = TempFileFacts()
    facts.learn("/w", asyncssh.SFTPAttrs(uid=1000, gid=1000))
    assert facts.owner("/w") is None and facts.written_recently("/w", 0, time.time()) is None
