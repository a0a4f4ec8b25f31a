"""The ledger: every sandbox tether created, its cost events, jobs and tunnels, in the state store.

A sandbox's row is written before its provider is asked to create anything, so a crash mid-provision
leaves a record for `tether gc` to reconcile. Terminating a sandbox and recording its cost event
happen in one transaction, and a sandbox can have only one cost event (UNIQUE), however many
processes try to terminate it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from sandbox.state import StateStore, default_store, process_running, process_stamp

from .errors import SandboxNotFound

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    provider      TEXT NOT NULL,
    pool          TEXT NOT NULL,
    external_id   TEXT,
    status        TEXT NOT NULL,
    status_reason TEXT,
    handle        TEXT,
    endpoint      TEXT,
    request       TEXT NOT NULL,
    created_at    REAL NOT NULL,
    expires_at    REAL,
    idle_timeout  REAL,
    last_activity REAL NOT NULL,
    terminated_at REAL,
    keep          INTEGER NOT NULL DEFAULT 0,
    owner_host    TEXT NOT NULL,
    owner_pid     INTEGER NOT NULL,
    gpu_type      TEXT,
    gpu_count     INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS sandboxes_live_name ON sandboxes(name) WHERE status != 'terminated';
CREATE TABLE IF NOT EXISTS cost_events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id    TEXT NOT NULL UNIQUE REFERENCES sandboxes(id),
    kind          TEXT NOT NULL,
    seconds       REAL NOT NULL,
    gpu_seconds   REAL NOT NULL,
    gpu_type      TEXT,
    billing_model TEXT NOT NULL,
    estimated_usd REAL,
    created_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id),
    job_id     TEXT NOT NULL,
    command    TEXT NOT NULL,
    started_at REAL NOT NULL,
    PRIMARY KEY (sandbox_id, job_id)
);
CREATE TABLE IF NOT EXISTS tunnels (
    id         TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id),
    port       INTEGER NOT NULL,
    backend    TEXT NOT NULL,
    url        TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at REAL NOT NULL,
    closed_at  REAL
)
"""

# Which process holds a tunnel open: a row whose process died is closed by gc (and `tether info`).
TUNNEL_OWNER_SCHEMA = """
ALTER TABLE tunnels ADD COLUMN owner_host TEXT;
ALTER TABLE tunnels ADD COLUMN owner_pid INTEGER
"""

# Time spent paused, so that a provider that bills nothing while paused (E2B) is not charged for it.
PAUSED_TIME_SCHEMA = """
ALTER TABLE sandboxes ADD COLUMN paused_at REAL;
ALTER TABLE sandboxes ADD COLUMN paused_seconds REAL NOT NULL DEFAULT 0
"""

# A termination under way: why, and which process is ending it. Written before the provider is
# asked, so that a process whose connection dies under a command can tell at once that the sandbox
# is ending; cleared when the termination is recorded (or fails). What `status` says is unchanged.
ENDING_SCHEMA = """
ALTER TABLE sandboxes ADD COLUMN ending_reason TEXT;
ALTER TABLE sandboxes ADD COLUMN ending_host TEXT;
ALTER TABLE sandboxes ADD COLUMN ending_pid INTEGER
"""

# Which process, beyond its pid: a pid reused after its process ended (a reboot makes that likely)
# must not keep a claim or an ownership alive for good (see sandbox.state.process_stamp).
STAMP_SCHEMA = """
ALTER TABLE sandboxes ADD COLUMN owner_stamp TEXT;
ALTER TABLE sandboxes ADD COLUMN ending_stamp TEXT;
ALTER TABLE tunnels ADD COLUMN owner_stamp TEXT
"""

# This state dir's own id, on every resource it has a provider make beside the sandbox's id: two
# installations (two people, two state dirs) may share one cloud account, and gc must take only
# its own for orphans.
INSTALLATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS installation (id TEXT NOT NULL)
"""

LIVE = ("provisioning", "running", "paused", "failed")


def owner_alive(host: str | None, pid: int | None, stamp: str | None = None) -> bool:
    """Whether the process that owns a row still runs: only knowable on its host (elsewhere, or with
    no pid recorded, it is taken to be alive). A process now running under the pid is another one
    when its stamp differs from the one recorded."""
    if host != socket.gethostname() or pid is None:
        return True
    if not process_running(pid):
        return False
    now = process_stamp(pid) if stamp is not None else None
    return now is None or now == stamp


def my_stamp() -> str | None:
    """This process's stamp (asked each time: rows are written rarely, and a fork is another process)."""
    return process_stamp(os.getpid())


