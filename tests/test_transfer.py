"""Pipelined SFTP upload and download: byte-exact, atomic, with progress."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from sandbox import ConnectionPool, Sandbox, transfer
from sandbox.errors import (
    ConnectionLost,
    FileNotFound,
    FileOperationError,
    InvalidArgument,
    IsADirectory,
    PermissionDenied,
    SpecialFile,
)
from tests.conftest import endpoint_for
from tests.sshd import SSHD


async def test_64_mib_uploads_and_downloads_byte_exact(sb: Sandbox, tmp_path: Path) -> None:
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(64 * 1024 * 1024))
    seen: list[tuple[int, int]] = []
    sent = await sb.upload(source, "up/blob.bin", progress=lambda done, total: seen.append((done, total)))
    assert sent == source.stat().st_size
    assert seen[-1] == (sent, sent) and len(seen) > 10
    remote_sum = (await sb.run("sha256sum up/blob.bin")).stdout.split()[0]
    assert remote_sum == hashlib.sha256(source.read_bytes()).hexdigest()

    back = tmp_path / "back" / "blob.bin"
    received = await sb.download("up/blob.bin", back)
    assert received == sent and back.read_bytes() == source.read_bytes()
    assert [p.name for p in back.parent.iterdir()] == ["blob.bin"]  # no temporary file left


def swap_for_a_link(directory: Path, victim: Path) -> None:
    """What someone who may rename files in `directory` can do mid-copy: put a symlink to `victim`
    where the copy's temp file was."""
    [temp] = [p for p in directory.iterdir() if p.name.endswith(".part")]
    temp.rename(directory / "moved-aside")
    temp.symlink_to(victim)


@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_a_temp_file_swapped_for_a_symlink_mid_copy_never_touches_its_target(
    sb: Sandbox, tmp_path: Path, direction: str
) -> None:
    """The temp file is written and chmod'ed through the handle that made it, never by its name."""
    home = Path(await sb.home())
    remote_dir = home / f"swap-{os.getpid()}"
    await sb.makedirs(str(remote_dir))
    local_dir = tmp_path / "into"
    local_dir.mkdir()
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(24 << 20))
    source.chmod(0o755)
    await sb.upload(source, f"{remote_dir}/blob.bin")  # (the download's source, 0755 too)
    victim = home / f"victim-{os.getpid()}" if direction == "upload" else tmp_path / "victim"
    if direction == "upload":
        await sb.write(str(victim), "mine\n")
        await sb.run(["chmod", "600", str(victim)])
    else:
        victim.write_text("mine\n")
        victim.chmod(0o600)
    swapped = False

    def swap(done: int, total: int) -> None:
        nonlocal swapped
        if not swapped and done < total:
            swap_for_a_link(remote_dir if direction == "upload" else local_dir, victim)
            swapped = True

    if direction == "upload":
        await sb.upload(source, f"{remote_dir}/copy.bin", progress=swap)
    else:
        await sb.download(f"{remote_dir}/blob.bin", local_dir / "copy.bin", progress=swap)
    assert swapped
    assert victim.read_text() == "mine\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    await sb.run(["rm", "-rf", str(remote_dir), str(victim)])


async def test_copies_through_symlinks_copy_what_they_name(sb: Sandbox, tmp_path: Path) -> None:
    """As cp does: a symlink given as the source is copied as the file it names."""
    (tmp_path / "real.txt").write_text("contents\n")
    (tmp_path / "link.txt").symlink_to("real.txt")
    await sb.upload(tmp_path / "link.txt", "uploaded-link.txt")
    assert (await sb.stat("uploaded-link.txt")).type == "file"
    assert await sb.read_text("uploaded-link.txt") == "contents\n"
    await sb.run(["ln", "-sf", "uploaded-link.txt", "remote-link.txt"])
    await sb.download("remote-link.txt", tmp_path / "back.txt")
    assert not (tmp_path / "back.txt").is_symlink() and (tmp_path / "back.txt").read_text() == "contents\n"


