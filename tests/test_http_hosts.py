"""`tether mcp --transport http --allow-host`: the Host and Origin headers a real server accepts,
as a browser, a client or a reverse proxy in front of it sends them."""

from __future__ import annotations

import httpx

from tests.mcp_support import http_server, server_env, tether

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


TOKEN = "proxied-token-0123456789"


async def test_allowed_hosts_with_and_without_ports_and_https_origins() -> None:
    env = server_env(TETHER_MCP_TOKEN=TOKEN)
    with http_server("--allow-host", "Tether.example", "--allow-host", "pinned.example:9443", env=env) as (_, url, _):
        port = url.split(":")[2].split("/")[0]

        async def status(host: str, origin: str | None = None) -> int:
            headers = {**MCP_HEADERS, "Host": host, "Authorization": f"Bearer {TOKEN}"}
            headers |= {"Origin": origin} if origin else {}
            async with httpx.AsyncClient() as client:
                return (await client.post(url, headers=headers, json=INITIALIZE)).status_code

        # a bare name: as a reverse proxy passes it on (no port), or with any port
        for host in ("tether.example", "tether.example:443", "tether.example:8080"):
            assert await status(host) == 200, host
        # its pages, over https behind a TLS proxy or plain http
        for origin in ("https://tether.example", "http://tether.example", "https://tether.example:8443"):
            assert await status("tether.example", origin) == 200, origin
        # a name with a port: exactly that
        assert await status("pinned.example:9443", "https://pinned.example:9443") == 200
        for host in ("pinned.example", "pinned.example:9444"):
            assert await status(host) == 421, host
        # other names, and pages elsewhere, are still refused (DNS rebinding)
        for host in ("evil.example", "evil.example:443", "tether.example.evil.example"):
            assert await status(host) == 421, host
        for origin in ("https://evil.example", "https://tether.example.evil.example", "null"):
            assert await status("tether.example", origin) == 403, origin
        # loopback as before; names in any letter case (they are case-insensitive)
        assert await status(f"127.0.0.1:{port}", f"http://127.0.0.1:{port}") == 200
        assert await status(f"LocalHost:{port}", f"HTTP://LOCALHOST:{port}") == 200
        assert await status("TETHER.example", "https://Tether.Example") == 200
        assert await status(f"LocalHost.evil.example:{port}") == 421
        assert await status("127.0.0.1", "http://127.0.0.1") == 421  # (loopback names carry the port)


async def test_a_wildcard_bind_with_allowed_hosts_still_answers_on_loopback() -> None:
    env = server_env(TETHER_MCP_TOKEN=TOKEN)
    with http_server("--allow-host", "tether.example", env=env, host="0.0.0.0") as (_, url, _):
        port = url.split(":")[2].split("/")[0]
        async with httpx.AsyncClient() as client:
            for host, expected in ((f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), ("tether.example", 200)):
                headers = {**MCP_HEADERS, "Host": host, "Authorization": f"Bearer {TOKEN}"}
                answer = await client.post(f"http://127.0.0.1:{port}/mcp", headers=headers, json=INITIALIZE)
                assert answer.status_code == expected, host
            headers = {**MCP_HEADERS, "Host": "evil.example", "Authorization": f"Bearer {TOKEN}"}
            answer = await client.post(f"http://127.0.0.1:{port}/mcp", headers=headers, json=INITIALIZE)
            assert answer.status_code == 421


async def test_a_wildcard_bind_with_a_token_serves_other_machines_by_any_name() -> None:
    """Bound to 0.0.0.0 with no --allow-host, the names other machines use are unknown: the token
    is the protection (as off loopback), and a request with it is served whatever its Host."""
    env = server_env(TETHER_MCP_TOKEN=TOKEN)
    with http_server(env=env, host="0.0.0.0") as (_, url, _):
        port = url.split(":")[2].split("/")[0]
        async with httpx.AsyncClient() as client:
            for host in ("10.0.0.5:" + port, "box.lan:" + port, f"127.0.0.1:{port}"):
                headers = {**MCP_HEADERS, "Host": host, "Authorization": f"Bearer {TOKEN}"}
                answer = await client.post(f"http://127.0.0.1:{port}/mcp", headers=headers, json=INITIALIZE)
                assert answer.status_code == 200, host
            headers = {**MCP_HEADERS, "Host": "box.lan:" + port}
            assert (
                await client.post(f"http://127.0.0.1:{port}/mcp", headers=headers, json=INITIALIZE)
            ).status_code == 401


def test_a_malformed_allow_host_is_refused_before_serving() -> None:
    for bad in ("box:http", "box:0", ":8080", "box:99999"):
        refused = tether("mcp", "--transport", "http", "--port", "0", "--allow-host", bad, timeout=30)
        assert refused.returncode == 2 and "--allow-host takes HOST" in refused.stderr, refused.stderr
        assert "serving" not in refused.stderr


def test_a_name_a_proxy_serves_needs_a_token_and_loopback_names_do_not() -> None:
    """A reverse proxy in front of a loopback bind passes on other machines' requests: an
    --allow-host name that is not loopback's is refused without a token, before serving."""
    refused = tether("mcp", "--transport", "http", "--port", "0", "--allow-host", "tether.example", timeout=30)
    assert refused.returncode == 2 and "serving" not in refused.stderr, refused.stderr
    assert "refusing to serve MCP for --allow-host tether.example without authentication" in refused.stderr
    with http_server("--allow-host", "localhost:9000", "--allow-host", "[::1]") as (_, url, said):
        assert url.startswith("http://127.0.0.1:") and "token" not in said
