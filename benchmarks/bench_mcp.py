"""End-to-end MCP latency: tether's tools against a bare MCPServer's no-op, in one run.

    python benchmarks/bench_mcp.py [--quick]

Starts its own sshd for an account whose .bashrc sleeps 50 ms (run as root to create it), then
`tether mcp` over stdio with that host as its default sandbox, and measures the median time from a
client's call to its result: a no-op tool on a bare MCPServer over stdio (the floor), and tether's
read (4 KB), write, edit, grep and run('true'), taking turns in interleaved rounds so that the
machine's noise falls on all of them alike. `edit` edits one file back to back (each edit of a file
written within the same second takes a fifth round trip); `edit_settled` edits files last changed
an hour ago, once each, each read first, as an agent does (Claude Code's Edit requires a Read; a
file tether has never seen is stat'ed alone first, one round trip more, so that a named pipe cannot
hang the sandbox). Then 8 concurrent clients × 200 mixed calls. The
last line is one JSON object: noop_ms, read_ms, write_ms, edit_ms, edit_settled_ms, grep_ms, run_ms,
concurrent_calls_per_s, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mcp
from mcp.client.stdio import StdioServerParameters

from tests.sshd import SLOW_RC, SSHD, ensure_account, is_root, keygen

ROOT = Path(__file__).resolve().parent.parent
NOOP_SERVER = """
from mcp.server.mcpserver import MCPServer
server = MCPServer("noop")

@server.tool()
async def noop() -> str:
    return "ok"

