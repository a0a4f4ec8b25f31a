"""What a machine has: CPUs, memory, disk, GPUs. Read locally, or over SSH with POSIX tools."""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
from pathlib import Path

from sandbox import Sandbox

from .base import Capacity

_GIB = 1024**3
NVIDIA_QUERY = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]


def parse_gpus(csv: str) -> list[dict[str, object]]:
    gpus = []
    for line in csv.strip().splitlines():
        name, _, memory = line.rpartition(",")
        if name.strip():
            gpus.append({"name": name.strip(), "memory_mb": int(memory) if memory.strip().isdigit() else None})
    return gpus


async def host_capacity(disk_path: Path) -> Capacity:
    """This machine's capacity; GPUs when nvidia-smi is installed."""
    disk = shutil.disk_usage(disk_path)
    gpus: list[dict[str, object]] = []
    if shutil.which("nvidia-smi"):
        proc = await asyncio.create_subprocess_exec(
            *NVIDIA_QUERY, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await proc.communicate()
        if proc.returncode == 0:
            gpus = parse_gpus(out.decode())
    return Capacity(
        cpus=os.cpu_count(),
        memory_mb=_memory_mb(),
        disk_free_gb=round(disk.free / _GIB, 2),
        disk_total_gb=round(disk.total / _GIB, 2),
        gpus=gpus,
    )


def _memory_mb() -> int | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    if platform.system() == "Darwin":
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages // (1024 * 1024)
    return None


REMOTE_PROBE = (
    "echo cpus=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null); "
    "echo mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null); "
    'df -Pk "$HOME" 2>/dev/null | awk \'NR==2 {print "disk_total_kb=" $2; print "disk_free_kb=" $4}\'; '
    "command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total "
    "--format=csv,noheader,nounits | sed 's/^/gpu=/'; true"
)


async def remote_capacity(box: Sandbox) -> Capacity:
    """A remote machine's capacity: nproc, /proc/meminfo, df, nvidia-smi when present."""
    out = (await box.exec_raw(["sh", "-c", REMOTE_PROBE], timeout=30)).stdout.decode("utf-8", "replace")
    values: dict[str, str] = {}
    gpu_lines = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key == "gpu":
            gpu_lines.append(value)
        elif value.strip():
            values[key] = value.strip()

    def number(key: str) -> int | None:
        return int(values[key]) if values.get(key, "").isdigit() else None

    mem_kb, total_kb, free_kb = number("mem_kb"), number("disk_total_kb"), number("disk_free_kb")
    return Capacity(
        cpus=number("cpus"),
        memory_mb=mem_kb // 1024 if mem_kb else None,
        disk_total_gb=round(total_kb / 1024**2, 2) if total_kb else None,
        disk_free_gb=round(free_kb / 1024**2, 2) if free_kb else None,
        gpus=parse_gpus("\n".join(gpu_lines)),
    )
