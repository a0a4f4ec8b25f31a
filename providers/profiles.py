"""Capability profiles and substrate defaults, as the provider pages in shared/seeds/ give them.

Each field keeps the seed's value and, separately, the seed's parenthetical note, so the profile can
be shown exactly as documented (tests compare them cell by cell with the seed documents).

Two providers have no page of their own and are derived (see PROFILE_NOTES and the README):
- `ssh` (your own hosts) — from the runtime overview ("any machine with SSH access can be a
  sandbox") and what such a machine offers: like `local` it is your hardware (zero idle cost, fixed
  billing, capacity queried over SSH), but tether does not manage it, so no host-binary or workarea.
- `runpod` — from the runtime overview ("GPU A100s at ~$0.50/hour", agents tear machines down) and
  RunPod's API (shared/specs/runpod): per-second billing while a pod runs, a stopped pod keeps only
  its volume (storage-only idle cost, no memory snapshot, so no pause/resume in the seeds' sense).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from .errors import ProviderError

PROVIDERS = ("local", "ssh", "daytona", "e2b", "modal", "runpod")


class CapabilityProfile(BaseModel):
    """The seeds' capability table. Field names serialize in the seeds' camelCase."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    transport_model: str
    supports_fs_snapshot: bool
    supports_pause_resume: bool
    supports_capacity_query: bool
    max_concurrent: int | None
    max_session_duration_seconds: int | None
    regions: list[str] | None = Field(None, description="None where the provider's page does not say.")
    os: list[str]
    arch: list[str]
    idle_cost_model: str
    billing_model: str
    supports_gpu: bool
    supports_custom_network_policy: bool
    egress_default: str
    notes: dict[str, str] = Field(default_factory=dict, description="The seeds' parenthetical notes, by field.")

    def cells(self) -> dict[str, str]:
        """Each field rendered as the seeds write it: `value (note)`."""
        rendered = {}
        for name, field in type(self).model_fields.items():
            if name == "notes":
                continue
            key = field.alias or name
            value = getattr(self, name)
            if value is None and key == "regions":
                continue
            text = _render(value, key)
            note = self.notes.get(key)
            rendered[key] = f"{text} ({note})" if note else text
        return rendered


def _render(value: Any, key: str) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return str(value) if key == "regions" else ", ".join(value)
    return str(value)


