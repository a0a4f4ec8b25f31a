"""Tunnel latency and throughput against an OpenSSH `ssh -L` forward, measured in one run.

    python benchmarks/bench_tunnels.py [--quick]

Starts its own sshd for a test account (run as root to create it) and a relay sshd with
`GatewayPorts clientspecified`, runs `python3 -m http.server` inside the sandbox as a background
job, and measures through each path the median latency of 200 small HTTP requests (each a new
connection, as http.server closes them) and the throughput of a 100 MiB download: an `ssh -L`
forward (the baseline), tether's `local` backend, and its `relay` backend. The HTTP client is a
separate process, the same for every path. The last line is one JSON object: ssh_l_ms, ssh_l_mbps,
and per backend {ms, mbps}.

The `provider` backend needs a cloud provider's own proxy and is not measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox import ConnectionPool, Sandbox, SSHEndpoint
from sandbox.hostkeys import HostKeyPins
from sandbox.state import StateStore
from tests.sshd import FAST_RC, SSHD, ensure_account, is_root, keygen
from tunnels import RelayConfig, TunnelManager

MIB = 1024 * 1024
# The client: N small GETs (median ms), then one big download (MB/s). Same process for every path.
CLIENT = r"""
import http.client, json, statistics, sys, time, urllib.parse
url, count = sys.argv[1], int(sys.argv[2])
u = urllib.parse.urlsplit(url)
def get(path):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    n = 0
    while chunk := r.read(1 << 20):
        n += len(chunk)
    c.close()
    return r.status, n
for _ in range(10):
    get("/small.txt")
samples = []
for _ in range(count):
    t = time.perf_counter(); status, _ = get("/small.txt"); samples.append(time.perf_counter() - t)
    assert status == 200
t = time.perf_counter(); status, size = get("/big.bin"); elapsed = time.perf_counter() - t
assert status == 200
print(json.dumps({"ms": round(statistics.median(samples) * 1000, 3), "mbps": round(size / elapsed / 1e6, 1)}))
"""


def measure(url: str, count: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CLIENT, url, str(count)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, smaller file (a smoke test)")
    args = parser.parse_args()
    count, big_mib, rounds = (40, 16, 1) if args.quick else (200, 100, 5)
    if not is_root():
        sys.exit("bench_tunnels.py creates test accounts and must run as root")

    work = Path(tempfile.mkdtemp(prefix="tether-bench-tunnels-"))
    work.chmod(0o755)
    key = keygen(work / "client")
    host = SSHD(ensure_account("tether-fast", "/bin/bash", FAST_RC), key).start()
    relay = SSHD(
        ensure_account("tether-relay", "/bin/bash", {".profile": ""}),
        key,
        extra_config=["GatewayPorts clientspecified"],
    ).start()
    pool = ConnectionPool(HostKeyPins(StateStore(work / "state.db")))
    forward: subprocess.Popen[bytes] | None = None
    report: dict[str, object] = {}
    try:
        box = Sandbox(SSHEndpoint.parse(host.address, key_paths=(str(key),), use_agent=False), pool=pool)
        site = f"{await box.home()}/bench-site"
        await box.run(
            f"mkdir -p {site} && printf 'ok\\n' > {site}/small.txt && "
            f"head -c {big_mib * MIB} /dev/urandom > {site}/big.bin"
        )
        port = free_port()
        job = await box.start_job(f"exec python3 -m http.server {port} --bind 127.0.0.1", cwd=site)
        while (
            await box.run(f"python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}))'")
        ).exit_code:
            await asyncio.sleep(0.1)

        local_port = free_port()
        forward = subprocess.Popen(
            [
                "ssh",
                "-N",
                "-i",
                str(key),
                "-p",
                str(host.port),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                f"{local_port}:127.0.0.1:{port}",
                f"{host.account.name}@127.0.0.1",
            ]
        )
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", local_port), timeout=0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        relay_config = RelayConfig(
            host=relay.address,
            identityFile=str(key),
            remote_host="0.0.0.0",
            remote_port=0,
            url_template="http://{host}:{port}",
        )
        tunnels = TunnelManager(relay=relay_config)
        urls = {"ssh -L": f"http://127.0.0.1:{local_port}"}
        for backend in ("local", "relay"):
            urls[backend] = (await tunnels.open(box, port, backend=backend)).url
        # Interleaved rounds, medians per path: this machine's noise then hits every path alike.
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
        for _ in range(rounds):
            for name, url in urls.items():
                samples[name].append(await asyncio.to_thread(measure, url, count))
        for name, runs in samples.items():
            ms = statistics.median(r["ms"] for r in runs)
            mbps = statistics.median(r["mbps"] for r in runs)
            if name == "ssh -L":
                report.update(ssh_l_ms=ms, ssh_l_mbps=mbps)
            else:
                report[name] = {"ms": ms, "mbps": mbps}
        await tunnels.close_all()
        await box.job_kill(job.id, "KILL")
        await box.run(["rm", "-rf", site])
        await box.close()
    finally:
        if forward is not None:
            forward.terminate()
        await pool.close()
        host.cleanup()
        relay.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"HTTP through each path: median of {count} small requests (new connection each) and a {big_mib} MiB "
        f"download; medians of {rounds} interleaved rounds"
    )
    print(f"{'ssh -L (baseline)':20}{report['ssh_l_ms']:8.2f} ms {report['ssh_l_mbps']:8.1f} MB/s")
    for backend in ("local", "relay"):
        figures = report[backend]
        assert isinstance(figures, dict)
        latency = figures["ms"] / report["ssh_l_ms"]  # type: ignore[operator]
        throughput = figures["mbps"] / report["ssh_l_mbps"]  # type: ignore[operator]
        print(
            f"{'tether ' + backend:20}{figures['ms']:8.2f} ms {figures['mbps']:8.1f} MB/s   "
            f"latency {latency:.2f}x (target <= 1.5x), throughput {throughput:.0%} (target >= 50%)"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("TETHER_STATE_DIR", tempfile.mkdtemp(prefix="tether-bench-state-"))
    asyncio.run(main())
