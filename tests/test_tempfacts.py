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
    assert facts.written_recently(int(now + box_ahead_s), now) is None  # nothing learned yet
    facts.learn("/w", asyncssh.SFTPAttrs(mtime=int(now + box_ahead_s), uid=1000, gid=1000))
    box_now = int(now + box_ahead_s)
    assert facts.written_recently(box_now, now) is True
    assert facts.written_recently(box_now - 1, now) is True  # (whole seconds: within the margin)
    assert facts.written_recently(box_now - 5, now) is False
    assert facts.written_recently(None, now) is True  # no mtime: assume the worst


def test_owners_are_per_directory_and_everything_is_forgotten_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    facts = TempFileFacts()
    facts.learn("/home/u", asyncssh.SFTPAttrs(mtime=int(time.time()), uid=1000, gid=1000))
    facts.learn("/srv/shared", asyncssh.SFTPAttrs(mtime=int(time.time()), uid=1000, gid=50))
    assert facts.owner("/home/u") == (1000, 1000) and facts.owner("/srv/shared") == (1000, 50)
    assert facts.owner("/tmp") is None
    monkeypatch.setattr(tempfacts, "FRESH_FOR_S", 0.0)
    assert facts.owner("/home/u") is None and facts.written_recently(0, time.time()) is None


def test_attributes_without_times_or_owner_teach_nothing() -> None:
    facts = TempFileFacts()
    facts.learn("/w", asyncssh.SFTPAttrs(uid=1000, gid=1000))
    assert facts.owner("/w") is None and facts.written_recently(0, time.time()) is None
