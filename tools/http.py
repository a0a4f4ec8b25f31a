"""`tether mcp --transport http`: streamable HTTP with the security an agent-facing server needs.

- Binds 127.0.0.1 by default. Any other address requires a bearer token: TETHER_MCP_TOKEN, or one
  generated with --generate-token and printed once. Without either it refuses to start.
- With a token set (on any address), every request must carry `Authorization: Bearer <token>`;
  others get 401. Compared in constant time.
- Host and Origin headers are checked against DNS rebinding (the MCP SDK's transport security):
  on loopback only 127.0.0.1/localhost hosts and origins are accepted; add more with --allow-host
  (see host_patterns), whose pages may be http or https origins.
- Request bodies are limited (MAX_REQUEST_BYTES; the SDK answers 413 beyond).
"""

from __future__ import annotations

import hmac
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from sandbox.endpoint import is_loopback
from tunnels.ports import PRIVATE_PORTS

MAX_REQUEST_BYTES = 16 * 1024 * 1024  # a write tool call carries a whole file
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]


class HTTPSecurityError(ValueError):
    """The HTTP transport was asked to start in a way that would expose it."""


def url_host(host: str) -> str:
    """`host` as a URL (and a Host header) writes it: an IPv6 address in brackets."""
    host = host.strip("[]")
    return f"[{host}]" if ":" in host else host


def resolve_token(
    host: str,
    generate: bool,
    environ: MutableMapping[str, str] = os.environ,
    *,
    allowed_hosts: Sequence[str] = (),
) -> str | None:
    """The bearer token to require, or None (loopback without TETHER_MCP_TOKEN).

    Raises HTTPSecurityError when the server would be reachable from elsewhere with no token and no
    --generate-token: a non-loopback bind, or an --allow-host name that is not loopback's (a
    reverse proxy in front of a loopback bind passes other machines' requests on).
    """
    token = environ.get("TETHER_MCP_TOKEN") or None
    if token is None and generate:
        token = secrets.token_urlsafe(32)
        print(f"tether mcp: bearer token (shown once): {token}", file=sys.stderr, flush=True)
    if token is None and not is_loopback(host):
        raise HTTPSecurityError(
            f"refusing to serve MCP on {host} without authentication: set TETHER_MCP_TOKEN, or pass "
            "--generate-token to have one generated and printed once (or bind 127.0.0.1)"
        )
    outside = [value for value in allowed_hosts if not is_loopback(_name_and_port(value)[0])]
    if token is None and outside:
        raise HTTPSecurityError(
            f"refusing to serve MCP for --allow-host {outside[0]} without authentication (a proxy passes "
            "on requests from other machines): set TETHER_MCP_TOKEN, or pass --generate-token to have one "
            "generated and printed once"
        )
    if token is not None and any(c.isspace() for c in token):
        # (a client cannot send it: HTTP strips a header value's edges, and a space splits it)
        raise HTTPSecurityError("TETHER_MCP_TOKEN contains whitespace; use 16 or more random characters without")
    if token is not None and not token.isascii():
        raise HTTPSecurityError("TETHER_MCP_TOKEN has characters other than ASCII, which HTTP clients cannot send")
    if token is not None and len(token) < 16:
        raise HTTPSecurityError("TETHER_MCP_TOKEN is too short; use at least 16 random characters")
    return token


class BearerAuth:
    """ASGI middleware: 401 unless `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = token.encode()

    async def __call__(
        self, scope: Scope, receive: Callable[..., Awaitable[Any]], send: Callable[..., Awaitable[Any]]
    ) -> None:
        if scope["type"] == "http":
            scheme, _, given = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
            # (the scheme's case does not matter: RFC 9110 section 11.1)
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._expected):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer realm="tether"'),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": b'{"error": "missing or wrong bearer token"}'})
                return
        await self.app(scope, receive, send)


def lowercase_host_and_origin(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: Host and Origin in lower case before the SDK compares them (exactly) with
    the allowed ones. Host names are case-insensitive (RFC 9110 section 4.2.3), and so are an
    origin's scheme and host: `LOCALHOST:8765` is the same server."""

    async def lowered(
        scope: Scope, receive: Callable[..., Awaitable[Any]], send: Callable[..., Awaitable[Any]]
    ) -> None:
        if scope["type"] == "http":
            headers = [
                (name, value.lower() if name in (b"host", b"origin") else value) for name, value in scope["headers"]
            ]
            scope = {**scope, "headers": headers}
        await app(scope, receive, send)

    return lowered


