"""Bulk copies over SFTP, pipelined: many requests in flight, block size from the server's limits.

Both directions write to a temporary name and rename at the end, so an interrupted copy never
leaves a half-written file under the real name. The temp file is written and given its mode
through the handle that created it (never reopened by name): someone who may rename files in
the target directory cannot swap in a symlink and have another file written or chmod'ed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from .channels import SFTPChannel
from .errors import (
    WRITE_SPECIAL_HINT,
    FileNotFound,
    FileOperationError,
    InvalidArgument,
    IsADirectory,
    SpecialFile,
)
from .files import (
    MAX_LINK_HOPS,
    PRIVATE,
    file_kind,
    link_target,
    sftp_error,
    special_kind,
    special_mode_kind,
    temp_name,
    too_many_links,
)
from .sftpio import GUARANTEED, read_upto, write_all

COPIES_FILES = "copies are of single files; copy a directory whole with upload_dir / download_dir (tether cp -r)"
TREE_COPIES = 8  # files of a directory copied at once
# Called with (bytes done, total bytes).
Progress = Callable[[int, int], None]
# asyncssh sizes blocks from the server's limits@openssh.com reply (OpenSSH: 255 KiB) when given -1;
# more requests in flight than its default keeps a high-latency link busy.
MAX_REQUESTS = 128
# An upload is read from disk in pieces of this size, each sent as parallel writes of one block per
# request; enough pieces are in flight together to keep MAX_REQUESTS requests going.
PIECE = 4 << 20


@dataclass
class TreeCopy:
    """What a directory copy did."""

    files: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # symlinked directories and special files, not copied


class Transfers:
    def __init__(self, sftp: SFTPChannel) -> None:
        self._sftp = sftp

    async def upload_tree(self, local: Path, remote: str, progress: Progress | None = None) -> TreeCopy:
        """Copy the directory `local` to the directory `remote` (created, parents too; what is there
        is added to, files of the same name replaced), as `cp -r`: its files (through symlinks to
        files, as cp -L), its directories with their modes. A symlinked directory is not entered
        and a special file not copied: both are listed in `skipped`."""
        if not local.is_dir():
            raise FileNotFound(str(local), " (a directory) on this machine")
        copy = TreeCopy()
        directories: list[tuple[str, int]] = [(remote, local.stat().st_mode)]
        files: list[tuple[Path, str, int]] = []
        for top, names, file_names in os.walk(local):  # (symlinked directories: listed, not followed)
            here = Path(top)
            into = posixpath.join(remote, here.relative_to(local).as_posix()).rstrip("/").removesuffix("/.")
            for name in list(names):
                if (here / name).is_symlink():
                    names.remove(name)
                    copy.skipped.append(str(here / name))
                else:
                    directories.append((posixpath.join(into, name), (here / name).stat().st_mode))
            for name in file_names:
                try:
                    info = (here / name).stat()
                except OSError:  # (a dangling link)
                    info = None
                if info is None or not stat.S_ISREG(info.st_mode):
                    copy.skipped.append(str(here / name))
                else:
                    files.append((here / name, posixpath.join(into, name), info.st_size))

        async def make_directories(sftp: asyncssh.SFTPClient) -> None:
            for path, _ in directories:
                await sftp.makedirs(path, exist_ok=True)

        await self._sftp.once(make_directories)
        await self._copy_all(files, self.upload, progress, copy)

        async def give_modes(sftp: asyncssh.SFTPClient) -> None:  # (last, deepest first: 0555 ones too)
            for path, mode in reversed(directories):
                await sftp.chmod(path, mode & 0o7777)

        await self._sftp.once(give_modes)
        return copy

    async def download_tree(self, remote: str, local: Path, progress: Progress | None = None) -> TreeCopy:
        """Copy the directory `remote` to the directory `local`, as upload_tree does the other way."""
        copy = TreeCopy()
        directories: list[tuple[Path, int]] = []
        files: list[tuple[str, Path, int]] = []

        async def walk(sftp: asyncssh.SFTPClient) -> None:
            top = await sftp.stat(remote)
            if file_kind(top) != "directory":
                raise InvalidArgument(f"{remote} is not a directory; copy a file with download")
            directories.append((local, top.permissions or 0o755))
            pending = [(remote, local)]
            while pending:
                here, there = pending.pop()
                try:
                    entries = await sftp.readdir(here)
                except asyncssh.SFTPError as exc:
                    raise sftp_error(here, exc) from None
                for entry in entries:
                    name = entry.filename
                    if name in (".", ".."):
                        continue
                    path, attrs = posixpath.join(here, name), entry.attrs
                    kind = file_kind(attrs)
                    if kind == "symlink":  # (what it names, when that is a file)
                        with contextlib.suppress(asyncssh.SFTPError):
                            attrs = await sftp.stat(path)
                        kind = "file" if file_kind(attrs) == "file" else "other"
                    if kind == "directory":
                        directories.append((there / name, attrs.permissions or 0o755))
                        pending.append((path, there / name))
                    elif kind == "file":
                        files.append((path, there / name, attrs.size or 0))
                    else:
                        copy.skipped.append(path)

        try:
            await self._sftp.retrying(walk)
        except asyncssh.SFTPError as exc:
            raise sftp_error(remote, exc) from None
        for path, _ in directories:
            if path.exists() and not path.is_dir():
                raise FileOperationError(str(path), f"{path} is in the way: a directory goes there")
            path.mkdir(parents=True, exist_ok=True)
        await self._copy_all(files, self.download, progress, copy)
        for path, mode in reversed(directories):
            os.chmod(path, mode & 0o7777)
        return copy

    @staticmethod
    async def _copy_all(
        files: list[tuple[Any, Any, int]],
        copy_one: Callable[..., Awaitable[int]],
        progress: Progress | None,
        copy: TreeCopy,
    ) -> None:
        """Each (source, target, size) copied with `copy_one`, TREE_COPIES at a time; progress
        counts the bytes of them all."""
        total = sum(size for _, _, size in files)
        done: dict[int, int] = {}
        gate = asyncio.Semaphore(TREE_COPIES)

        async def one(index: int, source: Any, target: Any) -> None:
            def counted(sent: int, _size: int) -> None:
                done[index] = sent
                if progress is not None:
                    progress(sum(done.values()), total)

            async with gate:
                sent = await copy_one(source, target, counted)
            copy.bytes += sent  # (after the await: `copy.bytes += await …` would read it before)
            copy.files += 1

        try:
            async with asyncio.TaskGroup() as group:
                for index, (source, target, _) in enumerate(files):
                    group.create_task(one(index, source, target))
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None

    async def upload(
        self, local: Path, remote: str, progress: Progress | None = None, *, into_directory: bool = False
    ) -> int:
        """Copy `local` to `remote` (parents created, atomic rename). Returns the size copied.
        When `remote` is a directory (or `into_directory`: one to create), the copy goes into it
        under the local file's name.

        Raises: FileNotFound / IsADirectory for the local file, FileOperationError for the remote side.
        """
        try:
            info = local.stat()
        except FileNotFoundError:
            raise FileNotFound(str(local), " on this machine") from None
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectory(str(local), COPIES_FILES)
        if not stat.S_ISREG(info.st_mode):  # (/dev/zero never ends; a pipe waits for a writer)
            raise SpecialFile(str(local), special_mode_kind(info.st_mode) or "odd", "copy regular files only")
        # A file that says it is empty may not be (/proc's): what it holds is read, and sent as is.
        contents = local.read_bytes() if info.st_size == 0 else None
        size = info.st_size if contents is None else len(contents)

        async def put(sftp: asyncssh.SFTPClient) -> None:
            target = await _upload_target(sftp, remote, local.name, into_directory)
            directory, name = posixpath.split(target)
            temp = posixpath.join(directory, temp_name(name, "part"))
            try:
                await sftp.makedirs(directory, exist_ok=True)
                # Created private: the final mode is given only once every byte is there.
                async with sftp.open(temp, "xb", PRIVATE, block_size=-1, max_requests=MAX_REQUESTS) as f:
                    if contents is None:
                        await _send(local, f, size, progress)
                    elif contents:
                        await write_all(f, contents)
                    await f.chmod(info.st_mode & 0o777)
                await sftp.posix_rename(temp, target)
            except BaseException as exc:
                try:
                    await sftp.remove(temp)
                except Exception:  # (the connection died with the upload: once re-dialed, then)
                    self._sftp.remove_later(temp)
                if isinstance(exc, asyncssh.SFTPError):
                    raise sftp_error(target, exc) from None
                raise

        await self._sftp.once(put)
        return size

    async def download(
        self, remote: str, local: Path, progress: Progress | None = None, *, into_directory: bool = False
    ) -> int:
        """Copy `remote` to `local` (parents created, atomic rename). Returns the size copied.
        When `local` is a directory (or `into_directory`: one to create), the copy goes into it
        under the remote file's name."""
        if into_directory or local.is_dir():
            local = local / posixpath.basename(remote)
        # As cp does: through a symlink to the file it names; never over a pipe or a device (which
        # the rename at the end would replace with a plain file: think /dev/null).
        local = Path(os.path.realpath(local))
        with contextlib.suppress(FileNotFoundError):
            mode = local.stat().st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectory(str(local), COPIES_FILES)
            if not stat.S_ISREG(mode):
                raise SpecialFile(str(local), special_mode_kind(mode) or "odd", WRITE_SPECIAL_HINT)
        local.parent.mkdir(parents=True, exist_ok=True)
        temp = local.with_name(temp_name(local.name, "part"))

        async def get(sftp: asyncssh.SFTPClient) -> int:
            try:
                attrs = await sftp.stat(remote)
                if file_kind(attrs) == "directory":
                    raise IsADirectory(remote, COPIES_FILES)
                what = special_kind(attrs)
                if what is not None:  # (opening a named pipe would block sftp-server)
                    raise SpecialFile(remote, what)
                with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:  # private until done
                    if attrs.size:
                        await _receive(sftp, remote, f.fileno(), attrs.size, progress)
                    else:  # it may hold more than it says (/proc's files): read to the end
                        f.write(await _read_to_end(sftp, remote))
                    if attrs.permissions is not None:
                        os.fchmod(f.fileno(), attrs.permissions & 0o777)
                    size = f.tell() if not attrs.size else attrs.size
            except BaseException as exc:
                temp.unlink(missing_ok=True)
                if isinstance(exc, asyncssh.SFTPError):
                    raise sftp_error(remote, exc) from None
                raise
            os.replace(temp, local)
            return size

        return await self._sftp.once(get)


