"""Tunnels: a real HTTP server in the sandbox, fetched through the local backend and through relays
(a real OpenSSH sshd, and a sish-style test relay); the provider hook; chat channels."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.server
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest

from providers import Fleet, Request
from providers.local import LocalProvider
from sandbox import ConnectionPool, Sandbox
from sandbox.errors import CommandTimeout, ConnectionLost, FileNotFound
from tests.conftest import endpoint_for
from tests.mcp_support import ROOT, server_env, stdio_client, structured, tether, tether_process, text
from tests.sshd import SSHD, ensure_account, free_port
from tunnels import ChannelConfig, Notifier, RelayConfig, TunnelError, TunnelManager
from tunnels import base as tunnels_base
from tunnels.check import NothingListens, verify
from tunnels.local import LocalForward
from tunnels.ports import listening_ports, parse_netstat, parse_proc_net_tcp
from tunnels.relay import RelayBackend, RelayForward, find_url

PAGE = "hello through the tunnel\n"


# http.server speaking HTTP/1.1, which keeps a connection open for the next request.
KEEP_ALIVE_SERVER = """
import http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
http.server.ThreadingHTTPServer((sys.argv[2], int(sys.argv[1])), Handler).serve_forever()
"""


async def start_http_server(box: Sandbox, bind: str = "127.0.0.1", keep_alive: bool = False) -> int:
    """`python3 -m http.server` as a background job in the sandbox; returns its port."""
    # (in the sandbox's own directory: a local sandbox's home is this machine user's real one)
    directory = f"{await box.cwd()}/site-{secrets.token_hex(3)}"
    await box.write(f"{directory}/index.html", PAGE)
    port = free_port()  # a random port could be one the kernel lent to a client socket
    server = (
        f"-c {shlex.quote(KEEP_ALIVE_SERVER)} {port} {bind}" if keep_alive else f"-m http.server {port} --bind {bind}"
    )
    job = await box.start_job(f"exec python3 {server}", cwd=directory)
    deadline = time.monotonic() + 15
    while True:
        probe = await box.run(f"python3 -c 'import socket; socket.create_connection((\"{bind}\", {port}))'")
        if probe.exit_code == 0:
            return port
        out = await box.job_output(job.id)
        assert out.status == "running", f"http.server exited: {out.stderr}"
        assert time.monotonic() < deadline, "http.server did not start"
        await asyncio.sleep(0.1)


async def stop_jobs(box: Sandbox) -> None:
    for job in await box.job_list():
        if job.status == "running":
            await box.job_kill(job.id, "KILL")


@pytest.fixture
async def ssh_box(sshd: SSHD, client_key: Path, pool: ConnectionPool) -> AsyncIterator[Sandbox]:
    async with Sandbox(
        endpoint_for(sshd, client_key), pool=pool, tether_dir=f"~/.tether/t-{secrets.token_hex(3)}"
    ) as box:
        yield box
        await stop_jobs(box)


@pytest.fixture
async def local_box() -> AsyncIterator[Sandbox]:
    fleet = Fleet(config={})
    box = await fleet.create(Request(provider="local"))
    yield box
    await fleet.close(teardown_created=True)


@pytest.fixture(params=["sshd", "local"])
async def any_box(
    request: pytest.FixtureRequest, sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> AsyncIterator[Sandbox]:
    """The real sshd host, then the local provider."""
    if request.param == "sshd":
        async with Sandbox(
            endpoint_for(sshd, client_key), pool=pool, tether_dir=f"~/.tether/t-{secrets.token_hex(3)}"
        ) as box:
            yield box
            await stop_jobs(box)
    else:
        fleet = Fleet(config={})
        yield await fleet.create(Request(provider="local"))
        await fleet.close(teardown_created=True)


async def test_local_backend_serves_a_real_http_server(any_box: Sandbox) -> None:
    box = any_box
    port = await start_http_server(box)
    tunnels = TunnelManager()
    tunnel = await tunnels.open(box, port, backend="local")
    assert tunnel.backend == "local" and tunnel.url.startswith("http://127.0.0.1:")
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{tunnel.url}/index.html")).text == PAGE
        pages = await asyncio.gather(*(client.get(f"{tunnel.url}/index.html") for _ in range(20)))
        assert all(p.status_code == 200 for p in pages)
    await tunnels.close(tunnel.id)
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(tunnel.url)


async def test_forwarded_connections_are_closed_once_both_ends_are_done(any_box: Sandbox) -> None:
    """http.server answers and hangs up at once: each forwarded connection's channel must then be
    closed, not left half-open for as long as the sandbox's connection lives (asyncssh's own
    forwarder did that to about one in ten when the channel's end of file came second). Counted in
    asyncssh's table of the connection's open channels: nothing outside the process shows them."""
    port = await start_http_server(any_box)
    conn = await any_box.connection()
    tunnels = TunnelManager()
    tunnel = await tunnels.open(any_box, port, backend="local")
    await asyncio.sleep(0.3)
    before = len(conn._channels)
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            assert (await client.get(f"{tunnel.url}/index.html")).status_code == 200
    deadline = time.monotonic() + 5
    while len(conn._channels) > before and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert len(conn._channels) <= before
    await tunnels.close_all()


async def test_closing_a_local_tunnel_ends_the_connections_made_through_it(ssh_box: Sandbox) -> None:
    """A kept-alive HTTP connection through the tunnel does not outlive it, nor does its channel."""
    port = await start_http_server(ssh_box, keep_alive=True)
    conn = await ssh_box.connection()
    tunnels = TunnelManager()
    tunnel = await tunnels.open(ssh_box, port, backend="local")
    async with httpx.AsyncClient() as client:
        for _ in range(3):  # (one connection: the server keeps it open)
            assert (await client.get(f"{tunnel.url}/index.html")).text == PAGE
        await tunnels.close(tunnel.id)
        with pytest.raises(httpx.TransportError):
            await client.get(f"{tunnel.url}/index.html")
    deadline = time.monotonic() + 5
    while any(isinstance(c, asyncssh.SSHTCPChannel) for c in conn._channels.values()):
        assert time.monotonic() < deadline, "the forwarded connection's channel stayed open"
        await asyncio.sleep(0.05)


# A server whose connects wait: with its accept queue held full (listen(0), and one connection of its
# own), the kernel drops a new connection's SYN and the connecting side sends it again 1 s, then 3 s,
# later. It accepts (and keeps what it accepts open) once the file argv[2] exists.
SLOW_TO_CONNECT_SERVER = """
import os, socket, sys, time
server = socket.socket()
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(0)
queued = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
kept = []
while True:
    kept.append(server.accept()[0])
    print("accepted", flush=True)
"""


async def test_a_channel_still_opening_when_its_tunnel_closes_is_closed_once_it_opens(ssh_box: Sandbox) -> None:
    """A client connects, and the tunnel closes (hanging up on it) while the sandbox's SSH server is
    still connecting the client's channel to the port: once the channel opens after all, it is
    closed, not left open on the sandbox's connection for as long as that lives."""
    port, go = free_port(), f"{await ssh_box.home()}/go-{secrets.token_hex(3)}"
    job = await ssh_box.start_job(f"exec python3 -c {shlex.quote(SLOW_TO_CONNECT_SERVER)} {port} {go}")
    out = ""
    deadline = time.monotonic() + 15
    while "ready" not in out:
        assert time.monotonic() < deadline, "the server did not start"
        out += (await ssh_box.job_output(job.id, wait_ms=200)).stdout
    conn = await ssh_box.connection()

    def channels() -> int:
        return sum(isinstance(c, asyncssh.SSHTCPChannel) for c in conn._channels.values())

    forward = LocalForward(ssh_box, port)
    await forward.start()
    _, client = await asyncio.open_connection("127.0.0.1", int(forward.url.rsplit(":", 1)[1]))
    while not channels():  # the channel's open was requested: sshd is connecting it
        assert time.monotonic() < deadline, "no channel was opened for the client"
        await asyncio.sleep(0.01)
    await forward.close()
    client.close()
    await ssh_box.write(go, "")  # the server accepts now: sshd's connect goes through at its next SYN
    while out.count("accepted") < 2:  # (its own queued connection, then sshd's)
        assert time.monotonic() < deadline + 10, "the channel's connection never arrived"
        out += (await ssh_box.job_output(job.id, wait_ms=200)).stdout
    deadline = time.monotonic() + 5
    while channels():
        assert time.monotonic() < deadline, "the channel that opened after its tunnel closed stayed open"
        await asyncio.sleep(0.05)


