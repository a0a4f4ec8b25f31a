"""Chat channels: tunnel URLs and lifecycle events pushed to Slack, Discord or any webhook.

    [[channels]]
    kind = "slack"                      # slack | discord | webhook
    url_env = "SLACK_WEBHOOK_URL"       # or url = "https://hooks.slack.com/services/…"
    events = ["tunnel.opened"]          # default: all of them

    [[channels]]
    kind = "webhook"
    url = "https://ci.example.com/tether-events"
    secret_env = "TETHER_WEBHOOK_SECRET"   # body signed: X-Tether-Signature: sha256=<hex HMAC-SHA256>

Deliveries run in the background with retries and backoff; a failing channel is logged (by kind
and name, never by URL: webhook URLs are secrets) and never fails the tool call that caused it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)
EVENTS = ("tunnel.opened", "tunnel.closed", "sandbox.created", "sandbox.terminated")
SIGNATURE_HEADER = "X-Tether-Signature"
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)


class ChannelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["slack", "discord", "webhook"]
    name: str | None = None
    url: str | None = None
    url_env: str | None = Field(None, description="Environment variable holding the URL")
    secret: str | None = None
    secret_env: str | None = Field(None, description="Environment variable holding the HMAC secret")
    events: list[Literal["tunnel.opened", "tunnel.closed", "sandbox.created", "sandbox.terminated"]] = Field(
        default_factory=lambda: list(EVENTS)
    )
    header: str = Field(SIGNATURE_HEADER, description="Header carrying the signature (webhook)")

    @model_validator(mode="after")
    def _has_url(self) -> ChannelConfig:
        if not self.url and not self.url_env:
            raise ValueError("a channel needs url or url_env")
        if self.kind == "webhook" and not (self.secret or self.secret_env):
            raise ValueError("a webhook channel needs secret or secret_env (its deliveries are signed)")
        return self

    @property
    def label(self) -> str:
        return f"{self.kind} channel {self.name or ''}".strip()

    def resolved_url(self) -> str:
        url = self.url or os.environ.get(self.url_env or "", "")
        if not url:
            raise ValueError(f"${self.url_env} is not set")
        return url

    def resolved_secret(self) -> bytes:
        secret = self.secret or os.environ.get(self.secret_env or "", "")
        if not secret:
            raise ValueError(f"${self.secret_env} is not set")
        return secret.encode()


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def describe(event: str, data: dict[str, Any]) -> str:
    """One line for people in a chat."""
    sandbox = data.get("sandbox", {})
    who = sandbox.get("name") or sandbox.get("id", "?")
    tunnel = data.get("tunnel", {})
    if event == "tunnel.opened":
        return f"tether: port {tunnel.get('port')} of {who} is at {tunnel.get('url')}"
    if event == "tunnel.closed":
        return f"tether: tunnel to port {tunnel.get('port')} of {who} closed"
    if event == "sandbox.created":
        return f"tether: sandbox {who} is running on {sandbox.get('provider')} (pool {sandbox.get('pool')})"
    cost = data.get("cost", {})
    usd = cost.get("estimated_usd")
    spent = f", ~${usd:.4f}" if isinstance(usd, int | float) else ""
    return f"tether: sandbox {who} terminated after {cost.get('seconds', 0):.0f}s ({cost.get('billing_model')}{spent})"


def slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render(channel: ChannelConfig, event: str, data: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The request body and headers a channel gets for an event."""
    headers = {"Content-Type": "application/json"}
    if channel.kind == "slack":
        # Slack reads &, < and > as markup (<!channel>, <url|label>): names and paths in the line
        # come from agents, so they are escaped as Slack's formatting guide says.
        payload: dict[str, Any] = {"text": slack_escape(describe(event, data))}
    elif channel.kind == "discord":
        # No @everyone, @here or role pings, whatever a name in the line says.
        payload = {"content": describe(event, data), "allowed_mentions": {"parse": []}}
    else:
        timestamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        payload = {"event": event, "timestamp": timestamp, **data}
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    if channel.kind == "webhook":
        headers[channel.header] = sign(channel.resolved_secret(), body)
        headers["X-Tether-Event"] = event
    return body, headers


