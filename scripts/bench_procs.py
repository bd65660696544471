"""The processes under test, seen from outside: start, stop, and probe via /proc."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
from collections.abc import Collection, Sequence
from pathlib import Path

from scripts.bench_client import cpu_seconds

HOST = "127.0.0.1"  # the benchmark only ever talks to this machine
ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "HOST",
    "ROOT",
    "ReaderProbe",
    "cpu_seconds",
    "free_port",
    "process_tree",
    "redis_connections",
    "rss_bytes",
    "start_process",
    "stop_process",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def start_process(
    argv: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            argv,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop one process we started, and the children it may have (its own session)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def process_tree(root: int) -> list[int]:
    """`root` and its descendants (a reader may run several processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def redis_connections(pids: Sequence[int], redis_ports: Collection[int]) -> int:
    """Established TCP connections to Redis's ports (a cluster's nodes) owned by these
    processes."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    if not pids:
        return 0
    ports_hex = {f"{port:04X}" for port in redis_ports}
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pids[0]}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                # fields: sl, local, remote, state (01 = ESTABLISHED), …, inode (10th)
                remote_port = fields[2].rsplit(":", 1)[1]
                if remote_port in ports_hex and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


@dataclasses.dataclass
class ReaderProbe:
    """Samples a reader's RSS and Redis connections from /proc, keeping the peaks."""

    pid: int
    redis_ports: tuple[int, ...]
    peak_rss: int = 0
    peak_redis_connections: int = 0
    processes: int = 1

    def sample(self) -> tuple[int, int]:
        pids = process_tree(self.pid)
        self.processes = max(self.processes, len(pids))
        rss, connections = rss_bytes(pids), redis_connections(pids, self.redis_ports)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_redis_connections = max(self.peak_redis_connections, connections)
        return rss, connections

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(interval)
