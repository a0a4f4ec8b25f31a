"""Engine latency and throughput against OpenSSH, measured in one run.

    python benchmarks/bench_core.py [--quick]

Starts its own sshd for two accounts (run as root to create them): `fast`, whose shell start-up is
cheap, and `slowrc`, whose .bashrc sleeps 50 ms (the pyenv/conda/nvm case). For each account it
measures the median per call of a new `ssh host true` process, `ssh -S socket host true` through an
OpenSSH ControlMaster, and tether's run('true'), read of a 4 KB file, write of 4 KB, edit, grep over a
1000-file tree and stat. Then 256 MiB upload/download throughput of tether against `scp` and
`ssh host cat` on the fast account. Prints a table; the last line is one JSON object.

`ssh_new_ms` and `controlmaster_ms` at the top level are the slowrc account's (the ratio the target
is stated on); each account's object carries its own too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox import ConnectionPool, Sandbox, SSHEndpoint
from sandbox.hostkeys import HostKeyPins
from sandbox.state import StateStore
from tests.sshd import FAST_RC, SLOW_RC, SSHD, ensure_account, is_root, keygen

MIB = 1024 * 1024


def ssh_base(server: SSHD, key: Path) -> list[str]:
    return [
        "ssh",
        "-i",
        str(key),
        "-p",
        str(server.port),
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
    ]


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def time_process(argv: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - started)
    return median_ms(samples)


async def time_call(
    call: Callable[[], Awaitable[object]], runs: int, before: Callable[[], Awaitable[object]] | None = None
) -> float:
    for _ in range(max(3, runs // 20)):  # warm up: shells and SFTP open, caches hot
        if before:
            await before()
        await call()
    samples = []
    for _ in range(runs):
        if before:
            await before()
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return median_ms(samples)


def openssh_latency(server: SSHD, key: Path, work: Path, runs: int) -> tuple[float, float]:
    base = ssh_base(server, key)
    target = f"{server.account.name}@127.0.0.1"
    new_ms = time_process([*base, target, "true"], max(10, runs // 10))
    control = work / f"cm-{server.port}"
    subprocess.run(
        [*base, "-o", "ControlMaster=yes", "-o", f"ControlPath={control}", "-o", "ControlPersist=yes", "-fN", target],
        check=True,
    )
    try:
        cm_ms = time_process(["ssh", "-S", str(control), "-o", "LogLevel=ERROR", target, "true"], max(20, runs // 5))
    finally:
        subprocess.run(["ssh", "-S", str(control), "-O", "exit", target], stderr=subprocess.DEVNULL, check=False)
    return new_ms, cm_ms


async def tether_latency(box: Sandbox, runs: int) -> dict[str, float]:
    work = f"{await box.home()}/bench"
    await box.run(["rm", "-rf", work])
    await box.run(
        f"mkdir -p {work}/tree && cd {work}/tree && for d in $(seq 1 20); do mkdir -p d$d; "
        f"for f in $(seq 1 50); do printf 'line one\\nline two %s\\n' $f > d$d/f$f.txt; done; done; "
        f"echo needle > d7/f7.txt; echo needle > d13/f42.txt"
    )
    payload = "x" * 4096
    await box.write(f"{work}/read.txt", payload)
    await box.write(f"{work}/edit.txt", "prefix\nALPHA\nsuffix\n")
    state = {"flip": False}

    async def edit() -> None:
        old, new = ("ALPHA", "BRAVO") if not state["flip"] else ("BRAVO", "ALPHA")
        state["flip"] = not state["flip"]
        await box.edit(f"{work}/edit.txt", old, new)

    results = {
        "run_ms": await time_call(lambda: box.run("true"), runs),
        "read_ms": await time_call(lambda: box.read(f"{work}/read.txt"), runs),
        "write_ms": await time_call(lambda: box.write(f"{work}/write.txt", payload), runs),
        "edit_ms": await time_call(edit, runs),
        "grep_ms": await time_call(lambda: box.grep("needle", f"{work}/tree"), max(20, runs // 5)),
        "stat_ms": await time_call(lambda: box.stat(f"{work}/read.txt"), runs),
    }
    await box.run(["rm", "-rf", work])
    return results


async def throughput(box: Sandbox, server: SSHD, key: Path, work: Path, rounds: int) -> dict[str, float]:
    source = work / "blob.bin"
    with source.open("wb") as f:
        for _ in range(256):
            f.write(os.urandom(MIB))
    size_mb = source.stat().st_size / 1e6
    remote = f"{await box.home()}/blob.bin"
    base = ssh_base(server, key)
    target = f"{server.account.name}@127.0.0.1"
    scp = ["scp", *base[1:]]
    scp[scp.index("-p")] = "-P"  # scp spells the port option -P

    def mbps(seconds: list[float]) -> float:
        return round(size_mb / statistics.median(seconds), 1)

    up, down, scp_up, cat_down = [], [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        await box.upload(source, remote)
        up.append(time.perf_counter() - started)
        started = time.perf_counter()
        await box.download(remote, work / "back.bin")
        down.append(time.perf_counter() - started)
        started = time.perf_counter()
        subprocess.run([*scp, str(source), f"{target}:blob-scp.bin"], check=True)
        scp_up.append(time.perf_counter() - started)
        started = time.perf_counter()
        with (work / "cat.bin").open("wb") as out:
            subprocess.run([*base, target, f"cat {remote}"], check=True, stdout=out)
        cat_down.append(time.perf_counter() - started)
    assert (work / "back.bin").read_bytes() == source.read_bytes()
    await box.run(["rm", "-f", remote, "blob-scp.bin"])
    return {
        "upload_mbps": mbps(up),
        "download_mbps": mbps(down),
        "scp_upload_mbps": mbps(scp_up),
        "ssh_cat_download_mbps": mbps(cat_down),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test, not a measurement)")
    args = parser.parse_args()
    runs, rounds = (40, 1) if args.quick else (400, 3)
    if not is_root():
        sys.exit("bench_core.py creates two test accounts and must run as root")

    work = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    work.chmod(0o755)
    os.environ["TETHER_STATE_DIR"] = str(work / "state")
    key = keygen(work / "client")
    servers = {
        "fast": SSHD(ensure_account("tether-fast", "/bin/bash", FAST_RC), key).start(),
        "slowrc": SSHD(ensure_account("tether-slow", "/bin/bash", SLOW_RC), key).start(),
    }
    pool = ConnectionPool(HostKeyPins(StateStore(work / "state.db")))
    report: dict[str, object] = {}
    try:
        boxes = {
            name: Sandbox(SSHEndpoint.parse(s.address, key_paths=(str(key),), use_agent=False), pool=pool)
            for name, s in servers.items()
        }
        for name, server in servers.items():
            new_ms, cm_ms = openssh_latency(server, key, work, runs)
            figures = await tether_latency(boxes[name], runs)
            report[name] = {"ssh_new_ms": new_ms, "controlmaster_ms": cm_ms, **figures}
        report["ssh_new_ms"] = report["slowrc"]["ssh_new_ms"]  # type: ignore[index]
        report["controlmaster_ms"] = report["slowrc"]["controlmaster_ms"]  # type: ignore[index]
        report.update(await throughput(boxes["fast"], servers["fast"], key, work, rounds))
        for box in boxes.values():
            await box.close()
    finally:
        await pool.close()
        for server in servers.values():
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    print_table(report, runs)
    print(json.dumps(report))


def print_table(report: dict, runs: int) -> None:
    print(f"tether engine vs OpenSSH on loopback (medians; {runs} calls per tether figure)")
    print(f"{'':24}{'fast':>12}{'slowrc':>12}")
    for key, label in [
        ("ssh_new_ms", "ssh host true (new)"),
        ("controlmaster_ms", "ssh -S (ControlMaster)"),
        ("run_ms", "tether run('true')"),
        ("read_ms", "tether read 4 KB"),
        ("write_ms", "tether write 4 KB"),
        ("edit_ms", "tether edit"),
        ("grep_ms", "tether grep 1000 files"),
        ("stat_ms", "tether stat"),
    ]:
        print(f"{label:24}{report['fast'][key]:>10.2f}ms{report['slowrc'][key]:>10.2f}ms")
    for name in ("fast", "slowrc"):
        figures = report[name]
        print(
            f"{name}: run('true') is {figures['controlmaster_ms'] / figures['run_ms']:.0f}x faster than "
            f"ControlMaster, {figures['ssh_new_ms'] / figures['run_ms']:.0f}x faster than a new ssh"
        )
    for label, ours, theirs, name in [
        ("upload", "upload_mbps", "scp_upload_mbps", "scp"),
        ("download", "download_mbps", "ssh_cat_download_mbps", "ssh cat"),
    ]:
        print(
            f"{label:9}tether {report[ours]:>8.1f} MB/s   {name:8} {report[theirs]:>8.1f} MB/s   "
            f"ratio {report[ours] / report[theirs]:.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
