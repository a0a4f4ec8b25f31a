"""The local provider end to end through the Python API: an embedded SSH server, no sshd, no root."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pydantic
import pytest

import providers
from providers import Fleet, Request, Unsupported
from providers.local_server import _WorkdirSFTPServer, sandbox_root
from sandbox import Sandbox, search
from sandbox.connect import dial
from sandbox.errors import ConnectTimeout, FileOperationError, InvalidArgument, IsADirectory, SandboxEnded
from sandbox.hostkeys import HostKeyPins
from sandbox.shell import BOOT_COMMAND
from sandbox.state import StateStore
from tests.mcp_support import tether
from tests.processes import fake_nvidia_smi, leaf_sleep, running, wait_until_gone, wait_until_running
from tests.sshd import ensure_account, is_root

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    """A fleet on the implicit pools (local first), closed after the test."""
    made = Fleet(config={})
    yield made
    await made.close()


async def test_local_sandbox_end_to_end(tmp_path: Path, fleet: Fleet) -> None:
    box = await fleet.create(Request(provider="local", name="e2e-local"))
    assert box.record.external_id == "user-managed" and box.record.status == "running"
    work = sandbox_root(box.id) / "work"
    assert await box.cwd() == str(work)
    r = await box.run("pwd; echo hi > made.txt; cd sub 2>/dev/null || mkdir sub && cd sub; pwd")
    assert r.stdout.splitlines() == [str(work), f"{work}/sub"]
    assert (work / "made.txt").read_text() == "hi\n"
    await box.write("../notes.md", "# notes\nTODO: ship\n")
    assert (await box.edit(f"{work}/notes.md", "TODO", "DONE")).replacements == 1
    assert (await box.grep("DONE", str(work))).text == f"{work}/notes.md"
    job = await box.start_job("sleep 1000")
    capacity = await box.capacity()
    assert capacity.cpus == os.cpu_count() and capacity.memory_mb and capacity.disk_free_gb
    with pytest.raises(Unsupported, match="supportsPauseResume: false"):
        await box.pause()
    with pytest.raises(Unsupported, match="supportsFsSnapshot: false"):
        await box.snapshot()
    event = await box.destroy()
    assert (event.billing_model, event.estimated_usd, event.gpu_seconds) == ("fixed", 0.0, 0.0)
    assert not sandbox_root(box.id).exists()
    assert job.pid
    for _ in range(100):  # its job died with it (SIGKILL is delivered asynchronously)
        if not running(job.pid):
            break
        await asyncio.sleep(0.05)
    assert not running(job.pid)
    assert await fleet.destroy(box.id) == event  # idempotent: the same single event


async def test_a_root_sandbox_copying_over_another_users_file_leaves_it_theirs(tmp_path: Path, fleet: Fleet) -> None:
    """As cp does (it writes in place): a root agent's copy over an app's 0600 .env keeps it the
    app's, readable by the app alone, instead of root's, which the app could no longer read."""
    if not is_root():
        pytest.fail("the local provider's user must be root to own files for others (CI runs as root)")
    box = await fleet.create(Request(provider="local", name="root-copies"))
    try:
        secret = sandbox_root(box.id) / "work" / "app.env"
        secret.write_text("TOKEN=old\n")
        secret.chmod(0o600)
        os.chown(secret, 1, 1)
        new = tmp_path / "new.env"
        new.write_text("TOKEN=new\n")
        new.chmod(0o644)
        await box.upload(new, "app.env")
        info = secret.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (1, 1, 0o600)
        assert secret.read_text() == "TOKEN=new\n"
    finally:
        await box.destroy()


async def test_sizing_the_local_machine_cannot_take_is_said_not_silently_dropped(fleet: Fleet, tmp_path: Path) -> None:
    heard: list[str] = []

    async def progress(message: str, fraction: float | None = None) -> None:
        heard.append(message)

    sized = await fleet.create(Request(provider="local", cpu=64, memory_mb=4096), progress)
    assert "note: local uses the machine as it is; cpu, memory_mb not applied" in heard, heard
    heard.clear()
    plain = await fleet.create(Request(provider="local"), progress)
    assert heard and not [m for m in heard if m.startswith("note:")], heard
    await sized.destroy()
    await plain.destroy()
    # a GPU asked of a machine with none (a pool that says it has one): none given, none billed
    said_gpu = Fleet(
        config={
            "pools": [
                {
                    "name": "gpu-here",
                    "provider": "local",
                    "runtime_provides": {"runtimeKinds": [], "requirementKinds": ["gpu"]},
                }
            ]
        }
    )
    try:
        heard.clear()
        with pytest.MonkeyPatch.context() as no_gpu:  # (no nvidia-smi to be found, whatever this machine has)
            no_gpu.setenv("PATH", str(tmp_path))
            gpu = await said_gpu.create(Request(gpu="a100"), progress)
        record = said_gpu.ledger.get(gpu.id)
        assert "note: local uses the machine as it is; gpu not applied" in heard, heard
        assert (record.gpu_type, record.gpu_count) == (None, 0)
        assert (await gpu.destroy()).gpu_seconds == 0
        # ... and a machine with one (nvidia-smi answers): given, and billed
        fake_nvidia_smi(tmp_path)
        heard.clear()
        with pytest.MonkeyPatch.context() as has_gpu:
            has_gpu.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
            gpu = await said_gpu.create(Request(gpu="a100"), progress)
        assert not [m for m in heard if m.startswith("note:")], heard
        assert said_gpu.ledger.get(gpu.id).gpu_type == "a100"
        assert (await gpu.destroy()).gpu_seconds > 0
    finally:
        await said_gpu.close(teardown_created=True)


async def test_each_local_sandbox_has_its_own_dir_and_jobs(fleet: Fleet) -> None:
    a = await fleet.create(Request(provider="local"))
    b = await fleet.create(Request(provider="local"))
    await a.start_job("sleep 30")
    assert len(await a.job_list()) == 1 and await b.job_list() == []
    marker = f"tether-regrouped-{os.getpid()}"  # a job's child in a session of its own
    await a.start_job(f"setsid sh -c 'sleep 1000' {marker}")
    await wait_until_running(marker)
    assert await a.cwd() != await b.cwd()
    # a removed cwd falls back to the sandbox's own work dir, not the user's home
    work = await a.cwd()
    await a.run("mkdir doomed && cd doomed")
    await a.exec_raw(["rmdir", f"{work}/doomed"], cwd=work)
    gone = await a.run("pwd")
    assert gone.stdout == f"{work}\n" and "is gone" in gone.stderr
    # the embedded SFTP server refuses to open a directory with a bare failure: still named
    await a.makedirs("a-dir")
    for attempt in (a.read("a-dir"), a.edit("a-dir", "x", "y")):
        with pytest.raises(IsADirectory, match="glob"):
            await attempt
    await a.destroy()  # stops its jobs, with whatever left their process group
    await b.destroy()
    assert await wait_until_gone(marker) == []


async def test_create_from_the_public_api() -> None:
    async with await providers.create("local", env={"GREETING": "hello"}) as sb:
        assert (await sb.run('echo "$GREETING from $TETHER_SANDBOX"')).stdout == f"hello from {sb.id}\n"
        sandbox_id = sb.id
    record = providers.default_fleet().ledger.get(sandbox_id)
    assert record.status == "terminated" and record.request["env_names"] == ["GREETING"]
    assert "hello" not in json.dumps(record.request)  # env values never reach the ledger


async def test_the_public_api_refuses_bad_arguments_by_name() -> None:
    before = providers.default_fleet().ledger.list(include_terminated=True)
    for args, options, problem in (
        (("bogus",), {}, "unknown provider 'bogus'; known: local"),
        (("local",), {"cpu": -1}, "invalid arguments to create: cpu: Input should be greater than 0"),
        (("local",), {"name": "sb-0123456789"}, "has the form of a sandbox id"),
        # a provider's options are the ones it reads: a typo is not silently ignored
        (("local",), {"host": "gpu-box"}, "the local provider has no option 'host' (it takes none)"),
        (("ssh",), {"host": "gpu-box", "keypath": "~/k"}, "has no option 'keypath' (it takes host, user, port"),
        (("ssh",), {"host": "127.0.0.1", "port": "twenty-two"}, "cannot attach to 127.0.0.1: port: Input should be"),
        (("ssh",), {"host": "me@127.0.0.1:2222", "port": 22}, "me@127.0.0.1:2222 says port 2222, and port says 22"),
        (("ssh",), {"host": "me@127.0.0.1", "user": "you"}, "says user me, and user says you: give one"),
        (("ssh",), {"host": "127.0.0.1", "port": 0}, "cannot attach to 127.0.0.1: port: Input should be greater"),
    ):
        with pytest.raises(InvalidArgument) as refused:
            await providers.create(*args, **options)
        assert problem in str(refused.value) and "pydantic" not in str(refused.value)
    assert providers.default_fleet().ledger.list(include_terminated=True) == before  # nothing was created


async def test_tethers_own_credentials_do_not_reach_the_sandbox(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Provider keys, and the variables config.toml names for channel secrets; a config broken
    while sandboxes run (an edit half done) stops no new shell and lets no secret through."""
    config = tmp_path / "config.toml"
    config.write_text('[[channels]]\nkind = "webhook"\nurl_env = "HOOK_URL"\nsecret_env = "HOOK_SECRET"\n')
    monkeypatch.setenv("TETHER_CONFIG", str(config))
    monkeypatch.setenv("RUNPOD_API_KEY", "rp-secret-value")
    monkeypatch.setenv("HOOK_SECRET", "hook-secret-value")
    async with await providers.create("local") as sb:
        out = (await sb.run("env")).stdout
        assert "rp-secret-value" not in out and "RUNPOD_API_KEY" not in out
        assert "hook-secret-value" not in out
        for broken in ("[[channels]\n", 'channels = "not a table"\n'):
            config.write_text(broken)
            await sb.close()  # (new sessions: each reads the config afresh)
            out = (await sb.run("env", timeout=10)).stdout
            assert "hook-secret-value" not in out and "rp-secret-value" not in out


