"""The [relay] and [[channels]] sections of config.toml."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from sandbox.state import config_path, read_config

from .channels import ChannelConfig
from .relay import RelayConfig


class TunnelConfigError(ValueError):
    pass


def load_relay(config: dict[str, Any] | None = None) -> RelayConfig | None:
    config = read_config() if config is None else config
    section = config.get("relay")
    if not section:
        return None
    try:
        return RelayConfig.model_validate(section)
    except ValidationError as exc:
        raise TunnelConfigError(f"{config_path()}: [relay]: {_explain(exc)}") from None


def load_channels(config: dict[str, Any] | None = None) -> list[ChannelConfig]:
    config = read_config() if config is None else config
    channels = []
    for index, entry in enumerate(config.get("channels", []) or []):
        try:
            channels.append(ChannelConfig.model_validate(entry))
        except ValidationError as exc:
            raise TunnelConfigError(f"{config_path()}: [[channels]] #{index + 1}: {_explain(exc)}") from None
    return channels


def _explain(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "entry"
        problems.append(f"{where}: {'unknown key' if error['type'] == 'extra_forbidden' else error['msg']}")
    return "; ".join(problems)
