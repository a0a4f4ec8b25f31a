"""The `tether` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from providers import Fleet, SandboxRecord
from providers import host as host_daemon
from providers.capacity import host_capacity
from providers.errors import ProviderError
from providers.local_server import local_dir
from providers.registry import profile_of
from sandbox.errors import SandboxError
from sandbox.hostkeys import HostKeyPins
from sandbox.state import default_store

from .output import duration, print_json, print_table, when

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return register


# -- pools, gc, costs ---------------------------------------------------------------------------------


@command("pools")
def pools_command(args: argparse.Namespace) -> int:
    fleet = Fleet()
    rows = []
    for pool in fleet.pools:
        substrate = pool.substrate()
        rows.append(
            {
                "name": pool.name,
                "provider": pool.provider,
                "active": pool.active,
                "implicit": pool.implicit,
                "available": fleet.availability(pool) or "yes",
                "requirement_kinds": substrate.requirement_kinds,
                "runtime_kinds": substrate.runtime_kinds,
                "capabilities": profile_of(pool.provider).model_dump(by_alias=True, exclude={"notes"}),
            }
        )
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["name", "provider", "active", "available", "requirement_kinds"])
    return 0


@command("gc")
def gc_command(args: argparse.Namespace) -> int:
    async def run() -> Any:
        fleet = Fleet()
        try:
            return await fleet.gc()
        finally:
            await fleet.close()

    report = asyncio.run(run())
    if args.json:
        print_json(report.__dict__)
    else:
        for sandbox_id, reason in report.reaped:
            print(f"reaped {sandbox_id}: {reason}")
        for name in report.orphans:
            print(f"terminated orphan {name}")
        for sandbox_id in report.interrupted:
            print(f"cleaned up interrupted provisioning {sandbox_id}")
        for sandbox_id in report.vanished:
            print(f"marked vanished {sandbox_id}")
        for error in report.errors:
            print(f"error: {error}", file=sys.stderr)
        if not any((report.reaped, report.orphans, report.interrupted, report.vanished, report.errors)):
            print("nothing to collect")
    return 1 if report.errors else 0


@command("costs")
def costs_command(args: argparse.Namespace) -> int:
    fleet = Fleet()
    rows = []
    for record, event in fleet.costs():
        rows.append(
            {
                "id": record.id,
                "name": record.name,
                "provider": record.provider,
                "pool": record.pool,
                "terminated": when(event.created_at),
                "seconds": round(event.seconds, 1),
                "duration": duration(event.seconds),
                "gpu_seconds": round(event.gpu_seconds, 1),
                "gpu_type": event.gpu_type,
                "billing_model": event.billing_model,
                "estimated_usd": event.estimated_usd,
            }
        )
    if args.json:
        print_json(rows)
        return 0
    print_table(
        rows,
        ["id", "name", "provider", "terminated", "duration", "gpu_seconds", "billing_model", "estimated_usd"],
        empty="no cost events yet",
    )
    known = [r["estimated_usd"] for r in rows if r["estimated_usd"] is not None]
    if rows:
        print(
            f"total: {duration(sum(r['seconds'] for r in rows))} sandbox time, "
            f"{sum(r['gpu_seconds'] for r in rows):.0f} GPU-seconds, ~${sum(known):.2f} estimated"
            + (" (some providers have no known rate)" if len(known) < len(rows) else "")
        )
    return 0


@command("forget-host")
def forget_host_command(args: argparse.Namespace) -> int:
    host, _, port = args.target.rpartition(":")
    if not host or not port.isdigit():
        host, port = args.target, "22"
    pins = HostKeyPins(default_store())
    if pins.forget(host.strip("[]"), int(port)):
        print(f"forgot the pinned host key of {host}:{port}; the next connection pins the key it presents")
        return 0
    print(f"no host key pinned for {host}:{port}", file=sys.stderr)
    return 1


# -- tether host --------------------------------------------------------------------------------------


@command("host")
def host_command(args: argparse.Namespace) -> int:
    action = args.action
    if action == "serve":
        asyncio.run(host_daemon.serve(args.port))
        return 0
    if action == "drain":
        remaining = asyncio.run(host_daemon.drain(wait=not args.no_wait))
        return 0 if not remaining else 3
    if action == "install":
        path, outcome = host_daemon.install()
        print(f"{path}: {outcome}")
        return 0
    if action == "uninstall":
        path, outcome = host_daemon.uninstall()
        print(f"{path}: {outcome}")
        return 0
    if action in ("start", "stop", "restart"):
        getattr(host_daemon, action)()
    state = host_daemon.status()
    capacity = asyncio.run(host_capacity(local_dir()))
    if args.json:
        print_json({**state.as_dict(), "capacity": capacity.model_dump()})
        return 0
    where = f" on 127.0.0.1:{state.port} (pid {state.pid})" if state.pid else ""
    print(f"state:     {state.state}{where}")
    print(f"service:   {state.service}{' (installed)' if state.installed else ''}")
    print(f"sandboxes: {len(state.sandboxes)}{': ' + ', '.join(state.sandboxes) if state.sandboxes else ''}")
    gpus = ", ".join(str(g["name"]) for g in capacity.gpus) or "none"
    print(
        f"capacity:  {capacity.cpus} CPUs, {capacity.memory_mb} MiB memory, "
        f"{capacity.disk_free_gb} GiB disk free, GPUs: {gpus}"
    )
    return 0


# -- plumbing -----------------------------------------------------------------------------------------


def record_row(record: SandboxRecord) -> dict[str, Any]:
    endpoint = record.endpoint or {}
    return {
        "id": record.id,
        "name": record.name,
        "provider": record.provider,
        "pool": record.pool,
        "status": record.status,
        "created_at": when(record.created_at),
        "expires_at": when(record.expires_at),
        "ssh": f"{endpoint.get('user')}@{endpoint.get('host')}:{endpoint.get('port')}" if endpoint else None,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description="Give AI agents real computers over SSH.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    add("pools", "list pools with their provider, state and capability profile")
    add("gc", "terminate expired and orphaned sandboxes; reconcile the ledger with each provider")
    add("costs", "cost events of terminated sandboxes")
    forget = add("forget-host", "remove a pinned host key (after a host was rebuilt)")
    forget.add_argument("target", metavar="HOST[:PORT]")
    host = add("host", "run this machine as a local pool: serve, install, start, stop, status, drain")
    host.add_argument(
        "action", choices=["serve", "install", "uninstall", "start", "stop", "restart", "status", "drain"]
    )
    host.add_argument("--port", type=int, default=0, help="port for `serve` (default: any free one)")
    host.add_argument("--no-wait", action="store_true", help="`drain`: mark draining and return at once")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (SandboxError, ProviderError, RuntimeError, ValueError) as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