async def test_a_directory_is_no_file_to_copy_either_way(sb: Sandbox, tmp_path: Path) -> None:
    """Said once, with what to do instead (not the server's reason after the path again)."""
    await sb.makedirs("a-dir")
    for copy, named in (
        (lambda: sb.download("a-dir", tmp_path / "here"), "a-dir"),
        (lambda: sb.upload(tmp_path, "there"), tmp_path.name),
    ):
        with pytest.raises(IsADirectory, match=r" is a directory; copies are of single files; copy a directory") as e:
            await copy()
        assert str(e.value).count(named) == 1 and str(e.value).endswith("(tether cp -r)"), str(e.value)
    assert not (tmp_path / "here").exists() and not await sb.exists("there")


def make_tree(root: Path) -> None:
    """Nested directories and odd names, a file's symlink, a directory's symlink, a named pipe, a
    read-only directory: what a project directory holds."""
    (root / "src" / "deep er").mkdir(parents=True)
    (root / "src" / "app.py").write_text("print('hi')\n")
    (root / "src" / "deep er" / "it's $(x).txt").write_text("odd\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o750)
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    (root / "link.txt").symlink_to("run.sh")  # copied as the file it names
    (root / "src-link").symlink_to("src")  # not entered
    os.mkfifo(root / "pipe")  # not copied
    (root / "frozen").mkdir()
    (root / "frozen" / "kept.txt").write_text("kept\n")
    (root / "frozen").chmod(0o555)
    (root / ".git" / "objects").mkdir(parents=True)  # (a hidden directory: under its own name, dot and all)
    (root / ".git" / "objects" / "o1").write_text("object\n")
    (root / "git").mkdir()
    (root / "git" / "o1").write_text("not the object\n")


def tree_of(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Relative path -> (kind, mode, contents) of everything under `root`."""
    found = {}
    for top, names, files in os.walk(root):
        for name in names + files:
            path = Path(top) / name
            info = path.lstat()
            kind = "dir" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode) else "other"
            found[str(path.relative_to(root))] = (
                kind,
                stat.S_IMODE(info.st_mode),
                path.read_bytes() if kind == "file" else b"",
            )
    return found


async def test_a_directory_goes_both_ways_whole_as_cp_r(sb: Sandbox, tmp_path: Path) -> None:
    source = tmp_path / "project"
    make_tree(source)
    seen: list[tuple[int, int]] = []
    remote = f"{await sb.home()}/tree-{os.getpid()}"
    sent = await sb.upload_dir(source, remote, progress=lambda done, total: seen.append((done, total)))
    regular = {k: v for k, v in tree_of(source).items() if v[0] != "other"}
    expected = {k: v for k, v in regular.items() if k != "src-link"}
    expected["link.txt"] = ("file", 0o750, b"#!/bin/sh\n")  # (the file it names)
    assert sent.files == 8 and sent.bytes == sum(len(c) for _, _, c in expected.values())
    assert sorted(sent.skipped) == [
        f"{source / 'pipe'} (a special file)",
        f"{source / 'src-link'} (a symlinked directory)",
    ]
    assert seen[-1] == (sent.bytes, sent.bytes)
    assert tree_of(Path(remote)) == expected  # (the sandbox is on this machine: looked at directly)
    back = tmp_path / "back"
    back.mkdir()
    got = await sb.download_dir(remote, back)  # an existing directory: into it, under the name
    assert (got.files, got.bytes, got.skipped) == (sent.files, sent.bytes, [])
    assert tree_of(back / f"tree-{os.getpid()}") == expected
    again = await sb.upload_dir(source, remote)  # into what is there now, as cp -r does
    assert again.files == 8 and tree_of(Path(remote) / "project") == expected
    with pytest.raises(InvalidArgument, match="is not a directory"):
        await sb.download_dir(f"{remote}/run.sh", tmp_path / "x")
    # "dir/.": what it holds, into the directory given (as cp -r reads it), which keeps its mode
    contents = tmp_path / "contents"
    contents.mkdir(mode=0o700)
    assert (await sb.download_dir(f"{remote}/src/.", contents)).files == 2
    assert sorted(p.name for p in contents.iterdir()) == ["app.py", "deep er"]
    assert stat.S_IMODE(contents.stat().st_mode) == 0o700
    await sb.run(["mkdir", "-m", "700", f"{remote}-into"])
    await sb.upload_dir(f"{source}/src/.", f"{remote}-into")
    assert (await sb.stat(f"{remote}-into")).mode == 0o700 and await sb.exists(f"{remote}-into/deep er")
    # a file where a directory is (or the other way round) is refused, not put inside it
    (source / "src" / "app.py").unlink()
    (source / "src" / "app.py").mkdir()
    with pytest.raises(FileOperationError, match=r"app\.py is in the way: a directory goes there"):
        await sb.upload_dir(source, remote)
    (source / "src" / "app.py").rmdir()
    (source / "src" / "app.py").write_text("again\n")
    await sb.run(["sh", "-c", 'rm "$1/src/app.py" && mkdir "$1/src/app.py"', "sh", f"{remote}/project"])
    with pytest.raises(IsADirectory):
        await sb.upload_dir(source, remote)
    # a directory whose entries cannot be looked at: named, not copied empty in silence
    await sb.run(
        ["sh", "-c", 'mkdir -p "$1/closed" && touch "$1/closed/inside" && chmod 600 "$1/closed"', "sh", remote]
    )
    closed = await sb.download_dir(remote, tmp_path / "again")
    assert f"{remote}/closed (a directory its owner may not search)" in closed.skipped
    assert not (tmp_path / "again" / "closed").exists()
    # the sandbox's symlinks: to a file, copied as it; to a directory or to nothing, named
    await sb.run(["sh", "-c", 'cd "$1" && ln -s run.sh rlink && ln -s src rdir && ln -s nowhere rdead', "sh", remote])
    linked = await sb.download_dir(remote, tmp_path / "linked")
    assert (tmp_path / "linked" / "rlink").read_text() == "#!/bin/sh\n"
    assert not (tmp_path / "linked" / "rdir").exists() and not (tmp_path / "linked" / "rdead").exists()
    assert {
        f"{remote}/rdir (a symlink to a directory or a special file)",
        f"{remote}/rdead (a symlink to nothing)",
    } <= set(linked.skipped)
    await sb.run(["sh", "-c", 'chmod -R u+w "$1" && rm -rf "$1" "$1-into"', "sh", remote])
    for path in (source, back):
        subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)


async def test_a_file_that_fails_to_read_gives_back_what_its_copy_held(
    sb: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read error mid-upload (EIO, as sysfs gives for some files): the copy fails, and the pieces
    in flight it held are given back; else a sandbox's copies would all hang once eight had failed."""
    source = tmp_path / "flaky.bin"
    source.write_bytes(b"x" * 5000)

    class Failing:
        def __init__(self, *_: object) -> None:
            pass

        def __enter__(self) -> Failing:
            return self

        def __exit__(self, *_: object) -> None:
            pass

        def read(self, _size: int) -> bytes:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(transfer, "open", Failing, raising=False)
    for _ in range(transfer.PIECES_IN_FLIGHT + 1):  # (pieces not given back: the ninth would wait for ever)
        with pytest.raises(OSError, match="Input/output error"):
            await asyncio.wait_for(sb.upload(source, "flaky.bin"), 10)
    monkeypatch.undo()
    assert await asyncio.wait_for(sb.upload(source, "flaky.bin"), 10) == 5000
    assert not [n for n in (await sb.run("ls -a")).stdout.split() if n.endswith(".part")]


async def test_upload_keeps_the_local_mode(sb: Sandbox, tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho uploaded\n")
    script.chmod(0o750)
    await sb.upload(script, "bin/run.sh")
    assert (await sb.stat("bin/run.sh")).mode == 0o750
    assert (await sb.run("./bin/run.sh")).stdout == "uploaded\n"


async def test_a_file_copied_over_another_keeps_the_others_mode_as_cp_does(sb: Sandbox, tmp_path: Path) -> None:
    """A 0600 secret replaced by a copy of a 0644 file stays 0600, either way; a read-only file is
    refused, as cp refuses to write it (the sandbox user is not root)."""
    public = tmp_path / "public.env"
    public.write_text("PUBLIC=1\n")
    public.chmod(0o644)
    await sb.write("secret.env", "TOKEN=old\n")
    await sb.run("chmod 600 secret.env")
    await sb.upload(public, "secret.env")
    assert (await sb.stat("secret.env")).mode == 0o600 and await sb.read_text("secret.env") == "PUBLIC=1\n"
    await sb.run("chmod 644 secret.env")
    local_secret = tmp_path / "secret.env"
    local_secret.write_text("TOKEN=mine\n")
    local_secret.chmod(0o600)
    await sb.download("secret.env", local_secret)
    assert stat.S_IMODE(local_secret.stat().st_mode) == 0o600 and local_secret.read_text() == "PUBLIC=1\n"
    await sb.run("chmod 444 secret.env")
    with pytest.raises(PermissionDenied, match="mode 0444"):
        await sb.upload(public, "secret.env")
    assert await sb.read_text("secret.env") == "PUBLIC=1\n" and (await sb.stat("secret.env")).mode == 0o444
    assert not [n for n in (await sb.run("ls -a")).stdout.split() if n.endswith(".part")]
    await sb.run("rm -f secret.env")


async def test_a_download_gives_new_files_the_umask_asked_for_and_leaves_the_processs(
    sb: Sandbox, tmp_path: Path
) -> None:
    """tether cp between sandboxes stages files here with no umask, so modes arrive as they left,
    without changing the process's umask (shells the local provider starts meanwhile inherit it)."""
    await sb.run("mkdir -p shared/sub && echo x > shared/sub/f && chmod 664 shared/sub/f && chmod 775 shared/sub")
    before = os.umask(0o022)
    seen: set[int] = set()  # (the process's umask while the copies run: what a shell started then gets)

    def meanwhile(_done: int, _total: int) -> None:
        seen.add(transfer.current_umask())

    try:
        await sb.download("shared/sub/f", tmp_path / "plain")
        await sb.download("shared/sub/f", tmp_path / "exact", meanwhile, umask=0)
        await sb.download_dir("shared", tmp_path / "tree", meanwhile, umask=0)
    finally:
        os.umask(before)
    assert seen == {0o022}
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "exact").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "tree/sub").stat().st_mode) == 0o775
    assert stat.S_IMODE((tmp_path / "tree/sub/f").stat().st_mode) == 0o664
    await sb.run("rm -rf shared")


