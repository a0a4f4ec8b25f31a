"""Directory copies, as `cp -r` makes them: the tree's directories first (one request each, a level
at a time), then its files as single-file copies (sandbox/transfer.py), several at a time, then
the modes of the directories the copy made (last: a read-only directory is filled before it
becomes one; a directory that was there keeps its own, as with cp).

What cannot be copied is skipped and named, never dropped in silence: a symlinked directory (not
entered), a special file, a directory whose entries cannot be listed, a file that cannot be read
or went away. A file is copied through a symlink to it, as `cp -L` does. Modes are kept on the
sandbox's side; on this machine they are given less the umask, as cp gives new files.
"""

from __future__ import annotations

import asyncio
import collections
import os
import posixpath
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from .errors import FileNotFound, FileOperationError, InvalidArgument, PermissionDenied, SpecialFile
from .files import file_kind, sftp_error
from .tasks import task_group
from .transfer import Progress, Transfers, current_umask

TREE_COPIES = 8  # files of a tree copied at once (they share the sandbox's pieces in flight)


@dataclass
class TreeCopy:
    """What a directory copy did."""

    files: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # "path (why)": not copied


@dataclass
class _Tree:
    """A tree's contents: directories (relative posix paths, "" the top, parents first) with their
    modes, and files (relative path, size) with where each is read from."""

    directories: list[tuple[str, int]] = field(default_factory=list)
    files: list[tuple[Any, str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class TreeCopies:
    def __init__(self, transfers: Transfers) -> None:
        self._transfers = transfers
        self._sftp = transfers.sftp

    async def upload_tree(self, local: Path, remote: str, progress: Progress | None = None) -> TreeCopy:
        """Copy the directory `local` to the directory `remote` (created with its parents; what is
        there already is added to, files of the same name replaced)."""
        tree = _local_tree(local)

        made: list[tuple[str, int]] = []  # (the directories this copy made: only they get modes)
        modes = dict(tree.directories)

        async def make_directories(sftp: asyncssh.SFTPClient) -> None:
            parent = posixpath.dirname(remote.rstrip("/"))
            if parent:
                try:
                    await sftp.makedirs(parent, exist_ok=True)
                except asyncssh.SFTPError as exc:
                    raise sftp_error(parent, exc) from None
            for level in _levels(tree.directories):
                paths = [_below(remote, relative) for relative in level]
                outcomes = await asyncio.gather(*(sftp.mkdir(path) for path in paths), return_exceptions=True)
                for relative, path, outcome in zip(level, paths, outcomes, strict=True):
                    if outcome is None:
                        made.append((path, modes[relative]))
                    elif isinstance(outcome, asyncssh.SFTPError):  # (there already: as a directory, it is fine)
                        await _is_remote_directory(sftp, path, outcome)
                    else:
                        raise outcome

        await self._sftp.once(make_directories)
        copy = TreeCopy(skipped=tree.skipped)
        jobs = [(source, _below(remote, relative), size) for source, relative, size in tree.files]
        await _copy_files(jobs, lambda s, t, p: self._transfers.upload(s, t, p, exact=True), progress, copy)

        async def give_modes(sftp: asyncssh.SFTPClient) -> None:
            paths = made[::-1]  # (deepest first: a parent that becomes unsearchable last; sent in this order)
            given = await asyncio.gather(*(sftp.chmod(p, m & 0o7777) for p, m in paths), return_exceptions=True)
            for (path, _), outcome in zip(paths, given, strict=True):
                if isinstance(outcome, asyncssh.SFTPError):
                    raise sftp_error(path, outcome)
                if isinstance(outcome, BaseException):
                    raise outcome

        await self._sftp.once(give_modes)
        return copy

    async def download_tree(
        self, remote: str, local: Path, progress: Progress | None = None, umask: int | None = None
    ) -> TreeCopy:
        """Copy the directory `remote` to the directory `local`, as upload_tree does the other way.
        What it makes gets the remote modes less `umask` (None: this process's)."""
        tree = await self._sftp.retrying(lambda sftp: _remote_tree(sftp, remote))
        made: list[tuple[Path, int]] = []  # (the directories this copy made: only they get modes)
        for relative, mode in tree.directories:
            path = local / relative if relative else local
            if path.exists() and not path.is_dir():
                raise FileOperationError(str(path), f"{path} is in the way: a directory goes there")
            if not path.is_dir():
                path.mkdir(parents=True)
                made.append((path, mode))
        copy = TreeCopy(skipped=tree.skipped)
        jobs = [(source, local / relative, size) for source, relative, size in tree.files]
        await _copy_files(
            jobs, lambda s, t, p: self._transfers.download(s, t, p, exact=True, umask=umask), progress, copy
        )
        mask = current_umask() if umask is None else umask
        for path, mode in reversed(made):  # (deepest first)
            os.chmod(path, mode & 0o7777 & ~mask)
        return copy


def _local_tree(local: Path) -> _Tree:
    if not local.is_dir():
        raise FileNotFound(str(local), " (a directory) on this machine")
    tree = _Tree(directories=[("", local.stat().st_mode)])

    def unlistable(error: OSError) -> None:
        if str(error.filename) == str(local):
            raise FileOperationError(str(local), f"{local} cannot be listed ({error.strerror}); nothing was copied")
        tree.skipped.append(f"{error.filename} (a directory that cannot be listed: {error.strerror})")

    for top, names, file_names in os.walk(local, onerror=unlistable):  # (symlinked directories: not entered)
        here = Path(top)
        relative = here.relative_to(local).as_posix()
        relative = "" if relative == "." else relative  # (the top; ".git" stays ".git")
        for name in list(names):
            if (here / name).is_symlink():
                names.remove(name)
                tree.skipped.append(f"{here / name} (a symlinked directory)")
            else:
                tree.directories.append((posixpath.join(relative, name), (here / name).stat().st_mode))
        for name in file_names:
            try:
                info = (here / name).stat()
            except OSError:
                tree.skipped.append(f"{here / name} (a symlink to nothing)")
                continue
            if stat.S_ISREG(info.st_mode):
                tree.files.append((here / name, posixpath.join(relative, name), info.st_size))
            else:
                tree.skipped.append(f"{here / name} (a special file)")
    return tree


async def _remote_tree(sftp: asyncssh.SFTPClient, remote: str) -> _Tree:
    """The tree under `remote`, listed a level at a time (the directories of one level, and then
    the symlinks they hold, asked together: a round trip is what a listing costs). Entries are
    lstat-like: a symlink is followed only to a file."""
    try:
        top = await sftp.stat(remote)
    except asyncssh.SFTPError as exc:
        raise sftp_error(remote, exc) from None
    if file_kind(top) != "directory":
        raise InvalidArgument(f"{remote} is not a directory; copy a file with download")
    tree = _Tree(directories=[("", top.permissions or 0o755)])
    level = [""]
    while level:
        listings = await asyncio.gather(*(sftp.readdir(_below(remote, r)) for r in level), return_exceptions=True)
        found = []  # (path, relative path, attrs) of this level's entries
        for relative, entries in zip(level, listings, strict=True):
            here = _below(remote, relative)
            if isinstance(entries, BaseException):
                failure = sftp_error(here, entries) if isinstance(entries, asyncssh.SFTPError) else entries
                if not relative or not isinstance(failure, FileOperationError):  # (the top; or the session)
                    raise failure from None
                tree.skipped.append(f"{here} (a directory that cannot be listed: {failure})")
                continue
            for entry in entries:
                name = entry.filename
                if name in (".", ".."):
                    continue
                if not isinstance(name, str) or not name or "/" in name or "\0" in name:
                    tree.skipped.append(f"{here}/{name!r} (a name no file can have)")  # (a server's mistake, or worse)
                    continue
                found.append((posixpath.join(here, name), posixpath.join(relative, name), entry.attrs))
        links = [path for path, _, attrs in found if file_kind(attrs) == "symlink"]
        targets = dict(zip(links, await asyncio.gather(*map(sftp.stat, links), return_exceptions=True), strict=True))
        level = []
        for path, below, attrs in found:
            kind = file_kind(attrs)
            if kind == "symlink":  # (followed to a file alone)
                attrs = targets[path]
                if isinstance(attrs, BaseException):
                    if not isinstance(attrs, asyncssh.SFTPError):
                        raise attrs
                    tree.skipped.append(f"{path} (a symlink to nothing)")
                    continue
                if file_kind(attrs) != "file":
                    tree.skipped.append(f"{path} (a symlink to a directory or a special file)")
                    continue
                kind = "file"
            if kind == "directory" and not (attrs.permissions or 0) & 0o100:
                # (sftp-server leaves out the entries it cannot look at: they would go missing unsaid)
                tree.skipped.append(f"{path} (a directory its owner may not search)")
            elif kind == "directory":
                tree.directories.append((below, attrs.permissions or 0o755))
                level.append(below)
            elif kind == "file":
                tree.files.append((path, below, attrs.size or 0))
            else:
                tree.skipped.append(f"{path} (a special file)")
    return tree


async def _copy_files(
    jobs: list[tuple[Any, Any, int]],
    copy_one: Callable[[Any, Any, Progress], Awaitable[int]],
    progress: Progress | None,
    copy: TreeCopy,
) -> None:
    """Each (source, target, size) copied with `copy_one` by TREE_COPIES workers; progress counts
    the bytes of them all."""
    total = sum(size for _, _, size in jobs)
    done = 0
    queue = collections.deque(jobs)

    async def worker() -> None:
        nonlocal done, total
        while queue:
            source, target, size = queue.popleft()
            counted = 0

            def count(sent: int, now_size: int) -> None:
                nonlocal done, counted, total, size
                if now_size != size:  # (it changed since it was listed)
                    total, size = total + now_size - size, now_size
                done, counted = done + sent - counted, sent
                if progress is not None:
                    progress(done, max(total, done))

            try:
                sent = await copy_one(source, target, count)
            except (FileNotFound, PermissionDenied, SpecialFile) as exc:  # (gone, or not to be read, since)
                copy.skipped.append(f"{source} ({exc})")
                total -= size
                done -= counted
                continue
            copy.bytes += sent
            copy.files += 1

    async with task_group() as group:
        for _ in range(min(TREE_COPIES, len(jobs))):
            group.create_task(worker())


def contents_of(path: str | Path) -> bool:
    """Whether a directory copy's source names what a directory holds (`dir/.`, as cp -r reads it)."""
    text = str(path).rstrip("/") if isinstance(path, str) else ""  # (a Path has lost its "/.")
    return text == "." or text.endswith("/.")


def _levels(directories: list[tuple[str, int]]) -> list[list[str]]:
    """The directories' relative paths by depth, top first (a level's parents are all made before)."""
    levels: dict[int, list[str]] = {}
    for relative, _ in directories:
        levels.setdefault(relative.count("/") + 1 if relative else 0, []).append(relative)
    return [levels[depth] for depth in sorted(levels)]


def _below(root: str, relative: str) -> str:
    return posixpath.join(root, relative) if relative else root


async def _is_remote_directory(sftp: asyncssh.SFTPClient, path: str, refused: asyncssh.SFTPError) -> None:
    """A mkdir of `path` was refused: fine when a directory is there; else the reason."""
    try:
        attrs = await sftp.stat(path)
    except asyncssh.SFTPError:
        raise sftp_error(path, refused) from None
    if file_kind(attrs) != "directory":
        raise FileOperationError(path, f"{path} is in the way: a directory goes there")
