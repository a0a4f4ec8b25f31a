"""read / write / edit / multi_edit / stat / list over SFTP, with hostile file names."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import os
import select
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from sandbox import Edit, Image, ReadResult, Sandbox
from sandbox.errors import (
    BinaryFile,
    EditConflict,
    FileNotFound,
    FileOperationError,
    InvalidArgument,
    InvalidEdit,
    IsADirectory,
    NoMatch,
    NotADirectory,
    NotUnique,
    PermissionDenied,
    SpecialFile,
)
from sandbox.files import MAX_READ_CHARS, MAX_TEXT_BYTES, WHOLE_READ_BYTES, Files, shorten_diff_lines, unified_diff
from sandbox.files import _text_window as text_window
from tests.processes import Watcher, output_until_exit

HOSTILE_NAMES = [
    "with space.txt",
    "quote'single.txt",
    'quote"double.txt',
    "new\nline.txt",
    "-leading-dash.txt",
    "$(touch pwned).txt",
    "`touch pwned`.txt",
    "semi;colon&amp|pipe.txt",
    "ünïcödé ☃ 名前.txt",
    "back\\slash.txt",
    "*glob?[x].txt",
]
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


async def test_read_numbers_lines_like_cat_n(sb: Sandbox) -> None:
    await sb.write("f.txt", "alpha\nbeta\ngamma\n")
    r = await sb.read("f.txt")
    assert isinstance(r, ReadResult)
    assert r.text == "     1\talpha\n     2\tbeta\n     3\tgamma"
    assert (r.total_lines, r.start_line, r.end_line, r.more_after) == (3, 1, 3, False)


async def test_read_window_says_what_follows(sb: Sandbox) -> None:
    await sb.write("many.txt", "".join(f"line {i}\n" for i in range(1, 101)))
    r = await sb.read("many.txt", offset=10, limit=5)
    assert isinstance(r, ReadResult)
    assert r.text.splitlines() == [f"{n:>6}\tline {n}" for n in range(10, 15)]
    assert (r.total_lines, r.end_line, r.more_after) == (100, 14, True)


async def test_a_read_stops_at_whole_lines_within_its_character_budget(sb: Sandbox) -> None:
    """2000 lines of 2000 characters would be 4 MB in one answer: it stops at a line that fits."""
    await sb.write("wide.txt", "".join(f"{i:04d}" + "w" * 996 + "\n" for i in range(1, 3001)))
    first = await sb.read("wide.txt")
    assert isinstance(first, ReadResult)
    assert len(first.text) <= MAX_READ_CHARS < len(first.text) + 1008  # (the next line would not fit)
    assert first.more_after and first.end_line == len(first.text.split("\n"))
    assert first.text.split("\n")[-1].startswith(f"{first.end_line:>6}\t{first.end_line:04d}")
    after = await sb.read("wide.txt", offset=first.end_line + 1)
    assert isinstance(after, ReadResult) and after.text.startswith(f"{first.end_line + 1:>6}\t{first.end_line + 1:04d}")
    narrow = await sb.read("wide.txt", limit=3)  # a window within the budget is given whole
    assert isinstance(narrow, ReadResult) and narrow.end_line == 3


async def test_read_cuts_long_lines_with_a_marker(sb: Sandbox) -> None:
    await sb.write("long.txt", "x" * 5000 + "\nshort\n")
    r = await sb.read("long.txt")
    assert isinstance(r, ReadResult)
    first, second = r.text.split("\n")
    assert first == f"     1\t{'x' * 2000}… [line cut: 5000 characters]"
    assert second == "     2\tshort" and r.lines_cut == 1


def large_text() -> bytes:
    """Over WHOLE_READ_BYTES, with what a reader taking it a chunk at a time could get wrong: a line
    longer than can be shown made of two-byte characters, crossing the first chunk's end; bytes
    that are not UTF-8; CRLF; an empty line; no newline at the end."""
    lines = [f"line {i} ünï\r".encode() for i in range(1, 200_001)]
    lines[100] = b"bad \xff\xfe bytes \xc3"
    lines[101] = b""
    lines[150_000] = "é".encode() * 2_500_000  # (5 MB: from below CHUNK to past it)
    lines[150_001] = b"x\x80" * 3000  # (long, and not UTF-8)
    data = b"\n".join(lines)
    assert len(data) > WHOLE_READ_BYTES and not data.endswith(b"\n")
    return data


@pytest.mark.parametrize("window", [(1, 2000), (95, 10), (149_990, 15), (150_001, 3), (199_990, 50), (250_000, 5)])
async def test_a_window_of_a_large_file_is_what_reading_it_whole_gives(sb: Sandbox, window: tuple[int, int]) -> None:
    data = large_text()
    await sb.write("large.txt", data)
    offset, limit = window
    got = await sb.read("large.txt", offset=offset, limit=limit)
    assert got == text_window(got.path, data, offset, limit)


async def test_a_window_of_a_file_over_any_whole_read_limit_is_read(sb: Sandbox) -> None:
    """Bigger than read_bytes takes at all: a window is still read, and its total line count is
    the box's (nothing but the window is fetched)."""
    size = MAX_TEXT_BYTES + 1000
    await sb.run(f"yes 'a line of text' | head -c {size} > huge.txt")
    try:
        got = await sb.read("huge.txt", offset=3, limit=2)
        assert isinstance(got, ReadResult) and got.text == "     3\ta line of text\n     4\ta line of text"
        assert got.total_lines == -(-size // len("a line of text\n")) and got.more_after
    finally:
        await sb.run("rm -f huge.txt")


async def test_a_large_file_is_counted_by_reading_it_when_the_box_cannot_count(sb: Sandbox) -> None:
    data = large_text()
    await sb.write("large.txt", data)
    await sb.read("large.txt")  # (the sandbox's SFTP session is open)
    uncounted = Files(sb._p.sftp)  # (as the engine's files are, with no way to run wc on the box)
    path = await sb.resolve_file("large.txt")
    assert await uncounted.read(path, 10, 5) == text_window(path, data, 10, 5)


async def test_a_path_through_a_file_or_with_a_name_too_long_says_what_to_change(sb: Sandbox) -> None:
    """What SFTP has no status code for (OpenSSH's sftp-server answers "Bad message" to a name
    over 255 bytes) still reads as what went wrong and what to do instead."""
    await sb.write("plain.txt", "x")
    for under_a_file in ("plain.txt/b.txt", "plain.txt/deeper/b.txt"):
        with pytest.raises(NotADirectory, match="a part of the path is a file: choose another path"):
            await sb.write(under_a_file, "y")
    for call in (lambda: sb.write("n" * 256, "y"), lambda: sb.read("é" * 128)):
        with pytest.raises(FileOperationError, match="file name too long; a name in a path may be at most 255 bytes"):
            await call()
    assert await sb.read_text("plain.txt") == "x"


async def test_a_large_binary_file_is_refused_naming_its_size(sb: Sandbox) -> None:
    data = b"\0" + large_text()
    await sb.write("large.bin", data)
    with pytest.raises(BinaryFile, match=f"{len(data)} bytes") as refused:
        await sb.read("large.bin")
    assert "tether cp SANDBOX:PATH ." in str(refused.value)  # (a way to download it that exists)


async def test_read_empty_file(sb: Sandbox) -> None:
    await sb.write("empty.txt", "")
    r = await sb.read("empty.txt")
    assert isinstance(r, ReadResult) and r.total_lines == 0 and r.text == ""


async def test_read_refuses_binary_naming_its_size(sb: Sandbox) -> None:
    await sb.write("blob.bin", b"\x00\x01\x02" * 100)
    with pytest.raises(BinaryFile, match="300 bytes"):
        await sb.read("blob.bin")


async def test_read_returns_images_as_bytes(sb: Sandbox) -> None:
    await sb.write("dot.png", PNG_1X1)
    r = await sb.read("dot.png")
    assert isinstance(r, Image) and r.mime_type == "image/png" and r.data == PNG_1X1


async def test_read_a_directory_suggests_glob(sb: Sandbox) -> None:
    await sb.makedirs("adir")
    with pytest.raises(IsADirectory, match="glob"):
        await sb.read("adir")
    with pytest.raises(InvalidArgument, match="glob, pattern \\*, path adir/"):
        await sb.read("adir/")


async def test_read_missing_file(sb: Sandbox) -> None:
    with pytest.raises(FileNotFound, match="no such file"):
        await sb.read("nope.txt")


async def test_write_creates_parents_and_reports_created(sb: Sandbox) -> None:
    w = await sb.write("deep/er/new.txt", "hi")
    assert (w.bytes, w.created) == (2, True)
    again = await sb.write("deep/er/new.txt", "hello")
    assert again.created is False
    assert await sb.read_text("deep/er/new.txt") == "hello"


async def test_write_keeps_an_existing_files_mode(sb: Sandbox) -> None:
    await sb.write("script.sh", "#!/bin/sh\necho one\n")
    await sb.run("chmod 751 script.sh")
    await sb.write("script.sh", "#!/bin/sh\necho two\n")
    assert (await sb.stat("script.sh")).mode == 0o751
    assert (await sb.run("./script.sh")).stdout == "two\n"


async def test_write_through_a_symlink_replaces_the_target_not_the_link(sb: Sandbox) -> None:
    await sb.write("real.txt", "old")
    await sb.run("ln -s real.txt link.txt")
    await sb.write("link.txt", "new")
    assert (await sb.stat("link.txt")).symlink_target == "real.txt"
    assert await sb.read_text("real.txt") == "new"


async def test_write_through_a_symlink_in_a_read_only_directory_writes_the_target(sb: Sandbox) -> None:
    """The temp file goes beside the target: the link's own directory may not be writable."""
    await sb.write("rw/target.txt", "old\n")
    await sb.run("mkdir ro && ln -s ../rw/target.txt ro/link && chmod 555 ro")
    try:
        await sb.write("ro/link", "new\n")
        assert await sb.read_text("rw/target.txt") == "new\n"
        assert (await sb.stat("ro/link")).symlink_target == "../rw/target.txt"
    finally:
        await sb.run("chmod 755 ro")


async def test_write_leaves_no_temporary_files(sb: Sandbox) -> None:
    await asyncio.gather(*(sb.write(f"many/{i}.txt", str(i)) for i in range(20)))
    names = sorted(e.path.rsplit("/", 1)[1] for e in await sb.list_dir("many"))
    assert names == sorted(f"{i}.txt" for i in range(20))


async def test_a_failed_write_leaves_the_original_intact(sb: Sandbox) -> None:
    await sb.write("locked/keep.txt", "original")
    await sb.run("chmod 555 locked")
    try:
        with pytest.raises(Exception, match="permission denied"):
            await sb.write("locked/keep.txt", "replacement")
        assert await sb.read_text("locked/keep.txt") == "original"
    finally:
        await sb.run("chmod 755 locked")


@pytest.mark.parametrize("change", ["write", "edit"])
async def test_a_file_of_the_kernels_is_said_to_be_changed_with_run(sb: Sandbox, change: str) -> None:
    """No file can be made beside one in /proc: that is what is said, not that the file is missing."""
    path = "/proc/self/comm"  # (sftp-server's own name: writable by its user)
    with pytest.raises(FileOperationError, match=r"^/proc/self/comm: no new file can be made in /proc/self .*with run"):
        await (sb.write(path, "x\n") if change == "write" else sb.edit(path, "sftp", "x"))


async def test_a_read_only_file_is_refused_as_an_editor_would_refuse_it(sb: Sandbox) -> None:
    """Renaming over a file needs only its directory writable: write and edit check the file's own
    mode, first use in a directory included (who the sandbox user is comes from the temp file)."""
    for attempt in ("write", "edit", "write-again", "edit-again"):
        name = f"ro-{attempt.split('-')[0]}/frozen.txt"
        if not attempt.endswith("again"):
            await sb.run(["sh", "-c", f"mkdir -p {name.split('/')[0]} && printf 'v1\\n' > {name} && chmod 444 {name}"])
        with pytest.raises(PermissionDenied, match=r"mode 0444.*chmod u\+w"):
            if attempt.startswith("write"):
                await sb.write(name, "v2\n")
            else:
                await sb.edit(name, "v1", "v2")
        assert await sb.read_text(name) == "v1\n"
    for directory in ("ro-write", "ro-edit"):  # (temp files are removed in the background, on the same channel)
        assert [e.path.rsplit("/", 1)[1] for e in await sb.list_dir(directory)] == ["frozen.txt"]
    await sb.run(["chmod", "644", "ro-write/frozen.txt"])
    await sb.write("ro-write/frozen.txt", "v3\n")
    assert await sb.read_text("ro-write/frozen.txt") == "v3\n"


async def test_edit_replaces_a_unique_match_and_returns_a_diff(sb: Sandbox) -> None:
    await sb.write("app.py", "def f():\n    return 1\n")
    e = await sb.edit("app.py", "return 1", "return 2")
    assert e.replacements == 1
    assert "-    return 1\n+    return 2\n" in e.diff
    assert await sb.read_text("app.py") == "def f():\n    return 2\n"


async def test_diffs_mark_a_last_line_without_its_newline(sb: Sandbox) -> None:
    """As diff -u and git do: otherwise the removed and the added line run together, and taking
    the final newline away looks like no change at all."""
    await sb.write("tail.txt", "one\ntwo")
    diff = (await sb.edit("tail.txt", "two", "TWO")).diff
    assert diff.endswith("-two\n\\ No newline at end of file\n+TWO\n\\ No newline at end of file\n")
    diff = (await sb.edit("tail.txt", "TWO", "TWO\n")).diff
    assert diff.endswith("-TWO\n\\ No newline at end of file\n+TWO\n")
    await sb.write("ff.txt", "a\x0cb\nc\n")  # (a form feed is inside its line, not a line break)
    assert (await sb.edit("ff.txt", "c", "C")).diff.endswith("@@ -1,2 +1,2 @@\n a\x0cb\n-c\n+C\n")


async def test_edits_of_a_crlf_file_take_newlines_as_crlf(sb: Sandbox) -> None:
    await sb.write("dos.txt", "a\r\nb\r\nc\r\n")
    await sb.edit("dos.txt", "a\nb", "A\nB\nB2")  # as an agent writes it
    await sb.edit("dos.txt", "B2\r\nc", "C")  # or as the file has it
    assert await sb.read_text("dos.txt") == "A\r\nB\r\nC\r\n"


async def test_edits_of_a_file_with_mixed_line_endings_match_either(sb: Sandbox) -> None:
    """A CRLF file with a line appended by echo: a "\n" the agent sends matches CRLF or LF, and the
    new text's line breaks are CRLF where the text it replaced had them."""
    await sb.write("mixed.txt", "one\r\ntwo\r\nthree\r\nfour\nfive\n")
    await sb.edit("mixed.txt", "one\ntwo", "ONE\nTWO")
    await sb.edit("mixed.txt", "four\nfive", "FOUR\nFIVE")
    await sb.edit("mixed.txt", "three\nFOUR", "3\n4")  # (across a CRLF line and an LF one)
    assert await sb.read_text("mixed.txt") == "ONE\r\nTWO\r\n3\r\n4\nFIVE\n"
    await sb.write("mixed.txt", "x\r\ny\r\nx\ny\n")
    with pytest.raises(NotUnique) as twice:
        await sb.edit("mixed.txt", "x\ny", "z")
    assert twice.value.lines == [1, 3]
    assert (await sb.edit("mixed.txt", "x\ny", "z\nz", replace_all=True)).replacements == 2
    assert await sb.read_text("mixed.txt") == "z\r\nz\r\nz\nz\n"
    with pytest.raises(NoMatch):
        await sb.edit("mixed.txt", "z\nq", "x")


async def test_utf16_text_is_read_and_edited_as_text(sb: Sandbox) -> None:
    """A file that begins with a UTF-16 byte-order mark (PowerShell's `>`, Notepad's "Unicode") is
    text, as ripgrep finds it: read gives its lines, edit keeps its encoding and mark."""
    for codec in ("utf-16-le", "utf-16-be"):
        bom = b"\xff\xfe" if codec == "utf-16-le" else b"\xfe\xff"
        await sb.write("u16.txt", bom + "hello\r\nfoo bär 🙂\r\n".encode(codec))
        window = await sb.read("u16.txt")
        assert isinstance(window, ReadResult) and window.total_lines == 2
        assert "     2\tfoo bär 🙂" in window.text
        await sb.edit("u16.txt", "foo", "baz")
        assert await sb.read_bytes("u16.txt") == bom + "hello\r\nbaz bär 🙂\r\n".encode(codec)
    # binary that starts like it is still binary: UTF-32's mark, a NUL, or no UTF-16 at all
    for data in (b"\xff\xfe\x00\x00h\x00\x00\x00", b"\xff\xfeh\x00\x00\x00i\x00", b"\xff\xfe\x00\xdc\x00\x00"):
        await sb.write("notext.bin", data)
        with pytest.raises(BinaryFile):
            await sb.read("notext.bin")


async def test_arguments_of_the_wrong_type_are_refused_before_the_file_is_touched(sb: Sandbox) -> None:
    await sb.write("typed.txt", "important\n")
    for content in (None, 42, ["a"]):
        with pytest.raises(InvalidArgument, match="write takes text \\(str\\) or bytes"):
            await sb.write("typed.txt", content)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="old_string and new_string are text"):
        await sb.edit("typed.txt", "important", None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"edits\[0\]: expected an Edit or a mapping"):
        await sb.multi_edit("typed.txt", [("important", "gone")])  # type: ignore[list-item]
    assert await sb.read_text("typed.txt") == "important\n"
    assert (await sb.write("typed.txt", bytearray(b"bytes too"))).bytes == 9


