"""The crash drill with real processes: two workers, one SIGKILLed mid-generation, on one
Redis and on a Redis Cluster.

A reader of the log must see consecutive seqs, exactly the sim's text (nothing
repeated, nothing missing) and one terminal event; the survivor then drains on
SIGTERM and exits cleanly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.events import LogEntry, Started
from app.settings import Settings
from app.store import GenerationLog
from tests.conftest import ON_EVERY_BACKEND
from tests.workers.conftest import at_least, ended, expected_events, sim_request, submit, until_log

LEASE_SECONDS = 1.0


class WorkerProcess:
    def __init__(self, process: asyncio.subprocess.Process, worker_id: str) -> None:
        self.process = process
        self.worker_id = worker_id
        self.output: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    async def until_ready(self) -> None:
        assert self.process.stderr is not None
        async with asyncio.timeout(15):
            while True:
                line = (await self.process.stderr.readline()).decode()
                if not line:
                    pytest.fail(f"worker {self.worker_id} exited: {''.join(self.output)}")
                self.output.append(line)
                if f"worker {self.worker_id} ready" in line:
                    break
        # Keep reading so the worker never blocks on a full pipe.
        self._drain = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.output.append(line.decode())

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._drain is not None:
            await self._drain


@pytest.fixture
async def workers(settings: Settings) -> AsyncIterator[list[WorkerProcess]]:
    env = {
        **os.environ,
        "TOKENTAPE_REDIS_URL": settings.redis_url or "",
        "TOKENTAPE_REDIS_CLUSTER": str(settings.redis_cluster).lower(),
        "TOKENTAPE_KEY_PREFIX": settings.key_prefix,
        "TOKENTAPE_LEASE_SECONDS": str(LEASE_SECONDS),
        "TOKENTAPE_SHUTDOWN_GRACE_SECONDS": "2",
    }
    started: list[WorkerProcess] = []
    for name in ("drill-a", "drill-b"):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "worker",
            env={**env, "TOKENTAPE_WORKER_ID": name},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(WorkerProcess(process, name))
    await asyncio.gather(*(w.until_ready() for w in started))
    yield started
    for worker in started:
        await worker.close()


@ON_EVERY_BACKEND
async def test_a_worker_killed_mid_generation_is_taken_over_without_gap_or_duplicate(
    log: GenerationLog, store_redis: Redis | RedisCluster, workers: list[WorkerProcess]
) -> None:
    request = sim_request(tokens=600, rate=300, seed=11, tool_calls=1)
    generation_id = await submit(log, request)
    await until_log(log, generation_id, at_least(60))

    holder = await store_redis.get(log.keys.lease(generation_id))
    assert isinstance(holder, bytes)  # "<worker id>:<epoch>"
    victim = next(w for w in workers if holder.decode().startswith(f"{w.worker_id}:"))
    survivor = next(w for w in workers if w is not victim)
    victim.process.send_signal(signal.SIGKILL)
    killed = time.perf_counter()

    def taken_over(entries: list[LogEntry]) -> bool:
        return any(e.type == "started" and e.seq > 1 for e in entries)

    await until_log(log, generation_id, taken_over)
    takeover = time.perf_counter() - killed
    print(
        f"crash drill: taken over {takeover * 1000:.0f} ms after SIGKILL (lease {LEASE_SECONDS} s)"
    )
    entries = await until_log(log, generation_id, ended)

    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert [e.event() for e in entries if e.type == "started"] == [
        Started(model="sim", attempt=1),
        Started(model="sim", attempt=2),
    ]
    assert [e.event() for e in entries if e.type != "started"] == expected_events(request)
    assert [e.type for e in entries].count("done") == 1
    assert takeover < 2 * LEASE_SECONDS

    # The survivor drains on SIGTERM and exits cleanly.
    survivor.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(5):
        assert await survivor.process.wait() == 0
