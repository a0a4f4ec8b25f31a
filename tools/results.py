"""Structured results of the MCP tools: the fields shared/contract.md fixes, and a text rendering of each.

Every tool returns MCP `structuredContent` matching one of these models (its `outputSchema`) plus a
text block for clients that only read text.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from providers import CostEvent, Fleet, Pool, SandboxRecord
from providers.profiles import CapabilityProfile, Substrate
from providers.registry import profile_of
from sandbox import Job

from .output import duration


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    try:
        return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):  # (beyond year 9999: a row from before TTLs were bounded)
        return "9999-12-31T23:59:59Z"


def _nullable_as_type_list(schema: dict[str, Any]) -> None:
    """Write `anyOf: [{type: T}, {type: null}]` as `type: [T, "null"]`: the same schema, but a client
    validates it several times faster (each anyOf branch is a validation of its own), and clients
    validate every result against the tool's outputSchema."""
    for prop in schema.get("properties", {}).values():
        options = prop.get("anyOf")
        if options and all(set(option) == {"type"} for option in options):
            del prop["anyOf"]
            prop["type"] = [option["type"] for option in options]


class Result(BaseModel):
    model_config = ConfigDict(json_schema_extra=_nullable_as_type_list)


class SSHInfo(Result):
    host: str | None
    port: int | None
    user: str | None

    @classmethod
    def of(cls, record: SandboxRecord) -> SSHInfo:
        endpoint = record.endpoint or {}
        return cls(host=endpoint.get("host"), port=endpoint.get("port"), user=endpoint.get("user"))


class Cost(Result):
    seconds: float
    gpu_seconds: float
    gpu_type: str | None = None
    billing_model: str
    estimated_usd: float | None = None

    @classmethod
    def of(cls, event: CostEvent) -> Cost:
        return cls(**event.as_dict())

    def text(self) -> str:
        """`4m12s (per-second, ~$0.0021)`, GPU time included when there was some."""
        gpu = f", {duration(self.gpu_seconds)} of {self.gpu_type or 'GPU'}" if self.gpu_seconds else ""
        usd = f", ~${self.estimated_usd:.4f}" if self.estimated_usd is not None else ""
        return f"{duration(self.seconds)} ({self.billing_model}{gpu}{usd})"


def capabilities(profile: CapabilityProfile, substrate: Substrate) -> dict[str, Any]:
    """The capability profile in the seeds' camelCase, with the runtime and requirement kinds."""
    return {
        **profile.model_dump(by_alias=True, exclude={"notes"}),
        "runtimeKinds": substrate.runtime_kinds,
        "requirementKinds": substrate.requirement_kinds,
    }


def sandbox_capabilities(fleet: Fleet, record: SandboxRecord) -> dict[str, Any]:
    """A sandbox's capabilities, as every tool and --json shows them: its pool's substrate's kinds."""
    return capabilities(profile_of(record.provider), fleet.pool_of(record).substrate())


class SandboxResult(Result):
    """sandbox_create and host_attach."""

    id: str
    name: str
    provider: str
    pool: str
    status: Literal["provisioning", "running", "paused", "failed", "terminated"]
    ssh: SSHInfo
    capabilities: dict[str, Any]
    expires_at: str | None = Field(description="ISO 8601, UTC; null when the sandbox has no TTL")

    @classmethod
    def of(cls, record: SandboxRecord, caps: dict[str, Any]) -> SandboxResult:
        return cls(
            id=record.id,
            name=record.name,
            provider=record.provider,
            pool=record.pool,
            status=record.status,  # type: ignore[arg-type]
            ssh=SSHInfo.of(record),
            capabilities=caps,
            expires_at=iso(record.expires_at),
        )

    def text(self) -> str:
        ttl = f", expires {self.expires_at}" if self.expires_at else ""
        return (
            f"sandbox {self.name} ({self.id}) is {self.status} on {self.provider} pool {self.pool}{ttl}; "
            f"ssh {self.ssh.user}@{self.ssh.host}:{self.ssh.port}"
        )