async def test_multi_edit_refuses_malformed_edits_by_index(sb: Sandbox) -> None:
    await sb.write("m.txt", "a\n")
    with pytest.raises(InvalidArgument, match=r"edits\[1\]: unknown keys \['old'\]"):
        await sb.multi_edit("m.txt", [{"old_string": "a", "new_string": "b"}, {"old": "a", "new_string": "c"}])
    with pytest.raises(InvalidArgument, match=r"edits\[0\]: missing \['new_string'\]"):
        await sb.multi_edit("m.txt", [{"old_string": "a"}])
    with pytest.raises(InvalidArgument, match=r"edits\[0\]: old_string and new_string are text"):
        await sb.multi_edit("m.txt", [{"old_string": "a", "new_string": 1}])
    assert await sb.read_text("m.txt") == "a\n"


async def test_edit_refuses_ambiguous_match_and_names_lines(sb: Sandbox) -> None:
    await sb.write("dup.txt", "x = 1\ny = 2\nx = 1\nz\nx = 1\n")
    with pytest.raises(NotUnique) as caught:
        await sb.edit("dup.txt", "x = 1", "x = 9")
    assert caught.value.count == 3 and caught.value.lines == [1, 3, 5]
    assert "matches 3 times" in str(caught.value) and "lines 1, 3, 5" in str(caught.value)
    assert await sb.read_text("dup.txt") == "x = 1\ny = 2\nx = 1\nz\nx = 1\n"
    with pytest.raises(NotUnique) as caught:  # (a line with several matches is named once)
        await sb.edit("dup.txt", "1", "2")
    assert caught.value.count == 3 and caught.value.lines == [1, 3, 5]
    await sb.write("same-line.txt", "a a a\n")
    with pytest.raises(NotUnique, match=r"matches 3 times \(line 1\)"):
        await sb.edit("same-line.txt", "a", "b")


