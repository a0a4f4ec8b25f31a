"""File operations over SFTP with the semantics agents are trained on (Claude Code's Read/Write/Edit)."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import difflib
import functools
import logging
import posixpath
import re
import secrets
import stat as stat_module
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import asyncssh

from .channels import SFTPChannel
from .errors import (
    WRITE_DIRECTORY_HINT,
    WRITE_SPECIAL_HINT,
    BinaryFile,
    EditConflict,
    FileNotFound,
    FileOperationError,
    FileTooLarge,
    InvalidArgument,
    InvalidEdit,
    IsADirectory,
    NoMatch,
    NotADirectory,
    NotUnique,
    PermissionDenied,
    SpecialFile,
)
from .known import KnownContents
from .pathlocks import PathLocks
from .sftpio import holds_exactly, read_whole, write_all
from .tempfacts import TempFileFacts
from .window import CountNewlines, read_window

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_LINE_LIMIT = 2000
MAX_LINE_CHARS = 2000
# A read's text stops at the last whole line within this (~25k tokens, as Claude Code's Read
# allows): 2000 lines of 2000 characters would be 4 MB in one answer. "read on with offset=N" follows.
MAX_READ_CHARS = 100_000
MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_TEXT_BYTES = 256 * 1024 * 1024  # read_bytes() refuses bigger files (read() too, where wc cannot count them)
WHOLE_READ_BYTES = 8 * 1024 * 1024  # read() of a bigger file fetches only the lines it shows
MAX_EDIT_BYTES = 64 * 1024 * 1024
PRIVATE = asyncssh.SFTPAttrs(permissions=0o600)  # temp files start readable by their owner alone
BINARY_SNIFF_BYTES = 8192

IMAGE_TYPES = {  # extension → (MIME type, magic prefix check)
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}

FileType = Literal["file", "directory", "symlink", "other"]


@dataclass
class Image:
    path: str
    mime_type: str
    data: bytes


@dataclass
class ReadResult:
    """A window of a text file as `cat -n` shows it."""

    path: str
    text: str  # numbered lines
    start_line: int
    end_line: int  # last line shown (start_line - 1 when none)
    total_lines: int
    lines_cut: int  # lines longer than MAX_LINE_CHARS that were shortened

    @property
    def more_after(self) -> bool:
        return self.end_line < self.total_lines


@dataclass
class WriteResult:
    path: str
    bytes: int
    created: bool


@dataclass
class EditResult:
    path: str
    replacements: int
    diff: str


@dataclass
class Edit:
    old_string: str
    new_string: str
    replace_all: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.old_string, str) and isinstance(self.new_string, str)):
            raise InvalidArgument("an edit's old_string and new_string are text (str)")
        if not isinstance(self.replace_all, bool):
            raise InvalidArgument("an edit's replace_all is true or false")


@dataclass
class FileStat:
    path: str
    type: FileType
    size: int
    mode: int  # permission bits
    mtime: float
    symlink_target: str | None = None
    uid: int | None = None


def sftp_error(path: str, exc: Exception) -> Exception:
    """The typed error for an SFTP failure on `path`; a session that ended is left as it is (the
    SFTP channel re-dials on it, or says ConnectionLost: it is no fault of the file's)."""
    if isinstance(exc, (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection)):
        return exc
    if isinstance(exc, asyncssh.SFTPNoSuchFile):
        return FileNotFound(path)
    if isinstance(exc, asyncssh.SFTPPermissionDenied):
        return PermissionDenied(path)
    if isinstance(exc, asyncssh.SFTPNotADirectory):
        return NotADirectory(path)
    if isinstance(exc, asyncssh.SFTPFileIsADirectory):
        return IsADirectory(path)
    if isinstance(exc, asyncssh.SFTPError):
        # Failures SFTP has no code for, by what the server says (Linux's strerror, asyncssh's makedirs).
        reason = exc.reason.lower()
        if "not a directory" in reason:  # (a write under t.txt/: its parents are made, and one is a file)
            return NotADirectory(path, f"{path}: {exc.reason}; a part of the path is a file: choose another path")
        # (OpenSSH's sftp-server says "Bad message" for a name too long: the path itself tells)
        if "name too long" in reason or any(
            len(part.encode(errors="surrogateescape")) > 255 for part in path.split("/")
        ):
            return FileOperationError(
                path, f"{path}: file name too long; a name in a path may be at most 255 bytes: choose a shorter one"
            )
        return FileOperationError(path, f"{path}: {exc.reason}")
    return exc


def file_kind(attrs: asyncssh.SFTPAttrs) -> FileType:
    mode = attrs.permissions or 0
    if stat_module.S_ISDIR(mode):
        return "directory"
    if stat_module.S_ISREG(mode):
        return "file"
    if stat_module.S_ISLNK(mode):
        return "symlink"
    return "other"


MAX_LINK_HOPS = 40  # as Linux's own limit on symlinks followed in a path


def temp_name(name: str, suffix: str) -> str:
    """A hidden temp file's name beside `name`: the name is shortened so that the temp name stays
    within NAME_MAX (255 bytes) however long `name` is."""
    short = name.encode("utf-8", "surrogateescape")[:100].decode("utf-8", "ignore")
    return f".{short}.tether-{secrets.token_hex(4)}.{suffix}"


def too_many_links(path: str) -> FileOperationError:
    return FileOperationError(path, f"{path}: too many levels of symbolic links (a loop?)")


def special_kind(attrs: asyncssh.SFTPAttrs) -> str | None:
    """What a file that is neither regular, a directory nor a symlink is ("a named pipe"), or None."""
    return special_mode_kind(attrs.permissions or 0)


def special_mode_kind(mode: int) -> str | None:
    """`special_kind` of a file mode (st_mode), for files on either side."""
    for test, what in (
        (stat_module.S_ISFIFO, "a named pipe (FIFO)"),
        (stat_module.S_ISSOCK, "a socket"),
        (stat_module.S_ISCHR, "a character device"),
        (stat_module.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return None


async def keep_owner(
    temp_file: asyncssh.SFTPClientFile, original: asyncssh.SFTPAttrs, ours: tuple[int, int] | None
) -> None:
    """Give the temp file the replaced file's owner and group, where the server lets us (root may
    give any; others their own uid and a group they belong to); otherwise it keeps ours. Nothing
    is sent when the temp file has them already (`ours`: its owner and group, when known)."""
    if original.uid is None or original.gid is None or (original.uid, original.gid) == ours:
        return
    with contextlib.suppress(asyncssh.SFTPError):
        await temp_file.chown(original.uid, original.gid)


def refuse_read_only(path: str, existing: asyncssh.SFTPAttrs, ours: tuple[int, int] | None) -> None:
    """Raise PermissionDenied for a file the sandbox user may not write.

    Renaming over a file needs only its directory to be writable, so without this a write or edit
    would replace a read-only file that an editor writing in place is refused. `ours` is the owner
    a new file gets (the sandbox user); root may write anything. Group membership is not known
    here, so a group-writable file gets the benefit of the doubt.
    """
    if ours is None or ours[0] == 0 or existing.uid is None:
        return
    mode = (existing.permissions or 0) & 0o777
    writable = mode & 0o200 if existing.uid == ours[0] else mode & 0o022
    if not writable:
        hint = f" (mode {mode:04o}): make it writable first (chmod u+w with run) if it should change"
        raise PermissionDenied(path, hint)


def temp_file_failure(
    path: str, directory: str, failure: BaseException, *, who: str = "write and edit"
) -> BaseException:
    """The error to raise when no temp file could be made beside `path` (write, edit and a copy
    replace a file through one): its directory is not writable, or is a kernel's (/proc, /sys)
    where no new file can be made, which says "no such file" of the temp file while the directory
    is there (made by open_temp, or known to be)."""
    why = f" and {who} replace a file through a temp file beside it; change it in place with run (e.g. a redirection)"
    if isinstance(failure, asyncssh.SFTPPermissionDenied):
        return PermissionDenied(path, f": its directory {directory or '/'} is not writable,{why} if it must")
    if isinstance(failure, asyncssh.SFTPNoSuchFile):
        where = f"{directory or '/'} (a filesystem such as /proc or /sys)"
        return FileOperationError(path, f"{path}: no new file can be made in {where},{why}")
    return sftp_error(path, failure) if isinstance(failure, asyncssh.SFTPError) else failure


def _late_chmod(mode: int, data: bytes) -> bool:
    """Whether the mode must be given after the data is written: a write by anyone but root
    clears the setuid and setgid bits."""
    return bool(mode & 0o6000) and bool(data)


def _raise_first(*outcomes: object) -> None:
    """Raise the first exception among the results of a gather(return_exceptions=True)."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def _identity(attrs: asyncssh.SFTPAttrs) -> tuple[object, ...]:
    """What SFTP can tell of which file a path names: another file renamed over it almost always
    differs in one of these (SFTP has no inode numbers)."""
    return attrs.size, attrs.mtime, attrs.permissions, attrs.uid, attrs.gid


_UTF16_BOMS = {codecs.BOM_UTF16_LE: "utf-16-le", codecs.BOM_UTF16_BE: "utf-16-be"}
_BOM_OF = {codec: bom for bom, codec in _UTF16_BOMS.items()}


def _utf16_codec(data: bytes) -> str | None:
    """The codec of text that begins with a UTF-16 byte-order mark (PowerShell's `>`, Notepad's
    "Unicode", .reg files), else None. Its NUL bytes would make it look binary; ripgrep reads it
    (transcoding), so read and edit must too. A head that does not read as UTF-16 text is not."""
    codec = _UTF16_BOMS.get(data[:2])
    if codec is None or data[:4] in (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE):
        return None
    try:  # (incrementally: the sniffed head may end inside a character)
        head = codecs.getincrementaldecoder(codec)().decode(data[2:BINARY_SNIFF_BYTES])
    except UnicodeDecodeError:
        return None
    return None if "\0" in head else codec


def decode_text(path: str, data: bytes, errors: str = "strict") -> tuple[str, str]:
    """A text file's content and its codec: UTF-16 after a byte-order mark (see _utf16_codec), else
    UTF-8. BinaryFile for a NUL byte in its head otherwise."""
    codec = _utf16_codec(data)
    if codec is None and b"\0" in data[:BINARY_SNIFF_BYTES]:
        raise BinaryFile(path, len(data))
    codec = codec or "utf-8"
    return data[len(_BOM_OF.get(codec, b"")) :].decode(codec, errors), codec


def number_lines(
    lines: Sequence[str], first: int, max_chars: int = MAX_READ_CHARS, lengths: Sequence[int] | None = None
) -> tuple[str, int, int]:
    """`cat -n` formatting; lines over MAX_LINE_CHARS are cut with a marker. Lines stop before the
    text would pass `max_chars` (one is always given). `lengths`: the lines' lengths, where they
    were cut before (a window of a large file). Returns (text, lines cut, lines given)."""
    out, cut, size = [], 0, 0
    for number, line in enumerate(lines, first):
        length = len(line) if lengths is None else lengths[number - first]
        if length > MAX_LINE_CHARS:
            line = f"{line[:MAX_LINE_CHARS]}… [line cut: {length} characters]"
            cut += 1
        numbered = f"{number:>6}\t{line}"
        size += len(numbered) + 1
        if out and size > max_chars:
            break
        out.append(numbered)
    return "\n".join(out), cut, len(out)


def _text_window(path: str, data: bytes, offset: int, limit: int) -> ReadResult:
    """Numbered lines `offset`.. of a whole file's bytes."""
    lines = split_lines(decode_text(path, data, "replace")[0])
    text, cut, given = number_lines(lines[offset - 1 : offset - 1 + limit], offset)
    return ReadResult(path, text, offset, offset + given - 1, len(lines), cut)


async def _all_of(f: asyncssh.SFTPClientFile, path: str, size: int, max_bytes: int) -> bytes:
    """All of a file open as `f` whose stat said `size`, up to `max_bytes`, else FileTooLarge."""
    if size > max_bytes:
        raise FileTooLarge(path, size, max_bytes)
    data = await read_whole(f, size, max_bytes)
    if len(data) > max_bytes:
        raise FileTooLarge(path, len(data), max_bytes)
    return data


def split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def line_numbers_of(text: str, needle: str) -> list[int]:
    """1-based numbers of the lines where occurrences of `needle` start, each line once."""
    numbers, at = [], text.find(needle)
    while at >= 0:
        line = text.count("\n", 0, at) + 1
        if not numbers or numbers[-1] != line:
            numbers.append(line)
        at = text.find(needle, at + max(1, len(needle)))
    return numbers


def apply_edits(path: str, text: str, edits: Sequence[Edit], indexed: bool) -> tuple[str, int]:
    """Apply edits in order to `text`; raise on the first that cannot apply. Returns (text, replacements).

    In a file whose every line ends in CRLF, the edits' line breaks are taken as CRLF too: an agent
    sends "\n" (as Claude Code's Edit does), and the file keeps its line endings. In one with both
    kinds, old_string's line breaks match either (see _edit_across_line_endings)."""
    total = 0
    crlf = "\r\n" in text and text.count("\n") == text.count("\r\n")
    for index, edit in enumerate(edits):
        which = index if indexed else None
        if crlf:
            edit = Edit(_crlf(edit.old_string), _crlf(edit.new_string), edit.replace_all)
        if edit.old_string == edit.new_string:
            raise InvalidEdit(path, "old_string and new_string are identical; nothing to change", which)
        if edit.old_string == "":
            if text:
                raise InvalidEdit(path, "old_string is empty but the file is not; quote the text to replace", which)
            text, total = edit.new_string, total + 1
            continue
        if "\r\n" in text and "\n" in edit.old_string and not crlf:
            # Some lines end in CRLF, some in LF (a line appended with echo): "\n" matches either.
            text, count = _edit_across_line_endings(path, text, edit, which)
            total += count
            continue
        count = text.count(edit.old_string)
        if count == 0:
            raise NoMatch(path, which)
        if count > 1 and not edit.replace_all:
            raise NotUnique(path, count, line_numbers_of(text, edit.old_string), which)
        text = (
            text.replace(edit.old_string, edit.new_string)
            if edit.replace_all
            else text.replace(edit.old_string, edit.new_string, 1)
        )
        total += count if edit.replace_all else 1
    return text, total


def _edit_across_line_endings(path: str, text: str, edit: Edit, which: int | None) -> tuple[str, int]:
    """`edit` applied with each line break of old_string matching CRLF or LF; new_string's line
    breaks become CRLF where the text it replaces has one. Returns (text, replacements)."""
    parts = edit.old_string.replace("\r\n", "\n").split("\n")
    pattern = re.compile(r"\r?\n".join(re.escape(part) for part in parts))
    matches = list(pattern.finditer(text))
    if not matches:
        raise NoMatch(path, which)
    if len(matches) > 1 and not edit.replace_all:
        lines = sorted({text.count("\n", 0, match.start()) + 1 for match in matches})
        raise NotUnique(path, len(matches), lines, which)
    new = edit.new_string.replace("\r\n", "\n")
    text = pattern.sub(
        lambda match: _crlf(new) if "\r\n" in match.group(0) else new, text, count=0 if edit.replace_all else 1
    )
    return text, len(matches) if edit.replace_all else 1


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


def encode_text(path: str, text: str, codec: str = "utf-8") -> bytes:
    """The bytes of text to write (UTF-16 ones after their byte-order mark), or InvalidArgument for
    a string that has no such form."""
    try:
        encoded = text.encode(codec)
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"the text for {path} contains {text[exc.start]!r} at index {exc.start}, a lone surrogate that "
            f"{codec.upper()} cannot encode; send valid Unicode text (or bytes, from Python)"
        ) from None
    return _BOM_OF.get(codec, b"") + encoded


def _apply_to(path: str, original: bytes, edits: Sequence[Edit], indexed: bool) -> tuple[str, str, int, str]:
    """(text before, text after, replacements, codec) of an edit of a file's bytes. A UTF-16 file
    stays UTF-16, its byte-order mark and all."""
    try:
        before, codec = decode_text(path, original)
    except UnicodeDecodeError:
        raise FileOperationError(
            path,
            f"{path} is not UTF-8 text; edit refuses to re-encode it: change it with run (sed, or iconv to "
            "UTF-8 first)",
        ) from None
    after, count = apply_edits(path, before, edits, indexed)
    return before, after, count, codec


def unified_diff(path: str, before: str, after: str) -> str:
    """The change as `diff -u` and git print it: lines end at newlines alone (a form feed or a
    lone CR is part of its line), and a last line without one is marked so."""
    lines = difflib.unified_diff(
        _lines_with_ends(before),
        _lines_with_ends(after),
        f"a{path}" if path.startswith("/") else f"a/{path}",
        f"b{path}" if path.startswith("/") else f"b/{path}",
        n=3,
    )
    return "".join(line if line.endswith("\n") else f"{line}\n\\ No newline at end of file\n" for line in lines)


def shorten_diff_lines(diff: str, limit: int = MAX_LINE_CHARS) -> str:
    """`diff` with each line over `limit` characters cut to `limit` of them, marked as read cuts
    lines. A changed line is cut around where it differs from its counterpart (the removed line
    the added one replaces, and back), so an edit inside a long line (minified code, a one-line
    JSON file) shows both sides of the change, not the first `limit` characters of each."""
    lines = diff.split("\n")
    focus = [0] * len(lines)
    i = next((n for n, line in enumerate(lines) if line.startswith("@@")), len(lines))  # (past the ---/+++ header)
    while i < len(lines):  # (pair a block of removed lines with the block of added ones after it)
        removed, end = _block(lines, i, "-")
        added, end = _block(lines, end, "+")
        for old, new in zip(removed, added, strict=False):
            focus[old] = focus[new] = len(posixpath.commonprefix([lines[old][1:], lines[new][1:]]))
        i = max(i + 1, end)
    return "\n".join(_cut_at(line, focus[n], limit) for n, line in enumerate(lines))


def _block(lines: list[str], start: int, sign: str) -> tuple[list[int], int]:
    """The indexes of the `sign` lines from `start` on (a "\\ No newline" among them is skipped),
    and where they end."""
    taken, end = [], start
    while end < len(lines) and (lines[end].startswith(sign) or lines[end].startswith("\\")):
        if lines[end].startswith(sign):
            taken.append(end)
        end += 1
    return taken, end


def _cut_at(line: str, focus: int, limit: int) -> str:
    if len(line) <= limit + 1:  # (+1: the line's sign)
        return line
    start = max(0, min(focus - limit // 4, len(line) - 1 - limit))
    shown = line[1 + start : 1 + start + limit]
    before = f"… [{start} characters] " if start else ""
    return f"{line[0]}{before}{shown}… [line cut: {len(line) - 1} characters]"


def _lines_with_ends(text: str) -> list[str]:
    *whole, last = text.split("\n")
    return [f"{line}\n" for line in whole] + ([last] if last else [])


class Files:
    """SFTP file operations. Paths given here are already absolute (the Sandbox resolves them).

    Independent requests are sent together (a stat with an open, a write with a chmod) and handles
    are closed in the background, so a small read costs two round trips and a write three.
    """

    def __init__(self, sftp: SFTPChannel, count_newlines: CountNewlines | None = None) -> None:
        self._sftp = sftp
        # How a read of a large file learns its line count without fetching all of it: asked of
        # the box (see window.py). None: the rest of the file is read, counting.
        self._count_newlines = count_newlines
        # Fault injection for tests: awaited with the path after an edit was applied and just before
        # the file is read again for the conflict check (where a concurrent writer would strike).
        self.before_conflict_check: Callable[[str], Awaitable[None]] | None = None
        # The mode a file created here gets (0666 less the server's umask, or a default ACL's),
        # learned from an empty probe file beside the first file written. Temp files are always
        # created 0600 and widened to it (or to the replaced file's mode) just before the rename,
        # so a secret written over a 0600 file is never readable by others in between.
        self._new_file_mode: int | None = None
        self._learning: asyncio.Future[None] | None = None  # the probe (see _probe_new_file_mode)
        # Paths seen to be regular files (or directories). Any other path is stat'ed before it is
        # opened: sftp-server serves one request at a time, and opening a named pipe with no writer
        # blocks it, and with it every file operation and command of the sandbox.
        self._openable: set[str] = set()
        self.temp_facts = TempFileFacts()  # (shared with the sandbox's Transfers: who a new file's owner is)
        self._known = KnownContents()
        self._writers = PathLocks()

    def _remember_openable(self, path: str) -> None:
        if len(self._openable) >= 10_000:
            self._openable.clear()
        self._openable.add(path)

    async def _refuse_special(self, sftp: asyncssh.SFTPClient, path: str) -> asyncssh.SFTPAttrs | None:
        """One round trip before the first open of a path: refuse pipes, sockets and devices.
        Returns the attributes when it asked for them (None for a path seen before, or missing)."""
        if path in self._openable:
            return None
        try:
            attrs = await sftp.stat(path)
        except asyncssh.SFTPNoSuchFile:
            return None  # (the open reports it)
        except asyncssh.SFTPError as exc:
            raise sftp_error(path, exc) from None
        what = special_kind(attrs)
        if what is not None:
            raise SpecialFile(path, what)
        self._remember_openable(path)
        return attrs

    # -- read ----------------------------------------------------------------------------------------

    async def read(self, path: str, offset: int = 1, limit: int = DEFAULT_LINE_LIMIT) -> ReadResult | Image:
        """A window of numbered lines, or the bytes of an image.

        Raises: FileNotFound, IsADirectory, BinaryFile, FileTooLarge, PermissionDenied.
        """
        if offset < 1:
            raise InvalidArgument("offset is a 1-based line number; it must be at least 1")
        if limit < 1:
            raise InvalidArgument("limit must be at least 1")
        mime = _image_type(path)
        if mime:
            data = await self.read_bytes(path, MAX_IMAGE_BYTES)
            if _image_magic_ok(mime, data):
                return Image(path, mime, data)
            return _text_window(path, data, offset, limit)

        async def window(attrs: asyncssh.SFTPAttrs, f: asyncssh.SFTPClientFile) -> ReadResult:
            size = attrs.size or 0
            if size <= WHOLE_READ_BYTES:  # (or a size that says nothing, as /proc's)
                data = await _all_of(f, path, size, MAX_TEXT_BYTES)
                self._known.remember(path, data)
                return _text_window(path, data, offset, limit)
            found = await read_window(
                f,
                path,
                size,
                offset,
                limit,
                self._count_newlines,
                keep_chars=MAX_LINE_CHARS,
                max_chars=MAX_READ_CHARS,
                sniff_bytes=BINARY_SNIFF_BYTES,
                max_uncounted=MAX_TEXT_BYTES,
            )
            if found.binary:
                raise BinaryFile(path, size)
            text, cut, given = number_lines(found.lines, offset, lengths=found.lengths)
            return ReadResult(path, text, offset, offset + given - 1, found.total_lines, cut)

        return await self._sftp.retrying(lambda sftp: self._reading(sftp, path, window))

    async def read_bytes(self, path: str, max_bytes: int = MAX_TEXT_BYTES) -> bytes:
        """The whole file. Raises: FileNotFound, IsADirectory, FileTooLarge, PermissionDenied."""

        async def whole(attrs: asyncssh.SFTPAttrs, f: asyncssh.SFTPClientFile) -> bytes:
            return await _all_of(f, path, attrs.size or 0, max_bytes)

        data = await self._sftp.retrying(lambda sftp: self._reading(sftp, path, whole))
        self._known.remember(path, data)
        return data

    async def _reading(
        self,
        sftp: asyncssh.SFTPClient,
        path: str,
        use: Callable[[asyncssh.SFTPAttrs, asyncssh.SFTPClientFile], Awaitable[T]],
    ) -> T:
        """`use` the file open for reading, with its attributes: stat and open in one round trip (a
        path not seen before is stat'ed alone first, see `_refuse_special`, and not again); a
        directory is refused; the close is not waited for."""
        known = await self._refuse_special(sftp, path)
        attrs, f = await self._stat_and_open(sftp, path, "rb", known)
        try:
            return await use(attrs, f)
        except asyncssh.SFTPError as exc:
            raise sftp_error(path, exc) from None
        finally:
            self._sftp.close_later(f)

    async def _stat_and_open(
        self,
        sftp: asyncssh.SFTPClient,
        path: str,
        mode: str,
        known: asyncssh.SFTPAttrs | None = None,
    ) -> tuple[asyncssh.SFTPAttrs, asyncssh.SFTPClientFile]:
        looked = sftp.stat(path) if known is None else asyncio.sleep(0, known)
        attrs, f = await self._look_and_open(path, looked, sftp.open(path, mode))
        if isinstance(f, asyncssh.SFTPClientFile) and isinstance(attrs, BaseException):
            self._sftp.close_later(f)
        if isinstance(attrs, asyncssh.SFTPAttrs) and file_kind(attrs) == "directory":
            # (some servers refuse to open a directory with a bare "failure": say what it is)
            if isinstance(f, asyncssh.SFTPClientFile):
                self._sftp.close_later(f)
            raise IsADirectory(path)
        for outcome in (attrs, f):
            if isinstance(outcome, asyncssh.SFTPError):
                raise sftp_error(path, outcome)
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(attrs, asyncssh.SFTPAttrs) and isinstance(f, asyncssh.SFTPClientFile)
        return attrs, f

    async def _look_and_open(
        self, path: str, look: Awaitable[asyncssh.SFTPAttrs], opening: Awaitable[asyncssh.SFTPClientFile]
    ) -> tuple[asyncssh.SFTPAttrs | BaseException, asyncssh.SFTPClientFile | BaseException]:
        """A stat of `path` and an open of it, sent together; each result or its error.

        The server answers in order, so the stat's answer comes while the open may still wait: a
        path that turned into a named pipe since tether last looked (a path seen before is not
        stat'ed alone first) blocks the open, and the whole session with it. Then the open is
        released and SpecialFile raised."""
        pending = asyncio.ensure_future(opening)
        try:
            attrs: asyncssh.SFTPAttrs | BaseException = await look
        except asyncio.CancelledError:
            pending.add_done_callback(self._close_if_opened)
            raise
        except Exception as exc:
            attrs = exc
        if isinstance(attrs, asyncssh.SFTPAttrs) and stat_module.S_ISFIFO(attrs.permissions or 0):
            self._openable.discard(path)  # (from now on stat'ed alone first, and refused there)
            pending.add_done_callback(self._close_if_opened)  # (first: should the release be cancelled)
            await self._sftp.release_fifo(path, pending)
            raise SpecialFile(path, "a named pipe (FIFO)")
        try:
            return attrs, await pending
        except Exception as exc:
            return attrs, exc

    def _close_if_opened(self, opening: asyncio.Future[asyncssh.SFTPClientFile], remove: str | None = None) -> None:
        """For an open its caller gave up on: close the handle, if it opened (and remove the file)."""
        if not opening.cancelled() and opening.exception() is None:
            self._sftp.close_later(opening.result())
            if remove is not None:
                self._sftp.remove_later(remove)

    async def _with_temp_file(
        self, sftp: asyncssh.SFTPClient, work: Awaitable[T], temp: str, make_directory: str | None = None
    ) -> tuple[T | BaseException, asyncssh.SFTPClientFile | BaseException]:
        """`work`, and the creation of the private temp file `temp` (and of `make_directory` when it
        is missing), sent together; each result or its error. Should the caller be cancelled, the
        temp file the open made is closed and removed once it lands."""
        opening = asyncio.ensure_future(open_temp(sftp, temp, make_directory))
        try:
            done, temp_file = await asyncio.gather(work, asyncio.shield(opening), return_exceptions=True)
        except asyncio.CancelledError:
            opening.add_done_callback(functools.partial(self._close_if_opened, remove=temp))
            raise
        return done, temp_file

    # -- write ---------------------------------------------------------------------------------------

    async def write(self, path: str, content: str | bytes) -> WriteResult:
        """Atomically replace (or create) `path`: temp file in the same directory, then rename.

        Parent directories are created; an existing file keeps its permission bits; writing through
        a symlink replaces the file it points to, not the link.
        """
        if isinstance(content, (bytearray, memoryview)):
            content = bytes(content)
        elif not isinstance(content, (str, bytes)):  # (before anything reaches the file: None would empty it)
            raise InvalidArgument(f"write takes text (str) or bytes, not {type(content).__name__}")
        data = encode_text(path, content) if isinstance(content, str) else content
        async with self._writers.hold(path):
            return await self._write(path, data)

    async def _write(self, path: str, data: bytes) -> WriteResult:
        existing = await self._sftp.once(lambda sftp: self._replace(sftp, path, data))
        self._remember_openable(path)
        self._known.remember(path, data)
        return WriteResult(path, len(data), existing is None)

    async def _replace(
        self, sftp: asyncssh.SFTPClient, path: str, data: bytes, hops: int = 0
    ) -> asyncssh.SFTPAttrs | None:
        """Write `data` to a temp file beside `path` and rename it over `path`; return the attributes
        `path` had (None when it did not exist).

        Round trips: lstat + open temp; write + chmod; rename. One more for the first new file a
        session writes (its mode comes from a probe, see __init__), and for a setuid or setgid file
        (the chmod after the data, which would clear those bits).
        """
        directory, name = posixpath.split(path)
        temp = posixpath.join(directory, temp_name(name, "tmp"))
        if self._learning is None:  # (the first write: see __init__)
            self._learning = asyncio.ensure_future(self._probe_new_file_mode(sftp, directory, name))
        existing, temp_file = await self._with_temp_file(sftp, sftp.lstat(path), temp, make_directory=directory)
        if isinstance(existing, asyncssh.SFTPNoSuchFile):
            existing = None
        if isinstance(existing, asyncssh.SFTPAttrs) and file_kind(existing) == "symlink":
            # Write the file it points to, through a temp file in that file's directory (whether or
            # not one could be made beside the link: that directory may well be read-only).
            if isinstance(temp_file, asyncssh.SFTPClientFile):
                await self._discard_temp(sftp, temp_file, temp)
            if hops >= MAX_LINK_HOPS:
                raise too_many_links(path)
            return await self._replace(sftp, await link_target(sftp, path), data, hops + 1)
        problem = existing if isinstance(existing, BaseException) else None
        if problem is None and existing is not None and file_kind(existing) == "directory":
            problem = IsADirectory(path, WRITE_DIRECTORY_HINT)
        if problem is None and existing is not None and (what := special_kind(existing)):
            problem = SpecialFile(path, what, WRITE_SPECIAL_HINT)
        if problem is None and isinstance(temp_file, BaseException):
            problem = temp_file
        if problem is not None:
            if isinstance(temp_file, asyncssh.SFTPClientFile):
                await self._discard_temp(sftp, temp_file, temp)
            if problem is temp_file:
                raise temp_file_failure(path, directory, problem)
            raise sftp_error(path, problem) if isinstance(problem, asyncssh.SFTPError) else problem
        assert isinstance(temp_file, asyncssh.SFTPClientFile)
        renamed = False
        try:
            mode = self._new_file_mode if existing is None else (existing.permissions or 0) & 0o7777
            chmod_now = mode is not None and not _late_chmod(mode, data)
            pending: list[Awaitable[object]] = []  # (sent in this order, and sftp-server keeps it)
            if existing is not None:
                # The owner first: a chown by anyone but root clears setuid bits the chmod sets.
                # (A temp file's group depends on its directory: unless known, always ask.)
                pending.append(keep_owner(temp_file, existing, self.temp_facts.owner(directory)))
                if self.temp_facts.owner(directory) is None:  # (who we are: see refuse_read_only)
                    pending.append(self._learn_temp_facts(temp_file, directory))
            if chmod_now:
                assert mode is not None
                pending.append(temp_file.chmod(mode))
            if data:
                pending.append(write_all(temp_file, data))
            await asyncio.gather(*pending)
            if existing is not None:
                refuse_read_only(path, existing, self.temp_facts.owner(directory))
            if mode is None:  # the first new file: it gets the probe's mode (or stays 0600 without one)
                mode = await self._learned_new_file_mode(sftp, directory, name)
            if mode is not None and not chmod_now:
                await temp_file.chmod(mode)
            await sftp.posix_rename(temp, path)
            renamed = True
        except asyncssh.SFTPError as exc:
            raise sftp_error(path, exc) from None
        finally:
            self._sftp.close_later(temp_file)
            if not renamed:
                self._sftp.remove_later(temp)
        return existing if isinstance(existing, asyncssh.SFTPAttrs) else None

    async def _probe_new_file_mode(self, sftp: asyncssh.SFTPClient, directory: str, name: str) -> None:
        """Create an empty file beside the first one written, as any program would create it, and
        take its mode. Once per session: only a probe that could not be created (its directory did
        not exist yet) is tried again, by the next write that needs it."""
        probe = posixpath.join(directory, temp_name(name, "probe"))
        try:
            f = await sftp.open(probe, "xb")
        except Exception:
            self._learning = None
            return
        try:
            attrs = await self._learn_temp_facts(f, directory)
            if attrs.permissions is not None:
                self._new_file_mode = attrs.permissions & 0o777
        except Exception as exc:  # (a write that waits for it sees the connection's failure itself)
            log.debug("could not learn a new file's mode in %s: %s", directory, exc)
        finally:
            self._sftp.close_later(f)
            self._sftp.remove_later(probe)

    async def _learned_new_file_mode(self, sftp: asyncssh.SFTPClient, directory: str, name: str) -> int | None:
        """The mode a new file gets, once the probe answered (probing now if the first one could not
        be made: it went before the write created the directory). None when the box won't say."""
        if self._learning is None:
            self._learning = asyncio.ensure_future(self._probe_new_file_mode(sftp, directory, name))
        await asyncio.shield(self._learning)  # (a cancelled write leaves the probe to finish and clean up)
        return self._new_file_mode

    async def _learn_temp_facts(self, temp_file: asyncssh.SFTPClientFile, directory: str) -> asyncssh.SFTPAttrs:
        attrs = await temp_file.stat()
        self.temp_facts.learn(directory, attrs)
        return attrs

    async def _discard_temp(self, sftp: asyncssh.SFTPClient, f: asyncssh.SFTPClientFile, temp: str) -> None:
        self._sftp.close_later(f)
        self._sftp.remove_later(temp)

    # -- edit ----------------------------------------------------------------------------------------

    async def edit(self, path: str, old_string: str, new_string: str, replace_all: bool = False) -> EditResult:
        """Replace one exact occurrence (or every one, with replace_all). See `multi_edit`."""
        async with self._writers.hold(path):
            return await self._edit(path, [Edit(old_string, new_string, replace_all)], False, held=frozenset({path}))

    async def multi_edit(self, path: str, edits: Sequence[Edit]) -> EditResult:
        """Apply edits in order to the file's text, then write once: all of them or none.

        Raises: FileNotFound, NoMatch, NotUnique, InvalidEdit (naming the failing edit's index),
        EditConflict (the file changed while the edit was applied), BinaryFile.
        """
        if not edits:
            raise InvalidArgument("multi_edit needs at least one edit")
        async with self._writers.hold(path):
            return await self._edit(path, list(edits), True, held=frozenset({path}))

    async def _edit(
        self, path: str, edits: list[Edit], indexed: bool, hops: int = 0, held: frozenset[str] = frozenset()
    ) -> EditResult:
        """Read, apply, write back: four round trips, five for a file written within the last second;
        one fewer when tether read or wrote the file last and remembers its content (known.py).

        1. lstat + open the file, open the temp file beside it (the temp is wasted if the
           edit turns out not to apply; it is removed in the background);
        2. read it (and fstat the temp file, about once a minute: see TempFileFacts); apply the
           edits here;
        3. write + chmod the temp file; read the file's handle again and stat the path: if the
           content is not what the edit was computed from (changed in place), or the path's size,
           mtime or mode changed (another file renamed over it), refuse with EditConflict;
        4. rename the temp file over it.

        SFTP has no inode numbers and whole-second mtimes: a same-size file renamed over the path
        within the second the original was written would look the same to step 3. For a file that
        recent, step 3 opens the path anew instead and step 4 reads that handle, the rename fifth.

        With a remembered copy of the file's size, step 2 is skipped and the edit computed from the
        copy; step 3 then checks the file against the copy. If the copy turns out stale (or the edit
        does not apply to it), nothing is written and the edit starts again, reading the file.
        """
        outcome = await self._sftp.once(lambda sftp: self._edit_in_place(sftp, path, edits, indexed, True))
        if outcome == "stale":
            self._known.forget(path)
            outcome = await self._sftp.once(lambda sftp: self._edit_in_place(sftp, path, edits, indexed, False))
        if isinstance(outcome, EditResult):
            return outcome
        if outcome == "missing":
            # Claude Code's convention: an empty old_string on a missing file creates it.
            if edits[0].old_string == "":
                after, count = apply_edits(path, "", edits, indexed)
                await self._write(path, encode_text(path, after))
                return EditResult(path, count, unified_diff(path, "", after))
            raise FileNotFound(path, "; create it with write, or check the path with glob")
        # A symlink: edit the file it points to (the temp file must live beside that one).
        if hops >= MAX_LINK_HOPS:
            raise too_many_links(path)
        target = await self._sftp.retrying(lambda sftp: link_target(sftp, path))
        if target in held:  # (a loop: MAX_LINK_HOPS ends it)
            result = await self._edit(target, edits, indexed, hops + 1, held)
        else:  # edits of the target by its own name wait for this one, and the other way round
            async with self._writers.hold(target):
                result = await self._edit(target, edits, indexed, hops + 1, held | {target})
        return EditResult(path, result.replacements, result.diff)

    async def _edit_in_place(
        self, sftp: asyncssh.SFTPClient, path: str, edits: list[Edit], indexed: bool, use_known: bool
    ) -> EditResult | str:
        known = await self._refuse_special(sftp, path)
        directory, name = posixpath.split(path)
        temp = posixpath.join(directory, temp_name(name, "tmp"))
        started = time.time()
        # The open follows a symlink, so the look sent before it does too (stat): a link whose
        # target became a named pipe is caught, and its open released, before it blocks the
        # session. An lstat goes along in the same round trip: a symlink is edited through its
        # target (below), as renaming over the link would replace it with a file.

        async def look_and_open() -> tuple[asyncssh.SFTPAttrs | BaseException, asyncssh.SFTPClientFile | BaseException]:
            # (sent in this order: lstat, then _look_and_open's stat before its open; no stat when
            # _refuse_special has just made one)
            look = sftp.stat(path) if known is None else asyncio.sleep(0, known)
            looking = self._look_and_open(path, look, sftp.open(path, "rb"))
            linked, looked = await asyncio.gather(sftp.lstat(path), looking, return_exceptions=True)
            _raise_first(looked)  # (a named pipe)
            attrs, opened = looked  # type: ignore[misc]
            if isinstance(linked, asyncssh.SFTPAttrs) and file_kind(linked) == "symlink":
                return linked, opened  # (the handle is closed with the others)
            return attrs, opened

        # (the temp file gets the file's own mode later)
        looked, temp_file = await self._with_temp_file(sftp, look_and_open(), temp)
        if isinstance(looked, BaseException):  # (a named pipe)
            if isinstance(temp_file, asyncssh.SFTPClientFile):
                await self._discard_temp(sftp, temp_file, temp)
            raise looked
        attrs, original_file = looked
        renamed = False
        fresh_file: asyncssh.SFTPClientFile | None = None
        try:
            if isinstance(attrs, asyncssh.SFTPAttrs) and file_kind(attrs) == "symlink":
                return "symlink"
            if isinstance(attrs, asyncssh.SFTPAttrs) and file_kind(attrs) == "directory":
                raise IsADirectory(path)  # (before the open's error, which may be a bare "failure")
            for outcome in (attrs, original_file):
                if isinstance(outcome, asyncssh.SFTPNoSuchFile):
                    return "missing"
                if isinstance(outcome, asyncssh.SFTPError):
                    raise sftp_error(path, outcome)
                if isinstance(outcome, BaseException):
                    raise outcome
            assert isinstance(attrs, asyncssh.SFTPAttrs) and isinstance(original_file, asyncssh.SFTPClientFile)
            if (attrs.size or 0) > MAX_EDIT_BYTES:
                raise FileTooLarge(path, attrs.size or 0, MAX_EDIT_BYTES)
            facts = self.temp_facts
            ask = isinstance(temp_file, asyncssh.SFTPClientFile) and facts.owner(directory) is None
            remembered = self._known.get(path, attrs.size) if use_known and not ask else None
            if remembered is not None:
                try:
                    original = remembered
                    before, after, count, codec = _apply_to(path, original, edits, indexed)
                except FileOperationError:
                    return "stale"  # (or the edit does not apply: the file itself will say which)
            else:
                original, temp_attrs = await asyncio.gather(
                    read_whole(original_file, attrs.size or 0, MAX_EDIT_BYTES),
                    # (the temp file's own failure is reported after the edit's: asyncio.sleep(0) is a no-op)
                    temp_file.stat() if ask else asyncio.sleep(0),  # type: ignore[union-attr]
                    return_exceptions=True,
                )
                _raise_first(original)
                assert isinstance(original, bytes)
                if len(original) > MAX_EDIT_BYTES:
                    raise FileTooLarge(path, len(original), MAX_EDIT_BYTES)
                if isinstance(temp_attrs, asyncssh.SFTPAttrs):
                    facts.learn(directory, temp_attrs)
                before, after, count, codec = _apply_to(path, original, edits, indexed)
            if isinstance(temp_file, BaseException):  # (the file was just opened: there)
                raise temp_file_failure(path, directory, temp_file)
            refuse_read_only(path, attrs, facts.owner(directory))
            data = encode_text(path, after, codec)
            if self.before_conflict_check is not None:
                await self.before_conflict_check(path)
            mode = (attrs.permissions or 0) & 0o7777
            writes: list[Awaitable[object]] = [keep_owner(temp_file, attrs, facts.owner(directory))]
            if not _late_chmod(mode, data):
                writes.append(temp_file.chmod(mode))
            if data:
                writes.append(write_all(temp_file, data))
            if facts.written_recently(directory, attrs.mtime, started) is not False:
                # Written this second (or the box's clock unknown): only a handle opened now tells it
                # from a replacement.
                fresh, *wrote = await asyncio.gather(sftp.open(path, "rb"), *writes, return_exceptions=True)
                fresh_file = fresh if isinstance(fresh, asyncssh.SFTPClientFile) else None
                _raise_first(fresh, *wrote)
                assert fresh_file is not None
                changed = not await holds_exactly(fresh_file, original)
            else:
                # An older file: a write in place shows in its content, read again through the
                # same handle, and its size; a file renamed over it has a later mtime.
                same, now, *_ = await asyncio.gather(holds_exactly(original_file, original), sftp.stat(path), *writes)
                changed = not same or _identity(now) != _identity(attrs)
            if changed:
                if remembered is not None:
                    return "stale"
                raise EditConflict(path)
            if _late_chmod(mode, data):
                await temp_file.chmod(mode)
            await sftp.posix_rename(temp, path)
            renamed = True
            self._known.remember(path, data)
            return EditResult(path, count, unified_diff(path, before, after))
        except asyncssh.SFTPNoSuchFile:
            raise EditConflict(path) from None  # it vanished between our read and our write
        except asyncssh.SFTPError as exc:
            raise sftp_error(path, exc) from None
        finally:
            for handle in (original_file, fresh_file, temp_file):
                if isinstance(handle, asyncssh.SFTPClientFile):
                    self._sftp.close_later(handle)
            if not renamed and isinstance(temp_file, asyncssh.SFTPClientFile):
                self._sftp.remove_later(temp)

    # -- metadata ------------------------------------------------------------------------------------

    async def stat(self, path: str) -> FileStat:
        """Type, size, permission bits and mtime; a symlink is followed and its target named."""

        async def look(sftp: asyncssh.SFTPClient) -> FileStat:
            try:
                attrs = await sftp.lstat(path)
                target = None
                if file_kind(attrs) == "symlink":
                    target = await sftp.readlink(path)
                    try:
                        attrs = await sftp.stat(path)
                    except asyncssh.SFTPNoSuchFile:
                        pass  # dangling: report the link itself
            except asyncssh.SFTPError as exc:
                raise sftp_error(path, exc) from None
            mode = (attrs.permissions or 0) & 0o7777
            kind = file_kind(attrs)
            if kind in ("file", "directory"):
                self._remember_openable(path)  # (a grep's or glob's sort stats what an edit opens next)
            return FileStat(path, kind, attrs.size or 0, mode, float(attrs.mtime or 0), target, attrs.uid)

        return await self._sftp.retrying(look)

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except FileNotFound:
            return False
        return True

    async def list_dir(self, path: str) -> list[FileStat]:
        """Entries of a directory (without . and ..), sorted by name."""

        async def listing(sftp: asyncssh.SFTPClient) -> list[FileStat]:
            try:
                names = await sftp.readdir(path)
            except asyncssh.SFTPError as exc:
                raise sftp_error(path, exc) from None
            entries = []
            for entry in names:
                name = (
                    entry.filename
                    if isinstance(entry.filename, str)
                    else entry.filename.decode("utf-8", "surrogateescape")
                )
                if name in (".", ".."):
                    continue
                attrs = entry.attrs
                entries.append(
                    FileStat(
                        posixpath.join(path, name),
                        file_kind(attrs),
                        attrs.size or 0,
                        (attrs.permissions or 0) & 0o7777,
                        float(attrs.mtime or 0),
                    )
                )
            return sorted(entries, key=lambda e: e.path)

        try:
            return await self._sftp.retrying(listing)
        except FileOperationError as exc:
            if isinstance(exc, PermissionDenied):
                raise
            # (OpenSSH's sftp-server says "no such file" for a file too: what is there tells)
            stat = await self.stat(path)  # (FileNotFound when nothing is)
            if stat.type != "directory":
                raise NotADirectory(
                    path, f"{path} is a {stat.type}, not a directory; read it, or list its parent"
                ) from None
            raise

    async def remove(self, path: str) -> None:
        async def remove(sftp: asyncssh.SFTPClient) -> None:
            try:
                await sftp.remove(path)
            except asyncssh.SFTPError as exc:
                raise sftp_error(path, exc) from None

        await self._sftp.once(remove)

    async def makedirs(self, path: str) -> None:
        async def make(sftp: asyncssh.SFTPClient) -> None:
            try:
                await sftp.makedirs(path, exist_ok=True)
            except asyncssh.SFTPError as exc:
                raise sftp_error(path, exc) from None

        await self._sftp.once(make)


async def open_temp(
    sftp: asyncssh.SFTPClient, temp: str, make_directory: str | None = None, **options: Any
) -> asyncssh.SFTPClientFile:
    """Create the private temp file `temp` (with asyncssh's open `options`); `make_directory`, when
    given, is made only should the open find it missing (asyncssh's makedirs costs two round
    trips per component of the path, the existing ones too)."""
    try:
        return await sftp.open(temp, "xb", PRIVATE, **options)
    except asyncssh.SFTPNoSuchFile:
        if make_directory is None:
            raise
        await sftp.makedirs(make_directory, exist_ok=True)
        return await sftp.open(temp, "xb", PRIVATE, **options)


async def link_target(sftp: asyncssh.SFTPClient, path: str) -> str:
    """Where a symlink points, as an absolute path (for a dangling link, the file it names)."""
    try:
        return await sftp.realpath(path)
    except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPFailure):  # dangling, or a loop: follow one hop
        link = await sftp.readlink(path)
        return posixpath.normpath(posixpath.join(posixpath.dirname(path), link))


def _image_type(path: str) -> str | None:
    return IMAGE_TYPES.get(posixpath.splitext(path)[1].lower())


def _image_magic_ok(mime: str, data: bytes) -> bool:
    return {
        "image/png": data.startswith(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg": data.startswith(b"\xff\xd8\xff"),
        "image/gif": data[:6] in (b"GIF87a", b"GIF89a"),
        "image/webp": data[:4] == b"RIFF" and data[8:12] == b"WEBP",
    }[mime]