server.run("stdio")
"""


def params(args: list[str], env: dict[str, str]) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=args, env=env, cwd=str(ROOT))


async def timed_ms(call: Callable[[], Awaitable[Any]], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def checked(result: Any) -> Any:
    if result.is_error:
        raise RuntimeError(result.content[0].text)
    return result


async def measure_latency(env: dict[str, str], runs: int, rounds: int) -> dict[str, float]:
    """Medians over `rounds` interleaved rounds: the floor and each tether call take turns, so a
    noisy stretch of the machine's time weighs on all of them alike."""
    tether_args = ["-m", "tools.cli", "mcp", "--provider", "ssh"]
    async with mcp.Client(params(["-c", NOOP_SERVER], env)) as bare, mcp.Client(params(tether_args, env)) as client:

        async def call(tool: str, arguments: dict[str, Any]) -> Any:
            return checked(await client.call_tool(tool, arguments))

        home = (await call("run", {"command": "mkdir -p bench/tree && cd bench && pwd"})).structured_content["cwd"]
        await call(
            "run",
            {
                "command": "cd tree && for i in $(seq 1 50); do echo line $i > f$i.txt; done; "
                "echo needle > f7.txt; cd .."
            },
        )
        await call("write", {"path": "read.txt", "content": "x" * 4096})
        await call("write", {"path": "edit.txt", "content": "before\nALPHA\nafter\n"})
        # Files last changed an hour ago, each edited once: the common case of an agent editing a
        # repository (an edit of a file written this very second takes one round trip more).
        await call(
            "run",
            {
                "command": f"mkdir -p settled && for i in $(seq 0 {runs + 40}); do "
                "printf 'before\\nALPHA\\nafter\\n' > settled/e$i.txt; done && touch -d '1 hour ago' settled/*"
            },
        )
        for i in range(runs + 40):  # read by the agent before it edits them (untimed)
            await call("read", {"path": f"settled/e{i}.txt"})
        settled = iter(range(runs + 40))
        flip = {"old": "ALPHA", "new": "BRAVO"}

        async def edit() -> None:
            await call("edit", {"path": "edit.txt", "old_string": flip["old"], "new_string": flip["new"]})
            flip["old"], flip["new"] = flip["new"], flip["old"]

        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "noop_ms": lambda: bare.call_tool("noop", {}),
            "read_ms": lambda: call("read", {"path": "read.txt"}),
            "write_ms": lambda: call("write", {"path": "write.txt", "content": "y" * 4096}),
            "edit_ms": edit,
            "edit_settled_ms": lambda: call(
                "edit", {"path": f"settled/e{next(settled)}.txt", "old_string": "ALPHA", "new_string": "BRAVO"}
            ),
            "grep_ms": lambda: call("grep", {"pattern": "needle", "path": "tree"}),
            "run_ms": lambda: call("run", {"command": "true"}),
        }
        for measured in calls.values():  # warm-up
            await timed_ms(measured, 20)
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, measured in calls.items():
                samples[name] += await timed_ms(measured, runs // rounds)
        await call("run", {"command": f"rm -rf {home}"})
    return {name: round(statistics.median(values), 3) for name, values in samples.items()}


async def concurrent_clients(env: dict[str, str], clients: int, calls: int) -> tuple[float, int]:
    """`clients` stdio sessions (each its own tether mcp and sandbox), each making `calls` mixed calls."""
    errors = 0

    async def one(index: int) -> int:
        nonlocal errors
        async with mcp.Client(params(["-m", "tools.cli", "mcp", "--provider", "ssh"], env)) as client:
            await client.call_tool("run", {"command": f"mkdir -p c{index} && cd c{index}"})
            await client.call_tool("write", {"path": "r.txt", "content": "z" * 1024})
            started = time.perf_counter()
            for i in range(calls):
                kind = i % 4
                if kind == 0:
                    result = await client.call_tool("run", {"command": f"echo {i}"})
                elif kind == 1:
                    result = await client.call_tool("read", {"path": "r.txt"})
                elif kind == 2:
                    result = await client.call_tool("write", {"path": f"w{i % 10}.txt", "content": str(i)})
                else:
                    result = await client.call_tool("glob", {"pattern": "*.txt"})
                if result.is_error:
                    errors += 1
            elapsed = time.perf_counter() - started
            await client.call_tool("run", {"command": f"cd .. && rm -rf c{index}"})
            return int(elapsed * 1e6)

    elapsed_us = await asyncio.gather(*(one(i) for i in range(clients)))
    wall = max(elapsed_us) / 1e6
    return round(clients * calls / wall, 1), errors


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke test, not a measurement)")
    args = parser.parse_args()
    runs, rounds, calls = (40, 2, 40) if args.quick else (400, 8, 200)
    if not is_root():
        sys.exit("bench_mcp.py creates a test account and must run as root")

    work = Path(tempfile.mkdtemp(prefix="tether-bench-mcp-"))
    work.chmod(0o755)
    key = keygen(work / "client")
    sshd = SSHD(ensure_account("tether-slow", "/bin/bash", SLOW_RC), key).start()
    config = work / "config.toml"
    config.write_text(
        f'[[pools]]\nname = "slow"\nprovider = "ssh"\nconfig = {{ host = "{sshd.address}", identityFile = "{key}" }}\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TETHER_STATE_DIR": str(work / "state"), "TETHER_CONFIG": str(config)}
    try:
        figures = await measure_latency(env, runs, rounds)
        throughput, errors = await concurrent_clients(env, 8, calls)
    finally:
        sshd.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    floor = figures["noop_ms"]
    report = {**figures, "concurrent_calls_per_s": throughput, "errors": errors}
    print(
        f"MCP over stdio, end to end: medians of {runs} calls each, in {rounds} interleaved rounds; "
        "account whose .bashrc sleeps 50 ms"
    )
    print(f"{'bare MCPServer no-op (floor)':32}{floor:8.2f} ms")
    labels = {"edit_ms": "tether edit (back to back)", "edit_settled_ms": "tether edit (file an hour old)"}
    for key_name in ("read_ms", "write_ms", "edit_ms", "edit_settled_ms", "grep_ms", "run_ms"):
        value = report[key_name]
        verdict = "ok" if value <= floor + 1.5 else "over floor + 1.5 ms"
        label = labels.get(key_name, "tether " + key_name[:-3])
        print(f"{label:32}{value:8.2f} ms   floor +{value - floor:5.2f} ms  {verdict}")
    print(f"8 clients x {calls} mixed calls: {throughput} calls/s, {errors} errors")
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