async def test_edit_replace_all_counts_replacements(sb: Sandbox) -> None:
    await sb.write("dup.txt", "a b a b a")
    e = await sb.edit("dup.txt", "a", "c", replace_all=True)
    assert e.replacements == 3 and await sb.read_text("dup.txt") == "c b c b c"


async def test_edit_errors(sb: Sandbox) -> None:
    await sb.write("e.txt", "content\n")
    with pytest.raises(NoMatch, match="not found"):
        await sb.edit("e.txt", "absent", "x")
    with pytest.raises(InvalidEdit, match="identical"):
        await sb.edit("e.txt", "content", "content")
    with pytest.raises(FileNotFound):
        await sb.edit("missing.txt", "a", "b")


async def test_edit_with_empty_old_string_creates_a_missing_file(sb: Sandbox) -> None:
    e = await sb.edit("fresh.txt", "", "brand new\n")
    assert e.replacements == 1 and await sb.read_text("fresh.txt") == "brand new\n"


async def test_edit_keeps_mode(sb: Sandbox) -> None:
    await sb.write("m.sh", "echo a\n")
    await sb.run("chmod 700 m.sh")
    await sb.edit("m.sh", "echo a", "echo b")
    assert (await sb.stat("m.sh")).mode == 0o700


async def test_multi_edit_applies_in_order(sb: Sandbox) -> None:
    await sb.write("multi.txt", "one two three")
    e = await sb.multi_edit("multi.txt", [Edit("one", "1"), {"old_string": "1 two", "new_string": "1 2"}])
    assert e.replacements == 2 and await sb.read_text("multi.txt") == "1 2 three"


