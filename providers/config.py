"""Pools from config.toml: one pydantic model per provider's pool config, with the seeds' keys and defaults.

    [[pools]]
    name = "gpu"
    provider = "modal"
    active = true
    config = { image = "registry.example.com/worker-cuda:v1", gpu = "a10g" }
    runtime_provides = { runtimeKinds = ["npm", "python-pip"], requirementKinds = ["long-running", "gpu"] }

Keys are the seeds' camelCase names. Unknown keys are refused, except in a local pool's config, which
tether ignores and keeps as metadata (as the local provider's page says). Without any [[pools]],
the implicit pools are `local` plus one per cloud provider whose credentials are in the environment.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandbox.state import config_path, read_config

from . import registry
from .errors import ConfigError
from .profiles import Substrate

HOST_BINARY = "host-binary"
# A TTL or idle timeout beyond a year is a mistake (or `inf`): refused, not kept as a date no clock shows.
MAX_TIMEOUT_S = 366 * 24 * 3600

DONMAI_IMAGE = "ghcr.io/renseiai/donmai-worker:latest"
DONMAI_COMMAND = ["donmai", "agent", "run"]


class _Strict(BaseModel):
    # strict: TOML has types, and `active = "no"` must not quietly mean something (it was True).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Resources(_Strict):
    """A Modal pool's spec.resources and their defaults (Modal's page: its "Resource configuration")."""

    cpu: float = Field(2.0, gt=0, description="vCPU count (float)")
    memoryMB: int = Field(2048, gt=0, description="Memory in MiB")
    timeoutSec: int = Field(3600, gt=0, le=MAX_TIMEOUT_S, description="Sandbox timeout in seconds (the TTL)")


# Daytona's page: "Idle workspaces automatically enter an archived state after autoStopInterval
# minutes (default: 30 minutes, or timeoutSec / 60 if set in resources)".
DAYTONA_AUTO_STOP_MINUTES = 30


class DaytonaResources(_Strict):
    """A Daytona pool's spec.resources: the page names timeoutSec alone, and gives it no default."""

    timeoutSec: int | None = Field(
        None,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Sets the auto-stop interval, ceil(timeoutSec / 60) minutes (unset: 30), after which an idle "
        "workspace is archived; not a TTL",
    )


class LocalPoolConfig(BaseModel):
    """The local provider reads none of its config: everything is kept, as metadata for people."""

    model_config = ConfigDict(extra="allow", frozen=True)


class SSHPoolConfig(_Strict):
    """A host you bring: an address or ~/.ssh/config alias, and how to log in."""

    host: str = Field(description="user@host[:port] or an ~/.ssh/config alias (ProxyJump honoured)")
    user: str | None = Field(None, description="Login name, when not in `host`")
    port: int | None = Field(None, ge=1, le=65535)
    identityFile: str | None = Field(None, description="Private key; default: tether's key, ~/.ssh keys, agent")


class DaytonaPoolConfig(_Strict):
    daytonaApiUrl: str = Field("https://app.daytona.io/api", description="Daytona API base URL")
    image: str = Field(DONMAI_IMAGE, description="Workspace image")
    diskGB: float = Field(20, gt=0, description="Disk size per workspace in GB")
    user: str = Field("daytona", description="Workspace user")
    command: list[str] = Field(default_factory=lambda: list(DONMAI_COMMAND), description="Launch command")
    resources: DaytonaResources = Field(default_factory=DaytonaResources)

    def auto_stop_minutes(self) -> int:
        """Daytona's autoStopInterval for this pool's workspaces: `ceil(timeoutSec / 60)`, default 30.
        Daytona archives an idle workspace then (storage-only cost); nothing ends it at a set time
        (maxSessionDurationSeconds: null), so this is no TTL."""
        timeout = self.resources.timeoutSec
        return DAYTONA_AUTO_STOP_MINUTES if timeout is None else math.ceil(timeout / 60)


class E2BPoolConfig(_Strict):
    """E2B's page has two keys in its table, a third in its text (pause and resume: "Set
    config.snapshotId on the pool or use launchRunnerInline: true"), and no resources (its
    sandboxes' timeout is the request's TTL)."""

    templateId: str = Field("base", description="E2B template ID")
    launchRunnerInline: bool = Field(False, description="Launch the runner via execCommand after provision")
    snapshotId: str | None = Field(
        None, description="Provision from this sandbox (one paused with `e2b sandbox pause`) instead of the template"
    )


