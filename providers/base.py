"""The provider protocol: how a machine is provisioned and how tether reaches it over SSH.

A provider is constructed for one pool. Required: provision, endpoint, status, terminate. Optional,
where the capability profile says so: pause, resume, snapshot, capacity, exec_command, list. The
base class's optional methods refuse with `Unsupported`, so a provider only writes what it offers.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox import ConnectionPool, SSHEndpoint
from sandbox.errors import InvalidArgument
from sandbox.executor import build_env

from .config import MAX_TIMEOUT_S, LocalPoolConfig, Pool, usable_gpu
from .errors import Unsupported
from .ledger import SANDBOX_ID
from .profiles import LOCAL_AUTH_MODES, CapabilityProfile, Substrate

SandboxStatus = Literal["provisioning", "running", "paused", "failed", "terminated"]
SANDBOX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # (it goes into work dirs, labels, host names)
# Progress reporter: (message, fraction done or None).
Progress = Callable[[str, float | None], Awaitable[None]]


async def no_progress(message: str, fraction: float | None = None) -> None:
    return None


class Request(BaseModel):
    """What a caller asks for. Everything is optional; dispatch picks the pool."""

    model_config = ConfigDict(extra="forbid")

    provider: str | None = None
    pool: str | None = None
    name: str | None = None
    image: str | None = None
    gpu: str | None = Field(
        None, description="GPU type, with a count after a colon for more than one (a100:2); implies `gpu`"
    )
    cpu: float | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, gt=0)
    disk_gb: int | None = Field(None, gt=0)
    timeout_s: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False, description="TTL: terminated this long after creation"
    )
    idle_timeout_s: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False, description="terminated after this long without use"
    )
    requirements: list[str] = Field(default_factory=list)
    runtime_kinds: list[str] = Field(default_factory=list)
    auth_mode: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    keep: bool = Field(False, description="survive the process that created it (no teardown on exit)")
    # Provider-specific arguments (ssh: host, user, port, key_path).
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("env")
    @classmethod
    def _usable_env(cls, value: dict[str, str]) -> dict[str, str]:
        # Checked now, not by every later command (each of which would refuse it).
        try:
            build_env(value)
        except InvalidArgument as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("gpu")
    @classmethod
    def _usable_gpu(cls, value: str | None) -> str | None:
        return usable_gpu(value)

    @field_validator("name")
    @classmethod
    def _usable_name(cls, value: str | None) -> str | None:
        if value is not None and not SANDBOX_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a usable name: start with a letter or digit, then letters, digits, '.', '_' "
                "or '-', at most 63 characters in all"
            )
        # Sandboxes are found by id or name, the id first: a name of that form could be another's id.
        if value is not None and SANDBOX_ID.match(value):
            raise ValueError(f"{value!r} has the form of a sandbox id (sb-…); pick another name")
        return value

    @field_validator("auth_mode")
    @classmethod
    def _spelled_one_way(cls, value: str | None) -> str | None:
        # "Host_Session" must pin like "host-session": a spelling that slipped past the pin would
        # send a session needing this machine's credentials to a cloud. So is a near miss
        # ("host-sesion", "hostsession"): refused, not taken for some other mode.
        if not value:
            return value
        mode = value.strip().lower().replace("_", "-")
        near = difflib.get_close_matches(mode.replace("-", ""), [m.replace("-", "") for m in LOCAL_AUTH_MODES], 1, 0.8)
        if mode not in LOCAL_AUTH_MODES and near:
            meant = next(m for m in LOCAL_AUTH_MODES if m.replace("-", "") == near[0])
            raise ValueError(f"unknown auth mode {value!r}; did you mean {meant!r}?")
        return mode

    def requirement_kinds(self) -> list[str]:
        kinds = list(self.requirements)
        if self.gpu and "gpu" not in kinds:
            kinds.append("gpu")
        return kinds


class ProvisionSpec(BaseModel):
    """What a provider is asked to create. `labels` must be attached to every remote resource."""

    sandbox_id: str
    name: str
    request: Request
    labels: dict[str, str]


class Handle(BaseModel):
    """What a provider needs to find its machine again, stored in the ledger (no secrets)."""

    external_id: str
    data: dict[str, Any] = Field(default_factory=dict)


class Capacity(BaseModel):
    cpus: int | None = None
    memory_mb: int | None = None
    disk_free_gb: float | None = None
    disk_total_gb: float | None = None
    gpus: list[dict[str, Any]] = Field(default_factory=list)


class ListedResource(BaseModel):
    """A machine as the provider's own listing shows it (for gc)."""

    external_id: str
    tether_id: str | None  # from the label tether put on it
    # From its tether-installation label: the state dir whose ledger has it. None where the provider
    # cannot tell, or lists only this state dir's (local): then it is taken for this one's.
    installation: str | None = None
    status: SandboxStatus
    data: dict[str, Any] = Field(default_factory=dict)  # enough to build a Handle and terminate it