async def test_multi_edit_is_all_or_nothing_and_names_the_failing_edit(sb: Sandbox) -> None:
    await sb.write("multi.txt", "one two three")
    with pytest.raises(NoMatch, match=r"edits\[1\]:"):
        await sb.multi_edit("multi.txt", [Edit("one", "1"), Edit("four", "4")])
    assert await sb.read_text("multi.txt") == "one two three"


@contextlib.contextmanager
def striking(sb: Sandbox, hook: Callable[[str], Awaitable[None]]) -> Iterator[None]:
    """Run `hook` inside an edit, after it was applied and before the conflict check (where a
    concurrent writer would strike)."""
    sb._p.files.before_conflict_check = hook
    try:
        yield
    finally:
        sb._p.files.before_conflict_check = None


async def warm_up(sb: Sandbox) -> None:
    """An edit elsewhere, so that the next one knows the box's clock and its temp files' owner
    without asking (see sandbox/tempfacts.py): the race tests run with and without that."""
    await sb.write("warm.txt", "cold\n")
    await sb.edit("warm.txt", "cold", "warm")
    await sb.run(["rm", "warm.txt"])


# Another writer strikes while an edit is applied: it rewrites the file in place, or renames a new
# file of the same size over the path (as editors save).
WRITERS = {
    "in place": 'printf "version two\\n" > "$1"',
    "renamed over": 'printf "version two\\n" > "$1.new" && mv -f "$1.new" "$1"',
}


