"""Trust on first use: the first host key a server shows is pinned; a different one later is refused."""

from __future__ import annotations

import contextlib
import ipaddress
import time

import asyncssh

from .state import StateStore


def openssh_line(key: asyncssh.SSHKey) -> str:
    """`ssh-ed25519 AAAA…` without a comment, the form we store and compare."""
    algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
    return f"{algorithm} {blob}"


def fingerprint_of(line: str) -> str:
    return asyncssh.import_public_key(line).get_fingerprint("sha256")


def pin_name(host: str) -> str:
    """The name a host's key is pinned under: DNS names are case-blind and `example.com.` is
    `example.com`, and an IPv6 address has many spellings (`::1`, `0:0::1`), so every spelling of
    one host shares its pin (as OpenSSH's known_hosts does); otherwise a new spelling would be
    trusted on first use again."""
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).compressed
    return host.lower().rstrip(".")


# Rows pinned before names were normalised are found under any spelling too.
_SAME_HOST = "lower(rtrim(host, '.')) = ? AND port = ?"


class HostKeyPins:
    """The `host_keys` table of the state store, keyed by the host name as tether dials it (see
    `pin_name`) and the port."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def get(self, host: str, port: int) -> str | None:
        rows = self._store.query(f"SELECT key FROM host_keys WHERE {_SAME_HOST}", (pin_name(host), port))
        return rows[0]["key"] if rows else None

    def pin(self, host: str, port: int, line: str) -> None:
        """Record `line` unless a key is already pinned (a concurrent first use must not overwrite)."""
        with self._store.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO host_keys (host, port, key, fingerprint, first_seen) VALUES (?, ?, ?, ?, ?)",
                (pin_name(host), port, line, fingerprint_of(line), time.time()),
            )

    def forget(self, host: str, port: int) -> bool:
        with self._store.transaction() as db:
            return db.execute(f"DELETE FROM host_keys WHERE {_SAME_HOST}", (pin_name(host), port)).rowcount > 0

    def all(self) -> list[tuple[str, int, str]]:
        rows = self._store.query("SELECT host, port, fingerprint FROM host_keys ORDER BY host, port")
        return [(r["host"], r["port"], r["fingerprint"]) for r in rows]