@dataclass(frozen=True)
class SandboxRecord:
    id: str
    name: str
    provider: str
    pool: str
    external_id: str | None
    status: str
    status_reason: str | None
    handle: dict[str, Any] | None
    endpoint: dict[str, Any] | None
    request: dict[str, Any]
    created_at: float
    expires_at: float | None
    idle_timeout: float | None
    last_activity: float
    terminated_at: float | None
    keep: bool
    owner_host: str
    owner_pid: int
    gpu_type: str | None
    gpu_count: int
    paused_at: float | None = None  # when the current pause began
    paused_seconds: float = 0.0  # pauses that ended
    ending_reason: str | None = None  # a termination under way (see ENDING_SCHEMA)
    ending_host: str | None = None
    ending_pid: int | None = None
    owner_stamp: str | None = None
    ending_stamp: str | None = None

    @property
    def live(self) -> bool:
        return self.status != "terminated"

    def expired(self, now: float | None = None) -> bool:
        """Past its TTL (it may still run, and cost, until something ends it)."""
        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at

    def paused_until(self, end: float) -> float:
        """Seconds spent paused up to `end`."""
        ongoing = max(0.0, end - self.paused_at) if self.paused_at is not None else 0.0
        return self.paused_seconds + ongoing

    def left_behind(self) -> str | None:
        """What its provider could not clean up when it ended (see EndedWithLeftovers), if anything."""
        reason = self.status_reason or ""
        return reason.split(LEFTOVERS, 1)[1] if self.status == "terminated" and LEFTOVERS in reason else None

    def owner_alive(self) -> bool:
        """Whether the process that created the sandbox still runs (only knowable on its host)."""
        return owner_alive(self.owner_host, self.owner_pid, self.owner_stamp)

    def ending(self) -> str | None:
        """Why it is being terminated, while the process terminating it runs (the provider was
        asked to end it; the row is not marked terminated yet)."""
        if self.status == "terminated" or self.ending_reason is None:
            return None
        return self.ending_reason if owner_alive(self.ending_host, self.ending_pid, self.ending_stamp) else None

    def ending_interrupted(self) -> bool:
        """A termination whose process died before it was recorded: the machine may be half gone,
        and the row still says what it said before (the reaper finishes the job)."""
        return self.status != "terminated" and self.ending_reason is not None and self.ending() is None

    def provision_abandoned(self) -> bool:
        """A provision that will never finish: it failed (perhaps cancelled, its process alive), or
        the process doing it died. What it left is gc's to remove."""
        return self.status == "failed" or (self.status == "provisioning" and not self.owner_alive())


@dataclass(frozen=True)
class CostEvent:
    sandbox_id: str
    kind: str
    seconds: float
    gpu_seconds: float
    gpu_type: str | None
    billing_model: str
    estimated_usd: float | None
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds": round(self.seconds, 3), "gpu_seconds": round(self.gpu_seconds, 3)}
        if self.gpu_type:
            out["gpu_type"] = self.gpu_type
        out["billing_model"] = self.billing_model
        if self.estimated_usd is not None:
            out["estimated_usd"] = round(self.estimated_usd, 6)
        return out


# Between why a sandbox ended and what its provider could not clean up, in its status_reason.
LEFTOVERS = "; but "
SANDBOX_ID = re.compile(r"sb-[0-9a-f]{10}\Z")  # what new_sandbox_id makes (and no name may be)


def new_sandbox_id() -> str:
    return f"sb-{secrets.token_hex(5)}"


