"""Bulk copies over SFTP, pipelined: many requests in flight, block size from the server's limits.

Both directions write to a temporary name and rename at the end, so an interrupted copy never
leaves a half-written file under the real name.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from pathlib import Path

import asyncssh

from .channels import SFTPChannel
from .errors import FileNotFound, IsADirectory, SpecialFile
from .files import PRIVATE, sftp_error, special_kind, temp_name

# Called with (bytes done, total bytes).
Progress = Callable[[int, int], None]
# asyncssh sizes blocks from the server's limits@openssh.com reply (OpenSSH: 255 KiB) when given -1;
# more requests in flight than its default keeps a high-latency link busy.
MAX_REQUESTS = 128


class Transfers:
    def __init__(self, sftp: SFTPChannel) -> None:
        self._sftp = sftp

    async def upload(
        self, local: Path, remote: str, progress: Progress | None = None, *, into_directory: bool = False
    ) -> int:
        """Copy `local` to `remote` (parents created, atomic rename). Returns the size copied.
        When `remote` is a directory (or `into_directory`: one to create), the copy goes into it
        under the local file's name.

        Raises: FileNotFound / IsADirectory for the local file, FileOperationError for the remote side.
        """
        if not local.exists():
            raise FileNotFound(str(local), " on this machine")
        if local.is_dir():
            raise IsADirectory(str(local))
        size = local.stat().st_size

        async def put(sftp: asyncssh.SFTPClient) -> None:
            # (one makedirs below creates the directory in either case: the target's parent)
            into = into_directory or await sftp.isdir(remote)
            target = posixpath.join(remote, local.name) if into else remote
            directory, name = posixpath.split(target)
            temp = posixpath.join(directory, temp_name(name, "part"))
            try:
                await sftp.makedirs(directory, exist_ok=True)
                # Created private first: put() reopens it (keeping the mode), and the final mode is
                # given only once every byte is there.
                await (await sftp.open(temp, "xb", PRIVATE)).close()
                await sftp.put(
                    str(local), temp, block_size=-1, max_requests=MAX_REQUESTS, progress_handler=_adapt(progress)
                )
                await sftp.chmod(temp, local.stat().st_mode & 0o777)
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

    async def download(self, remote: str, local: Path, progress: Progress | None = None) -> int:
        """Copy `remote` to `local` (parents created, atomic rename). Returns the size copied."""
        if local.is_dir():
            local = local / posixpath.basename(remote)
        local.parent.mkdir(parents=True, exist_ok=True)
        temp = local.with_name(temp_name(local.name, "part"))

        async def get(sftp: asyncssh.SFTPClient) -> int:
            try:
                attrs = await sftp.stat(remote)
                what = special_kind(attrs)
                if what is not None:  # (opening a named pipe would block sftp-server)
                    raise SpecialFile(remote, what)
                os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # private until done
                await sftp.get(
                    remote, str(temp), block_size=-1, max_requests=MAX_REQUESTS, progress_handler=_adapt(progress)
                )
            except BaseException as exc:
                temp.unlink(missing_ok=True)
                if isinstance(exc, asyncssh.SFTPError):
                    raise sftp_error(remote, exc) from None
                raise
            if attrs.permissions is not None:
                os.chmod(temp, attrs.permissions & 0o777)
            os.replace(temp, local)
            return attrs.size or local.stat().st_size

        return await self._sftp.once(get)


def _adapt(progress: Progress | None) -> Callable[[bytes, bytes, int, int], None] | None:
    if progress is None:
        return None
    return lambda _src, _dst, done, total: progress(done, total)