async def test_tethers_own_ports_are_not_suggested(local_box: Sandbox) -> None:
    """A local sandbox runs as tether's user: its SSH server and tether's tunnel listeners are not
    servers the agent meant."""
    port = await start_http_server(local_box)
    tunnels = TunnelManager(check_timeout=2)
    tunnel = await tunnels.open(local_box, port, backend="local")
    listener = int(tunnel.url.rsplit(":", 1)[1])
    own = await listening_ports(local_box, own_only=True, exclude={listener})  # (the manager knows its listeners)
    assert port in own and local_box.endpoint.port not in own and listener not in own
    assert {local_box.endpoint.port, listener} <= set(await listening_ports(local_box))  # (they do listen)
    with pytest.raises(TunnelError) as caught:
        await tunnels.open(local_box, 1, backend="local")
    named = {int(p) for p in str(caught.value).split("listening in the sandbox: ")[1].split(";")[0].split(", ")}
    assert not {local_box.endpoint.port, listener} & named
    await tunnels.close_all()


class NoPortTables:
    """A box with neither /proc/net/tcp nor netstat (the two sources of listening ports)."""

    async def read_bytes(self, path: str) -> bytes:
        raise FileNotFound(path)

    async def exec_raw(self, argv: list[str], timeout: float = 0) -> None:
        raise CommandTimeout(" ".join(argv), timeout)


async def test_ports_that_cannot_be_read_are_not_reported_as_none_listening() -> None:
    with pytest.raises(TunnelError, match="cannot be read"):
        await listening_ports(NoPortTables())  # type: ignore[arg-type]
    with pytest.raises(TunnelError) as caught:
        await verify(f"http://127.0.0.1:{free_port()}/", {}, NoPortTables(), 8000, timeout=2)  # type: ignore[arg-type]
    assert "whether port 8000 listens is unknown" in str(caught.value)
    assert "nothing is listening" not in str(caught.value)


async def test_closing_a_sandboxs_tunnels_twice_at_once_closes_each_once(local_box: Sandbox) -> None:
    """The termination listener and the watcher may both close a sandbox's tunnels."""
    port = await start_http_server(local_box)
    seen: list[tuple[str, str]] = []
    tunnels = TunnelManager(recorder=lambda what, t: seen.append((what, t.id)))
    opened = [await tunnels.open(local_box, port, backend="local") for _ in range(2)]
    sandbox_id = opened[0].sandbox_id
    first, second = await asyncio.gather(tunnels.close_for_sandbox(sandbox_id), tunnels.close_for_sandbox(sandbox_id))
    assert sorted(t.id for t in first + second) == sorted(t.id for t in opened)
    assert sorted(i for what, i in seen if what == "closed") == sorted(t.id for t in opened)


async def test_a_port_where_nothing_listens_gives_a_clear_error(ssh_box: Sandbox) -> None:
    port = await start_http_server(ssh_box)
    with pytest.raises(TunnelError) as caught:
        await TunnelManager(check_timeout=3).open(ssh_box, 1, backend="local")
    assert "nothing is listening on port 1 inside the sandbox" in str(caught.value)
    assert str(port) in str(caught.value)  # it names what does listen


async def test_on_a_shared_host_only_the_login_users_own_servers_are_suggested(ssh_box: Sandbox) -> None:
    port = await start_http_server(ssh_box)
    with socket.socket() as others:  # (this test process's: another user than the sshd account's)
        others.bind(("127.0.0.1", 0))
        others.listen()
        theirs = others.getsockname()[1]
        assert {port, theirs} <= set(await listening_ports(ssh_box))
        own = await listening_ports(ssh_box, own_only=True)
        assert port in own and theirs not in own


async def test_a_port_where_nothing_listens_is_named_when_login_shells_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which ports listen is read over SFTP alone: a box whose login shells hang in their profile
    (waiting on a stale lock, say) still gets its answer, not a check that never ends."""
    monkeypatch.setenv("SHELL", shutil.which("zsh") or "zsh")
    monkeypatch.setenv("ZDOTDIR", str(tmp_path))
    (tmp_path / ".zprofile").write_text("sleep 30\n")
    fleet = Fleet(config={})
    try:
        box = await fleet.create(Request(provider="local"))
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            async with Sandbox(box.endpoint, boot_timeout=30) as hung:
                with pytest.raises(NothingListens) as caught:
                    await asyncio.wait_for(TunnelManager(check_timeout=2).open(hung, 1, backend="local"), 10)
            assert str(server.getsockname()[1]) in str(caught.value)  # (the user's own: tether's user)
    finally:
        await fleet.close(teardown_created=True)


@contextlib.asynccontextmanager
async def tcp_server(box: Sandbox, each: str) -> AsyncIterator[int]:
    """A TCP server that speaks no HTTP, run in the sandbox until the block ends: it does `each`
    (python, with the listening socket `s`) over and over. Yields its port once it listens."""
    port = free_port()  # a random port could be one the kernel lent to a client socket
    script = f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\nwhile True: {each}"
    job = await box.start_job(f"exec python3 -c {shlex.quote(script)}")
    try:
        deadline = time.monotonic() + 10
        while port not in await listening_ports(box):
            assert time.monotonic() < deadline, "the server did not start"
            await asyncio.sleep(0.1)
        yield port
    finally:
        await box.job_kill(job.id, "KILL")


async def test_a_port_that_listens_but_never_answers_http_is_named_as_such(local_box: Sandbox) -> None:
    async with tcp_server(local_box, "c = s.accept(); time.sleep(1000)") as port:  # (silent)
        started = time.monotonic()
        with pytest.raises(TunnelError, match=f"port {port} is listening inside the sandbox but no HTTP answer") as e:
            await TunnelManager(check_timeout=1).open(local_box, port, backend="local")
        assert time.monotonic() - started < 8  # one bound for the whole request
        assert "within 1s (no answer)" in str(e.value)
    # one that hangs up at once: what was said of it, and no word of a time that did not run out
    async with tcp_server(local_box, "s.accept()[0].close()") as port:
        with pytest.raises(TunnelError, match=f"port {port} is listening inside the sandbox but no HTTP answer") as e:
            await TunnelManager(check_timeout=30).open(local_box, port, backend="local")
        assert "within" not in str(e.value) and "Error" in str(e.value), str(e.value)

        async def no_urls(_port: int) -> None:  # (a provider with no URLs of its own, as local and ssh)
            return None

        with pytest.raises(TunnelError) as e:  # auto: what was tried says what failed, and only that
            await TunnelManager(check_timeout=30).open(local_box, port, preview=no_urls)
        assert str(e.value).startswith(f"no tunnel backend could open the port: local: port {port} is listening")
        assert "provider" not in str(e.value), str(e.value)


@pytest.mark.parametrize("backend", ["local", "relay"])
async def test_a_tunnel_holds_the_connection_dialed_after_the_old_one_died(
    backend: str, own_sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> None:
    """A tunnel keeps the sandbox's connection from the pool's idle close. When that connection
    dies, the one dialed in its place (by the next request through the tunnel) is kept open as
    well, for as long as the tunnel is; once it closes, the connection idles out. (Either tunnel is
    re-established after its connection died, at the same URL.)"""
    pool.idle_close = 0.2
    async with Sandbox(endpoint_for(own_sshd, client_key), pool=pool) as box, sish_relay() as relay:
        port = await start_http_server(box)
        tunnels = TunnelManager(relay=sish_config(relay))
        tunnel = await tunnels.open(box, port, backend=backend)
        own_sshd.kill_connections()
        deadline = time.monotonic() + 15
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{tunnel.url}/index.html")).text == PAGE:
                        break
                assert time.monotonic() < deadline, "the tunnel did not come back"
                await asyncio.sleep(0.2)
        conn = await box.connection()  # (the one the request went over)
        await asyncio.sleep(pool.idle_close * 3)
        assert not conn.is_closed() and await box.connection() is conn
        await tunnels.close(tunnel.id)
        assert pool.holds(box.endpoint) == 0
        deadline = time.monotonic() + pool.idle_close + 5
        while not conn.is_closed():
            assert time.monotonic() < deadline, "the connection was still held after its tunnel closed"
            await asyncio.sleep(0.05)
        await stop_jobs(box)


async def test_a_burst_of_requests_after_the_connection_died_dials_one_connection(
    own_sshd: SSHD, client_key: Path, pool: ConnectionPool
) -> None:
    """A page's many requests through a tunnel whose connection just died wait for one re-dial
    (each dialing its own would log in to the sandbox dozens of times, and tunnels hold them all)."""
    async with Sandbox(endpoint_for(own_sshd, client_key), pool=pool) as box:
        port = await start_http_server(box)
        tunnels = TunnelManager()
        tunnel = await tunnels.open(box, port, backend="local")
        own_sshd.kill_connections()
        deadline = time.monotonic() + 10
        while pool.stats(box.endpoint):  # (until the pool has seen it die: then the burst comes)
            assert time.monotonic() < deadline, "the pool never saw its connection die"
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as client:
            pages = await asyncio.gather(*(client.get(f"{tunnel.url}/index.html") for _ in range(12)))
        assert {page.text for page in pages} == {PAGE}
        assert len(pool.stats(box.endpoint)) == 1
        await tunnels.close_all()
        await stop_jobs(box)


# -- relays ----------------------------------------------------------------------------------------------


@pytest.fixture
def openssh_relay(client_key: Path) -> Iterator[SSHD]:
    relay = SSHD(
        ensure_account("tether-relay", "/bin/bash", {".profile": ""}),
        client_key,
        extra_config=["GatewayPorts clientspecified"],
    ).start()
    yield relay
    relay.cleanup()


@pytest.fixture
def relay_config(openssh_relay: SSHD, client_key: Path) -> RelayConfig:
    """[relay] for the OpenSSH relay: any free port on it, the URL made from its address."""
    return RelayConfig(
        host=openssh_relay.address,
        identityFile=str(client_key),
        remote_host="0.0.0.0",
        remote_port=0,
        url_template="http://{host}:{port}",
    )


async def test_a_relay_is_offered_only_the_user_and_key_the_config_names(
    relay_config: RelayConfig, client_key: Path, ssh_box: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not this machine's user name, not ~/.ssh's keys, not the agent's: a public relay would learn
    whose they are. (Here ~/.ssh holds a key the relay accepts: it must not be offered.)"""
    (tmp_path / ".ssh").mkdir()
    default_key = tmp_path / ".ssh" / "id_ed25519"
    default_key.write_bytes(client_key.read_bytes())
    default_key.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    port = await start_http_server(ssh_box)
    unnamed = relay_config.model_copy(update={"identityFile": None})
    with pytest.raises(TunnelError, match="authentication failed; the server refused a login with no key"):
        await TunnelManager(relay=unnamed).open(ssh_box, port, backend="relay")
    nameless = relay_config.model_copy(update={"host": relay_config.host.split("@", 1)[1]})
    with pytest.raises(TunnelError, match=r"no user name for 127.0.0.1:.*a relay is not told this machine's user"):
        await TunnelManager(relay=nameless).open(ssh_box, port, backend="relay")
    tunnels = TunnelManager(relay=relay_config)  # (its identityFile: the one key offered)
    tunnel = await tunnels.open(ssh_box, port, backend="relay")
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{tunnel.url}/index.html")).text == PAGE
    await tunnels.close_all()
    await stop_jobs(ssh_box)