NONROOT_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, shutil
    import providers

    async def main():
        report = {"uid": os.getuid(), "sshd_on_path": shutil.which("sshd")}
        async with await providers.create("local", name="nonroot") as sb:
            report["whoami"] = (await sb.run("id -u")).stdout.strip()
            await sb.write("app/main.py", "print('hello from tether')\\n")
            await sb.edit("app/main.py", "hello", "greetings")
            report["python"] = (await sb.run("python3 app/main.py")).stdout
            report["glob"] = [os.path.basename(f) for f in (await sb.glob("**/*.py")).files]
            # the server's environment (tether's credentials) is not the sandbox's to read
            peek = await sb.run(f"cat /proc/{os.getpid()}/environ")
            report["environ_read"] = "TETHER_STATE_DIR=" in peek.stdout
            report["environ_refused"] = peek.exit_code != 0 and "Permission denied" in peek.stderr
            job = await sb.start_job("echo job-ran")
            report["job"] = (await sb.job_output(job.id, wait_ms=5000)).stdout
            report["sandbox_dir_exists"] = os.path.isdir(os.path.join(os.environ["TETHER_STATE_DIR"], "local"))
            # what a module cache leaves: directories without write permission
            await sb.run("mkdir -p cache/mod/sub && touch cache/mod/sub/f && chmod -R a-w cache")
            root = os.path.dirname(await sb.resolve("."))
        report["removed"] = not os.path.exists(root)
        print(json.dumps(report))

    asyncio.run(main())