@pytest.mark.parametrize("known", ["first edit", "box clock known"])
@pytest.mark.parametrize("written", ["just now", "an hour ago"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
async def test_the_file_changing_under_an_edit_is_refused(sb: Sandbox, writer: str, written: str, known: str) -> None:
    """Whether the original was written this very second (SFTP mtimes are whole seconds) or long
    before: nothing of the edit lands, the other writer's content stays, no temp file is left, and
    a quiet edit goes through afterwards. (The file is written by a command, so the edit reads it
    itself: see the next test for a file whose content tether remembers.)"""
    if known != "first edit":
        await warm_up(sb)
    await sb.run(["sh", "-c", "printf 'version one\\n' > race.txt"])
    if written != "just now":
        await sb.run(["touch", "-d", "1 hour ago", "race.txt"])

    async def strike(path: str) -> None:
        await sb.run(["sh", "-c", WRITERS[writer], "sh", path])

    with striking(sb, strike), pytest.raises(EditConflict, match="changed while the edit"):
        await sb.edit("race.txt", "one", "ONE")
    assert await sb.read_text("race.txt") == "version two\n"
    deadline = time.monotonic() + 5
    while len(listed := await sb.list_dir(".")) > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # (the unused temp file is removed in the background)
    assert [e.path.rsplit("/", 1)[1] for e in listed] == ["race.txt"]
    assert (await sb.edit("race.txt", "two", "three")).replacements == 1


async def test_an_edit_from_a_remembered_copy_never_trusts_it(sb: Sandbox) -> None:
    """tether remembers what it last read or wrote of a file and edits from that copy without
    reading the file again, but only lands the edit if the file still holds exactly that copy.
    Changed behind its back (same size, so only the content tells), the edit applies to what the
    file holds now; an edit that only fits the old copy is refused as NoMatch; a writer striking
    during the edit keeps its change, with the edit applied on top."""
    await sb.write("copy.txt", "alpha bbbb\n")
    await sb.run(["sh", "-c", "printf 'alpha cccc\\n' > copy.txt"])
    assert (await sb.edit("copy.txt", "cccc", "dddd")).replacements == 1
    assert await sb.read_text("copy.txt") == "alpha dddd\n"
    await sb.run(["sh", "-c", "printf 'alpha eeee\\n' > copy.txt"])
    with pytest.raises(NoMatch):
        await sb.edit("copy.txt", "dddd", "ffff")
    assert await sb.read_text("copy.txt") == "alpha eeee\n"

    await sb.write("race.txt", "version one\n")
    strikes = []

    async def strike_once(path: str) -> None:
        if not strikes:
            strikes.append(path)
            await sb.run(["sh", "-c", "printf 'version two\\n' > \"$1\"", "sh", path])

    with striking(sb, strike_once):
        assert (await sb.edit("race.txt", "version", "VERSION")).diff.count("+VERSION two") == 1
    assert strikes and await sb.read_text("race.txt") == "VERSION two\n"


async def test_temp_files_are_private_until_they_take_the_files_mode(sb: Sandbox) -> None:
    """A secret written or edited over a 0600 file is never readable by others on the way, and new
    files still get the box's usual mode (0666 less its umask)."""
    await sb.write("fresh-1.txt", "a")  # the first new file: its mode is learned
    await sb.write("fresh-2.txt", "b")  # the next: a private temp file widened to that mode
    assert (await sb.stat("fresh-1.txt")).mode == (await sb.stat("fresh-2.txt")).mode == 0o644
    await sb.write(".env", "TOKEN=old\n")
    await sb.run(["chmod", "600", ".env"])
    seen: list[int] = []

    async def look(path: str) -> None:
        listing = await sb.list_dir(".")
        seen.extend(e.mode for e in listing if ".tether-" in e.path)

    with striking(sb, look):
        await sb.edit(".env", "old", "new-secret")
    assert seen == [0o600]
    await sb.write(".env", "TOKEN=newer\n")
    assert (await sb.stat(".env")).mode == 0o600 and await sb.read_text(".env") == "TOKEN=newer\n"


class CreatedModes(Watcher):
    """The mode each file had the moment it appeared in a directory (inotify, from this process:
    the test sshd's files are on this machine), as a watcher of another user would catch it."""

    IN_CREATE = 0x100

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory
        self.modes: dict[str, int] = {}
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK)
        assert self._fd >= 0 and libc.inotify_add_watch(self._fd, directory.encode(), self.IN_CREATE) >= 0

    def watch_once(self) -> None:
        if not select.select([self._fd], [], [], 0.05)[0]:
            return
        buffer = os.read(self._fd, 65536)
        at = 0
        while at < len(buffer):  # (struct inotify_event: wd, mask, cookie, len, then the name)
            _, _, _, length = struct.unpack_from("iIII", buffer, at)
            name = buffer[at + 16 : at + 16 + length].rstrip(b"\0").decode()
            at += 16 + length
            with contextlib.suppress(FileNotFoundError):
                self.modes[name] = stat.S_IMODE(os.lstat(os.path.join(self.directory, name)).st_mode)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        os.close(self._fd)


async def test_a_secret_written_over_a_private_file_is_never_readable_by_others(sb: Sandbox) -> None:
    """The session's very first write, over a 0600 file: its temp file is created 0600 (what mode a
    new file gets is learned beside it, from an empty probe file), and later writes too."""
    work = await sb.cwd()
    await sb.run(["sh", "-c", "printf 'TOKEN=old\\n' > .env && chmod 600 .env"])
    with CreatedModes(work) as created:
        for n in range(50):  # five at least, and on until the watcher has seen a temp file (a loaded box)
            await sb.write(".env", f"TOKEN=new-{n}\n")
            if n >= 4 and any(name.endswith(".tmp") for name in list(created.modes)):
                break
        # The control: a file made 0644 and chmod'ed 0600 a moment later is seen as 0644, so the
        # watcher does catch what a write would show on its way.
        await sb.run(["sh", "-c", ": > control.tmp; sleep 0.05; chmod 600 control.tmp"])
        deadline = time.monotonic() + 5
        while "control.tmp" not in created.modes and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    assert created.modes.pop("control.tmp") == 0o644
    temp_modes = [mode for name, mode in created.modes.items() if name.endswith(".tmp")]
    # (a temp file renamed away before the watcher looked is not seen: most are)
    assert temp_modes and set(temp_modes) == {0o600}, created.modes
    assert (await sb.stat(".env")).mode == 0o600 and await sb.read_text(".env") == f"TOKEN=new-{n}\n"
    await sb.write("public.txt", "hello\n")  # a new file still gets the box's usual mode
    assert (await sb.stat("public.txt")).mode == 0o644


async def test_setuid_and_setgid_bits_survive_write_and_edit(sb: Sandbox) -> None:
    """A write by anyone but root clears them: the mode is given after the data."""
    await sb.write("tool", "abc\n")
    await sb.run(["chmod", "6755", "tool"])
    await sb.write("tool", "abd\n")
    assert (await sb.stat("tool")).mode == 0o6755
    await sb.edit("tool", "abd", "abe")
    assert (await sb.stat("tool")).mode == 0o6755 and await sb.read_text("tool") == "abe\n"


async def test_cancelled_writes_and_edits_leave_no_temp_files(sb: Sandbox) -> None:
    await sb.write("target.txt", "ALPHA\n")
    for n in range(30):
        call = sb.write("target.txt", f"ALPHA {n}\n") if n % 2 else sb.edit("target.txt", "ALPHA", "ALPHA")
        task = asyncio.ensure_future(call)
        await asyncio.sleep((n % 6) * 0.0005)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, FileOperationError):
            await task
    names: list[str] = []
    for _ in range(50):  # (temp files are removed in the background)
        names = [e.path.rsplit("/", 1)[1] for e in await sb.list_dir(".")]
        if names == ["target.txt"]:
            break
        await asyncio.sleep(0.1)
    assert names == ["target.txt"]
    assert (await sb.read_text("target.txt")).startswith("ALPHA")