async def test_relay_through_a_real_openssh_sshd(relay_config: RelayConfig, any_box: Sandbox) -> None:
    port = await start_http_server(any_box)
    tunnels = TunnelManager(relay=relay_config)
    tunnel = await tunnels.open(any_box, port)  # auto: the relay wins over local
    assert tunnel.backend == "relay" and tunnel.url.startswith("http://127.0.0.1:")
    async with httpx.AsyncClient() as client:
        responses = await asyncio.gather(*(client.get(f"{tunnel.url}/index.html") for _ in range(10)))
    assert {r.text for r in responses} == {PAGE}
    await tunnels.close_all()


async def test_a_server_listening_on_ipv6_loopback_alone_is_reached(
    relay_config: RelayConfig, any_box: Sandbox
) -> None:
    """Node and Vite bind ::1 when "localhost" means ::1: 127.0.0.1 gets refused there."""
    port = await start_http_server(any_box, bind="::1")
    tunnels = TunnelManager(relay=relay_config)
    for backend in ("local", "relay"):
        tunnel = await tunnels.open(any_box, port, backend=backend)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{tunnel.url}/index.html")).text == PAGE, backend
        await tunnels.close(tunnel.id)


async def test_a_relay_tunnel_comes_back_after_the_relay_connection_drops(
    openssh_relay: SSHD, relay_config: RelayConfig, ssh_box: Sandbox
) -> None:
    port = await start_http_server(ssh_box)  # (the relay hands out any free port: a new URL on the way back)
    seen: list[tuple[str, str]] = []
    tunnels = TunnelManager(relay=relay_config, recorder=lambda what, t: seen.append((what, t.url)))
    tunnel = await tunnels.open(ssh_box, port, backend="relay")
    first = tunnel.url
    openssh_relay.kill_connections()
    deadline = time.monotonic() + 20
    while tunnels.get(tunnel.id).url == first:
        assert time.monotonic() < deadline, "the relay tunnel did not come back"
        await asyncio.sleep(0.1)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{tunnel.url}/index.html", timeout=10)).text == PAGE
    assert seen == [("opened", first), ("moved", tunnel.url)]
    await tunnels.close_all()


async def established_to(box: Sandbox, port: int) -> int:
    """How many TCP connections to 127.0.0.1:`port` are open inside the sandbox (/proc/net/tcp)."""
    count = (
        "import sys; port = int(sys.argv[1]); rows = open('/proc/net/tcp').read().splitlines()[1:]; "
        "print(sum(1 for r in rows if int(r.split()[1].split(':')[1], 16) == port and r.split()[3] == '01'))"
    )
    return int((await box.run(f"python3 -c {shlex.quote(count)} {port}")).stdout)