SIZING = ("image", "cpu", "memory_mb", "disk_gb")


class Provider:
    """Base class of providers; see the module docstring."""

    name: ClassVar[str]
    profile: ClassVar[CapabilityProfile]
    substrate: ClassVar[Substrate]
    config_model: ClassVar[type[BaseModel]] = LocalPoolConfig
    # Whether a live sandbox's endpoint can change under it (local: the serving process restarts on
    # another port, or stops and this process serves instead). The fleet then asks again now and then.
    endpoint_moves: ClassVar[bool] = False
    # The request options (`create(..., host=...)`) it reads; the fleet refuses others, so a typo is
    # an error and not an option silently ignored. None: any (a plugin that does not say).
    option_names: ClassVar[tuple[str, ...] | None] = None
    # Which of a request's sizing fields (SIZING) it makes the machine to; local and ssh make none,
    # they use a machine as it is (the fleet says so when a request sets one).
    sizes_by: ClassVar[tuple[str, ...]] = SIZING

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why no sandbox can be provisioned right now (checked at dispatch), or None."""
        return None

    def __init__(self, pool: Pool, connections: ConnectionPool | None = None) -> None:
        self.pool = pool
        # The connection pool the fleet uses, for providers that talk SSH themselves (ssh: terminate).
        self.connections = connections

    def check_request(self, request: Request) -> None:
        """Refuse, with InvalidArgument, what this provider cannot take; called before anything is
        recorded or created. The base refuses options not in `option_names`."""
        known = self.option_names
        unknown = sorted(set(request.options) - set(known)) if known is not None else []
        if unknown:
            takes = f"it takes {', '.join(known)}" if known else "it takes none"
            raise InvalidArgument(
                f"the {self.name} provider has no option {', '.join(map(repr, unknown))} ({takes}); nothing was created"
            )

    def unapplied(self, request: Request) -> list[str]:
        """The sizing fields `request` sets that this provider does not apply."""
        return [field for field in SIZING if getattr(request, field) is not None and field not in self.sizes_by]

    async def provision(self, spec: ProvisionSpec, progress: Progress = no_progress) -> Handle:
        raise NotImplementedError

    async def endpoint(self, handle: Handle) -> SSHEndpoint:
        raise NotImplementedError

    async def status(self, handle: Handle) -> SandboxStatus:
        raise NotImplementedError

    async def terminate(self, handle: Handle) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the provider object holds (servers, HTTP clients)."""

    def tether_dir(self, sandbox_id: str) -> str:
        """Where on the box the sandbox keeps tether's files (command output, jobs)."""
        return f"~/.tether/sandboxes/{sandbox_id}"

    # -- optional ----------------------------------------------------------------------------------

    async def pause(self, handle: Handle) -> None:
        raise Unsupported(self.name, "pause", "its profile says supportsPauseResume: false")

    async def resume(self, handle: Handle) -> None:
        raise Unsupported(self.name, "resume", "its profile says supportsPauseResume: false")

    async def snapshot(self, handle: Handle) -> str:
        raise Unsupported(self.name, "snapshot", "its profile says supportsFsSnapshot: false")

    async def capacity(self, handle: Handle | None) -> Capacity:
        raise Unsupported(self.name, "report capacity", "its profile says supportsCapacityQuery: false")

    async def exec_command(
        self, handle: Handle, command: str, env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        raise Unsupported(self.name, "run one-shot commands outside SSH")

    async def preview_url(self, handle: Handle, port: int) -> tuple[str, dict[str, str]] | None:
        """The provider's own URL for `port` and the headers it needs (Daytona's preview token), or None.
        The tunnel layer's `provider` backend uses it."""
        return None

    async def list(self) -> list[ListedResource] | None:
        """The provider's own view of what exists, or None when it has no listing (nothing to reconcile)."""
        return None