async def test_an_upload_to_a_directory_goes_into_it_as_cp_does(sb: Sandbox, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("n\n")
    await sb.run("mkdir -p existing")
    await sb.upload(notes, "existing")  # an existing directory
    await sb.upload(notes, "fresh/")  # a trailing slash: a directory, created
    await sb.upload(notes, "")  # the current directory
    listing = (await sb.run("ls -p existing fresh .")).stdout
    assert (await sb.read_text("existing/notes.txt")) == (await sb.read_text("fresh/notes.txt")) == "n\n"
    assert (await sb.read_text("notes.txt")) == "n\n"
    assert ".part" not in listing, listing
    # and back: a download into a local directory keeps the remote name
    back = tmp_path / "back"
    back.mkdir()
    await sb.download("fresh/notes.txt", back)
    assert (back / "notes.txt").read_text() == "n\n"
    # ... or into one that a trailing slash names, created
    await sb.download("fresh/notes.txt", f"{tmp_path}/made/")
    assert (tmp_path / "made" / "notes.txt").read_text() == "n\n"


async def test_files_that_say_they_are_empty_are_copied_whole(sb: Sandbox, tmp_path: Path) -> None:
    """/proc's files have size 0 and content all the same."""
    version = Path("/proc/version").read_bytes()
    assert await sb.upload("/proc/version", "proc-version") == len(version)
    assert (await sb.read_text("proc-version")).encode() == version
    back = tmp_path / "version"
    assert await sb.download("/proc/version", back) == len(version)
    assert back.read_bytes() == version
    (tmp_path / "empty").write_bytes(b"")  # (and an empty file is still empty)
    assert await sb.upload(tmp_path / "empty", "empty") == 0 and await sb.download("empty", back) == 0
    assert back.read_bytes() == b""


async def test_an_upload_replaces_what_a_symlink_names_and_never_a_pipe(sb: Sandbox, tmp_path: Path) -> None:
    local = tmp_path / "new.txt"
    local.write_text("new\n")
    await sb.run(
        "rm -rf up-links && mkdir up-links && (cd up-links && echo old > real && ln -s real link && mkfifo pipe)"
    )
    await sb.upload(local, "up-links/link")  # as write does: the file the link names gets the content
    assert (await sb.stat("up-links/link")).symlink_target == "real"
    assert await sb.read_text("up-links/real") == "new\n"
    with pytest.raises(SpecialFile, match="named pipe"):
        await sb.upload(local, "up-links/pipe")
    assert (await sb.run("test -p up-links/pipe && ls up-links")).stdout.split() == ["link", "pipe", "real"]


async def test_failed_transfers_leave_nothing_half_written(sb: Sandbox, tmp_path: Path) -> None:
    local_dir = tmp_path / "local"
    with pytest.raises(FileNotFound):
        await sb.download("no/such/file", local_dir / "out.bin")
    assert not local_dir.exists()  # (not even the directory it would have gone into)
    with pytest.raises(FileNotFound):
        await sb.upload(tmp_path / "missing.bin", "x.bin")
    await sb.makedirs("ro")
    await sb.run("chmod 555 ro")
    local = tmp_path / "small.txt"
    local.write_text("x")
    try:
        with pytest.raises(Exception, match="permission denied"):
            await sb.upload(local, "ro/small.txt")
        assert await sb.list_dir("ro") == []
    finally:
        await sb.run("chmod 755 ro")


async def test_transfers_in_progress_are_readable_by_their_owner_alone(
    sshd: SSHD, client_key: Path, pool: ConnectionPool, tmp_path: Path
) -> None:
    """The final mode is given once every byte is there: a secret file is never world-readable.
    (The box's files are watched from this machine's disk: the sshd here, whatever TETHER_TEST_SSH says.)"""
    async with Sandbox(endpoint_for(sshd, client_key), pool=pool) as sb:
        await _watch_modes_while_transferring(sb, tmp_path)


async def _watch_modes_while_transferring(sb: Sandbox, tmp_path: Path) -> None:
    source = tmp_path / "secret.bin"
    source.write_bytes(os.urandom(8 * 1024 * 1024))
    source.chmod(0o644)
    remote_dir = await sb.resolve("private-up")
    await sb.makedirs(remote_dir)
    modes: set[int] = set()

    def look_remote(done: int, total: int) -> None:  # sshd is on this machine: look at its disk
        modes.update(p.stat().st_mode & 0o777 for p in Path(remote_dir).glob(".*.part"))

    await sb.upload(source, f"{remote_dir}/secret.bin", progress=look_remote)
    assert modes == {0o600}
    assert (await sb.stat(f"{remote_dir}/secret.bin")).mode == 0o644

    modes.clear()
    back = tmp_path / "back"
    back.mkdir()

    def look_local(done: int, total: int) -> None:
        modes.update(p.stat().st_mode & 0o777 for p in back.glob(".*.part"))

    await sb.download(f"{remote_dir}/secret.bin", back / "secret.bin", progress=look_local)
    assert modes == {0o600} and (back / "secret.bin").stat().st_mode & 0o777 == 0o644


async def test_an_upload_cut_off_by_a_lost_connection_leaves_no_partial_file(
    own_sshd: SSHD, client_key: Path, pool: ConnectionPool, tmp_path: Path
) -> None:
    server = own_sshd
    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        target = f"{await box.home()}/cut-{os.getpid()}"
        await box.makedirs(target)
        source = tmp_path / "big.bin"
        source.write_bytes(os.urandom(64 * 1024 * 1024))

        def cut(done: int, total: int) -> None:
            if done > total // 4:
                server.kill_connections()

        with pytest.raises(ConnectionLost):
            await box.upload(source, f"{target}/big.bin", progress=cut)
        for _ in range(100):
            if not list(Path(target).iterdir()):
                break
            await asyncio.sleep(0.1)
        assert list(Path(target).iterdir()) == []
        await box.run(["rm", "-rf", target])


async def test_a_copy_whose_sftp_session_ended_says_so_and_the_next_one_works(
    own_sshd: SSHD, client_key: Path, pool: ConnectionPool, tmp_path: Path
) -> None:
    """sftp-server gone mid-copy (killed, or out of memory): ConnectionLost, not a file's error;
    and the sandbox's next copy opens a new session."""
    async with Sandbox(endpoint_for(own_sshd, client_key), pool=pool) as box:
        source = tmp_path / "big.bin"
        source.write_bytes(os.urandom(64 << 20))
        await box.upload(source, "first.bin")  # (a session is open)

        def kill_sftp_server(done: int, total: int) -> None:
            if done > total // 4:
                found = subprocess.run(["pgrep", "-u", own_sshd.account.name, "sftp-server"], capture_output=True)
                for pid in found.stdout.split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)

        with pytest.raises(ConnectionLost):
            await box.upload(source, "cut.bin", progress=kill_sftp_server)
        assert await box.upload(source, "again.bin") == 64 << 20
        assert (await box.run(["cmp", "again.bin", "first.bin"])).exit_code == 0
        await box.run(["rm", "-f", "first.bin", "again.bin"])