class Ledger:
    def __init__(self, store: StateStore | None = None) -> None:
        self.store = store or default_store()
        self.store.ensure_schema("ledger-v1", LEDGER_SCHEMA)
        self.store.ensure_schema("ledger-v2-tunnel-owner", TUNNEL_OWNER_SCHEMA)
        self.store.ensure_schema("ledger-v3-paused-time", PAUSED_TIME_SCHEMA)
        self.store.ensure_schema("ledger-v4-ending", ENDING_SCHEMA)
        self.store.ensure_schema("ledger-v5-process-stamps", STAMP_SCHEMA)
        self.store.ensure_schema("ledger-v6-installation", INSTALLATION_SCHEMA)
        self._installation: str | None = None

    @property
    def installation_id(self) -> str:
        """This state dir's id (made once, by whichever process asks first; see INSTALLATION_SCHEMA)."""
        if self._installation is None:
            with self.store.transaction() as db:
                row = db.execute("SELECT id FROM installation").fetchone()
                if row is None:
                    row = (secrets.token_hex(8),)
                    db.execute("INSERT INTO installation (id) VALUES (?)", row)
            self._installation = row[0]
        return self._installation

    # -- sandboxes -----------------------------------------------------------------------------------

    def insert(
        self,
        *,
        sandbox_id: str,
        name: str,
        provider: str,
        pool: str,
        request: dict[str, Any],
        expires_at: float | None,
        idle_timeout: float | None,
        keep: bool,
        gpu_type: str | None,
        gpu_count: int,
    ) -> SandboxRecord:
        """Record a sandbox about to be provisioned. Raises ValueError if a live one has the name."""
        now = time.time()
        try:
            with self.store.transaction() as db:
                db.execute(
                    "INSERT INTO sandboxes (id, name, provider, pool, status, request, created_at, expires_at,"
                    " idle_timeout, last_activity, keep, owner_host, owner_pid, gpu_type, gpu_count, owner_stamp)"
                    " VALUES (?, ?, ?, ?, 'provisioning', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        sandbox_id,
                        name,
                        provider,
                        pool,
                        json.dumps(request),
                        now,
                        expires_at,
                        idle_timeout,
                        now,
                        int(keep),
                        socket.gethostname(),
                        os.getpid(),
                        gpu_type,
                        gpu_count,
                        my_stamp(),
                    ),
                )
        except sqlite3.IntegrityError:
            raise ValueError(f"a sandbox named {name!r} already exists; pick another name") from None
        return self.get(sandbox_id)

    def set_provisioned(
        self, sandbox_id: str, external_id: str, handle: dict[str, Any], endpoint: dict[str, Any]
    ) -> bool:
        """Mark a provisioning sandbox running; False when it no longer is provisioning (another
        process destroyed or collected it meanwhile)."""
        with self.store.transaction() as db:
            return bool(
                db.execute(
                    "UPDATE sandboxes SET external_id = ?, handle = ?, endpoint = ?, status = 'running'"
                    " WHERE id = ? AND status = 'provisioning'",
                    (external_id, json.dumps(handle), json.dumps(endpoint), sandbox_id),
                ).rowcount
            )

    def set_endpoint(self, sandbox_id: str, endpoint: dict[str, Any]) -> None:
        """Where the sandbox's SSH server is now (the local provider's moves with the process serving it)."""
        with self.store.transaction() as db:
            db.execute("UPDATE sandboxes SET endpoint = ? WHERE id = ?", (json.dumps(endpoint), sandbox_id))

    def set_status(self, sandbox_id: str, status: str, reason: str | None = None) -> None:
        with self.store.transaction() as db:
            db.execute(
                "UPDATE sandboxes SET status = ?, status_reason = ? WHERE id = ? AND status != 'terminated'",
                (status, reason, sandbox_id),
            )

    def set_paused(self, sandbox_id: str, paused: bool, now: float | None = None) -> None:
        """Mark a sandbox paused or running again, keeping count of the time it spent paused."""
        now = now or time.time()
        with self.store.transaction() as db:
            if paused:
                db.execute(
                    "UPDATE sandboxes SET status = 'paused', status_reason = NULL,"
                    " paused_at = COALESCE(paused_at, ?) WHERE id = ? AND status != 'terminated'",
                    (now, sandbox_id),
                )
            else:
                db.execute(
                    "UPDATE sandboxes SET status = 'running', status_reason = NULL,"
                    " paused_seconds = paused_seconds + MAX(0, ? - COALESCE(paused_at, ?)), paused_at = NULL"
                    " WHERE id = ? AND status != 'terminated'",
                    (now, now, sandbox_id),
                )

    def touch(self, sandbox_id: str, when: float | None = None) -> None:
        with self.store.transaction() as db:
            db.execute(
                "UPDATE sandboxes SET last_activity = MAX(last_activity, ?) WHERE id = ?",
                (when or time.time(), sandbox_id),
            )

    def claim_ending(self, sandbox_id: str, reason: str, idle_since: float | None = None) -> str:
        """Record that this process is about to have the provider end the sandbox, and why, unless
        it should not: "claimed", or why not: "terminated", "ending elsewhere" (another live
        process is ending it), "active" (with `idle_since`, the last activity a reaper judged it
        idle by: some activity was recorded since). One transaction, so that two processes never
        both end it."""
        with self.store.transaction() as db:
            row = db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
            if row is None or row["status"] == "terminated":
                return "terminated"
            record, here = _record(row), (socket.gethostname(), os.getpid())
            # (one of this process's own: its caller knows it is not under way, see fleet._ending_here)
            if record.ending() is not None and (record.ending_host, record.ending_pid) != here:
                return "ending elsewhere"
            if idle_since is not None and record.last_activity > idle_since:
                return "active"
            db.execute(
                "UPDATE sandboxes SET ending_reason = ?, ending_host = ?, ending_pid = ?, ending_stamp = ?"
                " WHERE id = ?",
                (reason, *here, my_stamp(), sandbox_id),
            )
            return "claimed"

    def clear_ending(self, sandbox_id: str) -> None:
        """This process's termination of the sandbox did not happen after all (the provider failed)."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE sandboxes SET ending_reason = NULL, ending_host = NULL, ending_pid = NULL, ending_stamp = NULL"
                " WHERE id = ? AND ending_host = ? AND ending_pid = ?",
                (sandbox_id, socket.gethostname(), os.getpid()),
            )

    def terminate(self, sandbox_id: str, reason: str, event: CostEvent, only_if: str | None = None) -> bool:
        """Mark terminated and record the cost event, once. Returns False if it already was, or
        (with `only_if`) if its status is no longer `only_if`: then nothing is written."""
        with self.store.transaction() as db:
            changed = db.execute(
                "UPDATE sandboxes SET status = 'terminated', status_reason = ?, terminated_at = ?,"
                " ending_reason = NULL, ending_host = NULL, ending_pid = NULL, ending_stamp = NULL"
                " WHERE id = ? AND status != 'terminated' AND status = COALESCE(?, status)",
                (reason, event.created_at, sandbox_id, only_if),
            ).rowcount
            if not changed:
                return False
            db.execute(
                "INSERT OR IGNORE INTO cost_events (sandbox_id, kind, seconds, gpu_seconds, gpu_type,"
                " billing_model, estimated_usd, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sandbox_id,
                    event.kind,
                    event.seconds,
                    event.gpu_seconds,
                    event.gpu_type,
                    event.billing_model,
                    event.estimated_usd,
                    event.created_at,
                ),
            )
            db.execute(
                "UPDATE tunnels SET status = 'closed', closed_at = ? WHERE sandbox_id = ? AND status = 'open'",
                (event.created_at, sandbox_id),
            )
        return True

    def get(self, ref: str) -> SandboxRecord:
        """By id, or by name (the live sandbox of that name, else the newest terminated one)."""
        rows = self.store.query(
            "SELECT * FROM sandboxes WHERE id = ? OR name = ?"
            " ORDER BY (id = ?) DESC, (status != 'terminated') DESC, created_at DESC LIMIT 1",
            (ref, ref, ref),
        )
        if not rows:
            raise SandboxNotFound(ref)
        return _record(rows[0])

    def list(self, include_terminated: bool = False) -> list[SandboxRecord]:
        where = "" if include_terminated else "WHERE status != 'terminated'"
        return [_record(r) for r in self.store.query(f"SELECT * FROM sandboxes {where} ORDER BY created_at")]

    # -- cost ----------------------------------------------------------------------------------------

    def cost_event(self, sandbox_id: str) -> CostEvent | None:
        rows = self.store.query("SELECT * FROM cost_events WHERE sandbox_id = ?", (sandbox_id,))
        return _cost(rows[0]) if rows else None

    def cost_events(self) -> list[tuple[SandboxRecord, CostEvent]]:
        rows = self.store.query(
            "SELECT s.*, c.kind AS c_kind, c.seconds AS c_seconds, c.gpu_seconds AS c_gpu_seconds,"
            " c.gpu_type AS c_gpu_type, c.billing_model AS c_billing_model, c.estimated_usd AS c_estimated_usd,"
            " c.created_at AS c_created_at FROM cost_events c JOIN sandboxes s ON s.id = c.sandbox_id"
            " ORDER BY c.created_at"
        )
        return [
            (
                _record(r),
                CostEvent(
                    r["id"],
                    r["c_kind"],
                    r["c_seconds"],
                    r["c_gpu_seconds"],
                    r["c_gpu_type"],
                    r["c_billing_model"],
                    r["c_estimated_usd"],
                    r["c_created_at"],
                ),
            )
            for r in rows
        ]

    # -- jobs and tunnels ----------------------------------------------------------------------------

    def add_job(self, sandbox_id: str, job_id: str, command: str, started_at: float) -> None:
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (sandbox_id, job_id, command, started_at) VALUES (?, ?, ?, ?)",
                (sandbox_id, job_id, command, started_at),
            )

    def job_owner(self, job_id: str) -> str | None:
        rows = self.store.query("SELECT sandbox_id FROM jobs WHERE job_id = ?", (job_id,))
        return rows[0]["sandbox_id"] if rows else None

    def add_tunnel(self, tunnel_id: str, sandbox_id: str, port: int, backend: str, url: str) -> None:
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO tunnels (id, sandbox_id, port, backend, url, status, created_at, owner_host, owner_pid,"
                " owner_stamp) VALUES (?, ?, ?, ?, ?, 'open', ?, ?, ?, ?)",
                (tunnel_id, sandbox_id, port, backend, url, time.time(), socket.gethostname(), os.getpid(), my_stamp()),
            )

    def move_tunnel(self, tunnel_id: str, url: str) -> None:
        """A tunnel re-established at another URL (a relay's reconnect)."""
        with self.store.transaction() as db:
            db.execute("UPDATE tunnels SET url = ? WHERE id = ? AND status = 'open'", (url, tunnel_id))

    def close_tunnel(self, tunnel_id: str) -> None:
        with self.store.transaction() as db:
            db.execute(
                "UPDATE tunnels SET status = 'closed', closed_at = ? WHERE id = ? AND status = 'open'",
                (time.time(), tunnel_id),
            )

    def close_abandoned_tunnels(self) -> list[str]:
        """Close the rows of tunnels whose process ended on this host without closing them, or whose
        sandbox has ended. Returns their ids."""
        abandoned = [
            row["id"]
            for row in self.store.query(
                "SELECT t.id, t.owner_host, t.owner_pid, t.owner_stamp, s.status FROM tunnels t JOIN sandboxes s"
                " ON s.id = t.sandbox_id WHERE t.status = 'open'"
            )
            if row["status"] == "terminated" or not owner_alive(row["owner_host"], row["owner_pid"], row["owner_stamp"])
        ]
        if abandoned:  # (nothing is written when nothing was abandoned: tunnel_list calls this)
            with self.store.transaction() as db:
                db.executemany(
                    "UPDATE tunnels SET status = 'closed', closed_at = ? WHERE id = ? AND status = 'open'",
                    [(time.time(), tunnel_id) for tunnel_id in abandoned],
                )
        return abandoned

    def tunnel(self, tunnel_id: str) -> dict[str, Any] | None:
        """The record of one tunnel, open or closed; None when there is none of that id."""
        rows = self.store.query("SELECT * FROM tunnels WHERE id = ?", (tunnel_id,))
        return dict(rows[0]) if rows else None

    def tunnels(self, sandbox_id: str | None = None, open_only: bool = True) -> list[dict[str, Any]]:
        clauses, params = [], []
        if sandbox_id:
            clauses.append("sandbox_id = ?")
            params.append(sandbox_id)
        if open_only:
            clauses.append("status = 'open'")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return [dict(r) for r in self.store.query(f"SELECT * FROM tunnels {where} ORDER BY created_at", tuple(params))]


def _record(row: sqlite3.Row) -> SandboxRecord:
    return SandboxRecord(
        id=row["id"],
        name=row["name"],
        provider=row["provider"],
        pool=row["pool"],
        external_id=row["external_id"],
        status=row["status"],
        status_reason=row["status_reason"],
        handle=json.loads(row["handle"]) if row["handle"] else None,
        endpoint=json.loads(row["endpoint"]) if row["endpoint"] else None,
        request=json.loads(row["request"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        idle_timeout=row["idle_timeout"],
        last_activity=row["last_activity"],
        terminated_at=row["terminated_at"],
        keep=bool(row["keep"]),
        owner_host=row["owner_host"],
        owner_pid=row["owner_pid"],
        gpu_type=row["gpu_type"],
        gpu_count=row["gpu_count"],
        paused_at=row["paused_at"],
        paused_seconds=row["paused_seconds"],
        ending_reason=row["ending_reason"],
        ending_host=row["ending_host"],
        ending_pid=row["ending_pid"],
        owner_stamp=row["owner_stamp"],
        ending_stamp=row["ending_stamp"],
    )


def _cost(row: sqlite3.Row) -> CostEvent:
    return CostEvent(
        row["sandbox_id"],
        row["kind"],
        row["seconds"],
        row["gpu_seconds"],
        row["gpu_type"],
        row["billing_model"],
        row["estimated_usd"],
        row["created_at"],
    )
