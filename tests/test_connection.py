"""Connections: the channel budget, re-dial, keepalive, idle close, host-key pinning, connect errors."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from sandbox import ConnectionPool, Sandbox, SSHEndpoint
from sandbox.errors import AuthFailed, ConnectionLost, ConnectTimeout, HostKeyMismatch, ShellsBusy, Unreachable
from sandbox.hostkeys import HostKeyPins, fingerprint_of
from sandbox.state import StateStore, state_dir
from tests.conftest import endpoint_for
from tests.processes import processes_matching
from tests.sshd import SSHD, Account, ensure_account, free_port, keygen


async def mixed_operations(box: Sandbox, count: int) -> list[BaseException | object]:
    work = f"{await box.home()}/mixed-{os.getpid()}-{random.randrange(1 << 30)}"
    await box.makedirs(work)

    async def one(i: int) -> object:
        kind = i % 3
        if kind == 0:
            r = await box.run(f"echo {i}; sleep 0.0{i % 10}")
            assert r.stdout == f"{i}\n", r
        elif kind == 1:
            await box.write(f"{work}/f{i}.txt", f"content {i}\n" * 100)
            assert await box.read_text(f"{work}/f{i}.txt") == f"content {i}\n" * 100
        else:
            await box.write(f"{work}/r{i}.txt", f"r{i}")
            read = await box.read(f"{work}/r{i}.txt")
            assert read.text == f"     1\tr{i}", read  # type: ignore[union-attr]
        return i

    return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)


async def test_64_concurrent_mixed_operations_with_max_sessions_10(
    bash_account: Account, client_key: Path, pool: ConnectionPool
) -> None:
    server = SSHD(bash_account, client_key, max_sessions=10).start()
    try:
        # more shells than the server's MaxSessions allows on one connection: the budget must cope
        async with Sandbox(endpoint_for(server, client_key), pool=pool, shells=12) as box:
            results = await mixed_operations(box, 64)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert errors == []
            assert all(in_use <= limit <= 10 for in_use, limit in pool.stats(box.endpoint))
    finally:
        server.cleanup()


async def test_the_real_session_limit_is_learned_and_never_surfaces(
    bash_account: Account, client_key: Path, pool: ConnectionPool
) -> None:
    server = SSHD(bash_account, client_key, max_sessions=3).start()
    try:
        async with Sandbox(endpoint_for(server, client_key), pool=pool, shells=6) as box:
            results = await mixed_operations(box, 64)
            assert [r for r in results if isinstance(r, BaseException)] == []
            stats = pool.stats(box.endpoint)
            assert stats and all(limit == 3 for _, limit in stats)  # learned from the refusals
            assert len(stats) >= 2  # and more connections were opened instead
    finally:
        server.cleanup()


async def test_one_session_per_connection_never_strands_a_caller(
    bash_account: Account, client_key: Path, pool: ConnectionPool
) -> None:
    """MaxSessions 1: fewer sessions than the sandbox has shells and SFTP. A caller waiting to open a
    shell takes one another caller gives back; one that gets none in its timeout is told so."""
    server = SSHD(bash_account, client_key, max_sessions=1).start()
    try:
        async with Sandbox(endpoint_for(server, client_key), pool=pool, boot_timeout=2) as box:
            await box.stat(".")  # the SFTP channel holds one session
            results = await asyncio.wait_for(asyncio.gather(*(box.run(f"sleep 0.2; echo {i}") for i in range(8))), 60)
            assert [r.stdout for r in results] == [f"{i}\n" for i in range(8)]
            sessions = len(pool.stats(box.endpoint))
            assert sessions >= 3, pool.stats(box.endpoint)  # (the SFTP channel, and two shells at least)
            marker = f"tether-busy-{secrets.token_hex(4)}"
            busy = [asyncio.ensure_future(box.run(f"sh -c 'sleep 5' {marker}")) for _ in range(sessions - 1)]
            deadline = time.monotonic() + 10
            while len(processes_matching(marker)) < sessions - 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # until every shell runs one
            with pytest.raises(ShellsBusy, match=r"within 2s.*did not run"):
                await box.run("echo never", timeout=0.5)  # (waits as long as a shell may take to boot)
            assert all(r.exit_code == 0 for r in await asyncio.gather(*busy))
            # a timeout while every session is taken: the kill waits for the first shell given back
            started = time.monotonic()
            timed = await asyncio.gather(
                box.run("sleep 1000", timeout=0.5),
                *(box.run("sleep 2") for _ in range(sessions - 2)),
            )
            assert timed[0].timed_out and time.monotonic() - started < 15
    finally:
        server.cleanup()


async def test_a_short_timeout_still_lets_a_slow_login_shell_start(client_key: Path, pool: ConnectionPool) -> None:
    """The first command's shell may take longer to start than the command is allowed to run."""
    account = ensure_account("tether-slower", "/bin/bash", {".bashrc": "sleep 1\n", ".profile": ". ~/.bashrc\n"})
    server = SSHD(account, client_key).start()
    try:
        async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
            assert (await box.run("echo quick", timeout=0.5)).stdout == "quick\n"
    finally:
        server.cleanup()


