"""Choosing the pool that serves a request, and validating it against the pools' profiles.

Order of checks, before any provider is called:
1. The auth-mode pin: `host-session` and `local` auth modes need credentials on this machine, so
   they run only on local pools; with no active local pool the request fails here.
2. Each pool in config order: active, the requested pool/provider, the provider usable here
   (implemented, credentials present), the requirement kinds and runtime kinds it provides.
The first pool with no reason against it wins; otherwise every pool's reasons are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import Request
from .config import Pool
from .errors import AuthPinError, DispatchError, Rejection
from .profiles import LOCAL_AUTH_MODES

# Why a pool's provider can't be used right now (missing credentials, not implemented), or None.
Availability = Callable[[Pool], str | None]


def choose_pool(request: Request, pools: Sequence[Pool], availability: Availability) -> Pool:
    """The pool to provision on. Raises AuthPinError or DispatchError (with per-pool reasons)."""
    _check_auth_pin(request, pools)
    if request.pool and all(pool.name != request.pool for pool in pools):
        names = ", ".join(pool.name for pool in pools) or "none"
        raise DispatchError(f"no pool named {request.pool!r}; the pools here: {names} (see pools_list)", [])
    rejections = []
    for pool in pools:
        reasons = rejection_reasons(request, pool, availability)
        if not reasons:
            return pool
        rejections.append(Rejection(pool.name, pool.provider, tuple(reasons)))
    raise DispatchError(f"no pool can serve this request ({describe(request)})", rejections)


def rejection_reasons(request: Request, pool: Pool, availability: Availability) -> list[str]:
    reasons = []
    if request.pool and pool.name != request.pool:
        reasons.append(f"not the requested pool {request.pool!r}")
    if request.provider and pool.provider != request.provider:
        reasons.append(f"provider is {pool.provider}, not the requested {request.provider}")
    if request.auth_mode in LOCAL_AUTH_MODES and pool.provider != "local":
        reasons.append(f"auth mode {request.auth_mode!r} runs only on local pools")
    if not pool.active:
        reasons.append("inactive (set active = true in config.toml)")
    if not reasons:  # only ask about availability for pools that would otherwise fit
        why_not = availability(pool)
        if why_not:
            reasons.append(why_not)
    substrate = pool.substrate()
    missing = [k for k in request.requirement_kinds() if k not in substrate.requirement_kinds]
    if missing:
        fix = (
            "configure a [[pools]] entry for a machine that has them"
            if pool.implicit
            else "if its machines have them, add them to its runtime_provides"
        )
        reasons.append(f"lacks requirement kinds {', '.join(missing)} ({fix})")
    missing_runtimes = [k for k in request.runtime_kinds if k not in substrate.runtime_kinds]
    if missing_runtimes:
        reasons.append(f"lacks runtime kinds {', '.join(missing_runtimes)}")
    return reasons


def _check_auth_pin(request: Request, pools: Sequence[Pool]) -> None:
    if request.auth_mode not in LOCAL_AUTH_MODES:
        return
    mode = request.auth_mode
    if request.provider and request.provider != "local":
        raise AuthPinError(
            f"auth mode {mode!r} uses credentials on this machine and runs only on local pools, "
            f"not on {request.provider}",
            [],
        )
    local = [p for p in pools if p.provider == "local"]
    if not any(p.active for p in local):
        rejections = [Rejection(p.name, p.provider, ("inactive",)) for p in local]
        raise AuthPinError(
            f"auth mode {mode!r} uses credentials on this machine and runs only on local pools, and no local "
            'pool is active; activate one in config.toml ([[pools]] provider = "local", active = true)',
            rejections,
        )


def describe(request: Request) -> str:
    parts = []
    for label, value in (("pool", request.pool), ("provider", request.provider), ("auth mode", request.auth_mode)):
        if value:
            parts.append(f"{label} {value}")
    if request.requirement_kinds():
        parts.append(f"requirements {', '.join(request.requirement_kinds())}")
    if request.runtime_kinds:
        parts.append(f"runtime kinds {', '.join(request.runtime_kinds)}")
    return "; ".join(parts) or "no constraints"