async def _upload_target(sftp: asyncssh.SFTPClient, remote: str, name: str, into_directory: bool) -> str:
    """The file an upload to `remote` replaces, as cp has it: `name` inside `remote` when that is a
    directory (or `into_directory`: one to create); through symlinks to the file they name (as
    `write` does). A pipe or a device is refused, and so is a directory in the file's place. One
    lstat per step: a new file costs a single round trip."""
    path, may_enter = (posixpath.join(remote, name), False) if into_directory else (remote, True)
    for _ in range(MAX_LINK_HOPS):
        try:
            attrs = await sftp.lstat(path)
        except asyncssh.SFTPNoSuchFile:
            return path
        kind = file_kind(attrs)
        if kind == "symlink":
            path = await link_target(sftp, path)
        elif kind == "directory" and may_enter:
            path, may_enter = posixpath.join(path, name), False
        elif kind == "directory":
            raise IsADirectory(path)
        elif what := special_kind(attrs):
            raise SpecialFile(path, what, WRITE_SPECIAL_HINT)
        else:
            return path
    raise too_many_links(path)


async def _read_to_end(sftp: asyncssh.SFTPClient, path: str) -> bytes:
    chunks, offset = [], 0
    async with sftp.open(path, "rb") as f:
        while chunk := await read_upto(f, GUARANTEED, offset):
            chunks.append(chunk)
            offset += len(chunk)
    return b"".join(chunks)


