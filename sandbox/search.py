"""grep and glob on the box: ripgrep when it is installed, POSIX grep/find otherwise.

Every pattern, glob and path is passed as its own quoted argument (after `-e` or `--`), never as
shell text, so nothing an agent sends can be read as an option or as code.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import time
from dataclasses import dataclass
from typing import Literal

from .errors import CommandTimeout, FileNotFound, InvalidArgument, PermissionDenied, SearchTimeout, SpecialFile
from .executor import Executor, RawResult, quote_word
from .files import Files, split_lines
from .tasks import task_group

GLOB_LIMIT = 100
LISTING_BYTES = 8 << 20  # of paths listed for a glob, or a grep without rg (about 100 000); beyond, some are missing
# Searches run from "/": their paths are absolute, and the session's cwd may have been removed.
SEARCH_FROM = "/"
MAX_SORTED = 10_000  # results beyond this many are not sorted by mtime (and are reported as truncated)
GREP_MAX_CHARS = 30_000
MAX_COLUMNS = 2000  # a line of content longer than this is cut (a match in a minified file)
GrepMode = Literal["files_with_matches", "content", "count"]
GREP_MODES = ("files_with_matches", "content", "count")


@dataclass
class GlobResult:
    files: list[str]  # newest first
    truncated: bool
    listing_cut: bool = False  # the tree held more files than one listing takes: matches may be missing


@dataclass
class GrepResult:
    mode: GrepMode
    text: str  # in ripgrep's own formats: paths; path:line:text (context path-line-text); path:N
    lines: int  # lines in `text`
    truncated: bool
    engine: Literal["rg", "grep"]
    limited: bool = False  # truncated by head_limit alone: more lines follow those asked for


@dataclass(frozen=True)
class GrepQuery:
    """What a grep asks for, validated; the argv builders of both engines read it."""

    pattern: str
    root: str
    glob: str | None
    type: str | None
    output_mode: GrepMode
    before: int | None
    after: int | None
    context: int | None
    line_numbers: bool
    case_insensitive: bool
    multiline: bool


def glob_to_regex(pattern: str, *, rg: bool = False) -> re.Pattern[str]:
    """Compile a glob with `**`, `*`, `?`, `[…]` and `{a,b}` to a regex over '/'-separated paths.

    A pattern without '/' matches at the top level only (`*.py`); use `**/*.py` to recurse, as in
    Claude Code's Glob tool. A backslash makes the next character itself (`app/\\[slug\\]/*`, a
    Next.js route). `rg`: as ripgrep reads a --glob, a `**` that is not a whole part of the path is
    a `*`, and a `[` that never closes is an error (not a `[`).
    """
    out, i, depth = [], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 == len(pattern):
                raise InvalidArgument(f"glob {pattern!r} ends in a lone backslash; write \\\\ for one")
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        # (to ripgrep, a `**` that is not a whole part of the path is a `*`)
        whole = not rg or (i == 0 or pattern[i - 1] == "/")
        if whole and pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
            continue
        if whole and pattern.startswith("**", i) and (not rg or i + 2 == len(pattern)):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            bracket = _bracket_to_regex(pattern, i)
            if bracket is None and rg:
                raise InvalidArgument(f"glob {pattern!r} has a '[' that never closes; write [[] for a '['")
            if bracket is None:
                out.append(re.escape(c))
            else:
                regex, i = bracket
                out.append(regex)
        elif c == "{":
            out.append("(?:")
            depth += 1
        elif c == "}" and depth:
            out.append(")")
            depth -= 1
        elif c == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(c))
        i += 1
    if depth:
        raise InvalidArgument(f"unbalanced braces in glob {pattern!r}")
    return re.compile("".join(out) + r"\Z", re.DOTALL)


_CLASSES = {
    "alpha": "a-zA-Z",
    "digit": "0-9",
    "alnum": "a-zA-Z0-9",
    "upper": "A-Z",
    "lower": "a-z",
    "space": r"\s",
    "blank": r" \t",
    "xdigit": "0-9A-Fa-f",
    "punct": re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
}


def _bracket_to_regex(pattern: str, start: int) -> tuple[str, int] | None:
    """The regex of the bracket expression opening at `start` (`[abc]`, `[!a-z]`, `[]x]`,
    `[[:digit:]_]`) and the index of its closing `]`; None when it never closes (then `[` is a
    plain character). As in sh: a `]` first (after any `!`) is one of the set."""
    i = start + 1
    negate = pattern[i : i + 1] in ("!", "^")
    i += negate
    parts = []
    first = True
    while i < len(pattern):
        c = pattern[i]
        if c == "]" and not first:
            return f"[{'^' if negate else ''}{''.join(parts)}]", i
        first = False
        if pattern.startswith("[:", i):
            end = pattern.find(":]", i + 2)
            name = pattern[i + 2 : end] if end > 0 else ""
            if name not in _CLASSES:
                raise InvalidArgument(f"unknown character class [:{name}:] in glob {pattern!r}")
            parts.append(_CLASSES[name])
            i = end + 2
            continue
        parts.append(c if c == "-" else re.escape(c))
        i += 1
    return None


# ripgrep's parallel walker costs about a millisecond to start, which a small tree never earns
# back (50 files: 4.1 ms with two threads, 2.9 ms with one) and a large one repays many times
# (56,000 files: 0.30 s against 0.55 s). A root whose last search was quick is searched with one
# thread; one that turns out slow goes back to rg's default. (Sorted modes are single-threaded anyway.)
ONE_THREAD_BELOW_S = 0.025
PARALLEL_ABOVE_S = 0.060
SEARCH_TIMEOUT_S = 120.0  # a grep or a glob's listing that runs longer is stopped
SLOW_SEARCH_S = 1.0  # a search still going after this long has its root looked at (see _search)


class Search:
    def __init__(self, executor: Executor, files: Files) -> None:
        self._executor = executor
        self._files = files
        self._small_roots: dict[str, bool] = {}  # root → searched with one thread next time

    async def _has_rg(self) -> bool:
        return (await self._executor.info()).has_rg

    # -- glob ----------------------------------------------------------------------------------------

    async def glob(self, pattern: str, root: str) -> GlobResult:
        """Files under `root` whose path relative to it matches `pattern`, newest first (≤ 100).

        With ripgrep, .gitignore'd files are skipped; hidden files are included; .git never is.
        """
        while pattern.startswith("./"):  # relative to the root already: "./src/*.py" is "src/*.py"
            pattern = pattern[2:].lstrip("/")
        if not pattern:
            raise InvalidArgument("glob pattern is empty")
        if "\0" in pattern:
            raise InvalidArgument("a glob pattern cannot contain a NUL byte")
        if pattern.startswith("/") or "/../" in f"/{pattern}":
            # An absolute pattern, or one that climbs (`../*.txt`): search from its longest literal
            # directory prefix, resolved.
            if not pattern.startswith("/"):
                pattern = f"{root.rstrip('/')}/{pattern}"
            prefix = pattern.split("*")[0].split("?")[0].split("[")[0].split("{")[0].split("\\")[0]
            root, pattern = prefix.rsplit("/", 1)[0] or "/", pattern[len(prefix.rsplit("/", 1)[0]) + 1 :]
            root = posixpath.normpath(root) if root != "/" else root
            if ".." in pattern.split("/"):
                raise InvalidArgument(f"glob {pattern!r}: '..' after a wildcard matches nothing; put it before")
        matcher = glob_to_regex(pattern)  # (a bad glob is refused as given, before the box is asked)
        # Only the part of the tree a match can lie in is listed: a listing of a whole home
        # directory would be cut short, and slow, for a `*` at its top. One stat, of where the
        # listing starts; the root is looked at only when that is not a directory.
        below, narrowed, depth = _narrowed(root, pattern)
        try:
            await self._require_directory(below)
        except (FileNotFound, InvalidArgument):
            if below == root:
                raise
            await self._require_directory(root)  # (a missing root is the caller's error)
            return GlobResult([], False)  # (the pattern's leading directory is not there)
        if below != root:
            root, matcher = below, glob_to_regex(narrowed)
        if await self._has_rg():
            argv = ["rg", "--files", "--hidden", "--glob", "!.git", "--null", "--no-config"]
            argv += [f"--max-depth={depth}"] if depth else []
            # (as a file type: a --glob would list the .gitignore'd files it matches, overriding the ignore)
            argv += ["--type-add", f"tether:{name}", "-t", "tether"] if (name := _basename_filter(narrowed)) else []
            argv += ["--", root]
        else:
            argv = ["find", *_walk(root, depth), "-print0"]
        try:
            names, raw = await self._listing(argv)
        except CommandTimeout:
            raise SearchTimeout("glob", root, SEARCH_TIMEOUT_S, "a narrower path or pattern") from None
        _raise_if_root_refused(root, raw.stderr)
        if raw.exit_code == 2 and not names and not _only_file_errors(message := raw.stderr.decode("utf-8", "replace")):
            raise InvalidArgument(f"glob failed: {message.strip()}; fix the pattern and search again")
        matches = [n for n in names if matcher.match(_relative(n, root))]
        newest, cut = await self._newest_first(matches, GLOB_LIMIT)
        return GlobResult(newest, cut or raw.stdout_truncated, listing_cut=raw.stdout_truncated)

    async def _listing(self, argv: list[str]) -> tuple[list[str], RawResult]:
        """The paths a listing command prints, NUL-separated (as os.fsdecode decodes them), up to
        LISTING_BYTES of them; and its result, whose stdout_truncated says whether it was cut."""
        raw = await self._executor.exec_raw(argv, cwd=SEARCH_FROM, timeout=SEARCH_TIMEOUT_S, max_bytes=LISTING_BYTES)
        names = raw.stdout.decode("utf-8", "surrogateescape").split("\0")
        if raw.stdout_truncated:
            names.pop()  # (a path cut in the middle)
        return [name for name in names if name], raw

    async def _newest_first(self, paths: list[str], limit: int | None) -> tuple[list[str], bool]:
        """`paths` sorted newest first (ties by name), at most `limit`; and whether any were left out.

        Neither ripgrep (whose --sortr sorts each directory, not the tree) nor POSIX find can print
        mtimes portably, so the candidates are stat'ed over SFTP, many requests in flight.
        """
        if len(paths) < 2:
            return paths, False
        candidates = paths[:MAX_SORTED]
        gate = asyncio.Semaphore(128)

        async def mtime(path: str) -> float:
            async with gate:
                try:
                    return (await self._files.stat(path)).mtime
                except Exception:  # vanished or unreadable since the listing: sort it last
                    return 0.0

        times = await asyncio.gather(*(mtime(p) for p in candidates))
        ordered = [p for _, p in sorted(zip(times, candidates, strict=True), key=lambda t: (-t[0], t[1]))]
        left_out = len(paths) > len(candidates)
        if limit is not None and len(ordered) > limit:
            return ordered[:limit], True
        return ordered, left_out

    # -- grep ----------------------------------------------------------------------------------------

    async def grep(
        self,
        pattern: str,
        root: str,
        *,
        glob: str | None = None,
        type: str | None = None,
        output_mode: GrepMode = "files_with_matches",
        before: int | None = None,
        after: int | None = None,
        context: int | None = None,
        line_numbers: bool = True,
        case_insensitive: bool = False,
        multiline: bool = False,
        head_limit: int | None = None,
    ) -> GrepResult:
        """Search file contents under `root` (a file or a directory) for a regular expression.

        Modes as in ripgrep: `files_with_matches` (one path per line, newest first), `content`
        (`path:line:text`, context lines `path-line-text`, sorted by path), `count` (`path:N`). `head_limit` keeps the
        first N lines. Without ripgrep on the box, POSIX `grep -E` is used: `type` and `multiline`
        need ripgrep, and the regex dialect is ERE instead of Rust's; `glob` selects the same files
        as with ripgrep (see _selected_by_glob).
        """
        if not pattern:
            raise InvalidArgument("grep pattern is empty")
        if "\0" in pattern:
            raise InvalidArgument("a grep pattern cannot contain a NUL byte")
        if output_mode not in GREP_MODES:
            raise InvalidArgument(f"output_mode must be one of {', '.join(GREP_MODES)}")
        for name, value in (("before", before), ("after", after), ("context", context), ("head_limit", head_limit)):
            if value is not None and value < 0:
                raise InvalidArgument(f"{name} must be zero or more")
        query = GrepQuery(
            pattern, root, glob, type, output_mode, before, after, context, line_numbers, case_insensitive, multiline
        )
        use_rg = await self._has_rg()
        one_thread = self._small_roots.get(root, False)
        started = time.monotonic()
        try:
            raw = await (self._search(_rg_argv(query, one_thread), root) if use_rg else self._grep_files(query))
        except CommandTimeout:
            raise SearchTimeout("grep", root, SEARCH_TIMEOUT_S, "a narrower path, or give glob or type") from None
        if use_rg and output_mode == "files_with_matches":
            took = time.monotonic() - started
            if len(self._small_roots) > 1000:
                self._small_roots.clear()
            self._small_roots[root] = took < (PARALLEL_ABOVE_S if one_thread else ONE_THREAD_BELOW_S)
        # (find passes grep's failures on as its exit code 1, and "no match" too: stderr tells them apart)
        failed = raw.exit_code not in (0, 1) or (not use_rg and raw.exit_code != 0 and raw.stderr.strip())
        if failed and not raw.stdout:
            message = raw.stderr.decode("utf-8", "replace").strip() or f"exit code {raw.exit_code}"
            # Only now is the root checked (up front it would cost every search a round trip).
            if not await self._files.exists(root):
                raise FileNotFound(root)
            _raise_if_root_refused(root, raw.stderr)
            if not _only_file_errors(message):
                raise InvalidArgument(f"grep failed: {message}; fix the pattern or the arguments and search again")
            # Unreadable or vanished files and no match in the others: that is no matches.
        # Paths alone decode as os.fsdecode does, so that any name can be stat'ed and opened again;
        # lines of content with U+FFFD for what is not UTF-8.
        paths_only = output_mode == "files_with_matches"
        text_out = raw.stdout.decode("utf-8", "surrogateescape" if paths_only else "replace")
        if paths_only:  # separated by NUL (see _grep_files), so names with newlines stay whole
            lines = [path for path in text_out.split("\0") if path]
        else:  # (lines end at "\n" alone: a form feed or a lone "\r" inside a line of content is not its end)
            lines = split_lines(text_out)
        truncated = raw.stdout_truncated
        if output_mode == "count" and not use_rg:
            lines = [line for line in lines if not line.endswith(":0")]
        elif output_mode == "files_with_matches":
            lines, cut = await self._newest_first(lines, None)
            truncated = truncated or cut
        limited = False  # (cut by head_limit alone)
        if head_limit is not None and len(lines) > head_limit:
            lines, truncated, limited = lines[:head_limit], True, not truncated
        if output_mode == "content" and not use_rg:  # (as rg's --max-columns-preview cuts them)
            lines = [
                f"{line[:MAX_COLUMNS]} [... omitted end of long line]" if len(line) > MAX_COLUMNS else line
                for line in lines
            ]
        text, size = [], 0
        for line in lines:
            size += len(line) + 1
            if size > GREP_MAX_CHARS:
                truncated, limited = True, False
                break
            text.append(line)
        return GrepResult(output_mode, "\n".join(text), len(text), truncated, "rg" if use_rg else "grep", limited)

    async def _grep_files(self, q: GrepQuery) -> RawResult:
        """grep without ripgrep: find lists the files under the root (as glob does), the glob if
        any picks those rg would search, and grep reads them, a batch at a time, each path its own
        argument (sorted, so that lines come in the order of rg's --sort=path; a `grep -r`, or find
        handing files to grep, would give them in the order of the directories' entries)."""
        flags = _grep_flags(q)
        names, listing = await self._listing(["find", *_walk(q.root), "-print0"])
        paths = sorted(_selected_by_glob(names, q.glob or "", q.root))
        if not paths:  # no match; or the root is missing or refused, which find's stderr says
            return RawResult(listing.exit_code or 1, b"", listing.stderr, listing.stdout_truncated)
        gate = asyncio.Semaphore(4)

        async def grep(batch: list[str]) -> RawResult:
            async with gate:
                argv = ["grep", *flags, "-e", q.pattern, "--", *batch]
                raw = await self._executor.exec_raw(argv, cwd=SEARCH_FROM, timeout=SEARCH_TIMEOUT_S)
            if q.output_mode != "files_with_matches":
                return raw
            # grep -l ends each path with a newline (POSIX grep has no -Z): NUL-separated here, as
            # rg gives them. A name holding a newline is searched alone: any output is its match.
            text = raw.stdout.decode("utf-8", "surrogateescape")
            found = batch if len(batch) == 1 and text else [path for path in text.split("\n") if path]
            listed = "".join(f"{path}\0" for path in found).encode("utf-8", "surrogateescape")
            return RawResult(raw.exit_code, listed, raw.stderr, raw.stdout_truncated)

        alone = [p for p in paths if "\n" in p] if q.output_mode == "files_with_matches" else []
        batched = [*_batches([p for p in paths if p not in alone]), *([p] for p in alone)]  # (-l: sorted again)
        async with task_group() as group:  # (a timeout or a lost connection, as itself)
            batches = [group.create_task(grep(batch)) for batch in batched]
        # (a listing cut short was searched in part)
        return _combined([batch.result() for batch in batches], listing.stdout_truncated)

    async def _search(self, argv: list[str], root: str) -> RawResult:
        """Run a grep. One that is still going after a second has its root looked at: a named pipe
        given as the root would hold it until something writes to the pipe (rg and grep skip the
        pipes they find in a tree, not the one they are given)."""
        search = asyncio.ensure_future(self._executor.exec_raw(argv, cwd=SEARCH_FROM, timeout=SEARCH_TIMEOUT_S))
        try:
            done, _ = await asyncio.wait({search}, timeout=SLOW_SEARCH_S)
            if not done and (await self._files.stat(root)).type == "other":
                search.cancel()  # (which kills it on the box)
                raise SpecialFile(root, "not a file or directory", "grep searches files and directories")
            return await search
        except BaseException:
            search.cancel()
            raise

    async def _require_directory(self, path: str) -> None:
        stat = await self._files.stat(path)
        if stat.type != "directory":
            raise InvalidArgument(f"{path} is not a directory; glob searches directories")


def _rg_argv(q: GrepQuery, one_thread: bool = False) -> list[str]:
    argv = [
        "rg",
        *(["--threads=1"] if one_thread else []),
        "--no-config",
        "--color=never",
        "--hidden",
        "--glob",
        "!.git",
        f"--max-columns={MAX_COLUMNS}",
        "--max-columns-preview",
    ]
    if q.output_mode == "files_with_matches":
        argv += ["--files-with-matches", "--null"]
    elif q.output_mode == "count":
        argv += ["--count", "--with-filename", "--sort=path"]
    else:
        argv += ["--with-filename", "--no-heading", "--sort=path"]
        argv += ["--line-number"] if q.line_numbers else ["--no-line-number"]
        argv += _context_flags(q, "--context", "--before-context", "--after-context")
    if q.case_insensitive:
        argv.append("--ignore-case")
    if q.multiline:
        argv += ["--multiline", "--multiline-dotall"]
    if q.glob:
        argv += ["--glob", _rg_glob(q.glob, q.root)]
    if q.type:
        argv += ["--type", q.type]
    return [*argv, "--regexp", q.pattern, "--", q.root]


def _grep_flags(q: GrepQuery) -> list[str]:
    """POSIX grep's options for a query (the same on GNU, BSD and busybox boxes), or InvalidArgument
    for what only ripgrep does."""
    if q.multiline:
        raise InvalidArgument("multiline search needs ripgrep (rg) on the box; install it or search line by line")
    if q.type:
        raise InvalidArgument(f"type filters need ripgrep (rg) on the box; use glob='*.{q.type}' instead")
    grep = ["-E", "-I", "-H"]
    if q.output_mode == "files_with_matches":
        grep.append("-l")
    elif q.output_mode == "count":
        grep.append("-c")
    else:
        if q.line_numbers:
            grep.append("-n")
        grep += _context_flags(q, "-C", "-B", "-A")
    if q.case_insensitive:
        grep.append("-i")
    return grep


# What a glob (rg's, fnmatch's) gives a meaning to; a backslash before one makes it itself.
_GLOB_SPECIAL = re.compile(r"([][*?{}\\])")


def _narrowed(root: str, pattern: str) -> tuple[str, str, int | None]:
    """The glob's search moved down through the pattern's leading literal directories (`src/app/*.py`
    under R is `*.py` under R/src/app), and how deep under it a match can lie (None: any, for a
    pattern with `**` or braces, which may hold a '/')."""
    parts = pattern.split("/")
    literal = 0
    while (
        literal < len(parts) - 1 and parts[literal] not in ("", ".", "..") and not _GLOB_SPECIAL.search(parts[literal])
    ):
        literal += 1
    if literal:
        root = posixpath.join(root, *parts[:literal])
        parts = parts[literal:]
    deep = "**" in pattern or "{" in pattern
    return root, "/".join(parts), None if deep else len(parts)


def _basename_filter(pattern: str) -> str | None:
    """A glob of file names for rg that every file the pattern matches passes (its last part), or
    None when there is none that is safe: a backslash (an escape, which rg reads after its own
    rules), braces (may hold a '/'), `**`, a leading '!' or '#', brackets (rg knows no
    [[:digit:]], and refuses an unclosed '['), blanks at either end (which rg trims), ':' and ','
    (which a file type's definition gives meanings of their own)."""
    last = pattern.rsplit("/", 1)[-1]
    unsafe = ("**", "\\", "[", "]", ":", ",")
    if last in ("*", "") or "{" in pattern or any(u in last for u in unsafe) or last[0] in "!#" or last != last.strip():
        return None
    return last


def _walk(root: str, depth: int | None = None) -> list[str]:
    """find's arguments for the files under `root` (at most `depth` levels down): .git skipped and
    a root that is a symlink followed, as rg does. (-H, not a trailing '/': grep's root may be a file.)"""
    return ["-H", root, *(["-maxdepth", str(depth)] if depth else []), "-name", ".git", "-prune", "-o", "-type", "f"]


# grep is given its files in batches of this many bytes of arguments: execve's room for arguments
# and environment together (ARG_MAX) is at least 128 KiB on Linux (a quarter of a small stack).
GREP_BATCH_CHARS = 64 << 10


def _batches(paths: list[str], budget: int = GREP_BATCH_CHARS) -> list[list[str]]:
    batches: list[list[str]] = []
    size = budget
    for path in paths:
        cost = len(quote_word(path).encode("utf-8", "surrogateescape")) + 1
        if size + cost > budget:
            batches.append([])
            size = 0
        batches[-1].append(path)
        size += cost
    return batches


def _combined(results: list[RawResult], truncated: bool) -> RawResult:
    """One grep's result from those of its batches: a match anywhere is a match (0), an error
    anywhere an error (2)."""
    codes = [r.exit_code for r in results]
    code = max(codes) if max(codes) > 1 else min(codes)
    return RawResult(
        code,
        b"".join(r.stdout for r in results),
        b"".join(r.stderr for r in results),
        truncated or any(r.stdout_truncated for r in results),
    )


# -- grep's `glob` ---------------------------------------------------------------------------------
# ripgrep reads a --glob as a line of a .gitignore (that of its working directory) and inverts it:
# `*.py` (no '/') matches a name at any depth, `src/*.py` (a '/' before its end) a path relative to
# the working directory, a leading '!' excludes (a directory it matches is not entered), a trailing
# '/' matches directories only; `**` is any number of directories; `{a,b}` alternatives. A path
# given on the command line (the root) is searched whatever the globs say.


@dataclass(frozen=True)
class _GlobLine:
    """A grep `glob` as ripgrep parses it (ignore::gitignore::GitignoreBuilder::add_line)."""

    pattern: str  # without the '!', a leading '/' or a trailing '/'
    negated: bool
    anchored: bool  # relative to the root, not a name at any depth
    only_dirs: bool


def _parse_glob(glob: str) -> _GlobLine | None:
    """None for what ripgrep ignores: an empty glob, or one that starts with '#' (a comment)."""
    if glob.startswith("#"):
        return None
    line = glob if glob.endswith("\\ ") else glob.rstrip()
    if not line:
        return None
    negated = anchored = only_dirs = False
    if line.startswith(("\\!", "\\#")):
        line = line[1:]
    else:
        if line.startswith("!"):
            negated, line = True, line[1:]
        if line.startswith("/"):
            anchored, line = True, line[1:]
    if line.endswith("/"):
        only_dirs, line = True, line[:-1]
        line = line[:-1] if line.endswith("\\") else line
    return _GlobLine(line, negated, anchored or "/" in line, only_dirs)


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # (bytes os.fsdecode could not decode)


def _rg_glob(glob: str, root: str) -> str:
    """The --glob to give rg for a grep `glob`. rg runs from "/" (SEARCH_FROM: its paths come out
    absolute), and anchors a glob with a '/' to its working directory: such a glob gets the root in
    front (its glob characters escaped), so that `src/*.py` is `ROOT/src/*.py`, as it would be were
    rg run from the root. (Running it there would not do: rg compares paths with the working
    directory as getcwd spells it, and spells a root reached through a symlink otherwise.) A glob
    without a '/' matches names at any depth and is passed on as it is."""
    line = _parse_glob(glob)
    if line is None or not line.anchored:
        return glob
    # (A byte that is not UTF-8 becomes a '?': rg's glob would never match it as it is. Every path
    # rg prints starts with the root anyway; the prefix only has to reach as deep.)
    prefix = _NOT_UTF8.sub("?", _GLOB_SPECIAL.sub(r"\\\1", root.strip("/")))
    anchored = f"/{prefix}/{line.pattern}" if prefix else f"/{line.pattern}"
    return ("!" if line.negated else "") + anchored + ("/" if line.only_dirs else "")


def _selected_by_glob(paths: list[str], glob: str, root: str) -> list[str]:
    """The files of `paths` (find's listing of `root`) that `rg --glob GLOB` would search: the
    glob made a path relative to the root as ripgrep makes it (`**/` before one without a '/',
    `/*` after a final `/**`), matched by glob_to_regex; with a '!', a file it matches is left out,
    and so is everything in a directory it matches."""
    line = _parse_glob(glob)
    if line is None:
        return paths
    glob_to_regex(line.pattern, rg=True)  # (so that an error names the glob as given, not as made below)
    # (a lone '!' is `**/` to rg, which matches everything)
    pattern = line.pattern if line.pattern or line.anchored else "**"
    if not line.anchored and pattern != "**" and not pattern.startswith("**/"):
        pattern = f"**/{pattern}"
    if pattern.endswith("/**"):  # what is in the directory, not the directory itself
        pattern += "/*"
    matches = glob_to_regex(pattern, rg=True).match
    excluded: dict[str, bool] = {"": False}  # directory (relative) → in or under one the glob excludes

    def in_excluded_directory(rel: str) -> bool:
        above, directory = [], posixpath.dirname(rel)
        while directory not in excluded:
            above.append(directory)
            directory = posixpath.dirname(directory)
        verdict = excluded[directory]
        for directory in reversed(above):
            verdict = excluded[directory] = verdict or bool(matches(directory))
        return verdict

    under = root.rstrip("/") + "/"
    selected = []
    for path in paths:
        if not path.startswith(under):  # the root itself, a file: searched whatever the glob says
            selected.append(path)
            continue
        rel = path[len(under) :]
        matched = not line.only_dirs and matches(rel) is not None
        keep = (not matched and not in_excluded_directory(rel)) if line.negated else matched
        if keep:
            selected.append(path)
    return selected


def _context_flags(q: GrepQuery, around: str, before: str, after: str) -> list[str]:
    flags = []
    for flag, value in ((around, q.context), (before, q.before), (after, q.after)):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def _raise_if_root_refused(root: str, stderr: bytes) -> None:
    """PermissionDenied when the search could not read its root itself (rg: `ROOT: Permission
    denied (os error 13)`; find: `find: ‘ROOT’: Permission denied`); an unreadable file inside a
    tree only leaves that file out (and its line starts with another path)."""
    names = {root, root.rstrip("/") + "/"}
    denied = names | {f"{quote}{name}{unquote}" for name in names for quote, unquote in ("‘’", "''")}
    for line in stderr.decode("utf-8", "surrogateescape").splitlines():
        for prefix in ("rg: ", "grep: ", "find: "):
            line = line.removeprefix(prefix)
        # (single-threaded rg words it `ROOT: IO error for operation on ROOT: Permission denied`)
        if line.endswith(("Permission denied", "Permission denied (os error 13)")) and any(
            line.startswith(f"{name}: ") for name in denied
        ):
            raise PermissionDenied(root)


def _only_file_errors(stderr: str) -> bool:
    """Whether grep's complaints are all about single files (unreadable, vanished), not the pattern.
    rg words them "PATH: Permission denied (os error 13)", grep "grep: PATH: Permission denied"."""
    per_file = ("Permission denied", "No such file or directory", "Is a directory", "Input/output error")
    lines = [line for line in stderr.splitlines() if line.strip()]
    return bool(lines) and all(any(reason in line for reason in per_file) for line in lines)


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/") + "/"
    return path[len(root) :] if path.startswith(root) else path
