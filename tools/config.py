"""config.toml as a whole: which sections there are. Each is validated by the layer that reads it
(providers: pools, providers, defaults; tunnels: channels, relay); a section nobody reads is a typo."""

from __future__ import annotations

from typing import Any

from sandbox.state import config_path

SECTIONS = ("pools", "providers", "defaults", "channels", "relay")


def check_sections(config: dict[str, Any]) -> None:
    """Raises ValueError naming any top-level key no layer reads (`[chanels]`)."""
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{config_path()}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