def usable_gpu(value: str | None) -> str | None:
    """`value` when it is a GPU spec (a type, and a count over 0 after a colon), else ValueError."""
    kind, colon, count = (value or "").partition(":")
    if value is not None and (not kind.strip() or (colon and not (count.isdigit() and int(count) > 0))):
        raise ValueError(f"{value!r} is not a GPU: write its type, and a count after a colon for more (a100:2)")
    return value


def gpu_type_and_count(spec: str) -> tuple[str, int]:
    """A GPU as Modal spells it, type and an optional count: "A100:2" → ("A100", 2), "h100" → ("h100", 1)."""
    kind, _, n = spec.partition(":")
    return kind, int(n) if n.isdigit() and int(n) > 0 else 1


class ModalPoolConfig(_Strict):
    image: str = Field(DONMAI_IMAGE, description="Container image")
    gpu: str | None = Field(None, description="GPU type (e.g. a10g, a100, h100); omit for CPU-only")
    entrypoint: list[str] = Field(default_factory=lambda: list(DONMAI_COMMAND), description="Sandbox entrypoint")
    resources: Resources = Field(default_factory=Resources)

    @field_validator("gpu")
    @classmethod
    def _usable_gpu(cls, value: str | None) -> str | None:
        return usable_gpu(value)

    def ttl(self) -> tuple[int, bool]:
        """Modal's sandbox timeout (Modal ends the sandbox then: a TTL), and whether this pool's
        config set it rather than taking the page's default."""
        return self.resources.timeoutSec, "timeoutSec" in self.resources.model_fields_set

    def gpu_spec(self) -> tuple[str | None, int]:
        """GPU type and count ("A100:2" → ("A100", 2)); (None, 0) for CPU-only."""
        return gpu_type_and_count(self.gpu) if self.gpu else (None, 0)


class RunPodPoolConfig(_Strict):
    """RunPod pod settings, named as in RunPod's PodCreateInput (shared/specs/runpod)."""

    imageName: str = Field("runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04", description="Pod image")
    gpuTypeIds: list[str] = Field(default_factory=lambda: ["NVIDIA A100 80GB PCIe"], description="GPU types")
    gpuCount: int = Field(1, ge=1)
    cloudType: Literal["SECURE", "COMMUNITY"] = "SECURE"
    containerDiskInGb: int = Field(50, gt=0)
    volumeInGb: int = Field(0, ge=0)
    rateUsdPerHour: float | None = Field(None, ge=0, description="Your rate, for cost estimates")

    def gpu_spec(self) -> tuple[str | None, int]:
        """GPU type (the first RunPod may choose) and count."""
        return (self.gpuTypeIds[0] if self.gpuTypeIds else None), self.gpuCount


CONFIG_MODELS: dict[str, type[BaseModel]] = {
    "local": LocalPoolConfig,
    "ssh": SSHPoolConfig,
    "daytona": DaytonaPoolConfig,
    "e2b": E2BPoolConfig,
    "modal": ModalPoolConfig,
    "runpod": RunPodPoolConfig,
}

# Environment variables that make a cloud provider's implicit pool appear.
CREDENTIAL_ENV: dict[str, tuple[str, ...]] = {
    "daytona": ("DAYTONA_API_KEY",),
    "e2b": ("E2B_API_KEY",),
    "modal": ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"),
    "runpod": ("RUNPOD_API_KEY",),
}


class RuntimeProvides(_Strict):
    """A pool's override of its provider's substrate defaults."""

    runtimeKinds: list[str]
    requirementKinds: list[str]


