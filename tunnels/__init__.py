"""Turning a port inside a sandbox into a URL, and telling chat channels about it.

Backends: `provider` (the provider's own URL), `relay` (a remote forward on an SSH relay) and `local`
(an SSH local forward on tether's host). This package uses the engine (`sandbox`) only.
"""

from .base import PreviewSource, PreviewURL, Tunnel, TunnelError
from .channels import ChannelConfig, Notifier
from .config import load_channels, load_relay
from .manager import TunnelManager
from .ports import listening_ports
from .relay import RelayConfig

__all__ = [
    "ChannelConfig",
    "Notifier",
    "PreviewSource",
    "PreviewURL",
    "RelayConfig",
    "Tunnel",
    "TunnelError",
    "TunnelManager",
    "listening_ports",
    "load_channels",
    "load_relay",
]