""")


def nonroot_python() -> Path:
    """A Python a non-root account can run, with the engine's dependencies (root's pyenv sits in /root,
    mode 0700): a venv from Debian's python3 in /opt, built once per machine."""
    base = Path("/opt/tether-test")
    venv = base / f"venv-asyncssh{asyncssh.__version__}-pydantic{pydantic.VERSION}"
    python = venv / "bin" / "python"
    if not python.exists():
        system_python = shutil.which("python3", path="/usr/bin:/bin")
        assert system_python, "Debian's python3 is needed to run tether as a non-root user"
        base.mkdir(parents=True, exist_ok=True)
        subprocess.run([system_python, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                f"asyncssh=={asyncssh.__version__}",
                f"pydantic=={pydantic.VERSION}",
            ],
            check=True,
        )
        subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
    return python


def test_local_provider_as_a_non_root_user_without_sshd(tmp_path: Path) -> None:
    if is_root():
        account = ensure_account("tether-local", "/bin/bash", {".profile": ""})
        python = nonroot_python()
        state = Path(f"/tmp/tether-local-state-{os.getpid()}")
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(mode=0o700)
        os.chown(state, account.uid, account.gid)
        prefix = ["runuser", "-u", account.name, "--"]
        home = str(account.home)
    else:
        python, state, prefix, home = Path(sys.executable), tmp_path / "state", [], str(Path.home())
    # PATH without the sbin directories: no sshd anywhere a program would look
    path = ":".join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if os.path.isdir(p))
    env = {
        "PATH": path,
        "HOME": home,
        "SHELL": "/bin/bash",
        "TETHER_STATE_DIR": str(state),
        "PYTHONPATH": str(ROOT),
        "LANG": "C.UTF-8",
    }
    try:
        result = subprocess.run(
            [*prefix, "env", "-i", *(f"{k}={v}" for k, v in env.items()), str(python), "-c", NONROOT_SCRIPT],
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/tmp",
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["uid"] != 0 or not is_root()
        assert report["sshd_on_path"] is None
        assert report["whoami"] == str(report["uid"])
        assert report["python"] == "greetings from tether\n"
        assert report["glob"] == ["main.py"]
        assert report["job"] == "job-ran\n"
        assert report["environ_read"] is False and report["environ_refused"] is True
        assert report["removed"], "destroy left the sandbox's directory behind"
    finally:
        if is_root():
            shutil.rmtree(state, ignore_errors=True)


async def test_the_embedded_server_sends_no_empty_ignore_packets(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """asyncssh puts an empty MSG_IGNORE before every packet it sends (a CBC defence); the embedded
    server, like tether's client, leaves them out: half the packets to encrypt and decrypt."""
    async with await providers.create("local") as sb:
        asyncssh.set_debug_level(3)  # packet-level logs: each packet sent or received is named
        caplog.set_level(logging.DEBUG, logger="asyncssh")
        try:
            conn = await dial(sb.endpoint, HostKeyPins(StateStore(tmp_path / "pins.db")))
            caplog.clear()  # (during the login, before dial streamlines it, the client still sends them)
            async with conn, conn.start_sftp_client() as sftp:
                await sftp.stat(".")
        finally:
            asyncssh.set_debug_level(1)
    received = [r.getMessage() for r in caplog.records if "Received MSG_" in r.getMessage()]
    assert any("MSG_CHANNEL_DATA" in m for m in received), received  # (the log does show packets)
    assert not [m for m in received if "MSG_IGNORE" in m]  # by the server from the client, or back


async def test_the_ledger_shows_where_the_sandbox_is_served_now() -> None:
    """A local sandbox's SSH server lives in the process serving it: one opened again elsewhere has
    a new port, and `tether info` / sandbox_info must show that one, not the first process's."""
    first = Fleet(config={})
    try:
        box = await first.create(Request(provider="local", keep=True))
        served = dict(first.ledger.get(box.id).endpoint or {})
        first.ledger.set_endpoint(box.id, {**served, "port": 1})  # as left by a process that has exited
        second = Fleet(config={})
        try:
            again = await second.get(box.id)
            assert (await again.run("echo here")).stdout == "here\n"
            assert second.ledger.get(box.id).endpoint == {**served, "port": again.endpoint.port}
            assert again.endpoint.port != 1
        finally:
            await second.close()
        await box.destroy()
    finally:
        await first.close()


async def test_asking_where_a_sandbox_in_use_is_served_connects_to_nothing(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fleet asks where a local sandbox is served at every ledger recheck (nearly every call):
    while host.json is unchanged and a connection reaches the sandbox, that is a stat and a pid
    check, not a connection to the daemon on the event loop."""
    from providers import fleet as fleet_module
    from providers import local_server

    monkeypatch.setattr(fleet_module, "LEDGER_RECHECK_SECONDS", 0)
    box = await fleet.create(Request(provider="local"))
    await box.run("true")
    looked: list[int] = []
    daemon_state = local_server.daemon_state
    monkeypatch.setattr(local_server, "daemon_state", lambda: looked.append(1) or daemon_state())
    for _ in range(5):
        assert await fleet.get(box.id) is box
        assert (await box.run("echo here")).stdout == "here\n"
    assert looked == []
    await box.destroy()


class _SmallDisk(io.RawIOBase):
    """A file on a disk that takes at most 5 bytes per write and holds `room` bytes in all: on a
    full disk, write(2) writes what fits and says how much; only the next one fails (ENOSPC)."""

    def __init__(self, room: int) -> None:
        self.data, self.room, self.at = bytearray(), room, 0

    def writable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.at = offset
        return offset

    def write(self, b: bytes) -> int:  # type: ignore[override]
        if len(self.data) >= self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        taken = bytes(b[: min(5, self.room - len(self.data))])
        self.data[self.at : self.at + len(taken)] = taken
        self.at += len(taken)
        return len(taken)


def test_the_embedded_sftp_server_writes_all_or_fails() -> None:
    """asyncssh's own SFTP write takes one write's word for it: on a full disk a write reported
    success and the file kept only part of it."""
    server = object.__new__(_WorkdirSFTPServer)  # (write uses nothing of the session)
    disk = _SmallDisk(room=100)
    assert server.write(disk, 0, b"twenty-three bytes long") == 23
    assert bytes(disk.data) == b"twenty-three bytes long"
    with pytest.raises(OSError) as failed:
        server.write(_SmallDisk(room=12), 0, b"twenty-three bytes long")
    assert failed.value.errno == errno.ENOSPC


async def run_in_background(box: Sandbox, before: str = "") -> tuple[str, asyncio.Future[object]]:
    """A `run` of a marked sleep, as a task, once its process is seen: (marker, task)."""
    marker = leaf_sleep()
    running = asyncio.ensure_future(box.run(f"{before}{marker}", timeout=120))
    await wait_until_running(marker, 10)
    return marker, running


async def test_destroying_a_sandbox_from_another_process_stops_what_runs_in_it(fleet: Fleet) -> None:
    """`tether down` while an MCP server runs a command in the sandbox: the command ends with it,
    not on, as this user's process, after its directory is gone."""
    box = await fleet.create(Request(provider="local", keep=True))
    marker, running = await run_in_background(box, "cd /tmp && ")  # (its cwd: not the sandbox's)
    down = await asyncio.to_thread(tether, "down", box.id)
    assert down.returncode == 0, down.stderr
    assert await wait_until_gone(marker) == []
    done, _ = await asyncio.wait([running], timeout=30)
    assert done, "the run did not end with its sandbox"
    assert isinstance(running.exception(), SandboxEnded), running.exception()  # (the end, not a dead shell)


async def test_a_copy_cut_short_by_a_destroy_from_another_process_says_the_sandbox_ended(
    fleet: Fleet, tmp_path: Path
) -> None:
    """`tether cp` while `tether down` ends the sandbox: the copy fails saying so, not that its
    target path does not exist (the sandbox's directory went with it)."""
    box = await fleet.create(Request(provider="local", keep=True))
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(16 << 20))
    ended: list[int] = []

    def down_once(sent: int, total: int) -> None:  # (blocks the loop meanwhile: the copy waits for it)
        if not ended:
            ended.append(tether("down", box.id).returncode)

    with pytest.raises(SandboxEnded, match="ended while this ran"):
        await box.upload(source, "big.bin", progress=down_once)
    assert ended == [0]


async def test_a_file_put_where_none_can_be_made_says_so(fleet: Fleet, tmp_path: Path) -> None:
    """/proc answers a new file's creation with "no such file" (to root; others are refused): the
    copy and the write say that the directory makes no files, not that the path is missing."""
    async with await fleet.create(Request(provider="local")) as box:
        source = tmp_path / "x.txt"
        source.write_text("x")
        refused = "no new file can be made in /proc" if is_root() else "is not writable"
        for put in (lambda: box.upload(source, "/proc/version"), lambda: box.write("/proc/tether-probe", "x")):
            with pytest.raises(FileOperationError, match=refused):
                await put()


async def test_destroying_a_sandbox_stops_its_running_command_and_says_why(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = await fleet.create(Request(provider="local"))
    marker, running = await run_in_background(box)
    await fleet.destroy(box.id)
    with pytest.raises(SandboxEnded, match="ended while this ran"):
        await running
    assert await wait_until_gone(marker) == []
    with pytest.raises(SandboxEnded):  # and nothing new starts on it
        await box.run("true")
    # a search in flight is told the same (not that its shell died under it): here rg waits on a
    # named pipe given as its root, which tether would look at only after a minute
    monkeypatch.setattr(search, "SLOW_SEARCH_S", 60)
    searched = await fleet.create(Request(provider="local"))
    pipe = f"pipe-{secrets.token_hex(4)}"
    await searched.run(["mkfifo", pipe])
    grep = asyncio.ensure_future(searched.grep("x", pipe))
    path, deadline = await searched.resolve(pipe), time.monotonic() + 10
    while True:  # until rg reads the pipe (it has no writer until then: ENXIO)
        try:
            writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            assert exc.errno == errno.ENXIO and time.monotonic() < deadline, exc
            await asyncio.sleep(0.05)
    await fleet.destroy(searched.id)
    with pytest.raises(SandboxEnded, match="ended while this ran"):
        await grep
    os.close(writer)
    # a caller's own timeout is still a timeout, on a sandbox that lives
    other = await fleet.create(Request(provider="local"))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await other.run("sleep 5")
    await other.destroy()


async def test_output_written_just_before_exit_reaches_the_client_and_the_connection_lives(
    tmp_path: Path, fleet: Fleet
) -> None:
    """A command that writes to stderr as it exits: its exit status used to close the channel while
    that write was still being copied to it, and the copy's error made asyncssh drop the whole
    connection (every SFTP client, shell and forward on it)."""
    async with await fleet.create(Request(provider="local")) as box:
        conn = await dial(box.endpoint, HostKeyPins(StateStore(tmp_path / "pins.db")))
        async with conn, conn.start_sftp_client() as sftp:
            for _ in range(50):
                r = await conn.run("echo a; echo b >&2; exit 3")
                assert (r.stdout, r.stderr, r.exit_status) == ("a\n", "b\n", 3)
            await sftp.stat(".")  # (the connection's other channels live too)
        # and through OpenSSH's client, as a user runs what `tether ssh` prints
        ssh = [
            "ssh", "-p", str(box.endpoint.port), "-i", box.endpoint.key_paths[0], "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path / 'known'}",
            "-o", "LogLevel=ERROR", f"{box.id}@127.0.0.1", "ls /nonexistent",
        ]  # fmt: skip
        for _ in range(10):
            p = await asyncio.to_thread(subprocess.run, ssh, capture_output=True, text=True)
            assert p.returncode == 2 and "nonexistent" in p.stderr, (p.returncode, p.stderr)


async def test_a_session_the_client_closes_takes_its_commands_with_it_and_no_subsystem_is_a_shell(
    tmp_path: Path, fleet: Fleet
) -> None:
    """An exec request whose channel the client closes (a cancelled exec_raw, a dropped ssh) ends
    what it started, not only its shell; a subsystem other than sftp is refused, not a login shell."""
    async with await fleet.create(Request(provider="local")) as box:
        conn = await dial(box.endpoint, HostKeyPins(StateStore(tmp_path / "pins.db")))
        async with conn:
            marker = leaf_sleep()
            session = await conn.create_process(f"{marker}; echo done")
            await wait_until_running(marker)
            session.close()
            assert await wait_until_gone(marker) == [], "the command outlived its session"
            other = await conn.create_process(subsystem="netconf")
            done = await other.wait()  # (a login shell would wait for input, or end with the profile's status)
            assert done.exit_status == 1 and "no subsystem 'netconf'" in str(done.stderr)


async def test_a_session_closed_while_its_profile_runs_lets_the_profile_finish(
    tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pyenv rehash` (in many a profile) takes a lock, and only then sets the EXIT trap that
    releases it: a signal in between leaves the lock behind, and every later login shell waits a
    minute on it. A session closed while its login shell still reads the profile (a short-lived
    `tether exec`, a shell warming up when its sandbox ends) lets the profile run to its end, as
    sshd does, and the shell exits on the end of its input."""
    monkeypatch.setenv("SHELL", shutil.which("zsh") or "zsh")  # (its start-up files are in ZDOTDIR)
    monkeypatch.setenv("ZDOTDIR", str(tmp_path))
    held = tmp_path / "held"
    (tmp_path / ".zprofile").write_text(f': > {held}\nsleep 0.5\ntrap "rm -f {held}" EXIT\n')
    async with await fleet.create(Request(provider="local")) as box:
        conn = await dial(box.endpoint, HostKeyPins(StateStore(tmp_path / "pins.db")))
        async with conn:
            session = await conn.create_process()
            for _ in range(100):
                if held.exists():
                    break
                await asyncio.sleep(0.01)
            assert held.exists(), "the profile did not start"
            session.close()
            for _ in range(50):
                if not held.exists():
                    break
                await asyncio.sleep(0.1)
            assert not held.exists(), "the profile was cut short, its lock left behind"


@pytest.mark.parametrize("command", [None, BOOT_COMMAND], ids=["session", "tethers-shell"])
async def test_a_sandbox_ended_while_a_login_shell_reads_its_profile_lets_the_profile_finish(
    command: str | None, tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same lock, when the sandbox ends (`tether down` from another shell) while a session is
    still open and its login shell is in the middle of its profile: the profile's processes are let
    finish before the shell is stopped, or the lock stays behind for every later login shell."""
    monkeypatch.setenv("SHELL", shutil.which("zsh") or "zsh")
    monkeypatch.setenv("ZDOTDIR", str(tmp_path))
    held = tmp_path / "held"
    # (pyenv-rehash is a bash script the profile runs: the lock, a moment, the trap, the work)
    rehash = f': > {held}; sleep 0.5; trap "rm -f {held}" EXIT; sleep 0.2'
    (tmp_path / ".zprofile").write_text(f"bash -c {shlex.quote(rehash)}\n")
    box = await fleet.create(Request(provider="local"))
    conn = await dial(box.endpoint, HostKeyPins(StateStore(tmp_path / "pins.db")))
    async with conn:
        await conn.create_process(command)  # (tether's own, in zsh: `zsh -l -c 'exec /bin/sh'`)
        for _ in range(100):
            if held.exists():
                break
            await asyncio.sleep(0.01)
        assert held.exists(), "the profile did not start"
        await fleet.destroy(box.id)
        assert not held.exists(), "the profile was cut short, its lock left behind"
        assert not sandbox_root(box.id).exists()


async def test_a_login_shell_that_hangs_in_its_profile_is_named_as_the_cause(
    tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHELL", shutil.which("zsh") or "zsh")
    monkeypatch.setenv("ZDOTDIR", str(tmp_path))
    (tmp_path / ".zprofile").write_text("sleep 3\n")  # (a stale lock pyenv rehash waits on, say)
    async with await fleet.create(Request(provider="local")) as box:
        async with Sandbox(box.endpoint, boot_timeout=0.5) as slow:
            with pytest.raises(ConnectTimeout, match=r"within 0.5s: its start-up files hang.*SHELL -lx -c true"):
                await slow.run("true")
            # a short timeout (`tether exec --timeout 2`) waits out the boot all the same, and says why
            with pytest.raises(ConnectTimeout, match=r"within 0.5s.*start-up files hang"):
                await slow.run("true", timeout=0.1)
            assert (await slow.stat(str(sandbox_root(box.id) / "work"))).type == "directory"  # (SFTP: no shell)


async def test_sessions_closed_as_they_start_leave_the_connection_up(
    tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session the client closes while its shell is being started (a call cancelled as its shell
    opened) ends that session alone: asyncssh closes the whole connection, and with it every
    other shell, SFTP and forward of the sandbox, when a session's handler fails on a closed channel."""
    # (sh: forty login shells of this account's own at once would run its profile forty times over,
    # pyenv's rehash among them, which then wait on each other's lock)
    monkeypatch.setenv("SHELL", "/bin/sh")
    async with await fleet.create(Request(provider="local")) as box:
        conn = await dial(box.endpoint, HostKeyPins(StateStore(tmp_path / "pins.db")))
        async with conn, conn.start_sftp_client() as sftp:
            for _ in range(40):
                (await conn.create_process()).close()
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.5)
            assert (await conn.run("echo still up")).stdout == "still up\n"
            assert await sftp.isdir(".")
