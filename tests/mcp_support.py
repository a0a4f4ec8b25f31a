"""Running tether as a real subprocess: `tether mcp` talked to with the official MCP client, and
the CLI's other commands."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import mcp
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

ROOT = Path(__file__).resolve().parents[1]


def server_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("TETHER_MCP_TOKEN", None) if "TETHER_MCP_TOKEN" not in extra else None
    return env


def tether(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`tether ARGS` as a subprocess, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env or server_env(),
        timeout=timeout,
    )


def tether_process(*args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[Any]:
    """`tether ARGS` started as a subprocess and left running: stdout and stderr piped and text
    unless `popen` says otherwise (any other Popen argument goes through too)."""
    options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, env=env or server_env(), **options)


@contextlib.asynccontextmanager
async def stdio_client(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[mcp.Client]:
    """The official client, launching `tether mcp ARGS` over stdio (closing it closes the server's stdin)."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "tools.cli", "mcp", *args], env=env or server_env(), cwd=str(ROOT)
    )
    async with mcp.Client(params) as client:
        yield client


@contextlib.contextmanager
def http_server(
    *args: str, env: dict[str, str] | None = None, port: int = 0, host: str = "127.0.0.1"
) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """`tether mcp --transport http` as a subprocess, the URL it says it serves (with port 0, the
    default, the kernel picks the port and the server prints it) and all it printed until then."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "mcp", "--transport", "http", "--host", host, "--port", str(port), *args],
        env=env or server_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        deadline, said = time.monotonic() + 20, ""
        while "serving http://" not in said:
            ready, _, _ = select.select([process.stdout], [], [], 0.2)
            if ready:
                line = process.stdout.readline()
                assert line, f"server exited: {said}{process.stdout.read()}"
                said += line
            assert time.monotonic() < deadline, "the HTTP server did not start"
        yield process, said.split("serving ", 1)[1].split()[0], said
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.asynccontextmanager
async def http_client(url: str, token: str | None = None) -> AsyncIterator[mcp.Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with (
        create_mcp_http_client(headers=headers) as http,
        mcp.Client(streamable_http_client(url, http_client=http), mode="legacy") as client,
    ):
        yield client


@contextlib.asynccontextmanager
async def mcp_client(transport: str, *args: str, env: dict[str, str] | None = None) -> AsyncIterator[mcp.Client]:
    """The official client on `tether mcp ARGS` over "stdio" or streamable "http" (on loopback, no
    token). Leaving it stops the server: stdin closed, or SIGTERM."""
    if transport == "stdio":
        async with stdio_client(*args, env=env) as client:
            yield client
        return
    with http_server(*args, env=env) as (_, url, _):
        async with http_client(url) as client:
            yield client


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content[0].text if result.content else result
    return dict(result.structured_content or {})


def text(result: Any) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "type", "") == "text")