class SandboxSummary(Result):
    id: str
    name: str
    provider: str
    pool: str
    status: str
    created_at: str
    expires_at: str | None
    cost: Cost | None = Field(None, description="so far (an estimate while it runs); final once terminated")

    @classmethod
    def of(cls, record: SandboxRecord, event: CostEvent | None) -> SandboxSummary:
        return cls(
            id=record.id,
            name=record.name,
            provider=record.provider,
            pool=record.pool,
            status=record.status,
            created_at=iso(record.created_at) or "",
            expires_at=iso(record.expires_at),
            cost=Cost.of(event) if event else None,
        )


class SandboxList(Result):
    sandboxes: list[SandboxSummary]
    default: str | None = Field(None, description="the id used when a tool's `sandbox` is omitted")

    def text(self) -> str:
        if not self.sandboxes:
            return "no sandboxes; create one with sandbox_create, or just use a tool: the default sandbox is made then"
        lines = [
            f"{s.id}  {s.name}  {s.provider}/{s.pool}  {s.status}" + ("  (default)" if s.id == self.default else "")
            for s in self.sandboxes
        ]
        return "\n".join(lines)


class JobInfo(Result):
    job_id: str
    command: str
    status: Literal["running", "exited"]
    started_at: str | None
    exit_code: int | None = None

    @classmethod
    def of(cls, job: Job) -> JobInfo:
        return cls(
            job_id=job.id,
            command=job.command,
            status=job.status,
            started_at=iso(job.started_at),
            exit_code=job.exit_code,
        )


class TunnelResult(Result):
    """tunnel_open; a tunnel in tunnel_list and sandbox_info."""

    tunnel_id: str
    url: str
    backend: Literal["provider", "relay", "local"]
    headers: dict[str, str] = Field(description="headers a request through the URL must carry (may be empty)")
    port: int
    sandbox: str
    status: Literal["open"] = "open"  # (closed ones are listed nowhere)
    held_by_pid: int | None = Field(
        None, description="set when another tether process holds the tunnel (close it there)"
    )

    @classmethod
    def held_elsewhere(cls, row: dict[str, Any]) -> TunnelResult:
        """Another process's tunnel, from the ledger (its headers are that process's to know)."""
        return cls(
            tunnel_id=row["id"],
            url=row["url"],
            backend=row["backend"],
            headers={},
            port=row["port"],
            sandbox=row["sandbox_id"],
            held_by_pid=row["owner_pid"],
        )

    def text(self) -> str:
        needs = f" with headers {self.headers}" if self.headers else ""
        held = f", held by tether process {self.held_by_pid}" if self.held_by_pid else ""
        return f"port {self.port} is at {self.url}{needs} ({self.backend} tunnel {self.tunnel_id}{held})"


class SandboxInfo(Result):
    id: str
    name: str
    provider: str
    pool: str
    status: str
    status_reason: str | None
    created_at: str
    expires_at: str | None
    ssh: SSHInfo
    capabilities: dict[str, Any]
    capacity: dict[str, Any] | None = Field(
        description="cpus, memory_mb, disk_free_gb, disk_total_gb, gpus; null where unsupported"
    )
    cwd: str | None
    jobs: list[JobInfo]
    tunnels: list[TunnelResult]
    listening_ports: list[int] = Field(default_factory=list)
    unreachable: str | None = Field(
        None,
        description="Why the machine could not be asked for capacity, cwd, jobs or listening ports: they "
        "are then left empty, which does not mean it has none",
    )


class DestroyResult(Result):
    id: str
    status: Literal["terminated"] = "terminated"
    cost: Cost
    left_behind: str | None = Field(
        None, description="What could not be cleaned up (an attached host that was unreachable), and where"
    )

    @classmethod
    def of(cls, record: SandboxRecord, event: CostEvent) -> DestroyResult:
        return cls(id=record.id, cost=Cost.of(event), left_behind=record.left_behind())

    def text(self, already: bool = False) -> str:
        """`already`: it had ended before this call, which did nothing."""
        if already:
            text = f"{self.id} had already ended (terminated after {self.cost.text()}); nothing was done"
        else:
            text = f"terminated {self.id} after {self.cost.text()}"
        return f"{text}; but {self.left_behind}" if self.left_behind else text


class StatusResult(Result):
    id: str
    status: str


class SnapshotResult(Result):
    snapshot_id: str