@pytest.mark.parametrize("dial_finishes", [False, True])
async def test_a_relay_connection_still_being_bridged_when_its_tunnel_closes_leaves_nothing_open(
    dial_finishes: bool, ssh_box: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request arrives at the relay; its channel to the sandbox takes a while (as when the
    sandbox's connection is being re-dialed), and the tunnel closes meanwhile: that channel is
    never opened, or, should the dial finish all the same, closed once it opens. Nothing stays
    connected to the dev server in the sandbox."""
    port = await start_http_server(ssh_box, keep_alive=True)
    async with sish_relay() as relay:
        tunnels = TunnelManager(relay=sish_config(relay))
        tunnel = await tunnels.open(ssh_box, port, backend="relay")
        assert await established_to(ssh_box, port) == 0
        dial = ssh_box.connection
        dialing, closed = asyncio.Event(), asyncio.Event()

        async def slow_dial() -> asyncssh.SSHClientConnection:
            dialing.set()  # (as when the sandbox's connection is being re-dialed)
            try:
                await closed.wait()
            except asyncio.CancelledError:
                if not dial_finishes:
                    raise
                await closed.wait()  # (a dial that finishes before the tunnel's cancel lands)
            return await dial()

        monkeypatch.setattr(ssh_box, "connection", slow_dial)

        async def request() -> None:
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(timeout=5) as client:
                    await client.get(f"{tunnel.url}/index.html")

        requesting = asyncio.create_task(request())
        await asyncio.wait_for(dialing.wait(), 10)  # (at the relay, waiting for its channel)
        closing = asyncio.create_task(tunnels.close(tunnel.id))
        await asyncio.sleep(0)  # (the close has begun, and cancelled the dial)
        closed.set()
        await closing
        await requesting
        monkeypatch.undo()
        deadline = time.monotonic() + 5
        while await established_to(ssh_box, port):
            assert time.monotonic() < deadline, "a connection to the dev server outlived its tunnel"
            await asyncio.sleep(0.1)
    await stop_jobs(ssh_box)


Banner = Callable[[asyncssh.SSHWriter[str], int, int], Awaitable[None]]


async def sish_banner(out: asyncssh.SSHWriter[str], public_port: int, nth: int) -> None:
    """What sish tells a session: the public URL, in colour, among other lines."""
    out.write("\x1b[1;32mPress Ctrl-C to close the session.\x1b[0m\r\n")
    out.write(
        "Starting SSH Forwarding service for \x1b[33mhttp:80\x1b[0m. Forwarded connections can be "
        "accessed via the following methods:\r\n"
    )
    out.write(f"\x1b[36mHTTP\x1b[0m: \x1b[4mhttp://127.0.0.1:{public_port}\x1b[0m\r\n")


@dataclass
class FakeRelay:
    """A sish-style test relay: it accepts any user and remote forwards, and writes `banner` to each
    session (on stdout, or on stderr); the forward listens on 127.0.0.1:public_port."""

    port: int
    public_port: int
    connections: int = 0  # logins so far
    forwards: int = 0  # remote forwards granted so far
    live: set[asyncssh.SSHServerConnection] = field(default_factory=set)

    def drop(self) -> None:
        """Cut every connection to the relay (as a relay restart does)."""
        for conn in list(self.live):
            conn.close()


class SishStyleRelay(asyncssh.SSHServer):
    def __init__(self, relay: FakeRelay) -> None:
        self.relay = relay
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.relay.connections += 1
        self.relay.live.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.live.discard(self.conn)  # type: ignore[arg-type]

    def begin_auth(self, username: str) -> bool:
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self.relay.forwards += 1
        return True


# One host key for every test relay, as a real relay keeps its own: tether's default pool pins the
# relays it reaches for the whole run, and a later relay given a port an earlier one had would
# otherwise be refused as a changed key.
RELAY_HOST_KEY = asyncssh.generate_private_key("ssh-ed25519")


@contextlib.asynccontextmanager
async def sish_relay(stream: str = "stdout", banner: Banner = sish_banner) -> AsyncIterator[FakeRelay]:
    relay = FakeRelay(0, free_port())

    async def session(process: asyncssh.SSHServerProcess[str]) -> None:
        await banner(process.stderr if stream == "stderr" else process.stdout, relay.public_port, relay.connections)
        await process.stdin.read()  # stay open like a relay session does

    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=lambda: SishStyleRelay(relay),
        server_host_keys=[RELAY_HOST_KEY],
        process_factory=session,
    )
    relay.port = server.sockets[0].getsockname()[1]
    try:
        yield relay
    finally:
        server.close()
        relay.drop()


def sish_config(relay: FakeRelay, user: str = "anyone") -> RelayConfig:
    return RelayConfig(host=f"{user}@127.0.0.1:{relay.port}", remote_host="127.0.0.1", remote_port=relay.public_port)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_relay_url_read_from_a_sish_style_banner(stream: str, ssh_box: Sandbox) -> None:
    """The URL comes from the banner; and each tunnel has a relay connection of its own (sish reads
    the session messages of one connection from one queue: a second tunnel's URL would go to the
    first tunnel's session)."""
    port = await start_http_server(ssh_box)
    async with sish_relay(stream) as relay:
        tunnels = TunnelManager(relay=sish_config(relay))
        tunnel = await tunnels.open(ssh_box, port, backend="relay")
        assert tunnel.url == f"http://127.0.0.1:{relay.public_port}"
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{tunnel.url}/index.html")).text == PAGE
        await tunnels.close_all()
        again = await tunnels.open(ssh_box, port, backend="relay")
        await tunnels.close_all()
        assert again.url == tunnel.url and relay.connections == 2


async def split_line(out: asyncssh.SSHWriter[str], public_port: int, nth: int) -> None:
    out.write("Forwarding HTTP traffic from http://127.0.0.1:")
    await asyncio.sleep(0.3)
    out.write(f"{public_port}\r\n")


async def http_then_https(out: asyncssh.SSHWriter[str], public_port: int, nth: int) -> None:
    out.write("\x1b[32mHTTP\x1b[0m: http://abc.relay.example\r\n")
    await asyncio.sleep(0.2)  # sish sends them as two messages
    out.write("\x1b[32mHTTPS\x1b[0m: https://abc.relay.example\r\n")


async def no_newline(out: asyncssh.SSHWriter[str], public_port: int, nth: int) -> None:
    out.write(f"Your URL: http://127.0.0.1:{public_port}")


@pytest.mark.parametrize(
    ("banner", "expected"),
    [
        (split_line, "http://127.0.0.1:{public_port}"),
        (http_then_https, "https://abc.relay.example"),
        (no_newline, "http://127.0.0.1:{public_port}"),
    ],
)
async def test_the_relay_url_is_read_from_whole_lines(
    banner: Banner, expected: str, ssh_box: Sandbox, pool: ConnectionPool
) -> None:
    """A line the relay has not finished is not taken (http://127.0.0.1: is no URL yet), unless the
    relay goes quiet after it; and an https line that comes a moment after the http one wins."""
    async with sish_relay(banner=banner) as relay:
        forward = RelayForward(ssh_box, 1, sish_config(relay), pool)
        try:
            await forward.start()
            assert forward.url == expected.format(public_port=relay.public_port)
        finally:
            await forward.close()


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def test_what_a_relay_says_after_the_url_is_read_and_dropped(ssh_box: Sandbox, pool: ConnectionPool) -> None:
    """A relay that goes on writing to the session (a log line per request, for days) costs no
    memory: what it says after the URL is read and dropped, not kept unread in tether's buffers."""
    said, measured = asyncio.Event(), asyncio.Event()

    async def chatty(out: asyncssh.SSHWriter[str], public_port: int, nth: int) -> None:
        await sish_banner(out, public_port, nth)
        await measured.wait()  # (tether has the URL, and the memory before is known)
        for _ in range(1024):  # 128 MiB
            out.write("GET /index.html 200 " + "x" * 131072 + "\r\n")
            await out.drain()
        said.set()

    async with sish_relay(banner=chatty) as relay:
        forward = RelayForward(ssh_box, 1, sish_config(relay), pool)
        try:
            await forward.start()
            before = resident_mib()
            measured.set()
            await asyncio.wait_for(said.wait(), 20)  # (unread, the relay blocks on its writes)
            await asyncio.sleep(0.5)
            assert resident_mib() - before < 48
        finally:
            await forward.close()


async def test_a_relay_tunnel_cancelled_while_opening_leaves_nothing_up(ssh_box: Sandbox, pool: ConnectionPool) -> None:
    """A relay that never prints a URL, and a tool call cancelled while tether waits for one: the
    relay's connection and its forward go, nothing is recorded, and the sandbox's connection is
    no longer held."""
    port = await start_http_server(ssh_box)

    async def silent(out: asyncssh.SSHWriter[str], public_port: int, nth: int) -> None:
        pass

    def holds() -> int:  # (the pool's own count of what keeps the sandbox's connection open)
        return pool.holds(ssh_box.endpoint)

    async with sish_relay(banner=silent) as relay:
        seen: list[str] = []
        tunnels = TunnelManager(relay=sish_config(relay), recorder=lambda what, t: seen.append(what))
        held = holds()
        opening = asyncio.create_task(tunnels.open(ssh_box, port, backend="relay"))
        deadline = time.monotonic() + 10
        while not relay.forwards:
            assert time.monotonic() < deadline, "the forward was never requested"
            await asyncio.sleep(0.05)
        while holds() != held + 1:  # (waiting for the URL now, the sandbox's connection held)
            assert time.monotonic() < deadline, f"holds: {holds()}, expected {held + 1}"
            await asyncio.sleep(0.05)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        deadline = time.monotonic() + 5
        while relay.live:
            assert time.monotonic() < deadline, "the relay's connection stayed up"
            await asyncio.sleep(0.05)
        with pytest.raises(httpx.TransportError):  # the relay serves the sandbox's page no more
            async with httpx.AsyncClient() as client:
                await client.get(f"http://127.0.0.1:{relay.public_port}/index.html", timeout=5)
        assert holds() == held and tunnels.list() == [] and seen == []


async def test_a_token_in_the_relays_user_name_is_never_shown(
    ssh_box: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """Pinggy Pro logs in as TOKEN@pro.pinggy.io: not in tool errors, not in log lines (tether's
    re-open lines, asyncssh's "auth for user")."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="asyncssh")
    token = f"pbSECRETTOKEN{secrets.token_hex(4)}"
    port = await start_http_server(ssh_box)
    dead = RelayConfig(host=f"{token}@127.0.0.1:{free_port()}", remote_port=0)
    with pytest.raises(TunnelError) as caught:
        await TunnelManager(relay=dead).open(ssh_box, port, backend="relay")
    assert "relay 127.0.0.1:" in str(caught.value) and "cannot connect" in str(caught.value)
    assert token not in str(caught.value)
    for mistyped in (
        RelayConfig(host=f"{token}@127.0.0.1:4430000"),  # (a port out of range: it does not parse)
        RelayConfig(host=f"{token}=x@127.0.0.1:22"),  # (not a login name: quoted by pydantic too)
    ):
        with pytest.raises(TunnelError, match="host is not usable") as caught:
            await TunnelManager(relay=mistyped).open(ssh_box, port, backend="relay")
        assert token not in str(caught.value)
    async with sish_relay() as relay:
        tunnels = TunnelManager(relay=sish_config(relay, user=token))
        await tunnels.open(ssh_box, port, backend="relay")
    # the relay is gone: its tunnel tries to re-open, and says so
    deadline = time.monotonic() + 5
    while "re-open failed" not in caplog.text:
        assert time.monotonic() < deadline, "no re-open was logged"
        await asyncio.sleep(0.05)
    await tunnels.close_all()
    assert "Beginning auth for user" in caplog.text  # (asyncssh's line is there, its name masked)
    assert token not in caplog.text


async def test_a_relay_hears_nothing_of_why_the_sandbox_could_not_be_reached(
    ssh_box: Sandbox, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A request arriving at the relay while the sandbox cannot be reached: the relay (someone
    else's machine) sees its channel closed, with no reason of ours (an address, a user, a key
    file's path); tether's own log has it. And once the sandbox is back, the tunnel serves again."""
    port = await start_http_server(ssh_box)
    # What the relay is told when a channel it opens for a request is refused (asyncssh's relay
    # side, recorded as it comes: the HTTP client only ever sees a hang-up either way).
    told: list[str] = []
    opens = asyncssh.SSHServerConnection.create_connection

    async def told_why(self: asyncssh.SSHServerConnection, *args: Any, **kwargs: Any) -> Any:
        try:
            return await opens(self, *args, **kwargs)
        except asyncssh.ChannelOpenError as exc:
            told.append(exc.reason)
            raise

    async with sish_relay() as relay:
        forward = await RelayBackend(sish_config(relay)).open(ssh_box, port)
        try:

            async def unreachable() -> asyncssh.SSHClientConnection:
                raise ConnectionLost("me@10.1.2.3:22: key /home/me/.ssh/id_work refused")

            monkeypatch.setattr(ssh_box, "connection", unreachable)
            monkeypatch.setattr(asyncssh.SSHServerConnection, "create_connection", told_why)
            caplog.set_level(logging.WARNING, logger="tunnels.relay")
            async with httpx.AsyncClient(timeout=5) as client:
                with pytest.raises(httpx.TransportError) as hung_up:
                    await client.get(f"{forward.url}/index.html")
                assert "id_work" not in str(hung_up.value)
                assert not any("id_work" in reason for reason in told), told
                assert "id_work" in caplog.text
                monkeypatch.undo()
                assert (await client.get(f"{forward.url}/index.html")).text == PAGE
            deadline = time.monotonic() + 5
            while forward._pairings.connections or forward._pairings.pairing:  # (the request, closed after it)
                assert time.monotonic() < deadline, "a connection through the relay was kept after it ended"
                await asyncio.sleep(0.05)
        finally:
            await forward.close()
    monkeypatch.undo()
    await stop_jobs(ssh_box)


async def test_a_relay_whose_host_key_changed_is_a_tunnel_error_that_says_what_to_do(
    ssh_box: Sandbox, pool: ConnectionPool
) -> None:
    """Every failure to reach the relay is a TunnelError (whether or not its text named a user),
    and a changed host key keeps what the engine says about it."""
    async with sish_relay() as relay:
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        pool.pins.pin("127.0.0.1", relay.port, other)
        forward = RelayForward(ssh_box, 1, sish_config(relay), pool)
        with pytest.raises(TunnelError) as caught:
            await forward.start()
        await forward.close()
    message = str(caught.value)
    assert message.startswith(f"relay host key for 127.0.0.1:{relay.port} changed")
    assert f"tether forget-host 127.0.0.1:{relay.port}" in message and "anyone" not in message


async def test_a_relays_new_url_is_announced_only_once_it_answers(
    ssh_box: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a reconnect, the relay hands out a URL where nothing answers yet: the tunnel keeps its
    checked URL, and channels hear nothing, until a request through the new one gets an answer."""
    monkeypatch.setattr(tunnels_base, "REOPEN_BACKOFF", (0.2,))  # (the new URL's checks, and the relay's re-open)
    port = await start_http_server(ssh_box)
    later = free_port()
    banners = 0

    async def banner(out: asyncssh.SSHWriter[str], public_port: int, nth: int) -> None:
        nonlocal banners
        banners += 1
        out.write(f"HTTP: http://127.0.0.1:{public_port if banners == 1 else later}\r\n")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async with sish_relay(banner=banner) as relay:

        async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            to_reader, to_writer = await asyncio.open_connection("127.0.0.1", relay.public_port)
            await asyncio.gather(pipe(reader, to_writer), pipe(to_reader, writer))

        seen: list[tuple[str, str]] = []
        tunnels = TunnelManager(
            relay=sish_config(relay), recorder=lambda w, t: seen.append((w, t.url)), check_timeout=2
        )
        tunnel = await tunnels.open(ssh_box, port, backend="relay")
        first = tunnel.url
        relay.drop()
        deadline = time.monotonic() + 10
        while banners < 2:
            assert time.monotonic() < deadline, "the relay tunnel did not reconnect"
            await asyncio.sleep(0.05)
        checks = 0

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal checks
            checks += 1
            writer.close()

        refusing = await asyncio.start_server(hang_up, "127.0.0.1", later)  # the new URL gets no answer yet
        while checks < 2:  # checked (and not answered) more than once
            assert time.monotonic() < deadline, "the new URL was not checked"
            await asyncio.sleep(0.05)
        refusing.close()
        await refusing.wait_closed()
        assert tunnel.url == first and seen == [("opened", first)]
        server = await asyncio.start_server(proxy, "127.0.0.1", later)  # the new URL answers now
        try:
            while tunnel.url == first:
                assert time.monotonic() < deadline + 10, "the new URL was never taken"
                await asyncio.sleep(0.05)
            assert seen == [("opened", first), ("moved", f"http://127.0.0.1:{later}")]
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{tunnel.url}/index.html")).text == PAGE
        finally:
            await tunnels.close_all()
            server.close()


async def test_auto_goes_on_to_local_when_the_relay_is_unreachable(
    local_box: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay nobody answers at, and an HTTP_PROXY that cannot reach this machine's 127.0.0.1: auto
    still ends with a checked local URL (the check of a URL on this machine bypasses the proxy)."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    port = await start_http_server(local_box)
    tunnels = TunnelManager(relay=RelayConfig(host=f"nobody@127.0.0.1:{free_port()}", remote_port=0))
    tables: list[str] = []  # (where the port listens is read once, not again for local after the relay)
    read_bytes = local_box.read_bytes

    async def reading(path: str) -> bytes:
        tables.extend([path] if path.startswith("/proc/net/") else [])
        return await read_bytes(path)

    monkeypatch.setattr(local_box, "read_bytes", reading)
    tunnel = await tunnels.open(local_box, port)
    assert tunnel.backend == "local"
    assert sorted(tables) == ["/proc/net/tcp", "/proc/net/tcp6"]
    with pytest.raises(TunnelError, match="relay"):  # named, it says what failed
        await tunnels.open(local_box, port, backend="relay")
    await tunnels.close_all()


async def test_auto_does_not_wait_long_on_a_relay_that_never_speaks(local_box: Sandbox) -> None:
    """A relay that accepts the TCP connection and says nothing: its login timeout, then local."""
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        port = await start_http_server(local_box)
        relay = RelayConfig(host=f"nobody@127.0.0.1:{silent.getsockname()[1]}", remote_port=0, login_timeout=1)
        tunnels = TunnelManager(relay=relay)
        started = time.monotonic()
        tunnel = await tunnels.open(local_box, port)
        assert tunnel.backend == "local" and time.monotonic() - started < 10
        await tunnels.close_all()
    finally:
        silent.close()


def test_find_url_in_banners() -> None:
    sish = (
        "\x1b[32mHTTP\x1b[0m: http://abc.sish.example\r\n\x1b[32mHTTPS\x1b[0m: "
        "\x1b[4mhttps://abc.sish.example\x1b[0m\r\n"
    )
    assert find_url(sish) == "https://abc.sish.example"
    localhost_run = "abc123.lhr.life tunneled with tls termination, https://abc123.lhr.life.\n"
    assert find_url(localhost_run) == "https://abc123.lhr.life"
    # whole welcome texts link the relay's own pages first
    welcome = (
        "Welcome to localhost.run!\n\nFollow your favourite reverse tunnel at [https://twitter.com/localhost_run].\n"
        "To set up and manage custom domains go to https://admin.localhost.run/\n\nMore details on custom "
        "domains at https://localhost.run/docs/custom-domains\n\nTo explore using localhost.run visit the "
        "documentation site:\nhttps://localhost.run/docs/\n\n** your connection id is 7e5d, please mention it "
        "if you send me a message about an issue. **\n\n"
    )
    assert find_url(welcome) is None  # (the tunnel line has not come yet: wait for it)
    assert find_url(welcome + localhost_run) == "https://abc123.lhr.life"
    # as a tunnel reads it: the relay's name and the subdomain asked for (remote_host "localhost",
    # the default, which is no subdomain: localhost.run's own pages are still its pages)
    assert find_url(welcome, relay="localhost.run", subdomain="localhost") is None
    assert find_url(welcome + localhost_run, relay="localhost.run", subdomain="localhost") == "https://abc123.lhr.life"
    pinggy = (
        "You are not authenticated.\nYour tunnel will expire in 60 minutes. Upgrade to Pinggy Pro to get "
        "unrestricted tunnels. https://dashboard.pinggy.io\n\nhttp://rnxyz-203-0-113-5.a.free.pinggy.link\n"
        "https://rnxyz-203-0-113-5.a.free.pinggy.link\n"
    )
    assert find_url(pinggy) == "https://rnxyz-203-0-113-5.a.free.pinggy.link"
    assert find_url("no url here") is None
    # a tunnel may be named like a relay's page (sish takes remote_host as the subdomain; a custom
    # domain may start with www): a page is one on the relay's own domain
    sish_app = "HTTP: http://app.tuns.sh\r\nHTTPS: https://app.tuns.sh\r\n"
    assert find_url(sish_app, relay="tuns.sh", subdomain="app") == "https://app.tuns.sh"
    assert find_url(sish_app, relay="tuns.sh", subdomain="localhost") is None
    custom = "set up at https://admin.localhost.run/\nhttps://www.example.com tunneled with tls termination\n"
    assert find_url(custom, relay="localhost.run") == "https://www.example.com"
    assert find_url(pinggy, relay="a.pinggy.io") == "https://rnxyz-203-0-113-5.a.free.pinggy.link"
    # any page of the relay's own site, whatever its name, is not a tunnel: tunnels have names of
    # their own (or, on a relay that tells them apart by port, a port)
    site = "FAQ: https://localhost.run/faq and https://www.localhost.run\n"
    assert find_url(site, relay="localhost.run") is None
    assert find_url(site + localhost_run, relay="localhost.run") == "https://abc123.lhr.life"
    pricing = "Pricing: https://pinggy.io/pricing\n"
    assert find_url(pricing + pinggy, relay="a.pinggy.io") == "https://rnxyz-203-0-113-5.a.free.pinggy.link"
    assert find_url("at http://relay.example:40123\n", relay="relay.example") == "http://relay.example:40123"
    assert find_url("at http://127.0.0.1/\n", relay="127.0.0.1") == "http://127.0.0.1/"
    assert (
        find_url("see https://docs.example and go https://x.tunnel.example", r"(https://\S+\.tunnel\.example)")
        == "https://x.tunnel.example"
    )


# -- the provider hook -----------------------------------------------------------------------------------


class PreviewingProvider(LocalProvider):
    """A provider with URLs of its own for ports (like E2B's {port}-{id} hosts), behind a token header."""

    name = "previewing"
    token = "preview-secret-123"

    async def preview_url(self, handle, port):  # type: ignore[no-untyped-def]
        return f"http://127.0.0.1:{_token_gate_port}/{port}", {"x-preview-token": self.token}


_token_gate_port = 0


@contextlib.contextmanager
def token_gate() -> Iterator[int]:
    """The provider's edge: forwards /PORT/... to 127.0.0.1:PORT when the token header is right."""

    class Gate(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("x-preview-token") != PreviewingProvider.token:
                self.send_response(403)
                self.end_headers()
                return
            port, _, rest = self.path.lstrip("/").partition("/")
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/{rest}").content
            except httpx.ConnectError:  # (as E2B's and Daytona's edges answer for a closed port)
                self.send_response(502)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gate)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()


async def test_provider_backend_through_a_test_provider() -> None:
    global _token_gate_port
    config = {
        "providers": [{"name": "previewing", "class": "tests.test_tunnels:PreviewingProvider"}],
        "pools": [{"name": "previews", "provider": "previewing"}],
    }
    fleet = Fleet(config=config)
    with token_gate() as gate_port:
        _token_gate_port = gate_port
        try:
            box = await fleet.create(Request(pool="previews"))
            port = await start_http_server(box)
            from tools.links import preview_source

            # auto: the provider's own URL wins over a configured relay (here one where nothing
            # listens, so choosing it would fail) and over local
            nowhere = RelayConfig(host=f"anyone@127.0.0.1:{free_port()}", remote_port=0)
            tunnels = TunnelManager(relay=nowhere)
            tunnel = await tunnels.open(box, port, preview=preview_source(fleet, box.id))
            assert tunnel.backend == "provider" and tunnel.headers == {"x-preview-token": PreviewingProvider.token}
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{tunnel.url}/index.html", headers=tunnel.headers)).text == PAGE
                assert (await client.get(f"{tunnel.url}/index.html")).status_code == 403
            # the edge's 502 for a port where nothing listens is no answer of the app's
            closed = free_port()
            with pytest.raises(NothingListens, match=f"nothing is listening on port {closed}"):
                await tunnels.open(box, closed, backend="provider", preview=preview_source(fleet, box.id))
        finally:
            await fleet.close(teardown_created=True)


# -- chat channels -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def webhook_receiver(fail_first: int = 0) -> Iterator[tuple[str, list[tuple[str, dict[str, str], bytes]]]]:
    received: list[tuple[str, dict[str, str], bytes]] = []
    failures = {"left": fail_first}

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if failures["left"] > 0:
                failures["left"] -= 1
                self.send_response(503)
            else:
                received.append((self.path, dict(self.headers), body))
                self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()


async def test_tunnel_urls_reach_chat_channels_signed(ssh_box: Sandbox) -> None:
    """Every channel's first delivery fails once (503) and is retried: each channel still hears of
    the tunnel's opening before its closing."""
    port = await start_http_server(ssh_box)
    with webhook_receiver(fail_first=3) as (base, received):
        os.environ["TETHER_TEST_HOOK_SECRET"] = "s3cret-for-hmac"
        channels = [
            ChannelConfig(kind="slack", url=f"{base}/slack"),
            ChannelConfig(kind="discord", url=f"{base}/discord", events=["tunnel.opened"]),
            ChannelConfig(kind="webhook", url=f"{base}/hook", secret_env="TETHER_TEST_HOOK_SECRET"),
        ]
        notifier = Notifier(channels, delays=(0.05, 0.1))
        tunnels = TunnelManager(notifier=notifier)
        tunnel = await tunnels.open(ssh_box, port, backend="local", sandbox={"id": "sb-x", "name": "demo"})
        await tunnels.close(tunnel.id)
        await notifier.drain()
    by_path: dict[str, list[tuple[dict[str, str], bytes]]] = {}
    for path, headers, body in received:
        by_path.setdefault(path, []).append((headers, body))
    assert sorted(by_path) == ["/discord", "/hook", "/slack"]
    assert len(by_path["/discord"]) == 1  # it asked for tunnel.opened only
    slack_texts = [json.loads(b)["text"] for _, b in by_path["/slack"]]
    opened_text = f"tether: port {port} of demo is at {tunnel.url}"
    assert slack_texts == [opened_text, f"tether: tunnel to port {port} of demo closed"]
    assert json.loads(by_path["/discord"][0][1])["content"] == opened_text
    for headers, body in by_path["/hook"]:
        expected = "sha256=" + hmac.new(b"s3cret-for-hmac", body, hashlib.sha256).hexdigest()
        assert headers["X-Tether-Signature"] == expected
        payload = json.loads(body)
        assert payload["tunnel"]["url"] == tunnel.url and payload["sandbox"]["name"] == "demo"
    assert [json.loads(b)["event"] for _, b in by_path["/hook"]] == ["tunnel.opened", "tunnel.closed"]
    assert notifier.failures == []  # the first 503s were retried


async def test_what_agents_name_cannot_ping_or_link_in_chat(ssh_box: Sandbox) -> None:
    """A tunnel path and a sandbox name come from agents: in Slack they must not become <!channel>
    or a <link|dressed as another>, in Discord not an @everyone ping."""
    port = await start_http_server(ssh_box)
    hostile = "<!channel> @everyone & <https://evil.example/login|https://sso.example>"
    with webhook_receiver() as (base, received):
        channels = [ChannelConfig(kind="slack", url=f"{base}/slack"), ChannelConfig(kind="discord", url=f"{base}/d")]
        notifier = Notifier(channels)
        tunnels = TunnelManager(notifier=notifier)
        tunnel = await tunnels.open(
            ssh_box, port, backend="local", path=f"/ {hostile}", sandbox={"id": "sb-x", "name": hostile}
        )
        await tunnels.close(tunnel.id)
        await notifier.drain()
    assert not set(tunnel.url) & set(" <>|\n"), tunnel.url
    assert tunnel.url.endswith(
        "/%20%3C!channel%3E%20@everyone%20&%20%3Chttps://evil.example/login%7Chttps://sso.example%3E"
    )
    [slack, _closed] = sorted((json.loads(b)["text"] for p, _, b in received if p == "/slack"), key=len, reverse=True)
    assert "<" not in slack and ">" not in slack
    assert "of &lt;!channel&gt; @everyone &amp; &lt;https://evil.example/login|https://sso.example&gt; is at" in slack
    discord = [json.loads(b) for p, _, b in received if p == "/d"]
    assert discord and all(d["allowed_mentions"] == {"parse": []} for d in discord)


async def test_a_failing_channel_never_fails_the_caller(ssh_box: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    port = await start_http_server(ssh_box)
    secret_url = "http://127.0.0.1:1/hooks/SECRET-PART"
    notifier = Notifier([ChannelConfig(kind="slack", url=secret_url, name="team")], delays=(0.01,))
    tunnels = TunnelManager(notifier=notifier)
    tunnel = await tunnels.open(ssh_box, port, backend="local")
    await notifier.drain()
    assert notifier.failures and "slack channel team: could not deliver tunnel.opened" in notifier.failures[0]
    assert "SECRET-PART" not in caplog.text
    await tunnels.close(tunnel.id)


def test_proc_net_tcp_and_netstat_parsing() -> None:
    proc = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 1 1\n"
        "   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1\n"
        "   2: 0100007F:0016 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1001        0 3 1\n"
    )
    assert parse_proc_net_tcp(proc) == {8080, 22}
    assert parse_proc_net_tcp(proc, uid=1001) == {8080}
    netstat = (
        "tcp        0      0 127.0.0.1:8000          0.0.0.0:*               LISTEN\n"
        "tcp4       0      0  *.5432                 *.*                    LISTEN\n"
        "tcp        0      0 10.0.0.1:22             10.0.0.2:5000           ESTABLISHED\n"
    )
    assert parse_netstat(netstat) == {8000, 5432}


# -- the MCP tools and the CLI ---------------------------------------------------------------------------


async def test_tunnel_tools_over_mcp() -> None:
    async with stdio_client() as client:
        job = structured(
            await client.call_tool(
                "run", {"command": "python3 -m http.server 0 --bind 127.0.0.1", "run_in_background": True}
            )
        )
        out = ""
        while "port" not in out:
            out += structured(await client.call_tool("job_output", {"job_id": job["job_id"], "wait_ms": 5000}))[
                "stdout"
            ]
        port = int(out.split("port ")[1].split()[0])
        info = structured(await client.call_tool("sandbox_info", {}))
        assert port in info["listening_ports"]
        opened = structured(await client.call_tool("tunnel_open", {"port": port, "path": "/"}))
        assert opened["backend"] == "local" and opened["headers"] == {}
        # tether's own ports there are no server of the sandbox's: its SSH server, the tunnel's listener
        listed_ports = structured(await client.call_tool("sandbox_info", {}))["listening_ports"]
        assert port in listed_ports and info["ssh"]["port"] not in listed_ports
        assert int(opened["url"].split(":")[2].split("/")[0]) not in listed_ports
        async with httpx.AsyncClient() as http:
            assert (await http.get(opened["url"])).status_code == 200
        listed = structured(await client.call_tool("tunnel_list", {}))
        assert [t["tunnel_id"] for t in listed["tunnels"]] == [opened["tunnel_id"]]
        refused = await client.call_tool("tunnel_open", {"port": 9})
        assert refused.is_error and "nothing is listening on port 9" in text(refused)
        closed = structured(await client.call_tool("tunnel_close", {"tunnel_id": opened["tunnel_id"]}))
        assert closed["status"] == "closed"
        assert structured(await client.call_tool("tunnel_list", {}))["tunnels"] == []
        again_closed = await client.call_tool("tunnel_close", {"tunnel_id": opened["tunnel_id"]})
        assert structured(again_closed)["status"] == "closed" and "already closed" in text(again_closed)
        unknown = await client.call_tool("tunnel_close", {"tunnel_id": "t-nosuch"})
        assert unknown.is_error and "tunnel_list" in text(unknown)
        # a sandbox ended by another process (`tether down` in another shell): its tunnels close here
        again = structured(await client.call_tool("tunnel_open", {"port": port}))
        assert (await asyncio.to_thread(tether, "down", info["id"])).returncode == 0
        deadline = time.monotonic() + 10
        while structured(await client.call_tool("tunnel_list", {}))["tunnels"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert structured(await client.call_tool("tunnel_list", {}))["tunnels"] == []
        with pytest.raises(httpx.TransportError):
            async with httpx.AsyncClient() as http:
                await http.get(again["url"], timeout=5)


async def test_tether_tunnel_command(local_box: Sandbox, tmp_path: Path) -> None:
    port = await start_http_server(local_box)
    with webhook_receiver() as (base, received):
        config = tmp_path / "config.toml"
        config.write_text(f'[[channels]]\nkind = "webhook"\nurl = "{base}/hook"\nsecret = "s3cret"\n')
        process = tether_process("tunnel", local_box.id, str(port), env=server_env(TETHER_CONFIG=str(config)))
        try:
            url = (await asyncio.to_thread(process.stdout.readline)).strip()  # type: ignore[union-attr]
            assert url.startswith("http://127.0.0.1:"), process.stderr.read() if process.stderr else url
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{url}/index.html")).text == PAGE
            process.send_signal(signal.SIGINT)
            assert await asyncio.to_thread(process.wait, 15) == 0
        finally:
            if process.poll() is None:
                process.kill()
    with pytest.raises(httpx.TransportError):  # Ctrl-C closed it
        async with httpx.AsyncClient() as client:
            await client.get(f"{url}/index.html", timeout=5)
    rows = json.loads(tether("info", local_box.id, "--json").stdout)["tunnels"]  # type: ignore[attr-defined]
    assert all(row["url"] != url for row in rows)  # and its record with it
    events = {json.loads(body)["event"]: json.loads(body) for _, _, body in received}
    assert sorted(events) == ["tunnel.closed", "tunnel.opened"]
    # the sandbox as the server's tunnel events and the fleet's own events name it
    assert events["tunnel.opened"]["sandbox"] == {
        "id": local_box.id,  # type: ignore[attr-defined]
        "name": local_box.name,
        "provider": "local",
        "pool": "local",
        "status": "running",
    }


async def test_tether_tunnel_ends_its_sandbox_when_its_ttl_runs_out() -> None:
    """Connections through a tunnel are no use that would end an expired sandbox, and `tether tunnel`
    runs no reaper: it ends the sandbox itself, tunnel and all, once its TTL is up."""
    fleet = Fleet(config={})
    box = await fleet.create(Request(provider="local", timeout_s=6))
    try:
        port = await start_http_server(box)
        process = tether_process("tunnel", box.id, str(port))
        try:
            url = (await asyncio.to_thread(process.stdout.readline)).strip()  # type: ignore[union-attr]
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{url}/index.html")).text == PAGE
            assert await asyncio.to_thread(process.wait, 20) == 1
            assert "ended (expired (TTL)); tunnel closed" in process.stderr.read()  # type: ignore[union-attr]
        finally:
            if process.poll() is None:
                process.kill()
        assert fleet.ledger.get(box.id).status == "terminated"
        with pytest.raises(httpx.TransportError):
            async with httpx.AsyncClient() as client:
                await client.get(f"{url}/index.html", timeout=5)
    finally:
        await fleet.close(teardown_created=True)


async def test_a_tunnel_closes_when_another_process_ends_its_sandbox() -> None:
    fleet = Fleet(config={})
    box = await fleet.create(Request(provider="local", keep=True))
    process = None
    try:
        port = await start_http_server(box)
        process = tether_process("tunnel", box.id, str(port))
        url = (await asyncio.to_thread(process.stdout.readline)).strip()  # type: ignore[union-attr]
        assert url.startswith("http://127.0.0.1:")
        assert (await asyncio.to_thread(tether, "down", box.id)).returncode == 0  # from another shell
        assert await asyncio.to_thread(process.wait, 15) == 1
        assert "ended (destroyed); tunnel closed" in process.stderr.read()  # type: ignore[union-attr]
        with pytest.raises(httpx.TransportError):
            async with httpx.AsyncClient() as client:
                await client.get(url, timeout=5)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        await fleet.close()


async def test_the_record_of_a_tunnel_whose_process_died_is_closed(local_box: Sandbox) -> None:
    port = await start_http_server(local_box)
    cli = [sys.executable, "-m", "tools.cli"]
    sandbox_id = local_box.id  # type: ignore[attr-defined]
    process = subprocess.Popen(
        [*cli, "tunnel", sandbox_id, str(port)], cwd=ROOT, env=server_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        url = (await asyncio.to_thread(process.stdout.readline)).strip()  # type: ignore[union-attr]

        def info_tunnels() -> list[dict[str, object]]:
            return json.loads(tether("info", sandbox_id, "--json").stdout)["tunnels"]  # type: ignore[no-any-return]

        (listed,) = await asyncio.to_thread(info_tunnels)  # another process sees it while it is held
        assert (listed["url"], listed["port"], listed["status"]) == (url, port, "open")
        async with stdio_client() as client:  # and so does an MCP server
            tunnels = structured(await client.call_tool("tunnel_list", {}))["tunnels"]
            held = next(t for t in tunnels if t["tunnel_id"] == listed["tunnel_id"])
            assert (held["url"], held["held_by_pid"]) == (url, process.pid)
            refused = await client.call_tool("tunnel_close", {"tunnel_id": listed["tunnel_id"]})
            assert refused.is_error and f"pid {process.pid}" in text(refused)
        process.kill()  # no Ctrl-C: the process cannot close its record
        process.wait()
        gc = tether("gc", "--json")
        assert listed["tunnel_id"] in json.loads(gc.stdout)["tunnels_closed"]  # (other tests' may be too)
        assert await asyncio.to_thread(info_tunnels) == []
    finally:
        if process.poll() is None:
            process.kill()


async def test_sandbox_events_reach_channels_and_tunnels_end_with_their_sandbox(tmp_path: Path) -> None:
    with webhook_receiver() as (base, received):
        config = tmp_path / "config.toml"
        config.write_text(f'[[channels]]\nkind = "webhook"\nurl = "{base}/hook"\nsecret = "s3cret"\n')
        async with stdio_client(env=server_env(TETHER_CONFIG=str(config))) as client:
            created = structured(await client.call_tool("sandbox_create", {"provider": "local", "name": "evented"}))
            job = structured(
                await client.call_tool(
                    "run",
                    {
                        "command": "python3 -m http.server 0 --bind 127.0.0.1",
                        "run_in_background": True,
                        "sandbox": "evented",
                    },
                )
            )
            out = ""
            while "port" not in out:
                polled = await client.call_tool("job_output", {"job_id": job["job_id"], "wait_ms": 5000})
                out += structured(polled)["stdout"]
            port = int(out.split("port ")[1].split()[0])
            tunnel = structured(await client.call_tool("tunnel_open", {"port": port, "sandbox": "evented"}))
            destroyed = structured(await client.call_tool("sandbox_destroy", {"sandbox": "evented"}))
            for _ in range(50):  # the tunnel closes in the background as the sandbox ends
                if not structured(await client.call_tool("tunnel_list", {}))["tunnels"]:
                    break
                await asyncio.sleep(0.1)
            assert structured(await client.call_tool("tunnel_list", {}))["tunnels"] == []
            async with httpx.AsyncClient() as http:
                with pytest.raises(httpx.HTTPError):
                    await http.get(tunnel["url"], timeout=2)
        events = {}
        for _, headers, body in received:
            assert headers["X-Tether-Signature"] == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
            payload = json.loads(body)
            events[payload["event"]] = payload
    assert set(events) == {"sandbox.created", "tunnel.opened", "tunnel.closed", "sandbox.terminated"}
    assert events["sandbox.created"]["sandbox"]["id"] == created["id"]
    terminated = events["sandbox.terminated"]
    assert terminated["sandbox"]["name"] == "evented"
    for key in ("seconds", "gpu_seconds", "billing_model", "estimated_usd"):
        assert terminated["cost"][key] == destroyed["cost"][key], key


def test_the_cli_tells_channels_of_sandboxes_it_creates_and_ends(tmp_path: Path) -> None:
    with webhook_receiver() as (base, received):
        config = tmp_path / "config.toml"
        config.write_text(f'[[channels]]\nkind = "webhook"\nurl = "{base}/hook"\nsecret = "s3cret"\n')
        env = server_env(TETHER_CONFIG=str(config))
        up = tether("up", "local", env=env)
        sandbox_id = up.stdout.strip()
        down = tether("down", sandbox_id, env=env)
        assert up.returncode == down.returncode == 0, down.stderr
        events = [(json.loads(body)["event"], json.loads(body)["sandbox"]["id"]) for _, _, body in received]
    assert events == [("sandbox.created", sandbox_id), ("sandbox.terminated", sandbox_id)]


def test_a_dead_channel_holds_a_cli_command_up_briefly_and_says_so(tmp_path: Path) -> None:
    """A person waits on `tether up`: not through a failing channel's whole backoff (7.5 s)."""
    with webhook_receiver(fail_first=1000) as (base, _received):
        config = tmp_path / "config.toml"
        config.write_text(f'[[channels]]\nkind = "slack"\nurl = "{base}/slack"\n')
        started = time.monotonic()
        up = tether("up", "local", env=server_env(TETHER_CONFIG=str(config)))
        took = time.monotonic() - started
    assert up.returncode == 0, up.stderr
    assert "slack channel: could not deliver sandbox.created: still failing when tether exited" in up.stderr
    assert took < 7, took
    assert tether("down", up.stdout.strip()).returncode == 0


async def test_a_channel_url_httpx_cannot_use_is_a_logged_failure() -> None:
    channels = [ChannelConfig(kind="slack", url="http://127.0.0.1:99999/x", name="bad-port")]
    notifier = Notifier(channels, delays=(0.01,))
    notifier.emit("tunnel.opened", {"tunnel": {"port": 1}})
    await notifier.drain()
    assert notifier.failures and "slack channel bad-port: could not deliver tunnel.opened" in notifier.failures[0]
    unset = Notifier([ChannelConfig(kind="slack", url_env="TETHER_TEST_UNSET_URL", name="team")], delays=(0.01,))
    unset.emit("tunnel.opened", {"tunnel": {"port": 1}})
    await unset.drain()
    assert unset.failures == ["slack channel team: could not deliver tunnel.opened: $TETHER_TEST_UNSET_URL is not set"]