async def test_copies_cut_off_by_lost_connections_leave_the_next_copies_working(
    own_sshd: SSHD, client_key: Path, pool: ConnectionPool, tmp_path: Path
) -> None:
    """A copy cut off mid-way (the connection killed) gives back every piece it held, the pieces
    whose turn had not come among them: the sandbox's next copies go on, not wait for good."""
    async with Sandbox(endpoint_for(own_sshd, client_key), pool=pool) as box:
        source = tmp_path / "big.bin"
        source.write_bytes(os.urandom(64 << 20))
        await box.upload(source, "whole.bin")

        def cut(done: int, total: int) -> None:
            if done > total // 8:
                own_sshd.kill_connections()

        for _ in range(2):
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(box.upload(source, "cut.bin", progress=cut), 60)
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(box.download("whole.bin", tmp_path / "cut.bin", progress=cut), 60)
        assert await asyncio.wait_for(box.upload(source, "again.bin"), 60) == 64 << 20
        await asyncio.wait_for(box.download("again.bin", tmp_path / "back.bin"), 60)
        assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
        await box.run(["rm", "-f", "whole.bin", "cut.bin", "again.bin"])


async def test_local_links_are_followed_and_pipes_and_devices_refused(sb: Sandbox, tmp_path: Path) -> None:
    """cp's rules on this machine's side: a download through a symlink replaces the file it names;
    a pipe or a device is never replaced by a plain file (nor read: /dev/zero never ends)."""
    await sb.write("remote.txt", "new\n")
    (tmp_path / "target").write_text("old\n")
    (tmp_path / "link").symlink_to("target")
    os.mkfifo(tmp_path / "fifo")
    await sb.download("remote.txt", tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target").read_text() == "new\n"
    with pytest.raises(SpecialFile, match="named pipe"):
        await asyncio.wait_for(sb.download("remote.txt", tmp_path / "fifo"), 10)
    assert stat.S_ISFIFO((tmp_path / "fifo").stat().st_mode)
    for special in (tmp_path / "fifo", Path("/dev/zero")):
        with pytest.raises(SpecialFile):
            await asyncio.wait_for(sb.upload(special, "special"), 10)
    assert not await sb.exists("special")
