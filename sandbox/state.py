"""tether's local state: where it lives, and one SQLite database (WAL) shared by every layer.

The engine owns the `host_keys` table. Higher layers (the providers' ledger) add their own tables by
registering a schema under a name; each named schema is applied once per database, in order.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import StateUnusable

ENGINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS host_keys (
    host        TEXT NOT NULL,
    port        INTEGER NOT NULL,
    key         TEXT NOT NULL,      -- OpenSSH public key line: "ssh-ed25519 AAAA..."
    fingerprint TEXT NOT NULL,      -- SHA256:...
    first_seen  REAL NOT NULL,
    PRIMARY KEY (host, port)
);
"""


def state_dir() -> Path:
    """$TETHER_STATE_DIR, else $XDG_STATE_HOME/tether, else ~/.local/state/tether (created 0700).

    It holds tether's client key and its host-key pins: a directory others could write to would let
    them swap either for their own, so one that is not ours is refused and one open to others is
    made private."""
    explicit = os.environ.get("TETHER_STATE_DIR")
    if explicit:
        path = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_STATE_HOME")
        path = (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state") / "tether"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = path.stat()
    except OSError as exc:
        why = "it is not a directory" if isinstance(exc, FileExistsError) else exc.strerror or exc
        raise StateUnusable(
            f"tether's state dir {path} cannot be created ({why}); set TETHER_STATE_DIR to a directory you can write to"
        ) from None
    if info.st_uid != os.getuid():
        raise PermissionError(
            f"tether's state dir {path} belongs to another user (uid {info.st_uid}); "
            "set TETHER_STATE_DIR to a directory of your own"
        )
    if info.st_mode & 0o077:
        # Open to others until now: what they may have put in it is not tether's to trust.
        planted = [entry.name for entry in path.iterdir() if entry.lstat().st_uid != os.getuid()]
        if planted:
            raise PermissionError(
                f"tether's state dir {path} was writable by others and holds files that are not yours "
                f"({', '.join(sorted(planted))}); check them, or set TETHER_STATE_DIR to a new directory"
            )
        path.chmod(0o700)
    return path


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...; the
    name, in parentheses, may hold anything); None without /proc, or once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def process_running(pid: int) -> bool:
    """Whether `pid` is a live process on this machine (a zombie, exited but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = proc_stat(pid)  # (None without /proc, macOS: kill(0) is all we know)
    return stat is None or stat[:1] != ["Z"]


def process_stamp(pid: int) -> str | None:
    """What tells the process `pid` now is from another that had that pid before (after it ended,
    or a reboot): the boot's id and the process's start time, where /proc says them; else None."""
    stat = proc_stat(pid)
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}:{stat[19]}" if stat is not None and len(stat) > 19 else None


def config_path() -> Path:
    """$TETHER_CONFIG, else ~/.config/tether/config.toml (which need not exist)."""
    explicit = os.environ.get("TETHER_CONFIG")
    return Path(explicit).expanduser() if explicit else Path.home() / ".config" / "tether" / "config.toml"


def read_config() -> dict[str, Any]:
    """The parsed config file, or {} when there is none. Each layer validates its own sections."""
    path = config_path()
    if not path.exists():
        return {}
    if path.is_dir():
        raise ValueError(f"{path} is a directory; the config is a file (TETHER_CONFIG names it)")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {exc.strerror or exc}") from None


class StateStore:
    """A small SQLite database. Safe to share between threads of one process and between processes."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path else state_dir() / "tether.db"
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE) so that writers
            # from several processes serialize instead of failing half-way with "database is locked".
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            os.chmod(self.path, 0o600)
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_applied (name TEXT PRIMARY KEY)")
            self.ensure_schema("engine", ENGINE_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StateUnusable(
                f"tether's state database {self.path} cannot be used ({exc}); check its permissions and the "
                "disk, move it aside if it is damaged (its host-key pins and sandbox records go with it), or "
                "set TETHER_STATE_DIR to another directory"
            ) from None

    def ensure_schema(self, name: str, ddl: str) -> None:
        """Apply `ddl` once per database under `name` (idempotent DDL is still recommended)."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM schema_applied WHERE name = ?", (name,)).fetchone():
                return
            for statement in filter(str.strip, ddl.split(";")):
                db.execute(statement)
            db.execute("INSERT INTO schema_applied (name) VALUES (?)", (name,))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, params: tuple[object, ...] | dict[str, object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()


_default_store: StateStore | None = None
_default_lock = threading.Lock()


def default_store() -> StateStore:
    """The process-wide store in the state dir (re-opened if TETHER_STATE_DIR changed)."""
    global _default_store
    with _default_lock:
        wanted = state_dir() / "tether.db"
        if _default_store is None or _default_store.path != wanted:
            _default_store = StateStore(wanted)
        return _default_store
