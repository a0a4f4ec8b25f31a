"""Opening, listing and closing tunnels; `auto` picks provider, then relay (when configured), then local."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from sandbox import Sandbox
from sandbox.errors import SandboxError

from .base import Backend, BackendName, Opened, PreviewSource, Tunnel, TunnelError, new_tunnel_id, reopen
from .channels import Notifier
from .check import CHECK_TIMEOUT, NothingListens, answers, verify
from .local import LocalBackend, LocalForward
from .ports import listening_ports, loopback_for, tethers_own
from .provider import NoProviderURLs, ProviderBackend
from .relay import RelayBackend, RelayConfig

log = logging.getLogger(__name__)
# Called with ("opened" | "moved" | "closed", tunnel): tools records it in the ledger.
Recorder = Callable[[str, Tunnel], None]


class TunnelManager:
    def __init__(
        self,
        relay: RelayConfig | None = None,
        notifier: Notifier | None = None,
        recorder: Recorder | None = None,
        check_timeout: float = CHECK_TIMEOUT,
    ) -> None:
        self.relay = relay
        self.notifier = notifier
        self._recorder = recorder
        self.check_timeout = check_timeout
        self._open: dict[str, tuple[Tunnel, Opened, dict[str, Any]]] = {}
        self._moves: dict[str, asyncio.Task[None]] = {}  # tunnel id -> the check of its relay's new URL

    async def open(
        self,
        box: Sandbox,
        port: int,
        backend: BackendName | str = "auto",
        path: str | None = None,
        preview: PreviewSource | None = None,
        sandbox: dict[str, Any] | None = None,
    ) -> Tunnel:
        """A URL for `port` inside the sandbox, checked with one HTTP request before it is returned.

        Raises TunnelError: no such backend here, or nothing answers (naming what listens instead).
        """
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise TunnelError(f"port must be 1-65535, not {port!r}")
        if port in tethers_own(box, self._listeners()):
            raise TunnelError(
                f"port {port} on this machine is tether's own (its SSH or MCP server, or a tunnel), not a server "
                "of the sandbox's, and is never published; tunnel the port your app listens on"
            )
        path = url_path(path)
        sandbox = sandbox or {"id": getattr(box, "id", box.name), "name": box.name}
        problems: list[str] = []
        loopback: str | None = None  # where the port listens inside the sandbox: read once, when needed
        for candidate in self._candidates(backend, preview):
            # Under auto, a backend that fails (the relay unreachable, the provider's API down, a URL
            # that gets no answer from a port that listens: a provider's edge may want 0.0.0.0) hands
            # over to the next one; nothing listening on the port is the end of it for all.
            try:
                if candidate.forwards:
                    loopback = loopback or await loopback_for(box, port)
                    opened = await candidate.open(box, port, loopback)
                else:
                    opened = await candidate.open(box, port)
            except SandboxError as exc:
                if backend != "auto" and isinstance(exc, TunnelError):
                    raise
                if backend != "auto":
                    raise TunnelError(f"{candidate.name} backend: {exc}") from None
                if not isinstance(exc, NoProviderURLs):  # (the usual case on local and ssh: said by no one)
                    problems.append(f"{candidate.name}: {exc}")
                continue
            url = opened.url.rstrip("/") + (path or "")
            try:
                await verify(url, opened.headers, box, port, self.check_timeout, self._listeners(opened))
            except BaseException as exc:
                await opened.close()
                if backend != "auto" or not isinstance(exc, TunnelError) or isinstance(exc, NothingListens):
                    raise
                problems.append(f"{candidate.name}: {exc}")
                continue
            tunnel = Tunnel(new_tunnel_id(), sandbox["id"], port, candidate.name, url, dict(opened.headers))
            self._open[tunnel.id] = (tunnel, opened, sandbox)
            self._record("opened", tunnel, sandbox)
            if hasattr(opened, "on_url_change"):  # a relay may hand out another URL after a reconnect
                opened.on_url_change = self._mover(tunnel, path, sandbox)
            return tunnel
        raise TunnelError("no tunnel backend could open the port: " + "; ".join(problems))

    def _mover(self, tunnel: Tunnel, path: str | None, sandbox: dict[str, Any]) -> Callable[[str], None]:
        """What a relay tunnel calls with its new URL after a reconnect: the URL is checked (in the
        background: the relay's supervisor goes on watching its connection) before it is recorded
        and announced, as any URL tether reports."""

        def moved(url: str) -> None:
            previous = self._moves.pop(tunnel.id, None)
            if previous is not None:
                previous.cancel()  # (a URL that moved again before it answered)
            task = asyncio.get_running_loop().create_task(
                self._confirm_move(tunnel, url.rstrip("/") + (path or ""), sandbox)
            )
            self._moves[tunnel.id] = task
            task.add_done_callback(lambda done: self._forget_move(tunnel.id, done))

        return moved

    def _forget_move(self, tunnel_id: str, done: asyncio.Task[None]) -> None:
        if self._moves.get(tunnel_id) is done:
            del self._moves[tunnel_id]

    async def _confirm_move(self, tunnel: Tunnel, url: str, sandbox: dict[str, Any]) -> None:
        """Record and announce `url` once a request through it gets an answer; until then the
        tunnel stays listed at its last checked URL, and the request is retried, with reopen's
        backoff, until the tunnel closes (close() cancels this task): the relay may still be
        setting up, or the server in the sandbox restarting. Only the request is retried: why
        nothing answers (verify's look at what listens in the sandbox) costs SFTP round trips."""
        await reopen(
            lambda: answers(url, tunnel.headers, self.check_timeout),
            lambda: False,  # (it ends when it succeeds, or when close() cancels it)
            f"tunnel {tunnel.id}",
            "a request through its new URL after its relay reconnected (it is announced once one gets an answer)",
            first_failure=logging.WARNING,
        )
        if url != tunnel.url:
            tunnel.url = url
            self._record("moved", tunnel, sandbox)

    def _candidates(self, backend: str, preview: PreviewSource | None) -> list[Backend]:
        available: dict[str, Backend] = {"local": LocalBackend()}
        if self.relay is not None:
            available["relay"] = RelayBackend(self.relay)
        if preview is not None:
            available["provider"] = ProviderBackend(preview)
        if backend == "auto":
            return [available[name] for name in ("provider", "relay", "local") if name in available]
        if backend not in ("provider", "relay", "local"):
            raise TunnelError(f"unknown tunnel backend {backend!r}; use auto, provider, relay or local")
        if backend not in available:
            why = "no [relay] is configured in config.toml" if backend == "relay" else "its provider has no URLs"
            raise TunnelError(f"backend {backend} is not available for this sandbox: {why}")
        return [available[backend]]

    async def listening(self, box: Sandbox) -> list[int]:
        """The ports listening in `box`, but for tether's own there (this process's local tunnels,
        a local sandbox's SSH server): the servers that run in it, as sandbox_info shows them."""
        return sorted(set(await listening_ports(box)) - tethers_own(box, self._listeners()))

    def _listeners(self, *also: Opened) -> set[int]:
        """The ports this process listens on for local tunnels (those of `also` too): a sandbox on
        this machine lists them among its user's, but they are no server an agent meant."""
        opened = [o for _, o, _ in self._open.values()] + list(also)
        return {o.local_port for o in opened if isinstance(o, LocalForward)}

    def list(self, sandbox_id: str | None = None) -> list[Tunnel]:
        return [t for t, _, _ in self._open.values() if sandbox_id is None or t.sandbox_id == sandbox_id]

    def get(self, tunnel_id: str) -> Tunnel:
        entry = self._open.get(tunnel_id)
        if entry is None:
            raise TunnelError(f"no open tunnel {tunnel_id!r}; list them with tunnel_list")
        return entry[0]

    async def close(self, tunnel_id: str) -> Tunnel:
        self.get(tunnel_id)
        tunnel, opened, sandbox = self._open.pop(tunnel_id)
        move = self._moves.pop(tunnel_id, None)
        if move is not None:
            move.cancel()
        try:
            await opened.close()  # (which lets go of everything before its first await)
        finally:  # (recorded and announced even when the call is cancelled meanwhile)
            tunnel.status = "closed"
            self._record("closed", tunnel, sandbox)
        return tunnel

    async def close_for_sandbox(self, sandbox_id: str) -> list[Tunnel]:
        # (one already closed meanwhile, by the termination listener or the watcher, is skipped:
        # the check and close's pop happen with no await between them)
        return [await self.close(t.id) for t in self.list(sandbox_id) if t.id in self._open]

    async def close_all(self) -> None:
        for tunnel_id in list(self._open):
            if tunnel_id in self._open:
                await self.close(tunnel_id)

    def _record(self, what: str, tunnel: Tunnel, sandbox: dict[str, Any]) -> None:
        if self._recorder is not None:
            try:
                self._recorder(what, tunnel)
            except Exception:  # the ledger is bookkeeping: never lose a working tunnel over it
                log.exception("could not record tunnel %s %s", tunnel.id, what)
        if self.notifier is not None:
            # Channels hear of a moved tunnel as opened again, at its new URL.
            event = "tunnel.opened" if what == "moved" else f"tunnel.{what}"
            self.notifier.emit(event, {"sandbox": sandbox, "tunnel": tunnel.announced(), "at": time.time()})


# What a URL's path, query and fragment may hold as is (RFC 3986), with "%" for escapes already made.
_URL_SAFE = "/?#[]@!$&'()*+,;=:~-._%"


def url_path(path: str | None) -> str:
    """The path an agent asked for, as it goes into a URL: a leading "/", and anything a URL may not
    hold (spaces, control characters, "<", ">", quotes, non-ASCII) percent-encoded. The URL is
    posted to chat channels as is; left raw, a path could carry a channel-wide mention or a link
    dressed up as another."""
    if not path:
        return ""
    return quote(path if path.startswith("/") else "/" + path, safe=_URL_SAFE)