class Pool(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    provider: str
    config: Any = None
    active: bool = True
    runtime_provides: RuntimeProvides | None = None
    implicit: bool = Field(False, description="Made up by tether (no config file), not written by a person")

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        if why := registry.unknown_provider(value):
            raise ValueError(why)
        return value

    @model_validator(mode="after")
    def _host_binary_is_local(self) -> Pool:
        # The seed: "host-binary is exclusive to the local provider" (this machine's own PATH).
        provides = self.runtime_provides
        if self.provider != "local" and provides and HOST_BINARY in provides.runtimeKinds + provides.requirementKinds:
            raise ValueError(
                f"{HOST_BINARY} is exclusive to the local provider; a {self.provider} pool cannot provide it"
            )
        return self

    def substrate(self) -> Substrate:
        """The provider's substrate defaults, or this pool's runtime_provides override."""
        if self.runtime_provides is not None:
            return Substrate(
                runtime_kinds=list(self.runtime_provides.runtimeKinds),
                requirement_kinds=list(self.runtime_provides.requirementKinds),
            )
        return registry.substrate_of(self.provider)


def parse_pool(entry: dict[str, Any]) -> Pool:
    """Validate one [[pools]] entry, its config against its provider's model."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{config_path()}: each pool is a table ([[pools]] with name and provider), not {entry!r}")
    provider = entry.get("provider")
    model = CONFIG_MODELS.get(provider) if isinstance(provider, str) else None
    if model is None and isinstance(provider, str) and provider in registry.custom_classes():
        model = registry.provider_class(provider).config_model
    raw_config = entry.get("config") or {}
    fields = dict(entry)
    if model is not None:
        try:
            fields["config"] = model.model_validate(raw_config)
        except ValidationError as exc:
            raise ConfigError(_explain(f"pool {entry.get('name')!r} ({provider}) config", exc)) from None
    try:
        return Pool.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(_explain(f"pool {entry.get('name')!r}", exc)) from None


def load_pools(config: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> list[Pool]:
    """The pools of config.toml, or the implicit ones when it defines none."""
    config = read_config() if config is None else config
    registry.register_from_config(config)
    entries = config.get("pools")
    if entries is not None and not isinstance(entries, list):  # (`pools = {}` or `false` too)
        raise ConfigError(f"{config_path()}: `pools` must be an array of tables ([[pools]])")
    if entries:
        pools = [parse_pool(e) for e in entries]
        names = [p.name for p in pools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{config_path()}: pool names must be unique; repeated: {', '.join(duplicates)}")
        return pools
    return implicit_pools(os.environ if environ is None else environ)


class Defaults(_Strict):
    """[defaults] in config.toml: what a request gets when it does not say.

    [defaults]
    pool = "gpu"          # the MCP server's default sandbox, and `tether up` with no provider
    ttl_s = 7200          # every new sandbox's TTL ...
    idle_timeout_s = 1800 # ... and idle timeout
    """

    pool: str | None = Field(None, description="Pool of the default sandbox (else `provider`, else local)")
    provider: str | None = Field(None, description="Provider of the default sandbox, when no pool is named")
    ttl_s: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False, description="TTL of new sandboxes that give none"
    )
    idle_timeout_s: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False, description="Idle timeout of new sandboxes that give none"
    )

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str | None) -> str | None:
        # (checked when the config loads, not at the first create, as a pool's provider is)
        if value is not None and (why := registry.unknown_provider(value)):
            raise ValueError(why)
        return value

    @property
    def says_where(self) -> bool:
        """Whether a request that names no place goes somewhere (rather than being refused)."""
        return bool(self.pool or self.provider)


def load_defaults(config: dict[str, Any]) -> Defaults:
    try:
        return Defaults.model_validate(config.get("defaults") or {})
    except ValidationError as exc:
        raise ConfigError(_explain("[defaults]", exc)) from None


def implicit_pools(environ: dict[str, str] | os._Environ[str]) -> list[Pool]:
    pools = [Pool(name="local", provider="local", config=LocalPoolConfig(), implicit=True)]
    for provider, names in CREDENTIAL_ENV.items():
        if all(environ.get(n) for n in names):
            pools.append(Pool(name=provider, provider=provider, config=CONFIG_MODELS[provider](), implicit=True))
    return pools


def credentials_missing(provider: str, environ: dict[str, str] | os._Environ[str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    return [n for n in CREDENTIAL_ENV.get(provider, ()) if not environ.get(n)]


def _explain(what: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        problems.append(f"{where}: {message}")
    return f"{config_path()}: {what}: " + "; ".join(problems)
