"""Which providers exist, and the class that implements each (imported only when used).

Built-in: `local` and `ssh`. The cloud providers' profiles and pool configs are known, but their
clients are not part of this version: asking for one raises ProviderUnavailable with that reason.
More providers can be plugged in from config.toml:

    [[providers]]
    name = "my-cloud"
    class = "my_package.provider:MyCloudProvider"   # a Provider with profile, substrate, config_model
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sandbox.state import read_config

from .errors import ConfigError, ProviderUnavailable
from .profiles import PROFILES, SUBSTRATES, CapabilityProfile, Substrate

if TYPE_CHECKING:
    from .base import Provider

BUILTIN_CLASSES = {"local": "providers.local:LocalProvider", "ssh": "providers.ssh:SSHProvider"}
NOT_YET_IMPLEMENTED = ("daytona", "e2b", "modal", "runpod")


_custom: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Make provider `name` available, implemented by `target` ("module:Class")."""
    if name in PROFILES:
        raise ConfigError(f"[[providers]] {name!r} would replace a built-in provider")
    if ":" not in target:
        raise ConfigError(f"provider {name!r}: class must be 'module:Class', got {target!r}")
    _custom[name] = target


def register_from_config(config: dict[str, Any] | None = None) -> None:
    """Register config.toml's [[providers]] entries."""
    config = read_config() if config is None else config
    entries = config.get("providers") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("`providers` must be an array of tables: [[providers]] with name and class")
    for entry in entries:
        name, target = entry.get("name"), entry.get("class")
        if not isinstance(name, str) or not isinstance(target, str):
            raise ConfigError(f"[[providers]] entries need name and class = 'module:Class'; got {entry!r}")
        register(name, target)


def custom_classes() -> dict[str, str]:
    return dict(_custom)


def known_providers() -> list[str]:
    return [*PROFILES, *_custom]


def unknown_provider(name: str) -> str | None:
    """Why `name` names no provider here (what the error says), or None when it does."""
    known = known_providers()
    return None if name in known else f"unknown provider {name!r}; known: {', '.join(known)}"


def provider_class(name: str) -> type[Provider]:
    """The class implementing `name`. Raises ProviderUnavailable for a known but unimplemented one."""
    if name in NOT_YET_IMPLEMENTED:
        raise ProviderUnavailable(
            f"the {name} provider is not part of this version of tether (its profile and pool config are); "
            "use local, ssh, or a [[providers]] plugin"
        )
    target = BUILTIN_CLASSES.get(name) or _custom.get(name)
    if target is None:
        raise ProviderUnavailable(unknown_provider(name) or name)
    module_name, _, class_name = target.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"provider {name!r}: cannot load {target}: {exc}") from None
    from .base import Provider  # (here: base, through config, imports this module)

    if not (isinstance(found, type) and issubclass(found, Provider)):
        raise ConfigError(f"provider {name!r}: {target} is not a class derived from providers.Provider")
    return found


def profile_of(name: str) -> CapabilityProfile:
    return PROFILES.get(name) or provider_class(name).profile


def substrate_of(name: str) -> Substrate:
    return SUBSTRATES.get(name) or provider_class(name).substrate
