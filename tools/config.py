"""config.toml as a whole: which sections there are. Each is validated by the layer that reads it
(providers: pools, providers, defaults; tunnels: channels, relay); a section nobody reads is a typo."""

from __future__ import annotations

from typing import Any

from providers.errors import ProviderError
from sandbox.state import config_path
from tunnels import TunnelError, load_channels, load_relay

SECTIONS = ("pools", "providers", "defaults", "channels", "relay")


def check_sections(config: dict[str, Any]) -> None:
    """Raises ValueError naming any top-level key no layer reads (`[chanels]`)."""
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{config_path()}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")


def section_problems(config: dict[str, Any]) -> list[str]:
    """What is wrong with the file's top level and with the sections the fleet does not read
    itself ([relay], [[channels]]); the fleet refuses its own ([[pools]], [defaults]) as it reads them."""
    problems = []
    for check in (check_sections, _check_relay, load_channels):
        try:
            check(config)
        except (ValueError, ProviderError, TunnelError) as exc:
            problems.append(str(exc))
    return problems


def _check_relay(config: dict[str, Any]) -> None:
    """Raises what is wrong with [relay]: its keys, or its host (a user name is required)."""
    relay = load_relay(config)
    if relay is not None:
        relay.usable_endpoint()
