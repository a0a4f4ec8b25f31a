"""Which TCP ports listen inside a sandbox (read over SSH; nothing is installed on the box)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection

from sandbox import Sandbox
from sandbox.endpoint import is_loopback
from sandbox.errors import SandboxError

from .base import TunnelError

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp
# Ports this process serves on this machine that no tunnel may publish: the MCP server's HTTP port
# (on loopback it asks no token, trusting whoever can reach it there: a tunnel to it would hand the
# whole server to anyone with the URL). tools/http.py adds it once bound.
PRIVATE_PORTS: set[int] = set()


def parse_proc_net_tcp(text: str, uid: int | None = None) -> set[int]:
    """Listening ports in a /proc/net/tcp or tcp6 table (only `uid`'s sockets when given)."""
    ports = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[3] == LISTEN and (uid is None or fields[7] == str(uid)):
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def parse_netstat(text: str) -> set[int]:
    """Listening TCP ports in `netstat -an` output (Linux and BSD/macOS spellings)."""
    ports = set()
    for line in text.splitlines():
        if "LISTEN" not in line or not line.lower().startswith("tcp"):
            continue
        local = line.split()[3]
        match = re.search(r"[.:](\d+)$", local)
        if match:
            ports.add(int(match.group(1)))
    return ports


async def proc_listeners(box: Sandbox, uid: int | None = None) -> tuple[set[int], set[int]] | None:
    """Listening ports of /proc/net/tcp and of /proc/net/tcp6 (only `uid`'s sockets when given),
    both read in one round trip; None when the box has neither table."""

    async def table(path: str) -> set[int] | None:
        try:
            return parse_proc_net_tcp((await box.read_bytes(path)).decode("ascii", "replace"), uid)
        except SandboxError:
            return None

    v4, v6 = await asyncio.gather(table("/proc/net/tcp"), table("/proc/net/tcp6"))
    return None if v4 is None and v6 is None else (v4 or set(), v6 or set())


async def listening_ports(box: Sandbox, own_only: bool = False, exclude: Collection[int] = ()) -> list[int]:
    """Sorted listening TCP ports: /proc/net/tcp{,6} over SFTP, else `netstat -an`.

    With `own_only`, only sockets of the sandbox's login user (a shared host lists everyone's), and
    none of tether's own (see `tethers_own`; `exclude`: the ports this process listens on, its local
    tunnels'): these name the servers an agent may have meant.
    """
    tables = await proc_listeners(box, await _login_uid(box) if own_only else None)
    if tables is not None:
        ports = tables[0] | tables[1]
    else:
        try:
            raw = await box.exec_raw(["netstat", "-an"], timeout=15)
        except (SandboxError, TimeoutError):
            raise PortsUnknown(
                "which ports listen inside the sandbox cannot be read (no /proc/net/tcp, no netstat)"
            ) from None
        ports = parse_netstat(raw.stdout.decode("ascii", "replace"))
    return sorted(ports - tethers_own(box, exclude) if own_only else ports)


async def _login_uid(box: Sandbox) -> int | None:
    """The login user's uid, from the SFTP server's own /proc/self/status (it runs as that user):
    over SFTP alone, as the tables are, so a box whose login shells will not start still answers."""
    try:
        status = (await box.read_bytes("/proc/self/status")).decode("ascii", "replace")
    except SandboxError:
        return None
    found = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def tethers_own(box: Sandbox, listeners: Collection[int] = ()) -> set[int]:
    """Ports inside the sandbox that are tether's, where it can know them: for a sandbox on this
    machine (an endpoint on loopback, reached directly), the SSH server's port (the local
    provider's embedded server runs as the same user), PRIVATE_PORTS and `listeners`, this
    process's own (its local tunnels'). Elsewhere, none: the same numbers there are the sandbox's."""
    endpoint = getattr(box, "endpoint", None)
    if endpoint is None or endpoint.jump or endpoint.socket_factory is not None or not is_loopback(endpoint.host):
        return set()
    return {endpoint.port, *PRIVATE_PORTS, *listeners}


async def loopback_for(box: Sandbox, port: int) -> str:
    """The loopback address a tunnel reaches `port` at: 127.0.0.1, unless the port listens on IPv6
    alone (a dev server bound to ::1, as Node and Vite do when "localhost" means ::1). Where the
    tables cannot be read, 127.0.0.1."""
    v4, v6 = await proc_listeners(box) or (set(), set())
    return "::1" if port in v6 and port not in v4 else "127.0.0.1"


class PortsUnknown(TunnelError):
    """Neither /proc/net/tcp nor netstat could be read on the box."""


def suggest(port: int, listening: list[int]) -> str:
    """A sentence for the agent: what listens instead of `port`."""
    likely = [p for p in listening if p >= 1024] or listening
    if not likely:
        return "nothing listens on any TCP port in the sandbox; start the server first (run_in_background)"
    shown = ", ".join(str(p) for p in likely[:10])
    return f"ports listening in the sandbox: {shown}" + (f"; did you mean {likely[0]}?" if len(likely) == 1 else "")