class Substrate(BaseModel):
    """What a provider's machines offer by default: runtime kinds and requirement kinds."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)

    runtime_kinds: list[str]
    requirement_kinds: list[str]


_TOOLCHAIN_FREE_RUNTIMES = ["npm", "python-pip", "http", "mcp-server", "a2a-protocol"]
_TOOLCHAIN_FREE_REQUIREMENTS = ["long-running", "network-egress", "git", "full-history-clone"]

PROFILES: dict[str, CapabilityProfile] = {
    "local": CapabilityProfile(
        transport_model="either",
        supports_fs_snapshot=False,
        supports_pause_resume=False,
        supports_capacity_query=True,
        max_concurrent=None,
        max_session_duration_seconds=None,
        regions=["*"],
        os=["linux", "macOS"],
        arch=["x86_64", "arm64"],
        idle_cost_model="zero",
        billing_model="fixed",
        supports_gpu=False,
        supports_custom_network_policy=False,
        egress_default="allow-all",
        notes={
            "transportModel": "dial-in via Unix socket or dial-out via token",
            "supportsCapacityQuery": "daemon reports capacity",
            "maxConcurrent": "host-limited",
            "maxSessionDurationSeconds": "unlimited",
            "regions": "wherever the machine is",
            "idleCostModel": "your own hardware",
            "billingModel": "no per-session billing",
            "supportsGpu": "operator may override at runtime",
        },
    ),
    "ssh": CapabilityProfile(
        transport_model="dial-in",
        supports_fs_snapshot=False,
        supports_pause_resume=False,
        supports_capacity_query=True,
        max_concurrent=None,
        max_session_duration_seconds=None,
        regions=["*"],
        os=["linux", "macOS"],
        arch=["x86_64", "arm64"],
        idle_cost_model="zero",
        billing_model="fixed",
        supports_gpu=False,
        supports_custom_network_policy=False,
        egress_default="allow-all",
        notes={
            "transportModel": "tether dials the host's sshd",
            "supportsCapacityQuery": "nproc, /proc/meminfo, df and nvidia-smi over SSH",
            "maxConcurrent": "host-limited",
            "maxSessionDurationSeconds": "unlimited",
            "regions": "wherever the machine is",
            "idleCostModel": "your own hardware",
            "billingModel": "no per-session billing",
            "supportsGpu": "declare gpu in the pool's runtime_provides for a GPU host",
        },
    ),
    "daytona": CapabilityProfile(
        transport_model="dial-in",
        supports_fs_snapshot=True,
        supports_pause_resume=False,
        supports_capacity_query=False,
        max_concurrent=None,
        max_session_duration_seconds=None,
        os=["linux"],
        arch=["x86_64"],
        idle_cost_model="storage-only",
        billing_model="wall-clock",
        supports_gpu=False,
        supports_custom_network_policy=False,
        egress_default="allow-all",
        notes={
            "transportModel": "Daytona control plane",
            "supportsFsSnapshot": "workspace archive",
            "supportsPauseResume": "FS archive only, not full memory+FS",
            "supportsCapacityQuery": "no public capacity API",
            "maxConcurrent": "tier-gated by Daytona",
            "maxSessionDurationSeconds": "days-long workspaces supported",
            "idleCostModel": "idle workspaces enter archived state",
            "billingModel": "while running",
        },
    ),
    "e2b": CapabilityProfile(
        transport_model="dial-in",
        supports_fs_snapshot=True,
        supports_pause_resume=True,
        supports_capacity_query=False,
        max_concurrent=None,
        max_session_duration_seconds=None,
        os=["linux"],
        arch=["x86_64"],
        idle_cost_model="zero",
        billing_model="wall-clock",
        supports_gpu=False,
        supports_custom_network_policy=False,
        egress_default="allow-all",
        notes={
            "transportModel": "E2B envd exposes an exec endpoint",
            "supportsPauseResume": "full memory + FS, ~1s pause/resume",
            "supportsCapacityQuery": "FaaS-style, opaque capacity",
            "maxConcurrent": "tier-gated by E2B",
            "maxSessionDurationSeconds": "tier-dependent",
            "idleCostModel": "paused sandboxes cost $0",
            "billingModel": "while running",
        },
    ),
    "modal": CapabilityProfile(
        transport_model="dial-in",
        supports_fs_snapshot=True,
        supports_pause_resume=True,
        supports_capacity_query=False,
        max_concurrent=None,
        max_session_duration_seconds=None,
        os=["linux"],
        arch=["x86_64", "arm64"],
        idle_cost_model="metered",
        billing_model="wall-clock",
        supports_gpu=True,
        supports_custom_network_policy=False,
        egress_default="allow-all",
        notes={
            "transportModel": "Modal provides a direct connection endpoint",
            "supportsPauseResume": "preview tier",
            "supportsCapacityQuery": "FaaS-style, opaque capacity",
            "maxConcurrent": "tier-gated by Modal",
            "maxSessionDurationSeconds": "tier-dependent; plan for a 24h practical ceiling",
            "idleCostModel": "warm containers are billed for standby time",
            "supportsGpu": "first-class GPU billing",
        },
    ),
    "runpod": CapabilityProfile(
        transport_model="dial-in",
        supports_fs_snapshot=False,
        supports_pause_resume=False,
        supports_capacity_query=False,
        max_concurrent=None,
        max_session_duration_seconds=None,
        regions=["*"],
        os=["linux"],
        arch=["x86_64"],
        idle_cost_model="storage-only",
        billing_model="wall-clock",
        supports_gpu=True,
        supports_custom_network_policy=False,
        egress_default="allow-all",
        notes={
            "transportModel": "SSH to the pod's public port 22",
            "supportsFsSnapshot": "volumes persist, no snapshot API",
            "supportsPauseResume": "a stopped pod keeps its volume, not its memory",
            "supportsCapacityQuery": "GPU stock is advisory",
            "maxConcurrent": "account quota",
            "maxSessionDurationSeconds": "until terminated",
            "regions": "RunPod data centers",
            "idleCostModel": "stopped pods bill volume storage",
            "billingModel": "per second while running",
            "supportsGpu": "A100s at ~$0.50/hour",
        },
    ),
}

SUBSTRATES: dict[str, Substrate] = {
    "local": Substrate(
        runtime_kinds=["native", "npm", "python-pip", "http", "mcp-server", "a2a-protocol", "host-binary", "workarea"],
        requirement_kinds=[
            "persistent-storage",
            "long-running",
            "workarea",
            "host-binary",
            "network-egress",
            "git",
            "full-history-clone",
            "toolchain:go",
            "toolchain:node",
        ],
    ),
    # Your own host: it persists and runs as long as you like, but tether knows nothing of its
    # toolchains; declare git, toolchain:go, gpu, … in the pool's runtime_provides.
    "ssh": Substrate(
        runtime_kinds=["native", "npm", "python-pip", "http", "mcp-server", "a2a-protocol"],
        requirement_kinds=["persistent-storage", "long-running", "network-egress"],
    ),
    "daytona": Substrate(runtime_kinds=_TOOLCHAIN_FREE_RUNTIMES, requirement_kinds=_TOOLCHAIN_FREE_REQUIREMENTS),
    "e2b": Substrate(runtime_kinds=_TOOLCHAIN_FREE_RUNTIMES, requirement_kinds=_TOOLCHAIN_FREE_REQUIREMENTS),
    "modal": Substrate(runtime_kinds=_TOOLCHAIN_FREE_RUNTIMES, requirement_kinds=_TOOLCHAIN_FREE_REQUIREMENTS),
    # GPU pods from a CUDA image: the gpu requirement is what they are for.
    "runpod": Substrate(
        runtime_kinds=_TOOLCHAIN_FREE_RUNTIMES,
        requirement_kinds=["long-running", "network-egress", "git", "full-history-clone", "gpu"],
    ),
}

# Provider state -> tether status. Daytona's and Modal's are their pages' tables. E2B's and RunPod's
# pages give none; theirs map the states of their API specs (shared/specs): E2B's SandboxState
# (running, paused: a paused sandbox keeps memory and disk and resumes), RunPod's PodStatus (v2; v1's
# desiredStatus and the GraphQL API use a subset). A state a table does not name is "terminated", the
# seeds' "others" row.
STATUS_MAPS: dict[str, dict[str, str]] = {
    "daytona": {"creating": "provisioning", "started": "running", "running": "running", "error": "failed"},
    "e2b": {"running": "running", "paused": "paused"},
    "modal": {
        "creating": "provisioning",
        "pending": "provisioning",
        "running": "running",
        "ready": "running",
        "error": "failed",
        "failed": "failed",
    },
    "runpod": {
        "provisioning": "provisioning",
        "starting": "provisioning",
        "running": "running",
        "error": "failed",
        # A stopped pod (its container exited) runs nothing but still exists, billing its volume:
        # not "terminated" (deleted; then no one would delete it), nor "paused" (no memory is
        # kept: the profile says no pause/resume). "failed": ended by the ledger, deleted by gc.
        "exited": "failed",
        "terminated": "terminated",
    },
}

# USD per GPU-hour where a rate is documented (runtime overview: "A100s at ~$0.50/hour"); pools may
# set their own `rateUsdPerHour`.
GPU_RATES_USD_PER_HOUR: dict[str, dict[str, float]] = {"runpod": {"a100": 0.50}}

# Auth modes that need credentials on the local machine: only local pools can serve them.
LOCAL_AUTH_MODES = ("host-session", "local")


def map_status(provider: str, state: str) -> str:
    """Tether's status for a cloud provider's state of a sandbox (a state its table does not name:
    "terminated"). Raises ProviderError for a provider with no table: tether's own providers (local,
    ssh) and custom ones report tether's statuses themselves."""
    table = STATUS_MAPS.get(provider)
    if table is None:
        raise ProviderError(
            f"no status mapping for provider {provider!r}; there is one for {', '.join(sorted(STATUS_MAPS))}, "
            "other providers report tether's statuses (provisioning, running, paused, failed, terminated) themselves"
        )
    return table.get(state.lower(), "terminated")