async def test_a_command_in_flight_when_the_connection_dies_is_reported(
    own_sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> None:
    async with Sandbox(endpoint_for(own_sshd, client_key), pool=pool) as box:
        await box.write("survivor.txt", "still here")
        running = asyncio.ensure_future(box.run("sleep 5; echo done"))
        await asyncio.sleep(0.5)
        own_sshd.kill_connections()
        with pytest.raises(ConnectionLost, match="may still be running"):
            await asyncio.wait_for(running, 5)
        # safe operations re-dial transparently
        assert await box.read_text("survivor.txt") == "still here"
        assert (await box.run("echo back")).stdout == "back\n"


async def test_a_read_waits_out_a_server_that_is_down_for_a_while(
    own_sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> None:
    """The whole sshd goes away (listener too) and comes back 1.5 s later on the same port: a read
    issued meanwhile re-dials with backoff instead of failing, and a job started before still runs."""
    async with Sandbox(endpoint_for(own_sshd, client_key), pool=pool) as box:
        await box.write("survivor.txt", "still here")
        job = await box.start_job("sleep 60")
        own_sshd.stop()
        down_at = time.monotonic()

        async def come_back() -> None:
            await asyncio.sleep(1.5)
            await asyncio.to_thread(own_sshd.start)

        returning = asyncio.ensure_future(come_back())
        assert await asyncio.wait_for(box.read_text("survivor.txt"), 15) == "still here"
        assert time.monotonic() - down_at >= 1.5  # it was answered by the restarted server
        await returning
        assert {j.id: j.status for j in await box.job_list()}[job.id] == "running"
        await box.job_kill(job.id, "KILL")


async def test_keepalive_notices_a_silent_peer_and_the_next_call_redials(
    own_sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> None:
    endpoint = endpoint_for(own_sshd, client_key, keepalive_interval=0.2)
    async with Sandbox(endpoint, pool=pool) as box:
        assert (await box.run("echo one")).stdout == "one\n"
        with own_sshd.frozen_connections():
            deadline = time.monotonic() + 5
            while pool.stats(endpoint) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert pool.stats(endpoint) == []  # the dead connection was dropped by keepalive
            assert (await box.read_text("/etc/hostname")) != ""
            assert (await box.run("echo two")).stdout == "two\n"


async def test_a_command_on_a_frozen_connection_ends_within_its_timeout(
    own_sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> None:
    """The server stops answering (keepalive slower than the command's timeout): the command is
    not even started, and says so within a bound, not when keepalive gives up on the peer."""
    endpoint = endpoint_for(own_sshd, client_key, keepalive_interval=60)
    async with Sandbox(endpoint, pool=pool) as box:
        assert (await box.run("echo one")).stdout == "one\n"
        with own_sshd.frozen_connections():
            started = time.monotonic()
            with pytest.raises(ConnectionLost, match=r"not even started within 10s: the box or the connection"):
                await asyncio.wait_for(box.run("echo two", timeout=2), 30)
            assert time.monotonic() - started < 20  # (keepalive: 60 s, and three missed)


async def test_idle_channels_and_connections_are_closed(own_sshd: SSHD, client_key: Path, tmp_path: Path) -> None:
    pool = ConnectionPool(HostKeyPins(StateStore(tmp_path / "s.db")), idle_close=0.2)
    endpoint = endpoint_for(own_sshd, client_key)
    try:
        async with Sandbox(endpoint, pool=pool, idle_timeout=0.3) as box:
            await box.run("true")
            await box.read_text("/etc/hostname")
            assert pool.stats(endpoint)
            await asyncio.sleep(1.0)
            assert pool.stats(endpoint) == []
            assert own_sshd.connection_pids() == []
            assert (await box.run("echo again")).stdout == "again\n"  # reopened on demand
    finally:
        await pool.close()


async def test_first_use_pins_the_host_key_and_a_changed_key_is_refused(
    own_sshd: SSHD, client_key: Path, tmp_path: Path
) -> None:
    pins = HostKeyPins(StateStore(tmp_path / "pins.db"))
    endpoint = endpoint_for(own_sshd, client_key)
    first = ConnectionPool(pins)
    async with Sandbox(endpoint, pool=first) as box:
        await box.run("true")
    await first.close()
    [(host, port, pinned)] = pins.all()
    assert (host, port) == ("127.0.0.1", own_sshd.port) and pinned.startswith("SHA256:")

    own_sshd.restart(new_host_key=True)
    second = ConnectionPool(pins)
    try:
        with pytest.raises(HostKeyMismatch) as caught:
            async with Sandbox(endpoint, pool=second) as box:
                await box.run("true")
        message = str(caught.value)
        assert f"127.0.0.1:{own_sshd.port}" in message and pinned in message
        assert caught.value.presented != pinned and caught.value.presented in message
        assert pins.all()[0][2] == pinned  # the pin is not replaced
    finally:
        await second.close()


async def test_a_host_key_is_pinned_for_every_spelling_of_its_host(
    own_sshd: SSHD, client_key: Path, tmp_path: Path
) -> None:
    """DNS names are case-blind and may end in a dot: a new spelling of a pinned host is the same
    host, refused when its key changed, not trusted on first use again."""
    store = StateStore(tmp_path / "pins.db")
    pins = HostKeyPins(store)
    first = ConnectionPool(pins)
    async with Sandbox(endpoint_for(own_sshd, client_key, host="localhost"), pool=first) as box:
        await box.run("true")
    await first.close()
    [(host, _, pinned)] = pins.all()
    own_sshd.restart(new_host_key=True)
    second = ConnectionPool(pins)
    try:
        for spelling in ("LocalHost", "LOCALHOST"):
            with pytest.raises(HostKeyMismatch):
                async with Sandbox(endpoint_for(own_sshd, client_key, host=spelling), pool=second) as box:
                    await box.run("true")
    finally:
        await second.close()
    assert pins.all() == [(host, own_sshd.port, pinned)]
    # a pin recorded under another spelling (before names were normalised) is found and forgotten too
    with store.transaction() as db:
        db.execute("UPDATE host_keys SET host = 'LOCALHOST.'")
    assert pins.get("localhost", own_sshd.port) is not None and pins.forget("Localhost", own_sshd.port)
    assert pins.all() == []
    # an IPv6 address, however it is written
    line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDxyTHuNF1+fRVp5KhaDGqj8UmhGvdKQr9aS+n8OJ6Oq"
    pins.pin("0:0::1", 22, line)
    assert pins.get("::1", 22) == line and pins.get("0000::0001", 22) == line


def test_a_state_dir_open_to_others_is_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state dir holds tether's client key and its pins: nobody else may swap them."""
    shared = tmp_path / "shared-state"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("TETHER_STATE_DIR", str(shared))
    assert state_dir() == shared and shared.stat().st_mode & 0o777 == 0o700


def test_a_state_dir_holding_anothers_files_or_anothers_own_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.getuid() != 0:
        pytest.fail("this test gives files to another user: it needs root (CI runs as root)")
    shared = tmp_path / "shared-state"
    shared.mkdir()
    monkeypatch.setenv("TETHER_STATE_DIR", str(shared))
    shared.chmod(0o777)
    planted = shared / "tether.db"
    planted.write_bytes(b"")
    os.chown(planted, 1, 1)  # someone else's, put there while the directory was open
    with pytest.raises(PermissionError, match=r"holds files that are not yours \(tether.db\)"):
        state_dir()
    planted.unlink()
    os.chown(shared, 1, 1)
    with pytest.raises(PermissionError, match=r"belongs to another user.*TETHER_STATE_DIR"):
        state_dir()


async def test_a_host_key_replaced_by_one_of_another_kind_is_a_mismatch(
    own_sshd: SSHD, client_key: Path, tmp_path: Path
) -> None:
    server = own_sshd  # an ed25519 host key, pinned on first use
    pins = HostKeyPins(StateStore(tmp_path / "pins.db"))
    pool = ConnectionPool(pins)
    async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
        await box.run("true")
    await pool.close()
    pinned = pins.get("127.0.0.1", server.port)
    assert pinned is not None and pinned.startswith("ssh-ed25519 ")
    server.stop()
    server.host_key = keygen(server.workdir / "host_rsa", "rsa")
    server.start()
    pool = ConnectionPool(pins)
    try:
        with pytest.raises(HostKeyMismatch) as caught:
            async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
                await box.run("true")
        # both fingerprints named: the pinned ed25519 key's and the RSA key the server now has
        rsa = fingerprint_of(Path(f"{server.host_key}.pub").read_text())
        assert (caught.value.presented, caught.value.pinned) == (rsa, fingerprint_of(pinned))
    finally:
        await pool.close()


async def test_a_host_with_a_host_certificate_is_pinned_by_its_key_not_its_ca(
    own_sshd: SSHD, client_key: Path, tmp_path: Path
) -> None:
    """A server that presents a host certificate (HostCertificate, as fleets signed by a CA do) can
    be attached: tether pins its plain key on first use, as any host's. A CA's signature vouches
    for nothing: the same CA's certificate on a new key is a changed key, refused."""
    server = own_sshd
    ca = keygen(tmp_path / "host_ca")

    def certified(host_key: Path) -> None:
        subprocess.run(
            ["ssh-keygen", "-q", "-s", str(ca), "-I", "host", "-h", "-n", "127.0.0.1", f"{host_key}.pub"], check=True
        )
        server.extra_config = [f"HostCertificate {host_key}-cert.pub"]

    assert server.host_key is not None
    server.stop()
    certified(server.host_key)
    server.start()
    pins = HostKeyPins(StateStore(tmp_path / "pins.db"))
    pool = ConnectionPool(pins)
    try:
        async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
            assert (await box.run("echo ok")).stdout == "ok\n"
        pinned = pins.get("127.0.0.1", server.port)
        assert pinned is not None
        assert pinned.split()[:2] == Path(f"{server.host_key}.pub").read_text().split()[:2]
        await pool.close()
        server.stop()
        server.host_key = keygen(server.workdir / "host_new_ed25519")
        certified(server.host_key)
        server.start()
        pool = ConnectionPool(pins)
        with pytest.raises(HostKeyMismatch):
            async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
                await box.run("true")
    finally:
        await pool.close()


async def test_an_explicit_host_key_is_the_only_one_accepted(own_sshd: SSHD, client_key: Path, pool: ConnectionPool):
    assert own_sshd.host_key is not None
    real = Path(f"{own_sshd.host_key}.pub").read_text().split()
    other = keygen(client_key.parent / f"other-{random.randrange(1 << 30)}")
    wrong = " ".join(Path(f"{other}.pub").read_text().split()[:2])
    async with Sandbox(endpoint_for(own_sshd, client_key, host_key=" ".join(real[:2])), pool=pool) as box:
        assert (await box.run("echo ok")).stdout == "ok\n"
    with pytest.raises(HostKeyMismatch):
        async with Sandbox(endpoint_for(own_sshd, client_key, host_key=wrong), pool=pool) as box:
            await box.run("true")


async def test_a_wrong_key_is_an_auth_failure(own_sshd: SSHD, keys_dir: Path, pool: ConnectionPool) -> None:
    stranger = keygen(keys_dir / f"stranger-{random.randrange(1 << 30)}")
    with pytest.raises(AuthFailed, match="authorized_keys"):
        async with Sandbox(endpoint_for(own_sshd, stranger), pool=pool) as box:
            await box.run("true")


async def test_a_closed_port_is_unreachable(pool: ConnectionPool) -> None:
    with pytest.raises(Unreachable, match="cannot connect"):
        async with Sandbox(SSHEndpoint.parse(f"me@127.0.0.1:{free_port()}"), pool=pool) as box:
            await box.run("true")


async def test_a_server_that_never_speaks_ssh_times_out_in_the_login_phase(pool: ConnectionPool) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        # The TCP connection is made at once: the login's limit is the one that applies, not connect's.
        endpoint = SSHEndpoint.parse(f"me@127.0.0.1:{port}", connect_timeout=30, login_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ConnectTimeout, match=r"login did not finish within 0.5s \(login_timeout\)"):
            async with Sandbox(endpoint, pool=pool) as box:
                await box.run("true")
        assert time.monotonic() - started < 5
    finally:
        listener.close()


async def test_a_slow_login_within_its_limit_is_not_cut_by_the_connect_timeout(
    own_sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> None:
    """The TCP connection comes at once, the server answers after 0.8 s: connect_timeout (0.3 s)
    has nothing to do with that; login_timeout (10 s) allows it."""

    async def slow_server_socket() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", own_sshd.port))
        sock.setblocking(False)
        return sock

    endpoint = endpoint_for(own_sshd, client_key).model_copy(
        update={"socket_factory": slow_server_socket, "connect_timeout": 0.3, "login_timeout": 10.0}
    )
    original = asyncssh.SSHClientConnection.connection_made

    def late(self: asyncssh.SSHClientConnection, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # the server's banner is read 0.8 s late
        asyncio.get_running_loop().call_later(0.8, transport.resume_reading)  # type: ignore[attr-defined]
        original(self, transport)

    asyncssh.SSHClientConnection.connection_made = late  # type: ignore[method-assign]
    try:
        async with Sandbox(endpoint, pool=pool) as box:
            assert (await box.run("echo in")).stdout == "in\n"
    finally:
        asyncssh.SSHClientConnection.connection_made = original  # type: ignore[method-assign]


async def test_a_server_that_cannot_be_reached_times_out_in_the_connect_phase(pool: ConnectionPool) -> None:
    async def never_connects() -> socket.socket:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    endpoint = SSHEndpoint(host="unreachable.example", socket_factory=never_connects, connect_timeout=0.3)
    with pytest.raises(ConnectTimeout, match=r"could not connect within 0.3s \(connect_timeout\)"):
        async with Sandbox(endpoint, pool=pool) as box:
            await box.run("true")


async def test_a_missing_key_file_is_named(own_sshd: SSHD, tmp_path: Path, pool: ConnectionPool) -> None:
    with pytest.raises(AuthFailed, match=r"key file .*absent does not exist"):
        async with Sandbox(endpoint_for(own_sshd, tmp_path / "absent"), pool=pool) as box:
            await box.run("true")


async def test_a_key_file_that_is_not_a_private_key_is_named(
    own_sshd: SSHD, client_key: Path, tmp_path: Path, pool: ConnectionPool
) -> None:
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("not a key\n")
    for path in (not_a_key, Path(f"{client_key}.pub")):  # (the .pub, given by mistake)
        with pytest.raises(AuthFailed, match=rf"key file {path} is not a private key .*give the private key file"):
            async with Sandbox(endpoint_for(own_sshd, path), pool=pool) as box:
                await box.run("true")


async def test_an_encrypted_key_file_says_to_use_the_agent(
    own_sshd: SSHD, keys_dir: Path, pool: ConnectionPool
) -> None:
    """tether cannot ask for a passphrase: the error names the file and the way on (ssh-agent),
    before any dial when there is nothing else to log in with, or when the login fails."""
    encrypted = keys_dir / f"encrypted-{random.randrange(1 << 30)}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret phrase", "-f", str(encrypted)], check=True)
    advice = rf"key file {encrypted} is encrypted .*ssh-add {encrypted}.*omit --identity"
    with pytest.raises(AuthFailed, match=advice):
        async with Sandbox(endpoint_for(own_sshd, encrypted), pool=pool) as box:
            await box.run("true")
    stranger = keygen(keys_dir / f"stranger-{random.randrange(1 << 30)}")  # another key, refused
    both = SSHEndpoint.parse(own_sshd.address, key_paths=(str(encrypted), str(stranger)), use_agent=False)
    with pytest.raises(AuthFailed, match=rf"authentication failed; {advice}"):
        async with Sandbox(both, pool=pool) as box:
            await box.run("true")


async def test_ssh_agent_auth(
    own_sshd: SSHD, client_key: Path, pool: ConnectionPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no default keys in ~/.ssh: only the agent can log in
    sock = tmp_path / "agent.sock"
    agent = await asyncio.create_subprocess_exec("ssh-agent", "-D", "-a", str(sock))
    try:
        for _ in range(100):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        add = await asyncio.create_subprocess_exec(
            "ssh-add",
            str(client_key),
            env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert await add.wait() == 0
        os.environ["SSH_AUTH_SOCK"] = str(sock)
        endpoint = SSHEndpoint.parse(own_sshd.address, use_agent=True)
        async with Sandbox(endpoint, pool=pool) as box:
            assert (await box.run("whoami")).stdout.strip() == own_sshd.account.name
    finally:
        os.environ.pop("SSH_AUTH_SOCK", None)
        agent.terminate()
        await agent.wait()


async def test_key_material_auth(own_sshd: SSHD, client_key: Path, pool: ConnectionPool) -> None:
    endpoint = SSHEndpoint.parse(own_sshd.address, key_material=client_key.read_text(), use_agent=False)
    async with Sandbox(endpoint, pool=pool) as box:
        assert (await box.run("echo keyed")).stdout == "keyed\n"


class _GatewayServer(asyncssh.SSHServer):
    """An SSH server that, like Daytona's gateway, logs in a known token with "none" auth, or a
    password, and refuses everything else."""

    def __init__(self, token: str, password: str) -> None:
        self.token, self.password = token, password

    def begin_auth(self, username: str) -> bool:
        return username != self.token  # False = no auth needed

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == "pw-user" and password == self.password


async def test_token_and_password_auth(tmp_path: Path, pool: ConnectionPool, caplog: pytest.LogCaptureFixture) -> None:
    async def handle(process: asyncssh.SSHServerProcess) -> None:
        process.stdout.write(f"hello {process.get_extra_info('username')[:3]}\n")
        process.exit(0)

    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=lambda: _GatewayServer("tok-123", "s3cret"),
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        process_factory=handle,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        pins = pool.pins
        token_endpoint = SSHEndpoint(host="127.0.0.1", port=port, token="tok-123")
        assert "tok-123" not in token_endpoint.display and "tok-123" not in repr(token_endpoint)
        conn = await _dial(token_endpoint, pins)
        assert (await conn.run("x")).stdout == "hello tok\n"
        conn.close()
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            with pytest.raises(AuthFailed):
                await _dial(SSHEndpoint(host="127.0.0.1", port=port, token="wrong-token-Q7"), pins)
        # asyncssh logs the user name it logs in as: a gateway token never reaches a log
        assert "Auth" in caplog.text and "wrong-token-Q7" not in caplog.text and "<token>" in caplog.text
        password_endpoint = SSHEndpoint(host="127.0.0.1", port=port, user="pw-user", password="s3cret", use_agent=False)
        conn = await _dial(password_endpoint, pins)
        assert (await conn.run("x")).stdout == "hello pw-\n"
        conn.close()
        with pytest.raises(AuthFailed):
            await _dial(
                SSHEndpoint(host="127.0.0.1", port=port, user="pw-user", password="nope", use_agent=False), pins
            )
    finally:
        server.close()


async def _dial(endpoint: SSHEndpoint, pins: HostKeyPins) -> asyncssh.SSHClientConnection:
    from sandbox.connect import dial

    return await dial(endpoint, pins)


async def test_a_socket_factory_carries_the_connection(own_sshd: SSHD, client_key: Path, pool: ConnectionPool) -> None:
    """Transports that are not plain TCP (E2B's websocket bridge) hand tether a connected socket; the
    host name then only names the server for pinning."""
    made: list[int] = []

    async def bridge() -> socket.socket:
        made.append(1)
        return socket.create_connection(("127.0.0.1", own_sshd.port))

    endpoint = SSHEndpoint(
        host="sandbox-42.bridge.invalid",
        port=22,
        user=own_sshd.account.name,
        key_paths=(str(client_key),),
        use_agent=False,
        socket_factory=bridge,
    )
    async with Sandbox(endpoint, pool=pool) as box:
        assert (await box.run("echo bridged")).stdout == "bridged\n"
    assert made and ("sandbox-42.bridge.invalid", 22) in {(h, p) for h, p, _ in pool.pins.all()}


async def test_an_rsa_only_host_is_reachable_again_after_its_key_is_pinned(
    bash_account: Account, client_key: Path, tmp_path: Path
) -> None:
    server = SSHD(bash_account, client_key)
    server.host_key = keygen(server.workdir / "host_rsa", "rsa")  # the harness hands its workdir to the account
    server.start()
    pins = HostKeyPins(StateStore(tmp_path / "pins.db"))
    try:
        for _ in range(2):  # the second dial asks for the pinned key's kind: rsa-sha2, not ssh-rsa
            pool = ConnectionPool(pins)
            async with Sandbox(endpoint_for(server, client_key), pool=pool) as box:
                assert (await box.run("echo rsa")).stdout == "rsa\n"
            await pool.close()
        assert pins.get("127.0.0.1", server.port).startswith("ssh-rsa ")
    finally:
        server.cleanup()


async def test_a_failed_dial_releases_every_waiter(tmp_path: Path) -> None:
    pool = ConnectionPool(HostKeyPins(StateStore(tmp_path / "s.db")), max_connections=1)
    endpoint = SSHEndpoint.parse(f"me@127.0.0.1:{free_port()}", use_agent=False)
    try:
        async with asyncio.timeout(10):  # a waiter left behind would hang here
            results = await asyncio.gather(
                *(Sandbox(endpoint, pool=pool).run("true") for _ in range(3)), return_exceptions=True
            )
        assert all(isinstance(r, Unreachable) for r in results), results
    finally:
        await pool.close()


async def test_writes_leave_in_fewer_larger_sends_in_order() -> None:
    """What the corked transport hands the socket: a loop pass's writes together at its end,
    nothing reordered or lost; a close sends what is still held."""
    from sandbox.connect import _CorkedTransport

    class Socket:  # the real transport's part the cork uses
        def __init__(self) -> None:
            self.sends: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.sends.append(data)

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

    socket_ = Socket()
    cork = _CorkedTransport(socket_, asyncio.get_running_loop())  # type: ignore[arg-type]
    for i in (1, 2, 3):
        cork.write(f"packet{i}".encode())
    assert socket_.sends == []
    await asyncio.sleep(0)  # the end of the pass
    assert socket_.sends == [b"packet1packet2packet3"]
    cork.write(b"alone")
    await asyncio.sleep(0)
    assert socket_.sends[-1] == b"alone"
    cork.write(b"last")
    cork.close()
    assert socket_.sends[-1] == b"last" and socket_.closed


async def test_a_connection_sends_one_write_per_pass_and_no_empty_ignores(
    own_sshd: SSHD, client_key: Path, tmp_path: Path
) -> None:
    """On a real connection: asyncssh's empty MSG_IGNORE before each packet (a CBC defence; tether
    negotiates AES-GCM) never reaches the socket, and the requests of one gather leave in one send."""
    conn = await _dial(endpoint_for(own_sshd, client_key), HostKeyPins(StateStore(tmp_path / "pins.db")))
    try:
        assert "gcm" in conn.get_extra_info("send_cipher")
        sftp = await conn.start_sftp_client()
        corked = conn._transport  # type: ignore[attr-defined]
        socket_transport = corked._transport
        sends: list[bytes] = []

        class Recorder:
            def write(self, data: bytes) -> None:
                sends.append(data)
                socket_transport.write(data)

            def __getattr__(self, name: str) -> object:
                return getattr(socket_transport, name)

        corked._transport = Recorder()
        conn.send_packet(2, b"\0\0\0\0")  # MSG_IGNORE, an empty string
        await asyncio.sleep(0.05)
        assert sends == []
        conn.send_packet(2, b"\0\0\0\1x")  # one with content is sent as asked
        await asyncio.sleep(0.05)
        assert len(sends) == 1
        sends.clear()
        home = await sftp.realpath(".")
        stats = await asyncio.gather(sftp.stat(home), sftp.lstat(home), sftp.exists(home + "/nothing"))
        assert stats[0].permissions == stats[1].permissions and stats[2] is False
        assert len(sends) == 2  # the realpath; then the three requests, together
        sftp.exit()
    finally:
        conn.close()
        await conn.wait_closed()
