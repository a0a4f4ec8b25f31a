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
from collections.abc import Callable
from pathlib import Path

import asyncssh

from .channels import SFTPChannel
from .errors import WRITE_SPECIAL_HINT, FileNotFound, FileOperationError, IsADirectory, SandboxError, SpecialFile
from .files import (
    MAX_LINK_HOPS,
    file_kind,
    keep_owner,
    link_target,
    open_temp,
    refuse_read_only,
    sftp_error,
    special_kind,
    special_mode_kind,
    temp_file_failure,
    temp_name,
    too_many_links,
)
from .sftpio import GUARANTEED, read_upto, write_all
from .tasks import task_group
from .tempfacts import TempFileFacts

COPIES_FILES = "copies are of single files; copy a directory whole with upload_dir / download_dir (tether cp -r)"
# Called with (bytes done, total bytes).
Progress = Callable[[int, int], None]
# A file goes in pieces of this size, each as parallel requests of one block (asyncssh sizes blocks
# from the server's limits@openssh.com reply when given -1: OpenSSH 255 KiB, asyncssh's own server
# 4 MiB). At most PIECES_IN_FLIGHT pieces of a sandbox's copies are in flight at once, whatever the
# server allows and however many files go together: 32 MiB keeps a high-latency link busy, and
# bounds the memory a copy takes.
PIECE = 4 << 20
PIECES_IN_FLIGHT = 8
MAX_REQUESTS = PIECE // GUARANTEED  # (a piece's blocks all at once, even at the smallest block size)


