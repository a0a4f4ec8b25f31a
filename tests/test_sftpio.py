"""Reads against an SFTP server that answers in smaller pieces than asked (as Go's pkg/sftp does,
32 KiB at most): a short answer must never be taken for the end of the file."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from sandbox.sftpio import holds_exactly, read_exactly, read_prefix, read_range, read_to_eof

PIECE = 32 * 1024


class PieceByPieceSFTP(asyncssh.SFTPServer):
    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        return super().read(file_obj, offset, min(size, PIECE))  # type: ignore[no-any-return, arg-type]


async def test_reads_go_on_past_short_answers(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "blob").write_bytes(data)
    (tmp_path / "small").write_bytes(data[: PIECE - 1])
    host_key, client_key = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
        sftp_factory=PieceByPieceSFTP,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            asyncssh.connect(
                "127.0.0.1",
                port,
                username="tester",
                client_keys=[client_key],
                known_hosts=([host_key.convert_to_public()], [], []),
            ) as conn,
            conn.start_sftp_client() as sftp,
            sftp.open(str(tmp_path / "blob"), "rb") as f,
        ):
            head, size = await read_prefix(f, 200_001)
            assert (head, size) == (data[:200_001], 300_000)
            small, _ = await read_prefix(f, 50_000)
            assert small == data[:50_000]
            assert await read_range(f, 60_000, 250_000) == data[250_000:]
            assert await read_exactly(f, 400_000) == data
            # a file whose size says nothing (/proc's say 0): read to its end, or past the limit
            assert await read_to_eof(f, 400_000) == data
            assert 100_000 < len(await read_to_eof(f, 100_000)) < 300_000
            # whether a file holds exactly some bytes: small and large, the same, shorter, longer
            assert await holds_exactly(f, data)
            assert not await holds_exactly(f, data[:-1]) and not await holds_exactly(f, data + b"x")
            async with sftp.open(str(tmp_path / "small"), "rb") as small_file:
                assert await holds_exactly(small_file, data[: PIECE - 1])
                assert not await holds_exactly(small_file, data[: PIECE - 2])
                assert not await holds_exactly(small_file, data[:PIECE])
    finally:
        server.close()
        await server.wait_closed()