def _default_client() -> httpx.AsyncClient:
    import httpx

    return httpx.AsyncClient(timeout=10)


class Notifier:
    """Delivers events to the configured channels without ever blocking or failing the caller."""

    def __init__(
        self,
        channels: list[ChannelConfig],
        client: Callable[[], httpx.AsyncClient] | None = None,
        delays: tuple[float, ...] = RETRY_DELAYS,
    ) -> None:
        self.channels = channels
        self._client_factory = client or _default_client
        self._delays = delays
        self._pending: dict[asyncio.Task[None], tuple[ChannelConfig, str]] = {}  # delivery -> (channel, event)
        self._last: dict[int, asyncio.Task[None]] = {}  # id(channel) -> its latest delivery
        self.failures: list[str] = []  # "kind name: reason", for tests and `tether doctor`

    def emit(self, event: str, data: dict[str, Any]) -> None:
        for channel in self.channels:
            if event not in channel.events:
                continue
            try:  # (rendered now: a webhook's timestamp is the event's, not its delivery's)
                url = channel.resolved_url()
                body, headers = render(channel, event, data)
            except ValueError as exc:
                self._failed(channel, event, str(exc))
                continue
            # A channel hears of events in the order they happened: each delivery waits for the one
            # before it (a tunnel.opened being retried must not land after its tunnel.closed).
            key = id(channel)
            after = self._last.get(key)
            task = asyncio.get_running_loop().create_task(self._deliver(channel, event, url, body, headers, after))
            self._pending[task] = (channel, event)
            self._last[key] = task
            task.add_done_callback(functools.partial(self._delivered, key=key))

    def _delivered(self, task: asyncio.Task[None], *, key: int) -> None:
        self._pending.pop(task, None)
        if self._last.get(key) is task:
            del self._last[key]

    async def _deliver(
        self,
        channel: ChannelConfig,
        event: str,
        url: str,
        body: bytes,
        headers: dict[str, str],
        after: asyncio.Task[None] | None,
    ) -> None:
        import httpx  # (here, not at the top: every tether command imports this module, few send)

        if after is not None:
            await asyncio.wait({after})  # (however it ended: delivered, given up, cancelled)
        problem = ""
        async with self._client_factory() as client:
            for attempt, delay in enumerate((0.0, *self._delays)):
                if delay:
                    await asyncio.sleep(delay)
                try:
                    response = await client.post(url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}"
                    continue
                except Exception as exc:  # (a URL httpx cannot use: InvalidURL, a port out of range)
                    problem = f"{type(exc).__name__}"
                    break
                if response.status_code < 300:
                    return
                problem = f"HTTP {response.status_code}"
                if response.status_code < 500 and response.status_code != 429:
                    break  # the channel refused it; retrying won't change its mind
                log.debug("%s: %s for %s (attempt %d)", channel.label, problem, event, attempt + 1)
        self._failed(channel, event, problem)

    def _failed(self, channel: ChannelConfig, event: str, reason: str) -> None:
        message = f"{channel.label}: could not deliver {event}: {reason}"
        self.failures.append(message)
        log.warning(message)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait (a bounded time) for deliveries in flight, e.g. before the process exits; those
        still retrying then are given up, each with a warning."""
        if not self._pending:
            return
        _, late = await asyncio.wait(set(self._pending), timeout=timeout)
        for task in late:
            channel, event = self._pending[task]  # (still pending: its done callback has not run)
            message = f"{channel.label}: could not deliver {event}: still failing when tether exited"
            task.cancel()
            self.failures.append(message)
            log.warning(message)
        if late:
            await asyncio.wait(late)