async def test_symlink_loops_and_names_at_the_length_limit(sb: Sandbox, tmp_path: Path) -> None:
    await sb.run("ln -s loop-b loop-a && ln -s loop-a loop-b")
    for attempt in (sb.write("loop-a", "x"), sb.edit("loop-a", "x", "y"), sb.edit("loop-a", "", "new")):
        with pytest.raises(FileOperationError, match="symbolic links"):
            await attempt
    long = "n" * 250 + ".txt"  # 254 bytes: a temp name beside it must still fit in 255
    await sb.write(long, "one\n")
    await sb.edit(long, "one", "two")
    assert await sb.read_text(long) == "two\n"
    local = tmp_path / long
    await sb.download(long, local)
    await sb.upload(local, f"up-{long[3:]}")
    assert local.read_text() == await sb.read_text(f"up-{long[3:]}") == "two\n"


async def test_write_and_edit_keep_the_files_group(sb: Sandbox) -> None:
    """The login user may give a file any group it belongs to: write and edit keep it."""
    groups = (await sb.run("id -G")).stdout.split()
    primary = (await sb.run("id -g")).stdout.strip()
    other = next((g for g in groups if g != primary), None)
    if other is None:  # the test account is in a second group (tests/sshd.py), so this is a bug
        raise AssertionError(f"the test account has one group only: {groups}")
    await sb.write("grouped.txt", "one\n")
    await sb.run(["chgrp", other, "grouped.txt"])
    await sb.edit("grouped.txt", "one", "two")
    assert (await sb.run("stat -c %g grouped.txt")).stdout.strip() == other
    await sb.write("grouped.txt", "three\n")
    assert (await sb.run("stat -c %g grouped.txt")).stdout.strip() == other
    # In a setgid directory a temp file takes the directory's group, not the user's: what tether
    # learned of temp files in the home directory must not be taken for this one.
    await sb.run(["sh", "-c", f"mkdir shared && chgrp {other} shared && chmod g+s shared"])
    await sb.write("shared/mine.txt", "one\n")
    await sb.run(["chgrp", primary, "shared/mine.txt"])
    await sb.edit("shared/mine.txt", "one", "two")
    await sb.write("shared/mine.txt", "three\n")
    assert (await sb.run("stat -c %g shared/mine.txt")).stdout.strip() == primary


async def test_stat_and_list(sb: Sandbox) -> None:
    await sb.write("d/a.txt", "12345")
    await sb.makedirs("d/sub")
    st = await sb.stat("d/a.txt")
    assert (st.type, st.size) == ("file", 5)
    assert (await sb.stat("d")).type == "directory"
    listing = await sb.list_dir("d")
    assert [(e.path.rsplit("/", 1)[1], e.type) for e in listing] == [("a.txt", "file"), ("sub", "directory")]
    with pytest.raises(FileNotFound):
        await sb.stat("d/none")


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_hostile_names_round_trip_and_are_never_interpreted(sb: Sandbox, name: str) -> None:
    await sb.write(f"h/{name}", "needle here\n")
    r = await sb.read(f"h/{name}")
    assert isinstance(r, ReadResult) and r.text == "     1\tneedle here"
    await sb.edit(f"h/{name}", "needle", "pin")
    assert await sb.read_text(f"h/{name}") == "pin here\n"
    assert (await sb.stat(f"h/{name}")).size == len("pin here\n")
    assert [e.path.rsplit("/", 1)[1] for e in await sb.list_dir("h")] == [name]
    found = await sb.grep("pin", "h")
    assert found.text == f"{await sb.cwd()}/h/{name}"
    assert (await sb.glob("*", "h")).files == [f"{await sb.cwd()}/h/{name}"]
    assert (await sb.run(["cat", "--", f"h/{name}"])).stdout == "pin here\n"
    assert not await sb.exists("pwned") and not await sb.exists("h/pwned")


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_hostile_names_as_directories_and_through_every_other_operation(
    sb: Sandbox, name: str, tmp_path: Path
) -> None:
    """The same names as a directory a command runs in (and stays in), a job's cwd, an upload's
    target and a download's source, a multi_edit and grep's content mode."""
    directory = f"{await sb.cwd()}/hd/{name}"
    await sb.makedirs(directory)
    assert (await sb.run("pwd", cwd=directory)).stdout == f"{directory}\n"
    await sb.run(["cd", "--", directory])
    assert await sb.cwd() == directory  # where a command ends is where the next one starts
    assert (await sb.run("echo here > marker; pwd")).stdout == f"{directory}\n"
    assert (await sb.run(["cat", "--", f"{directory}/marker"])).stdout == "here\n"
    job = await sb.start_job("pwd; ls", cwd=directory)
    assert (await output_until_exit(sb, job.id)).stdout.startswith(f"{directory}\nmarker\n")

    local = tmp_path / "payload.bin"
    local.write_bytes(bytes(range(256)) * 100)
    await sb.upload(local, f"{directory}/{name}")
    back = tmp_path / "back.bin"
    await sb.download(f"{directory}/{name}", back)
    assert back.read_bytes() == local.read_bytes()

    await sb.write(f"{directory}/{name}", "one two\nthree\n")
    edited = await sb.multi_edit(f"{directory}/{name}", [Edit("one", "1"), Edit("three", "3")])
    assert edited.replacements == 2 and await sb.read_text(f"{directory}/{name}") == "1 two\n3\n"
    found = await sb.grep("two", directory, output_mode="content")
    assert f"{directory}/{name}" in found.text and "1 two" in found.text
    assert not await sb.exists("pwned") and not await sb.exists(f"{directory}/pwned")


