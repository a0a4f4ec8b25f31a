"""Wiring the tunnel layer to the fleet: the ledger records tunnels, the provider's own URLs feed the
`provider` backend, and chat channels hear about tunnels and sandboxes (tunnels/ knows nothing of
providers, so the wiring lives here)."""

from __future__ import annotations

from providers import Fleet, SandboxNotFound
from tunnels import Notifier, PreviewSource, PreviewURL, Tunnel, TunnelManager, load_channels, load_relay

# How often a process holding tunnels looks for their sandboxes having ended elsewhere (`tether down`
# in another shell, another process's reaper): a tunnel to a machine that is gone must not linger.
ENDED_CHECK_SECONDS = 2.0


def fleet_notifier(fleet: Fleet) -> Notifier:
    """The configured chat channels, hearing of the fleet's sandboxes (created, terminated)."""
    notifier = Notifier(load_channels(fleet.config))
    fleet.listeners.append(notifier.emit)
    return notifier


def tunnel_manager(fleet: Fleet, notifier: Notifier) -> TunnelManager:
    """A tunnel manager that records in the fleet's ledger and tells `notifier` (the fleet's own,
    from `fleet_notifier`) of its tunnels."""

    def record(what: str, tunnel: Tunnel) -> None:
        if what == "opened":
            fleet.ledger.add_tunnel(tunnel.id, tunnel.sandbox_id, tunnel.port, tunnel.backend, tunnel.url)
        elif what == "moved":
            fleet.ledger.move_tunnel(tunnel.id, tunnel.url)
        else:
            fleet.ledger.close_tunnel(tunnel.id)

    return TunnelManager(relay=load_relay(fleet.config), notifier=notifier, recorder=record)


def preview_source(fleet: Fleet, sandbox_id: str) -> PreviewSource:
    async def preview(port: int) -> PreviewURL | None:
        found = await fleet.preview_url(sandbox_id, port)
        return PreviewURL(found[0], found[1]) if found else None

    return preview


async def close_tunnels_of_ended_sandboxes(fleet: Fleet, tunnels: TunnelManager) -> list[str]:
    """Close the tunnels whose sandbox the ledger says has ended (whoever ended it), and end, with
    its tunnels, a sandbox past its TTL: connections through a tunnel are no use of the sandbox
    that would end it, and `tether tunnel` runs no reaper. Returns the ids of those sandboxes."""
    ended = []
    for sandbox_id in {t.sandbox_id for t in tunnels.list()}:
        try:
            record = fleet.ledger.get(sandbox_id)
        except SandboxNotFound:
            live = False
        else:
            live = record.live and not await fleet.end_if_expired(record)
        if not live:
            await tunnels.close_for_sandbox(sandbox_id)
            ended.append(sandbox_id)
    return ended