class Transfers:
    def __init__(self, sftp: SFTPChannel, temp_facts: TempFileFacts | None = None) -> None:
        self.sftp = sftp
        # Who a new file's owner is, per directory (learned by an fstat of one, shared with Files):
        # an upload over a file needs it, and asks only where it is not known.
        self._facts = temp_facts or TempFileFacts()
        self._pieces = asyncio.Semaphore(PIECES_IN_FLIGHT)  # (shared by every copy of the sandbox)

    async def upload(
        self,
        local: Path,
        remote: str,
        progress: Progress | None = None,
        *,
        into_directory: bool = False,
        exact: bool = False,
    ) -> int:
        """Copy `local` to `remote` (parents created, atomic rename). Returns the size copied.
        When `remote` is a directory (or `into_directory`: one to create), the copy goes into it
        under the local file's name; `exact`: `remote` is the file's own path (its directory is
        there; a directory in its place is refused), as a directory copy has it.

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
            try:
                target, existing = await _upload_target(sftp, remote, local.name, into_directory, not exact)
            except asyncssh.SFTPError as exc:
                raise sftp_error(remote, exc) from None
            directory, name = posixpath.split(target)
            temp = posixpath.join(directory, temp_name(name, "part"))
            try:
                # Created private: the final mode is given only once every byte is there.
                try:
                    opened = await open_temp(
                        sftp, temp, None if exact else directory, block_size=-1, max_requests=MAX_REQUESTS
                    )
                except asyncssh.SFTPError as exc:  # (its directory is there: made, or known to be)
                    raise temp_file_failure(target, directory, exc, who="copies") from None
                async with opened as f:
                    if existing is not None:
                        if self._facts.owner(directory) is None:  # (the temp file's owner is the sandbox user's)
                            self._facts.learn(directory, await f.stat())
                        ours = self._facts.owner(directory)
                        refuse_read_only(target, existing, ours)
                        await keep_owner(f, existing, ours)  # (root copying over app's .env: still app's)
                    if contents is None:
                        await _send(local, f, size, progress, self._pieces)
                    elif contents:
                        await write_all(f, contents)
                    # As cp: a file copied over another keeps the other's mode (a 0600 secret stays 0600)
                    await f.chmod((info.st_mode if existing is None else existing.permissions or 0) & 0o777)
                await sftp.posix_rename(temp, target)
            except BaseException as exc:
                try:
                    await sftp.remove(temp)
                except Exception:  # (the connection died with the upload: once re-dialed, then)
                    self.sftp.remove_later(temp)
                if isinstance(exc, asyncssh.SFTPError):
                    raise sftp_error(target, exc) from None
                raise

        await self.sftp.once(put)
        return size

    async def download(
        self,
        remote: str,
        local: Path,
        progress: Progress | None = None,
        *,
        into_directory: bool = False,
        exact: bool = False,
        umask: int | None = None,
    ) -> int:
        """Copy `remote` to `local` (parents created, atomic rename). Returns the size copied.
        When `local` is a directory (or `into_directory`: one to create), the copy goes into it
        under the remote file's name; `exact`: `local` is the file's own path. As cp has it, a new
        file gets the remote one's mode less `umask` (None: this process's), and a file copied
        over keeps its own mode; one this user may not write is refused."""
        if into_directory or (local.is_dir() and not exact):
            local = local / posixpath.basename(remote)
        # As cp does: through a symlink to the file it names; never over a pipe or a device (which
        # the rename at the end would replace with a plain file: think /dev/null).
        local = Path(os.path.realpath(local))
        existing: int | None = None  # (the mode of the file copied over)
        try:
            existing = local.stat().st_mode
        except FileNotFoundError:
            pass
        except OSError as exc:  # (a file where a directory of the path should be: NotADirectoryError)
            raise local_write_failure(local, exc) from None
        if existing is not None:
            if stat.S_ISDIR(existing):
                raise IsADirectory(str(local), COPIES_FILES)
            if not stat.S_ISREG(existing):
                raise SpecialFile(str(local), special_mode_kind(existing) or "odd", WRITE_SPECIAL_HINT)
            if not os.access(local, os.W_OK):
                raise SandboxError(
                    f"{local}: it is read-only on this machine (mode {existing & 0o777:04o}), and cp would not "
                    "write it either; make it writable first (chmod u+w) if it should change"
                )
        temp = local.with_name(temp_name(local.name, "part"))

        async def get(sftp: asyncssh.SFTPClient) -> int:
            try:
                attrs = await sftp.stat(remote)
                if file_kind(attrs) == "directory":
                    raise IsADirectory(remote, COPIES_FILES)
                what = special_kind(attrs)
                if what is not None:  # (opening a named pipe would block sftp-server)
                    raise SpecialFile(remote, what)
                try:  # (only once there is something to copy: a failed copy leaves no directories)
                    local.parent.mkdir(parents=True, exist_ok=True)
                    created = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private until done
                except OSError as exc:
                    raise local_write_failure(local, exc) from None
                with open(created, "wb") as f:
                    if attrs.size:
                        await _receive(sftp, remote, f.fileno(), attrs.size, progress, self._pieces)
                    else:  # it may hold more than it says (/proc's files): read to the end
                        f.write(await _read_to_end(sftp, remote))
                    if existing is not None or attrs.permissions is not None:
                        mask = current_umask() if umask is None else umask
                        mode = existing if existing is not None else (attrs.permissions or 0) & ~mask
                        os.fchmod(f.fileno(), mode & 0o777)
                    size = f.tell() if not attrs.size else attrs.size
                os.replace(temp, local)
            except BaseException as exc:
                temp.unlink(missing_ok=True)
                if isinstance(exc, asyncssh.SFTPError):
                    raise sftp_error(remote, exc) from None
                raise
            return size

        return await self.sftp.once(get)


def local_write_failure(local: Path, exc: OSError) -> SandboxError:
    """A copy that cannot be written on this machine, named as asked for (not by the temp file
    beside it, which is what the OS names)."""
    reason = (exc.strerror or str(exc)).lower()
    return SandboxError(f"{local}: cannot write it on this machine: {reason}")


async def _upload_target(
    sftp: asyncssh.SFTPClient, remote: str, name: str, into_directory: bool, may_enter: bool = True
) -> tuple[str, asyncssh.SFTPAttrs | None]:
    """The file an upload to `remote` replaces, as cp has it, and its attributes (None: a new file):
    `name` inside `remote` when that is a directory (or `into_directory`: one to create; not when
    `may_enter` is false); through symlinks to the file they name (as `write` does). A pipe or a
    device is refused, and so is a directory in the file's place. One lstat per step: a new file
    costs a single round trip."""
    path = posixpath.join(remote, name) if into_directory else remote
    may_enter = may_enter and not into_directory
    for _ in range(MAX_LINK_HOPS):
        try:
            attrs = await sftp.lstat(path)
        except asyncssh.SFTPNoSuchFile:
            return path, None
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
            return path, attrs
    raise too_many_links(path)


async def _read_to_end(sftp: asyncssh.SFTPClient, path: str) -> bytes:
    chunks, offset = [], 0
    async with sftp.open(path, "rb") as f:
        while chunk := await read_upto(f, GUARANTEED, offset):
            chunks.append(chunk)
            offset += len(chunk)
    return b"".join(chunks)


async def _send(
    local: Path, f: asyncssh.SFTPClientFile, size: int, progress: Progress | None, pieces: asyncio.Semaphore
) -> None:
    """`size` bytes of `local` written to the open remote file: pieces read in turn, several pieces'
    writes in flight at once (each piece's blocks are parallel requests of their own)."""
    done = 0

    async def write(data: bytes, offset: int) -> None:
        nonlocal done
        await f.write(data, offset)
        done += len(data)
        if progress is not None:
            progress(done, size)

    with open(local, "rb") as source:
        async with task_group() as group:
            for offset in range(0, size, PIECE):
                await pieces.acquire()
                try:
                    # (a file that shrank meanwhile ends the copy short: the sizes are compared below)
                    data = source.read(min(PIECE, size - offset))
                except BaseException:
                    pieces.release()  # (else a sandbox's copies would run out of pieces for good)
                    raise
                if not data:
                    pieces.release()
                    break
                _releasing(pieces, group.create_task(write(data, offset)))
    if done != size:
        raise FileOperationError(str(local), f"{local} changed size while it was copied; copy it again")


async def _receive(
    sftp: asyncssh.SFTPClient, remote: str, fd: int, size: int, progress: Progress | None, pieces: asyncio.Semaphore
) -> None:
    """`size` bytes of `remote` written to the open local file `fd`, several pieces in flight, each
    block written as it comes (a piece put together first costs two copies of it: half the speed)."""
    done = 0

    async def read(f: asyncssh.SFTPClientFile, offset: int) -> None:
        nonlocal done
        async for at, data in await f.read_parallel(min(PIECE, size - offset), offset):
            view = memoryview(data)
            while view:  # (a full disk writes short: the rest is not dropped, it fails)
                written = os.pwrite(fd, view, at)
                view, at = view[written:], at + written
            done += len(data)
            if progress is not None:
                progress(done, size)

    async with sftp.open(remote, "rb", block_size=-1, max_requests=MAX_REQUESTS) as f, task_group() as group:
        for offset in range(0, size, PIECE):
            await pieces.acquire()
            _releasing(pieces, group.create_task(read(f, offset)))
    if done != size:  # (it shrank meanwhile)
        raise FileOperationError(remote, f"{remote} changed size while it was copied; copy it again")


def _releasing(pieces: asyncio.Semaphore, task: asyncio.Task[None]) -> None:
    """Give `task`'s piece back when it is done, however: a finally in its body would not run for
    a task cancelled before it started (one piece failed, the group cancelled the rest), and the
    sandbox's later copies would wait for that piece for good."""
    task.add_done_callback(lambda _: pieces.release())


def current_umask() -> int:
    """This process's umask (read without changing it where /proc says it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
