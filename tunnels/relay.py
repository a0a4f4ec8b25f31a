"""The relay backend: a remote forward on an SSH relay (sish, localhost.run, pinggy, or your sshd).

As those relays expect: open a session first, request the forward, then read the public URL from
the session's output (stdout and stderr, ANSI codes stripped). A plain OpenSSH relay prints no URL;
give `url_template` instead (e.g. "http://relay.example.com:{port}", with GatewayPorts
clientspecified on the relay and remote_host "0.0.0.0"). Every connection that arrives at the relay
is bridged to the sandbox's port through the sandbox's own SSH connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import asyncssh
from pydantic import BaseModel, ConfigDict, Field

from sandbox import ConnectionPool, Sandbox, SSHEndpoint, default_pool

from .base import BackendName, TunnelError

log = logging.getLogger(__name__)
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
URL = re.compile(r"https?://[^\s'\"<>()\[\]]+")
PUMP_CHUNK = 256 * 1024


class RelayConfig(BaseModel):
    """[relay] in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(description="The relay: user@host[:port] or an ~/.ssh/config alias, e.g. nokey@localhost.run")
    identityFile: str | None = Field(None, description="Key for the relay (default: ~/.ssh keys and the agent)")
    remote_host: str = Field("localhost", description="Bind address requested (sish uses it as the subdomain)")
    remote_port: int = Field(80, ge=0, le=65535, description="Port requested on the relay (0: any free one)")
    url_template: str | None = Field(None, description="URL when the relay prints none: {host} and {port}")
    url_pattern: str | None = Field(None, description="Regex for the URL in the relay's banner")
    command: str | None = Field(None, description="Command for the session (default: a shell session)")
    url_timeout: float = Field(15.0, gt=0, description="Seconds to wait for the URL in the banner")

    def endpoint(self) -> SSHEndpoint:
        endpoint = SSHEndpoint.resolve(self.host)
        if self.identityFile:
            endpoint = endpoint.model_copy(update={"key_paths": (str(Path(self.identityFile).expanduser()),)})
        return endpoint


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def find_url(banner: str, pattern: str | None = None) -> str | None:
    """The public URL in a relay's banner: the first https one, else the first http one."""
    clean = strip_ansi(banner)
    if pattern:
        match = re.search(pattern, clean)
        if match is None:
            return None
        return match.group(1) if match.re.groups else match.group(0)
    urls = [u.rstrip(".,;:") for u in URL.findall(clean)]
    return next((u for u in urls if u.startswith("https://")), urls[0] if urls else None)


async def pump(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
    try:
        while data := await reader.read(PUMP_CHUNK):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except (asyncssh.Error, OSError, BrokenPipeError):
        writer.close()


class RelayForward:
    def __init__(self, box: Sandbox, port: int, config: RelayConfig, pool: ConnectionPool) -> None:
        self._box, self._port, self._config, self._pool = box, port, config, pool
        self._session: asyncssh.SSHClientProcess[bytes] | None = None
        self._listener: asyncssh.SSHListener | None = None
        self.url = ""
        self.headers: dict[str, str] = {}

    async def start(self) -> None:
        endpoint = self._config.endpoint()
        try:
            conn = await self._pool.connection(endpoint)
            # Relays print their URL to the session, so it comes first; then the forward.
            self._session = await conn.create_process(self._config.command, encoding=None)
            self._listener = await conn.start_server(
                lambda _host, _port: self._bridge, self._config.remote_host, self._config.remote_port
            )
        except (asyncssh.Error, OSError) as exc:
            await self.close()
            raise TunnelError(f"relay {endpoint.display} refused the forward: {exc}") from None
        if self._config.url_template:
            self.url = self._config.url_template.format(host=endpoint.host, port=self._listener.get_port())
        else:
            self.url = await self._read_url(endpoint.display)

    async def _read_url(self, relay: str) -> str:
        assert self._session is not None
        banner = ""
        streams = [self._session.stdout, self._session.stderr]
        pending = {asyncio.ensure_future(s.read(4096)): s for s in streams}
        try:
            async with asyncio.timeout(self._config.url_timeout):
                while pending:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        stream = pending.pop(task)
                        chunk = task.result()
                        if chunk:
                            banner += chunk.decode("utf-8", "replace")
                            pending[asyncio.ensure_future(stream.read(4096))] = stream
                    url = find_url(banner, self._config.url_pattern)
                    if url:
                        return url
        except TimeoutError:
            pass
        finally:
            for task in pending:
                task.cancel()
        await self.close()
        shown = strip_ansi(banner).strip()[-300:] or "(nothing)"
        raise TunnelError(
            f"relay {relay} printed no URL within {self._config.url_timeout:g}s; it said: {shown}. "
            "Set url_template (or url_pattern) in [relay]"
        )

    async def _bridge(self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
        """One connection that arrived at the relay, carried into the sandbox over its own connection."""
        try:
            conn = await self._box.connection()
            inner_reader, inner_writer = await conn.open_connection("127.0.0.1", self._port)
        except (asyncssh.Error, OSError) as exc:
            log.info("relay connection to port %d refused in the sandbox: %s", self._port, exc)
            writer.close()
            return
        await asyncio.gather(pump(reader, inner_writer), pump(inner_reader, writer))

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._session is not None:
            self._session.close()


class RelayBackend:
    name: BackendName = "relay"

    def __init__(self, config: RelayConfig, pool: ConnectionPool | None = None) -> None:
        self.config = config
        self._pool = pool

    async def open(self, box: Sandbox, port: int) -> RelayForward:
        forward = RelayForward(box, port, self.config, self._pool or default_pool())
        await forward.start()
        return forward