class PoolInfo(Result):
    name: str
    provider: str
    active: bool
    implicit: bool
    available: bool
    unavailable_reason: str | None
    capabilities: dict[str, Any]
    notes: dict[str, str]
    runtime_kinds: list[str]
    requirement_kinds: list[str]
    config: dict[str, Any]

    @classmethod
    def of(cls, pool: Pool, fleet: Fleet) -> PoolInfo:
        reason = fleet.availability(pool)
        substrate = pool.substrate()
        profile = profile_of(pool.provider)
        return cls(
            name=pool.name,
            provider=pool.provider,
            active=pool.active,
            implicit=pool.implicit,
            available=reason is None,
            unavailable_reason=reason,
            capabilities=capabilities(profile, substrate),
            notes=profile.notes,
            runtime_kinds=substrate.runtime_kinds,
            requirement_kinds=substrate.requirement_kinds,
            config=pool.config.model_dump(mode="json") if isinstance(pool.config, BaseModel) else {},
        )


class PoolList(Result):
    pools: list[PoolInfo]

    def text(self) -> str:
        return "\n".join(
            f"{p.name} ({p.provider}){'' if p.active else ' inactive'}"
            f"{'' if p.available else ' unavailable: ' + (p.unavailable_reason or '')}: "
            f"requirement kinds {', '.join(p.requirement_kinds)}"
            for p in self.pools
        )


class WriteResult(Result):
    path: str
    bytes: int
    created: bool


class EditResult(Result):
    path: str
    replacements: int
    diff: str


class GlobResult(Result):
    files: list[str]
    truncated: bool


class GrepResult(Result):
    mode: Literal["files_with_matches", "content", "count"]
    lines: int
    truncated: bool
    output: str = Field(description="the same text as the text content, in ripgrep's formats")
    engine: Literal["rg", "grep"]


class RunResult(Result):
    exit_code: int | None = Field(description="null when the command timed out or runs in the background")
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    duration_ms: float
    cwd: str
    job_id: str | None = None
    stdout_path: str | None = Field(None, description="the whole stdout on the box, when it was cut")
    stderr_path: str | None = Field(None, description="the whole stderr on the box, when it was cut")

    def text(self) -> str:
        if self.job_id:
            return f"started background job {self.job_id}; read its output with job_output"
        parts = []
        if self.stdout:
            parts.append(self.stdout.rstrip("\n"))
        if self.stderr:
            parts.append(f"[stderr]\n{self.stderr.rstrip(chr(10))}")
        if self.timed_out:
            parts.append(f"[timed out after {self.duration_ms / 1000:.1f}s; the process group was killed]")
        else:
            parts.append(f"[exit code {self.exit_code}]")
        return "\n".join(parts)  # (a stream that was cut says so at its end, with where the rest is)


class JobOutputResult(Result):
    job_id: str
    stdout: str
    stderr: str
    status: Literal["running", "exited"]
    exit_code: int | None
    more: bool = Field(False, description="more output is waiting: call job_output again")

    def text(self) -> str:
        parts = [p for p in (self.stdout.rstrip("\n"), f"[stderr]\n{self.stderr.rstrip()}" if self.stderr else "") if p]
        state = f"exited with code {self.exit_code}" if self.status == "exited" else "still running"
        parts.append(f"[{self.job_id} {state}{'; more output is waiting' if self.more else ''}]")
        return "\n".join(parts)


class JobList(Result):
    jobs: list[JobInfo]

    def text(self) -> str:
        if not self.jobs:
            return "no background jobs"
        return "\n".join(
            f"{j.job_id}  {j.status}{'' if j.exit_code is None else f' ({j.exit_code})'}  {j.started_at}  {j.command}"
            for j in self.jobs
        )


class JobKillResult(Result):
    job_id: str
    status: Literal["running", "exited"]
    exit_code: int | None
    signal: str | None = Field(description="The signal this call sent; null when the job had already ended")


class TunnelList(Result):
    tunnels: list[TunnelResult]

    def text(self) -> str:
        return "\n".join(t.text() for t in self.tunnels) or "no open tunnels"


class TunnelClosed(Result):
    tunnel_id: str
    status: Literal["closed"] = "closed"