async def test_a_name_that_is_not_utf8_works_as_os_fsdecode_gives_it(sb: Sandbox) -> None:
    """A Latin-1 byte in a file name: the Python API spells it with a lone surrogate (as os.fsdecode
    does), it round-trips through every file operation, and it never fails a listing."""
    await sb.run(["sh", "-c", "mkdir l1 && printf 'needle\\n' > \"l1/caf$(printf '\\351').txt\" && echo x > l1/plain"])
    name = "caf\udce9.txt"
    assert [e.path.rsplit("/", 1)[1] for e in await sb.list_dir("l1")] == [name, "plain"]
    cwd = await sb.cwd()
    assert (await sb.glob("*.txt", "l1")).files == [f"{cwd}/l1/{name}"]
    assert (await sb.grep("needle", "l1")).text == f"{cwd}/l1/{name}"
    assert (await sb.edit(f"l1/{name}", "needle", "pin")).replacements == 1
    assert await sb.read_text(f"l1/{name}") == "pin\n"
    await sb.write(f"l1/{name}", "rewritten\n")
    assert (await sb.run(["sh", "-c", "cat l1/caf$(printf '\\351').txt"])).stdout == "rewritten\n"


async def test_a_file_path_must_name_a_file(sb: Sandbox) -> None:
    """Paths that cannot name a file are refused before anything is sent: a trailing '/', '.' or
    '..' (which normalizing would drop, writing a file named like the directory meant), an empty
    path, a NUL."""
    await sb.write("f.txt", "one\n")
    for attempt in (
        sb.write("newdir/", "x"),
        sb.write("newdir/.", "x"),
        sb.write("newdir/sub/..", "x"),
        sb.read("f.txt/"),
        sb.edit("f.txt/", "one", "two"),
        sb.multi_edit("f.txt/", [Edit("one", "two")]),
    ):
        with pytest.raises(InvalidArgument, match="names a directory"):
            await attempt
    for bad, reason in (("", "non-empty"), ("a\0b", "NUL")):
        with pytest.raises(InvalidArgument, match=reason):
            await sb.write(bad, "x")
    assert [e.path.rsplit("/", 1)[1] for e in await sb.list_dir(".")] == ["f.txt"]
    assert await sb.read_text("f.txt") == "one\n"


async def test_edits_sent_together_all_land(sb: Sandbox) -> None:
    """An agent's parallel edits of one file (and a write among them) go through one by one: every
    change lands or is refused, none is lost while reporting success."""
    lines = [f"line {i}" for i in range(20)]
    await sb.write("together.txt", "\n".join(lines) + "\n")
    results = await asyncio.gather(*(sb.edit("together.txt", f"line {i}\n", f"LINE {i}\n") for i in range(20)))
    assert all(r.replacements == 1 for r in results)
    assert await sb.read_text("together.txt") == "".join(f"LINE {i}\n" for i in range(20))
    pair = await asyncio.gather(
        sb.multi_edit("together.txt", [Edit("LINE 0\n", "first\n"), Edit("LINE 19\n", "last\n")]),
        sb.write("other.txt", "unrelated\n"),
        sb.edit("together.txt", "LINE 10\n", "middle\n"),
    )
    assert pair[0].replacements == 2 and pair[2].replacements == 1
    text = await sb.read_text("together.txt")
    assert text.startswith("first\n") and text.endswith("last\n") and "middle\n" in text


