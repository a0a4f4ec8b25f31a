"""What a tunnel is, and what every backend provides."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sandbox import Sandbox
from sandbox.errors import SandboxError

log = logging.getLogger(__name__)

BackendName = Literal["provider", "relay", "local"]


class TunnelError(SandboxError):
    """A tunnel could not be opened or does not exist."""


@dataclass
class PreviewURL:
    """A provider's own URL for a port (Daytona preview link, E2B host, RunPod proxy, Modal port)."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)


# The provider hook: the preview URL of `port` for this sandbox, or None when the provider has none.
PreviewSource = Callable[[int], Awaitable[PreviewURL | None]]


@dataclass
class Tunnel:
    id: str
    sandbox_id: str
    port: int
    backend: BackendName
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    status: Literal["open", "closed"] = "open"

    def public(self) -> dict[str, Any]:
        """The fields tools report (headers included: a preview token is for the agent to use)."""
        return {
            "tunnel_id": self.id,
            "sandbox": self.sandbox_id,
            "port": self.port,
            "backend": self.backend,
            "url": self.url,
            "headers": self.headers,
            "status": self.status,
        }

    def announced(self) -> dict[str, Any]:
        """What chat channels hear: header names only, never their values (a preview token)."""
        return {**self.public(), "headers": sorted(self.headers)}


REOPEN_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds between attempts; the last one repeats


async def reopen(
    attempt: Callable[[], Awaitable[object]],
    closed: Callable[[], bool],
    what: str,
    doing: str = "re-open",
    first_failure: int = logging.INFO,
) -> bool:
    """Call `attempt` until it succeeds, waiting longer between failures (the box or relay may be
    restarting, a relay's new URL not answer yet), or until `closed()`. Returns whether it
    succeeded. Failures are logged as "<what>: <doing> failed (why); retrying in Ns", the first
    at level `first_failure`, the others at INFO."""
    delays = itertools.chain(REOPEN_BACKOFF, itertools.repeat(REOPEN_BACKOFF[-1]))
    for tries, delay in enumerate(delays):
        if closed():
            return False
        try:
            await attempt()
        except Exception as exc:
            level = first_failure if tries == 0 else logging.INFO
            log.log(level, "%s: %s failed (%s); retrying in %ss", what, doing, exc, delay)
            await asyncio.sleep(delay)
            continue
        log.info("%s: %s succeeded", what, doing)
        return True
    return False  # (unreachable: the delays never run out)


def new_tunnel_id() -> str:
    return f"t-{secrets.token_hex(4)}"


class Opened(Protocol):
    """A backend's live tunnel: its URL, and how to close it."""

    url: str
    headers: dict[str, str]

    async def close(self) -> None: ...


class Backend(Protocol):
    name: BackendName
    # Whether it forwards to the port over SSH (relay, local): then `open` is given `host`, the
    # sandbox's loopback address the port listens on (127.0.0.1, or ::1 for a server on IPv6 alone).
    forwards: bool

    async def open(self, box: Sandbox, port: int, host: str = "127.0.0.1") -> Opened: ...
