"""Where machines come from: provider protocol, capability profiles, pools, dispatch, lifecycle.

from providers import create
async with await create("local") as sb:          # also "ssh", or pool="name"
    print((await sb.run("uname -a")).stdout)
async with await create("ssh", host="gpu-box", user="me", key_path="~/.ssh/id_ed25519") as sb: ...
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from pydantic import ValidationError

from sandbox.errors import InvalidArgument, validation_problems

from .base import Capacity, Handle, Progress, Provider, ProvisionSpec, Request, no_progress
from .config import Pool, load_pools
from .errors import (
    AuthPinError,
    ConfigError,
    DispatchError,
    ProviderError,
    ProviderUnavailable,
    SandboxGone,
    SandboxNotFound,
    Unsupported,
)
from .fleet import Fleet, GcReport, ManagedSandbox
from .ledger import CostEvent, Ledger, SandboxRecord
from .profiles import PROFILES, SUBSTRATES, CapabilityProfile, Substrate

__all__ = [
    "PROFILES",
    "SUBSTRATES",
    "AuthPinError",
    "CapabilityProfile",
    "Capacity",
    "ConfigError",
    "CostEvent",
    "DispatchError",
    "Fleet",
    "GcReport",
    "Handle",
    "Ledger",
    "ManagedSandbox",
    "Pool",
    "Progress",
    "Provider",
    "ProviderError",
    "ProviderUnavailable",
    "ProvisionSpec",
    "Request",
    "SandboxGone",
    "SandboxNotFound",
    "SandboxRecord",
    "Substrate",
    "Unsupported",
    "create",
    "default_fleet",
    "load_pools",
    "no_progress",
]

_REQUEST_FIELDS = set(Request.model_fields) - {"options", "provider", "pool"}
_fleets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Fleet] = weakref.WeakKeyDictionary()


def default_fleet() -> Fleet:
    """The fleet of the running event loop, built from config.toml and the state dir."""
    loop = asyncio.get_running_loop()
    fleet = _fleets.get(loop)
    if fleet is None:
        fleet = _fleets[loop] = Fleet()
    return fleet


async def create(
    provider: str | None = None, *, pool: str | None = None, progress: Progress = no_progress, **arguments: Any
) -> ManagedSandbox:
    """Provision a sandbox and return it connected.

    Keyword arguments are the request's fields (name, image, gpu, cpu, memory_mb, disk_gb, timeout_s,
    idle_timeout_s, requirements, runtime_kinds, auth_mode, env, keep); anything else goes to the
    provider (ssh: host, user, port, key_path).
    """
    fields = {k: v for k, v in arguments.items() if k in _REQUEST_FIELDS}
    options = {k: v for k, v in arguments.items() if k not in _REQUEST_FIELDS}
    try:
        request = Request(provider=provider, pool=pool, options=options, **fields)
    except ValidationError as exc:
        raise InvalidArgument(f"invalid arguments to create: {validation_problems(exc)}") from None
    return await default_fleet().create(request, progress)
