"""Before a URL is reported, one HTTP request through it must get an answer."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from sandbox import Sandbox

from .base import TunnelError
from .ports import PortsUnknown, listening_ports, suggest

CHECK_TIMEOUT = 10.0
GATEWAY_ERRORS = (502, 503, 504)


class NothingListens(TunnelError):
    """Nothing listens on the port inside the sandbox: no backend can help."""


class NoAnswer(TunnelError):
    """No HTTP answer came through a URL."""


async def answers(url: str, headers: dict[str, str], timeout: float = CHECK_TIMEOUT) -> int:
    """GET `url`; any HTTP answer (even 404 or 500) passes. Returns the status code.

    Raises NoAnswer (with no word on why: that is `verify`'s, and costs round trips to the sandbox).
    """
    import httpx  # (here, not at the top: every tether command imports this module, few fetch)

    try:
        # One bound for the whole request (httpx's timeout bounds each phase: connect, each read);
        # the status line is the answer, the body is not waited for.
        async with (
            asyncio.timeout(timeout),
            # A URL on this machine is fetched directly: an HTTP_PROXY would answer for it, or fail.
            httpx.AsyncClient(
                timeout=timeout, verify=True, follow_redirects=False, trust_env=not _on_this_machine(url)
            ) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            return response.status_code
    except httpx.HTTPError as exc:
        problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
        raise NoAnswer(f"no HTTP answer came through {url} ({problem})") from None
    except TimeoutError:  # (the time is named only when it ran out: a connection reset comes at once)
        raise NoAnswer(f"no HTTP answer came through {url} within {timeout:g}s (no answer)") from None


async def verify(
    url: str,
    headers: dict[str, str],
    box: Sandbox,
    port: int,
    timeout: float = CHECK_TIMEOUT,
    exclude: Collection[int] = (),
) -> int:
    """`answers(url)`, or a TunnelError saying whether anything listens on `port` inside the sandbox
    (and, when nothing does, what does: not `exclude`, this process's own listeners).

    A gateway's error (502, 503, 504) is the answer of whatever stands in front of the sandbox (a
    relay, a provider's edge) as often as the app's: it counts only if the port listens."""
    status: int | None = None
    try:
        status = await answers(url, headers, timeout)
    except NoAnswer as exc:
        said = str(exc)
    else:
        if status not in GATEWAY_ERRORS:
            return status
        said = f"only a gateway's error ({status}) came through {url}"
    try:
        listening = port in await listening_ports(box)
    except PortsUnknown as exc:
        raise TunnelError(
            f"{said}; {exc}, so whether port {port} listens is unknown: check that the server runs "
            "(job_list, job_output)"
        ) from None
    if listening and status is not None:
        return status  # (a gateway's error from a port that listens: the app's own, it may be)
    if listening:
        raise TunnelError(
            f"port {port} is listening inside the sandbox but {said}; is it an HTTP server, and does it "
            "answer on 127.0.0.1?"
        )
    # The suggestion names the sandbox user's own servers: a shared host lists everyone's.
    own = await listening_ports(box, own_only=True, exclude=exclude)
    raise NothingListens(f"nothing is listening on port {port} inside the sandbox; {suggest(port, own)}")


def _on_this_machine(url: str) -> bool:
    import httpx

    host = httpx.URL(url).host
    return host in ("localhost", "::1") or host.startswith("127.")
