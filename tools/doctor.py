"""`tether doctor`: can each configured provider be used from here, and if not, what is missing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from pydantic import ValidationError

from providers import Fleet, Pool
from providers.config import CREDENTIAL_ENV, SSHPoolConfig, load_defaults
from providers.errors import ProviderError
from providers.local_server import ensure_server, sandbox_root
from providers.registry import provider_class
from providers.ssh import identities
from sandbox import Sandbox, SSHEndpoint
from sandbox.errors import SandboxError, StateUnusable, validation_problems
from sandbox.state import config_path, state_dir
from tunnels import load_channels

from .config import section_problems

API_HOSTS = {
    "daytona": "https://app.daytona.io/api",
    "e2b": "https://api.e2b.dev",
    "modal": "https://api.modal.com",
    "runpod": "https://api.runpod.io",
}
API_URL_ENV = {"daytona": "DAYTONA_API_URL", "runpod": "RUNPOD_API_BASE_URL"}


@dataclass
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str


async def run_doctor() -> list[Check]:
    checks = [_state_dir()]
    try:
        fleet = Fleet()
    except StateUnusable as exc:  # (the state dir's check names a directory that cannot be made)
        return checks if checks[0].status == "fail" else [*checks, Check("state db", "fail", str(exc))]
    except (ProviderError, ValueError) as exc:
        return [*checks, Check("config", "fail", str(exc))]
    path = config_path()
    problems = section_problems(fleet.config)
    if problems:
        checks.append(Check("config", "fail", "; ".join(problems)))
    elif path.exists():
        checks.append(Check("config", "ok", str(path)))
    elif os.environ.get("TETHER_CONFIG"):  # (named on purpose, and not there: a typo, likely)
        detail = f"TETHER_CONFIG names {path}, which does not exist: using implicit pools"
        checks.append(Check("config", "warn", detail))
    else:
        checks.append(Check("config", "ok", f"no {path}: using implicit pools"))
    checks += _defaults_and_channels(fleet)
    try:
        for pool in fleet.pools:
            try:
                checks.append(await _pool(pool, fleet))
            except (SandboxError, ProviderError, ValueError, OSError) as exc:
                # One pool's odd config (a host SSHEndpoint refuses: pydantic's ValidationError) is
                # that pool's [FAIL], not the end of the report: the other checks and --json's JSON
                # still come out.
                detail = validation_problems(exc) if isinstance(exc, ValidationError) else str(exc)
                checks.append(Check(f"pool {pool.name} ({pool.provider})", "fail", detail))
    finally:
        await fleet.close()
    checks += _half_set_credentials({p.provider for p in fleet.pools})
    checks.append(
        Check(
            "ssh client",
            "ok" if shutil.which("ssh") else "warn",
            "found (for `tether ssh`)"
            if shutil.which("ssh")
            else "no `ssh` binary: `tether ssh` will print the command instead",
        )
    )
    return checks


def _defaults_and_channels(fleet: Fleet) -> list[Check]:
    """What parses but cannot work: a [defaults] pool or provider that does not exist (every call
    that names no sandbox would fail), a channel whose URL or secret variable is not set (each of
    its events would fail to go out)."""
    checks = []
    with contextlib.suppress(ValueError, ProviderError):  # (reported by the config check)
        defaults = load_defaults(fleet.config)
        pools = sorted(p.name for p in fleet.pools)
        if defaults.pool and defaults.pool not in pools:
            detail = f"pool {defaults.pool!r} is not a pool here (pools: {', '.join(pools)})"
            checks.append(Check("[defaults]", "fail", detail))
        elif defaults.provider and defaults.provider not in {p.provider for p in fleet.pools}:
            detail = f"provider {defaults.provider!r} has no available pool here"
            checks.append(Check("[defaults]", "fail", detail))
    with contextlib.suppress(ValueError, ProviderError):
        for channel in load_channels(fleet.config):
            unset = [f"${n}" for n in (channel.url_env, channel.secret_env) if n and not os.environ.get(n)]
            if unset:
                detail = f"{' and '.join(unset)} not set: its events are not delivered"
                checks.append(Check(f"channel {channel.label}", "warn", detail))
    return checks


def _half_set_credentials(checked: set[str]) -> list[Check]:
    """A provider whose credentials are only partly in the environment gets no implicit pool, so
    no pool check would mention it: say what is missing."""
    checks = []
    for provider, names in CREDENTIAL_ENV.items():
        missing = [n for n in names if not os.environ.get(n)]
        if provider not in checked and 0 < len(missing) < len(names):
            checks.append(Check(f"{provider} credentials", "warn", f"partly set: also set {', '.join(missing)}"))
    return checks


def _state_dir() -> Check:
    try:
        path = state_dir()
    except OSError as exc:
        return Check("state dir", "fail", str(exc) if isinstance(exc, StateUnusable) else f"cannot be created: {exc}")
    probe = path / f".doctor-{secrets.token_hex(4)}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return Check("state dir", "fail", f"{path} is not writable: {exc}")
    return Check("state dir", "ok", str(path))


async def _pool(pool: Pool, fleet: Fleet) -> Check:
    name = f"pool {pool.name} ({pool.provider})"
    if not pool.active:
        return Check(name, "warn", "inactive")
    if pool.provider == "local":
        return await _local(name)
    if pool.provider == "ssh":
        return await _ssh(name, pool)
    if pool.provider in CREDENTIAL_ENV:
        return await _cloud(name, pool.provider, pool.config)
    try:
        provider_class(pool.provider)
    except ProviderError as exc:
        return Check(name, "fail", str(exc))
    return Check(name, "ok", "plugin loads")


async def _local(name: str) -> Check:
    """Start the embedded server and run a command through it in a throwaway directory."""
    probe_id = f"sb-{secrets.token_hex(5)}"
    root = sandbox_root(probe_id)
    (root / "work").mkdir(parents=True)
    try:
        server = ensure_server()
        endpoint = SSHEndpoint(
            host="127.0.0.1",
            port=server.port,
            user=probe_id,
            key_paths=(str(server.client_key),),
            use_agent=False,
            host_key=server.host_key,
        )
        async with Sandbox(endpoint, tether_dir=str(root / "tether")) as box:
            result = await box.run("echo ok", timeout=30)
        if result.stdout.strip() != "ok":
            return Check(name, "fail", f"a test command answered {result.stdout!r} {result.stderr!r}")
        return Check(name, "ok", f"embedded SSH server on 127.0.0.1:{server.port} runs commands")
    except (SandboxError, OSError) as exc:
        return Check(name, "fail", f"the embedded SSH server does not work: {exc}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _ssh(name: str, pool: Pool) -> Check:
    config = pool.config if isinstance(pool.config, SSHPoolConfig) else None
    if config is None:
        return Check(name, "fail", "no host in the pool's config")
    try:
        endpoint = SSHEndpoint.resolve(config.host, user=config.user, port=config.port)
        endpoint = endpoint.model_copy(update={"key_paths": identities(config.identityFile)})
        async with Sandbox(endpoint) as box:
            await box.run("true", timeout=30)
        return Check(name, "ok", f"logged in to {endpoint.display}")
    except SandboxError as exc:
        return Check(name, "fail", str(exc))


async def _cloud(name: str, provider: str, pool_config: object = None) -> Check:
    missing = [n for n in CREDENTIAL_ENV[provider] if not os.environ.get(n)]
    if missing:
        return Check(name, "fail", f"missing credentials: set {', '.join(missing)}")
    url = _api_url(provider, pool_config)
    parsed = urlparse(url)
    host, port = parsed.hostname or url, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        await asyncio.wait_for(asyncio.to_thread(_connect, host, port), 5)
        reach = f"credentials set; {host}:{port} reachable"
    except (OSError, TimeoutError) as exc:
        return Check(name, "fail", f"credentials set, but {host}:{port} is unreachable: {exc or 'timed out'}")
    try:
        provider_class(provider)
    except ProviderError as exc:
        return Check(name, "warn", f"{reach}; {exc}")
    return Check(name, "ok", reach)


def _api_url(provider: str, pool_config: object = None) -> str:
    """Where the provider's API is: its environment variable (E2B_DOMAIN names a domain), else the
    pool's own setting (Daytona's daytonaApiUrl, as the seed's credential resolver has it), else
    the public default."""
    if provider == "e2b" and os.environ.get("E2B_DOMAIN"):
        return f"https://api.{os.environ['E2B_DOMAIN']}"
    from_env = os.environ.get(API_URL_ENV.get(provider, ""), "")
    return from_env or getattr(pool_config, "daytonaApiUrl", None) or API_HOSTS[provider]


def _connect(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=5):
        pass
