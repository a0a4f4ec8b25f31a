"""The relay backend: a remote forward on an SSH relay (sish, localhost.run, pinggy, or your sshd).

As those relays expect: open a session first, request the forward, then read the public URL from
the session's output (stdout and stderr, ANSI codes stripped). A plain OpenSSH relay prints no URL;
give `url_template` instead (e.g. "http://relay.example.com:{port}", with GatewayPorts
clientspecified on the relay and remote_host "0.0.0.0"). Every connection that arrives at the relay
is bridged to the sandbox's port through the sandbox's own SSH connection.

When the relay's connection drops, the forward is requested again on a new one (with backoff, until
closed); should the relay hand out another URL, `on_url_change` hears of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import asyncssh
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox import ConnectionPool, Sandbox, SSHEndpoint, default_pool
from sandbox.connect import dial, redact_in_logs
from sandbox.endpoint import is_loopback
from sandbox.errors import SandboxError
from sandbox.forwarding import FORWARD_PACKET, FORWARD_WINDOW
from sandbox.pool import Hold

from .base import BackendName, TunnelError, reopen
from .pairing import Pairings

log = logging.getLogger(__name__)
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
URL = re.compile(r"https?://[^\s'\"<>()\[\]]+")
# The banner is read a line at a time: a URL counts once its line has ended, or once the relay has
# been quiet this long after writing it (a relay that ends its last line with no newline).
QUIET = 0.5
# After the first URL, how long to wait for another one: sish sends its http and https lines as two
# messages, and the https one is preferred.
SETTLE = 0.5


class RelayConfig(BaseModel):
    """[relay] in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(description="The relay: user@host[:port] or an ~/.ssh/config alias, e.g. nokey@localhost.run")
    identityFile: str | None = Field(None, description="The one key offered to the relay (default: none)")
    remote_host: str = Field("localhost", description="Bind address requested (sish uses it as the subdomain)")
    remote_port: int = Field(80, ge=0, le=65535, description="Port requested on the relay (0: any free one)")
    url_template: str | None = Field(None, description="URL when the relay prints none: {host} and {port}")
    url_pattern: str | None = Field(None, description="Regex for the URL in the relay's banner")
    command: str | None = Field(None, description="Command for the session (default: a shell session)")
    url_timeout: float = Field(15.0, gt=0, description="Seconds to wait for the URL in the banner")
    login_timeout: float = Field(
        10.0, gt=0, description="Seconds for the relay's key exchange and login (auto then tries local)"
    )

    @field_validator("url_template")
    @classmethod
    def _formats(cls, template: str | None) -> str | None:
        if template is not None:
            try:
                template.format(host="relay.example", port=8080)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"{template!r} can name only {{host}} and {{port}} ({exc!r})") from None
        return template

    @field_validator("url_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return pattern

    def usable_endpoint(self) -> SSHEndpoint:
        """`endpoint()`, or a TunnelError that says what is wrong with `host` (its user names,
        which can be tokens, taken out)."""
        try:
            return self.endpoint()
        except (ValueError, SandboxError) as exc:  # (an address that does not parse: it is quoted whole)
            users = {part.rpartition("@")[0] for part in re.split(r"[,\s]+", self.host) if "@" in part}
            raise TunnelError(f"[relay] host is not usable: {_without_users(str(exc), users)}") from None

    def endpoint(self) -> SSHEndpoint:
        """The relay, offered only what the config names: its user name (never this machine's) and
        identityFile (or its ~/.ssh/config alias's IdentityFile), no other key of ~/.ssh or the
        agent. A public relay (localhost.run, pinggy) would learn whose they are."""
        endpoint = SSHEndpoint.resolve(self.host)
        hops = (*endpoint.jump, endpoint)
        if nameless := [hop.address for hop in hops if hop.user is None]:
            raise ValueError(
                f"no user name for {nameless[0]}: write it as user@host (e.g. nokey@localhost.run), or give "
                "the ~/.ssh/config alias a User; a relay is not told this machine's user name"
            )
        private = {"use_agent": False, "default_keys": False}
        # A relay that accepts and never speaks would otherwise hold a tunnel_open for the
        # engine's 30 s default before auto goes on to the local backend.
        update: dict[str, object] = {
            **private,
            "login_timeout": self.login_timeout,
            "jump": tuple(hop.model_copy(update=private) for hop in endpoint.jump),
        }
        if self.identityFile:
            update["key_paths"] = (str(Path(self.identityFile).expanduser()),)
        return endpoint.model_copy(update=update)


def masked(text: str, endpoint: SSHEndpoint) -> str:
    """`text` (an error from dialing the relay) with the relay named by its address (host:port): its
    user names (the relay's and its jump hosts') taken out. Messages and logs never name a relay's
    user, which can be a credential (Pinggy Pro logs in as TOKEN@pro.pinggy.io)."""
    hops = (*endpoint.jump, endpoint)
    for hop in hops:
        text = text.replace(hop.display, hop.address)
    return _without_users(text, {hop.user for hop in hops if hop.user})


def _without_users(text: str, users: Iterable[str]) -> str:
    """`text` with `users` taken out: before an '@', and, a token-like one, wherever it stands as a
    word (an address that does not parse is quoted in pydantic's input_value=…)."""
    for user in users:
        text = text.replace(f"{user}@", "")
        if _token_like(user):  # (a short one names a mode: nokey, tcp)
            text = re.sub(rf"(?<![\w.-]){re.escape(user)}(?![\w.-])", "<user>", text)
    return text


def _token_like(user: str) -> bool:
    """A user name long enough to be a credential (Pinggy Pro's token). Short ones (nokey, tcp, qr)
    name a mode, and masking them wherever they stand would mangle words ("tcp" in direct-tcpip)."""
    return len(user) >= 8


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def find_url(
    banner: str, pattern: str | None = None, relay: str | None = None, subdomain: str | None = None
) -> str | None:
    """The public URL in a relay's banner: the first https one, else the first http one, of those
    that can be a tunnel's. Welcome texts also link the relay's own pages (localhost.run: its
    Twitter, admin and docs; pinggy: its dashboard), which come first. `relay` (the relay's host
    name) and `subdomain` (the one asked for, as sish takes remote_host) tell a page of the relay's
    own site from a tunnel that happens to be named app, www or docs."""
    clean = strip_ansi(banner)
    if pattern:
        match = re.search(pattern, clean)
        if match is None:
            return None
        return match.group(1) if match.re.groups else match.group(0)
    urls = [u.rstrip(".,;:") for u in URL.findall(clean)]
    urls = [u for u in urls if not _relay_page(u, relay, subdomain)]
    return next((u for u in urls if u.startswith("https://")), urls[0] if urls else None)


# Not a tunnel: social and code sites, a relay's own pages, documentation.
_NOT_TUNNELS = {"twitter.com", "x.com", "github.com", "discord.gg", "discord.com", "t.me", "youtube.com"}
_SITE_PAGES = {"admin", "dashboard", "docs", "www", "help", "status", "blog", "app", "console"}


def _relay_page(url: str, relay: str | None, subdomain: str | None) -> bool:
    relay = relay.lower() if relay else None
    authority, _, path = url.split("://", 1)[1].partition("/")
    host, _, port = authority.lower().rsplit("@", 1)[-1].partition(":")
    label, _, parent = host.partition(".")
    if host in _NOT_TUNNELS or host.removeprefix("www.") in _NOT_TUNNELS or path.lower().startswith("docs"):
        return True
    if relay and not port and not _is_address(host) and host.removeprefix("www.") in {relay, _domain(relay)}:
        return True  # the relay's own site (localhost.run/faq, pinggy.io/pricing): a tunnel has a name
    if subdomain and label == subdomain.lower():
        return False  # (the name this tunnel asked for)
    # A page's name on the relay's own domain (admin.localhost.run for localhost.run,
    # dashboard.pinggy.io for a.pinggy.io); on any other domain it can be a tunnel's.
    on_relays_site = relay is None or _domain(parent) == _domain(relay)
    return label in _SITE_PAGES and on_relays_site


def _domain(host: str) -> str:
    """The last two labels of a host name (pinggy.io of a.pinggy.io)."""
    return ".".join(host.rsplit(".", 2)[-2:])


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class RelayForward:
    def __init__(
        self, box: Sandbox, port: int, config: RelayConfig, pool: ConnectionPool, host: str = "127.0.0.1"
    ) -> None:
        self._box, self._port, self._config, self._pool = box, port, config, pool
        # The connections that arrive at the relay (host: the sandbox's loopback address)
        self._pairings = Pairings(box, host, port, self._failed)
        self._session: asyncssh.SSHClientProcess[str] | None = None
        self._listener: asyncssh.SSHListener | None = None
        self._hold: Hold | None = None  # keeps the sandbox's connection from being closed as idle
        self._relay_conn: asyncssh.SSHClientConnection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._draining: asyncio.Task[None] | None = None  # reads what the relay says after the URL
        self._closed = False
        self.url = ""
        self.headers: dict[str, str] = {}
        self.on_url_change: Callable[[str], None] | None = None
        # find_url's pattern, relay host and subdomain asked for (see _open)
        self._url_hints: tuple[str | None, str | None, str | None] = (config.url_pattern, None, None)

    async def start(self) -> None:
        # Held for the tunnel's life, across relay reconnects (and the pool's re-dials of the sandbox).
        self._hold = await self._box.hold_connection()
        await self._open()
        self._supervisor = asyncio.get_running_loop().create_task(self._keep_open())

    async def _keep_open(self) -> None:
        while not self._closed:
            assert self._relay_conn is not None
            await self._relay_conn.wait_closed()
            if self._closed:
                return
            self._release()
            previous = self.url
            if not await reopen(self._open, lambda: self._closed, f"relay tunnel {previous}"):
                return
            if self.url != previous and self.on_url_change is not None:
                self.on_url_change(self.url)

    async def _open(self) -> None:
        endpoint = self._config.usable_endpoint()
        name = endpoint.address
        # (sish takes remote_host as the subdomain; a bind address, localhost or 0.0.0.0, names none)
        asked = self._config.remote_host
        subdomain = None if not asked or is_loopback(asked) or asked in ("0.0.0.0", "::") else asked
        self._url_hints = (self._config.url_pattern, endpoint.host, subdomain)
        for hop in (*endpoint.jump, endpoint):
            if hop.user and _token_like(hop.user):
                redact_in_logs(hop.user)  # (asyncssh logs "Beginning auth for user …")
        try:
            try:
                # A connection of this tunnel's own: sish reads the session messages of one connection
                # from one queue, so a second tunnel on it would have its URL read by the first one's
                # session. (The pool still pins the relay's host key.)
                conn = self._relay_conn = await dial(endpoint, self._pool.pins)
            except SandboxError as exc:  # (a connect error says what to do: it is kept, user names masked)
                raise TunnelError(f"relay {masked(str(exc), endpoint)}") from None
            try:
                # Relays print their URL to the session, so it comes first; then the forward.
                self._session = await conn.create_process(
                    self._config.command, stderr=asyncssh.STDOUT, encoding="utf-8", errors="replace"
                )
                # Each byte crosses two SSH connections in this process (decrypted from one,
                # encrypted into the other): both channels get forward_over's bigger window and packets.
                self._listener = await conn.create_server(
                    lambda _host, _port: self._pairings.new(),
                    self._config.remote_host,
                    self._config.remote_port,
                    window=FORWARD_WINDOW,
                    max_pktsize=FORWARD_PACKET,
                )
            except (asyncssh.Error, OSError) as exc:
                raise TunnelError(f"relay {name} refused the forward: {masked(str(exc), endpoint)}") from None
            if self._config.url_template:
                self.url = self._config.url_template.format(host=endpoint.host, port=self._listener.get_port())
            else:
                try:
                    self.url = await self._read_url(endpoint)
                except (asyncssh.Error, OSError) as exc:
                    raise TunnelError(
                        f"relay {name} ended the session before it gave a URL: {masked(str(exc), endpoint)}"
                    ) from None
        except BaseException:
            # Failed, timed out or cancelled half way: nothing of it stays up (the relay would go on
            # serving the sandbox's port, untracked).
            self._release()
            raise
        self._draining = asyncio.get_running_loop().create_task(_discard(self._session.stdout))

    async def _read_url(self, endpoint: SSHEndpoint) -> str:
        """The URL in the session's output (stdout and stderr, as one stream), read a whole line at a
        time: a line still being written counts once the relay has been quiet for QUIET."""
        assert self._session is not None
        output = self._session.stdout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.url_timeout
        lines = tail = ""  # the finished lines, and the one still being written
        heard = loop.time()  # when output last came
        found: str | None = None
        found_at = 0.0
        reading: asyncio.Future[str] | None = asyncio.ensure_future(output.read(4096))  # None: it ended
        try:
            while True:
                now = loop.time()
                if found and (found.startswith("https://") or self._config.url_pattern or now >= found_at + SETTLE):
                    return found  # (https, or a pattern's: nothing better can come)
                if now >= deadline or reading is None:
                    break
                wake = min(deadline, found_at + SETTLE if found else deadline)
                if tail and now < heard + QUIET:
                    wake = min(wake, heard + QUIET)  # then the line being written counts as finished
                done, _ = await asyncio.wait({reading}, timeout=max(0.0, wake - now))
                if done:
                    chunk = reading.result()
                    reading = asyncio.ensure_future(output.read(4096)) if chunk else None
                    heard = loop.time()
                    finished, newline, tail = (tail + chunk).rpartition("\n")
                    lines += finished + newline
                quiet = reading is None or loop.time() >= heard + QUIET
                url = find_url(lines + tail if quiet else lines, *self._url_hints)
                if url and (found is None or (url.startswith("https://") and not found.startswith("https://"))):
                    found, found_at = url, found_at or loop.time()
            url = found or find_url(lines + tail, *self._url_hints)
            if url:
                return url
        finally:
            if reading is not None:
                reading.cancel()
        shown = masked(strip_ansi(lines + tail).strip()[-300:], endpoint) or "(nothing)"  # (a relay may greet its user)
        raise TunnelError(
            f"relay {endpoint.address} printed no URL within {self._config.url_timeout:g}s; it said: {shown}. "
            "Set url_template (or url_pattern) in [relay]"
        )

    def _failed(self, exc: Exception) -> None:
        # The relay (someone else's machine) sees the connection end with no reason: the reason can
        # name the sandbox's address, its user, this machine's key files. The log has it.
        log.warning("relay tunnel to port %s: %s", self._port, getattr(exc, "reason", exc))

    async def close(self) -> None:
        # Everything is let go before the first await: a close that is itself cancelled still
        # leaves nothing open.
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        self._pairings.close()
        self._release()
        if self._hold is not None:
            self._hold.release()
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor

    def _release(self) -> None:
        """Let go of what is on the relay (its connection, the session, the forward)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._pairings.close_connections()  # (they arrived over the connection let go of)
        if self._draining is not None:
            self._draining.cancel()
            self._draining = None
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._relay_conn is not None:
            self._relay_conn.close()


async def _discard(output: asyncssh.SSHReader[str]) -> None:
    """Read what the relay goes on writing to the session (connection logs, notices) and drop it:
    left unread, it would fill the session's window, and a relay blocked writing to it can stall."""
    with contextlib.suppress(asyncssh.Error, OSError):
        while await output.read(65536):
            pass


class RelayBackend:
    name: BackendName = "relay"
    forwards = True

    def __init__(self, config: RelayConfig, pool: ConnectionPool | None = None) -> None:
        self.config = config
        self._pool = pool

    async def open(self, box: Sandbox, port: int, host: str = "127.0.0.1") -> RelayForward:
        forward = RelayForward(box, port, self.config, self._pool or default_pool(), host)
        try:
            await forward.start()
        except BaseException:
            await forward.close()  # (whatever start left, cancelled or failed)
            raise
        return forward
