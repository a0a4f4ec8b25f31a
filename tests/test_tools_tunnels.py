"""`tether tunnel` as a real process: what it prints while it holds the tunnel, and what other
processes (the MCP server) see of the tunnel it holds."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import select
import threading
import time
from collections.abc import Iterator
from typing import Any

from tests.mcp_support import server_env, stdio_client, structured, tether, tether_process


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def web_server() -> Iterator[int]:
    """An HTTP server on loopback (a local sandbox shares this machine's network): its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def held_tunnel(sandbox: str, port: int) -> Iterator[dict[str, Any]]:
    """`tether tunnel SANDBOX PORT --json` into a pipe, with Python's own buffering (this machine
    may set PYTHONUNBUFFERED, which would hide a missing flush): the tunnel it printed while it
    still holds it."""
    env = server_env()
    env.pop("PYTHONUNBUFFERED", None)
    process = tether_process("tunnel", sandbox, str(port), "--backend", "local", "--json", env=env, text=False)
    assert process.stdout is not None
    try:
        printed, deadline = b"", time.monotonic() + 30
        while not printed.rstrip().endswith(b"}"):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"nothing printed while the tunnel is open: {printed!r}"
            if select.select([process.stdout], [], [], 0.2)[0]:
                printed += os.read(process.stdout.fileno(), 65536)
        yield json.loads(printed)
    finally:
        process.terminate()
        process.communicate(timeout=30)


@contextlib.contextmanager
def local_sandbox(name: str) -> Iterator[str]:
    up = tether("up", "local", "--name", name)
    assert up.returncode == 0, up.stderr
    try:
        yield up.stdout.strip()
    finally:
        tether("down", up.stdout.strip())


def test_tunnel_json_reaches_a_pipe_while_the_tunnel_is_open() -> None:
    with local_sandbox("tunnel-json") as box, web_server() as port, held_tunnel(box, port) as tunnel:
        assert tunnel["port"] == port and tunnel["url"].startswith("http://")


async def test_sandbox_info_lists_a_tunnel_held_by_another_process() -> None:
    """As tunnel_list and `tether info` do: the tunnel is the sandbox's, whoever holds it."""
    with local_sandbox("tunnel-elsewhere") as box, web_server() as port, held_tunnel(box, port) as tunnel:
        async with stdio_client() as client:
            info = structured(await client.call_tool("sandbox_info", {"sandbox": box}))
            listed = structured(await client.call_tool("tunnel_list", {"sandbox": box}))
        [shown] = [t for t in info["tunnels"] if t["tunnel_id"] == tunnel["tunnel_id"]]
        assert shown["url"] == tunnel["url"] and shown["port"] == port and shown["held_by_pid"]
        assert [t["tunnel_id"] for t in listed["tunnels"]] == [t["tunnel_id"] for t in info["tunnels"]]


async def test_no_tunnel_publishes_the_mcp_server_or_tethers_ssh_server() -> None:
    """On loopback the HTTP server asks no token: a tunnel to its port (a local sandbox shares this
    machine's network) would hand the whole server to anyone with the URL, a relay's public one
    included. tunnel_open refuses it, and the embedded SSH server's port, for every backend; a
    server of the sandbox's own goes through."""
    from urllib.parse import urlsplit

    from tests.mcp_support import http_client, http_server

    with http_server() as (_, url, _), web_server() as app:
        async with http_client(url) as client:
            structured(await client.call_tool("run", {"command": "true"}))  # (the default sandbox, made)
            info = structured(await client.call_tool("sandbox_info", {}))
            assert info["provider"] == "local"
            for port in (urlsplit(url).port, info["ssh"]["port"]):
                for backend in ("local", "auto"):
                    refused = await client.call_tool("tunnel_open", {"port": port, "backend": backend})
                    assert refused.is_error, (port, backend)
                    assert "is tether's own" in refused.content[0].text
            opened = structured(await client.call_tool("tunnel_open", {"port": app, "backend": "local"}))
            assert opened["url"].startswith("http://127.0.0.1:")