def host_patterns(value: str) -> list[str]:
    """The Host headers one --allow-host value accepts (the SDK's patterns: `name:*` is any port).

    `name:port` is exactly that. A bare name is the name with or without any port: a reverse proxy
    may pass the Host header on without one (Caddy, nginx's $host, cloudflared). Any port is as safe
    against DNS rebinding as one: a rebinding page's requests carry the attacker's name, whatever
    its port, never one of ours.
    """
    name, port = _name_and_port(value)
    return [f"{name}:{port}"] if port else [name, f"{name}:*"]


def _name_and_port(value: str) -> tuple[str, str]:
    """An --allow-host value's host name (an IPv6 address in brackets) and port ("", "*" or digits)."""
    value = value.strip().lower()  # (browsers and proxies send host names in lower case)
    if value.startswith("["):  # [v6] or [v6]:port
        name, _, port = value.partition("]")
        name, port = name + "]", port.removeprefix(":")
    elif value.count(":") > 1:  # a bare IPv6 address
        name, port = url_host(value), ""
    else:
        name, _, port = value.partition(":")
    valid_port = port in ("", "*") or (port.isdigit() and 0 < int(port) < 65536)
    if name in ("", "[]") or not valid_port:
        raise HTTPSecurityError(f"--allow-host takes HOST, HOST:PORT or HOST:*, not {value!r}")
    return name, port


def build_app(server: MCPServer, host: str, port: int, token: str | None, allowed_hosts: list[str]) -> ASGIApp:
    # (on loopback, the address bound too: 127.0.0.2 is loopback, and the URL printed names it;
    # a wildcard bind, 0.0.0.0 or ::, serves loopback as well, but its Host check is on only with
    # --allow-host: without, the names other machines reach it by are unknown, and the token guards)
    names = ("127.0.0.1", "localhost", "[::1]", url_host(host))
    serves_loopback = is_loopback(host) or (host in ("0.0.0.0", "::") and bool(allowed_hosts))
    hosts = list(dict.fromkeys(f"{h}:{port}" for h in names)) if serves_loopback else []
    hosts += [pattern for value in allowed_hosts for pattern in host_patterns(value)]
    security = TransportSecuritySettings(
        # Off-loopback with no --allow-host, the bearer token is the protection (a rebinding page
        # cannot know it), so the Host check would only refuse legitimate names.
        enable_dns_rebinding_protection=bool(hosts),
        allowed_hosts=hosts,
        # A page served by an allowed name, over http or (behind a TLS proxy) https
        allowed_origins=[f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")],
    )
    app: ASGIApp = server.streamable_http_app(
        host=host, transport_security=security, max_request_body_size=MAX_REQUEST_BYTES
    )
    app = lowercase_host_and_origin(app)
    return BearerAuth(app, token) if token else app


async def serve_http(server: MCPServer, host: str, port: int, token: str | None, allowed_hosts: list[str]) -> None:
    import uvicorn

    # Bound here, before the app is built: with port 0 the Host check must name the port the
    # kernel chose, and so must the address printed for the client.
    host = host.strip("[]")  # ([::1] as a URL writes it)
    for value in allowed_hosts:  # (a bad --allow-host is refused before anything listens)
        host_patterns(value)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listening = socket.create_server((host, port), family=family)
    except (OSError, OverflowError) as exc:
        raise RuntimeError(f"cannot listen on {host} port {port}: {exc}; check --host and --port") from None
    port = listening.getsockname()[1]
    PRIVATE_PORTS.add(port)  # (no tunnel_open may publish the server itself)
    print(f"tether mcp: serving http://{url_host(host)}:{port}/mcp", file=sys.stderr, flush=True)
    app = build_app(server, host, port, token, allowed_hosts)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    web = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM (our lifespan tears down), then re-raises the
    # signal once its own handlers are gone; let that re-raise end the process with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # SIGHUP (the terminal closed, the SSH session to this machine dropped) would end the process at
    # once, leaving its sandboxes running until a gc: it shuts down as SIGTERM does. (uvicorn does
    # not handle it, so this handler stays in place while it serves.)
    signal.signal(signal.SIGHUP, lambda _, frame: web.handle_exit(signal.SIGTERM, frame))
    await web.serve(sockets=[listening])