async def _send(local: Path, f: asyncssh.SFTPClientFile, size: int, progress: Progress | None) -> None:
    """`size` bytes of `local` written to the open remote file: pieces read in turn, several pieces'
    writes in flight at once (each piece's blocks are parallel requests of their own)."""
    pieces_in_flight = max(1, MAX_REQUESTS * max(f.write_len, 1) // PIECE)
    gate = asyncio.Semaphore(pieces_in_flight)
    done = 0

    async def write(data: bytes, offset: int) -> None:
        nonlocal done
        try:
            await f.write(data, offset)
        finally:
            gate.release()
        done += len(data)
        if progress is not None:
            progress(done, size)

    with open(local, "rb") as source:
        try:
            async with asyncio.TaskGroup() as group:
                for offset in range(0, size, PIECE):
                    await gate.acquire()
                    # (a file that shrank meanwhile ends the copy short: the sizes are compared below)
                    data = source.read(min(PIECE, size - offset))
                    if not data:
                        gate.release()
                        break
                    group.create_task(write(data, offset))
        except BaseExceptionGroup as failed:  # (the pieces fail together when the connection goes)
            raise failed.exceptions[0] from None
    if done != size:
        raise FileOperationError(str(local), f"{local} changed size while it was copied; copy it again")


async def _receive(sftp: asyncssh.SFTPClient, remote: str, fd: int, size: int, progress: Progress | None) -> None:
    """`size` bytes of `remote` written to the open local file `fd`, many reads in flight."""
    done = 0
    async with sftp.open(remote, "rb", block_size=-1, max_requests=MAX_REQUESTS) as f:
        async for offset, data in await f.read_parallel(size, 0):
            os.pwrite(fd, data, offset)
            done += len(data)
            if progress is not None:
                progress(done, size)
    if done != size:  # (it shrank meanwhile)
        raise FileOperationError(remote, f"{remote} changed size while it was copied; copy it again")