@pytest.mark.parametrize("mode", ["644", "444"])
async def test_a_named_pipe_never_blocks_the_sandbox(sb: Sandbox, mode: str) -> None:
    """Opening a FIFO blocks until something writes to it, and sftp-server serves one request at
    a time: one blocked open would hang every file operation and command of the sandbox. A pipe is
    refused with SpecialFile whether tether has never seen the path or knew it as a file until it
    was swapped for a pipe (then the open already sent is released, or with a pipe this user may
    not write (444), the blocked session dropped), and everything else goes on working."""
    await sb.write("other.txt", "still here\n")
    await sb.run(["mkfifo", "-m", mode, "fresh.pipe"])
    with pytest.raises(SpecialFile, match="named pipe"):
        await asyncio.wait_for(sb.read("fresh.pipe"), 15)
    for operation in ("read", "edit"):
        await sb.write("swapped", "x\n")
        assert await sb.read_text("swapped") == "x\n"
        await sb.run(["sh", "-c", f"rm swapped && mkfifo -m {mode} swapped"])
        with pytest.raises(SpecialFile, match="named pipe"):
            if operation == "read":
                await asyncio.wait_for(sb.read("swapped"), 15)
            else:
                await asyncio.wait_for(sb.edit("swapped", "x", "y"), 15)
        assert await asyncio.wait_for(sb.read_text("other.txt"), 10) == "still here\n"
        assert (await asyncio.wait_for(sb.run("echo alive"), 10)).stdout == "alive\n"
        with pytest.raises(SpecialFile):  # and again, refused up front this time
            await asyncio.wait_for(sb.read("swapped"), 10)
        await sb.run(["rm", "swapped"])
    # a write would rename a plain file over the pipe (or over /dev/null, for a root agent): refused
    with pytest.raises(SpecialFile, match="write to it with run instead"):
        await sb.write("fresh.pipe", "data\n")
    assert (await sb.stat("fresh.pipe")).type == "other"
    await sb.run(["rm", "fresh.pipe"])


async def test_edits_through_a_symlink_and_of_its_target_sent_together_all_land(sb: Sandbox) -> None:
    await sb.write("real.txt", "".join(f"line {i}\n" for i in range(10)))
    await sb.run(["ln", "-s", "real.txt", "link.txt"])
    names = ["link.txt", "real.txt"] * 5
    await asyncio.gather(*(sb.edit(name, f"line {i}\n", f"LINE {i}\n") for i, name in enumerate(names)))
    assert await sb.read_text("real.txt") == "".join(f"LINE {i}\n" for i in range(10))
    await sb.run(["ln", "-sf", "loop.txt", "loop.txt"])  # a loop still ends with a clear error
    with pytest.raises(FileOperationError, match="too many levels"):
        await asyncio.wait_for(sb.edit("loop.txt", "a", "b"), 10)


async def test_text_that_utf8_cannot_encode_is_refused_clearly(sb: Sandbox) -> None:
    """A lone surrogate (JSON can carry one as an escape) has no UTF-8 form: InvalidArgument saying
    where, and nothing written."""
    with pytest.raises(InvalidArgument, match="at index 2, a lone surrogate"):
        await sb.write("surrogate.txt", "ab\ud800c")
    assert not await sb.exists("surrogate.txt")
    await sb.write("surrogate.txt", "abc\n")
    with pytest.raises(InvalidArgument, match="lone surrogate"):
        await sb.edit("surrogate.txt", "b", "\udc80")
    assert await sb.read_text("surrogate.txt") == "abc\n"
    # and everywhere else a string reaches the box: commands, argv, env, paths, patterns, jobs
    jobs_before = len(await sb.job_list())
    for attempt in (
        lambda: sb.run("echo \ud800"),
        lambda: sb.run(["printf", "%s", "\ud800"]),
        lambda: sb.run("true", env={"V": "\ud800"}),
        lambda: sb.read("x\ud800.txt"),
        lambda: sb.grep("\ud800", "."),
        lambda: sb.start_job("echo \ud800"),
    ):
        with pytest.raises(InvalidArgument, match="lone surrogate"):
            await attempt()
    assert len(await sb.job_list()) == jobs_before  # (no job half-made)
    assert (await sb.run("echo still fine")).stdout == "still fine\n"


async def test_listing_a_file_says_it_is_no_directory(sb: Sandbox) -> None:
    """OpenSSH's sftp-server answers a readdir of a file with "no such file": not what to tell."""
    await sb.write("plain.txt", "a")
    with pytest.raises(NotADirectory, match=r"plain\.txt is a file, not a directory"):
        await sb.list_dir("plain.txt")
    with pytest.raises(FileNotFound):
        await sb.list_dir("nothing-here")


async def test_editing_through_a_symlink_whose_target_became_a_named_pipe_is_refused(sb: Sandbox) -> None:
    """The link was edited before (so its path is opened without a stat alone first): its target
    replaced by a named pipe since is refused, and the session goes on (an open of a pipe with no
    writer would block sftp-server, and every file operation of the sandbox with it)."""
    await sb.write("pipe-target.txt", "hello\n")
    await sb.run("ln -sf pipe-target.txt pipe-link.txt")
    await sb.edit("pipe-link.txt", "hello", "bye")
    assert await sb.read_text("pipe-target.txt") == "bye\n"
    await sb.run("rm pipe-target.txt && mkfifo pipe-target.txt")
    with pytest.raises(SpecialFile, match="named pipe"):
        await asyncio.wait_for(sb.edit("pipe-link.txt", "bye", "again"), 10)
    assert (await asyncio.wait_for(sb.stat("pipe-link.txt"), 10)).symlink_target == "pipe-target.txt"


def test_a_diff_of_long_lines_is_cut_around_each_change() -> None:
    """Each side of a change inside a long line is shown around where it differs (a removed line
    that starts with `-- `, an SQL comment, is no diff header); short lines stay as they are."""
    before = "short\n-- " + "a" * 5000 + "OLD" + "b" * 5000 + "\n" + "c" * 3000 + "\n"
    after = before.replace("OLD", "NEW").replace("short", "shorter")
    lines = shorten_diff_lines(unified_diff("/f.sql", before, after), limit=200).splitlines()
    assert (lines[3], lines[5]) == ("-short", "+shorter")  # (difflib: the removed lines, then the added)
    assert "aOLDb" in lines[4] and "aNEWb" in lines[6] and all(len(line) < 300 for line in lines)
    assert lines[4].startswith("-… [4953 characters] ") and lines[4].endswith("… [line cut: 10006 characters]")
    assert lines[7] == " " + "c" * 200 + "… [line cut: 3000 characters]"  # (context: its start)
