"""Helpers for worker tests: sim requests, running workers, and waiting on the log."""

from __future__ import annotations

import asyncio
import dataclasses
from asyncio import Future
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterPubSub, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from app.events import Event, LogEntry
from app.generations import GenerationRequest, Message, SimParams
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog, Lease
from app.telemetry import Telemetry
from workers.models.sim import plan, prompt_tokens
from workers.runner import AdapterResolver, Worker


def sim_request(
    tokens: int = 40, rate: float = 1e9, seed: int = 7, tool_calls: int = 0
) -> GenerationRequest:
    return GenerationRequest(
        model="sim",
        messages=[Message(role="user", content="write about durable streams")],
        sim=SimParams(tokens=tokens, tokens_per_second=rate, seed=seed, tool_calls=tool_calls),
    )


def expected_events(request: GenerationRequest) -> list[Event]:
    assert request.sim is not None
    return list(plan(request.sim, prompt_tokens(request)))


async def submit(log: GenerationLog, request: GenerationRequest) -> str:
    """Create a generation and enqueue its job, as the HTTP API does."""
    generation_id = new_generation_id()
    await log.create(generation_id, request)
    await log.jobs.enqueue(generation_id, None)
    return generation_id


async def read_all(log: GenerationLog, generation_id: str) -> list[LogEntry]:
    entries: list[LogEntry] = []
    while page := await log.read(generation_id, entries[-1].seq if entries else 0, 1000):
        entries.extend(page)
    return entries


async def until_log(
    log: GenerationLog,
    generation_id: str,
    done: Callable[[list[LogEntry]], bool],
) -> list[LogEntry]:
    """Wait, woken by the generation's live channel, until `done(entries)` holds (10 s at most)."""
    # The log's own client: the store has no use for live messages (the hub reads them).
    redis = log._redis
    channel = log.keys.live_channel(generation_id)
    pubsub = redis.pubsub()
    if isinstance(pubsub, ClusterPubSub):
        await pubsub.ssubscribe(channel)
    else:
        await pubsub.subscribe(channel)
    try:
        async with asyncio.timeout(10.0):
            while True:
                entries = await read_all(log, generation_id)
                if done(entries):
                    return entries
                if isinstance(pubsub, ClusterPubSub):
                    # Each wait bounded: the channel's node may change under a cluster test.
                    await pubsub.get_sharded_message(timeout=0.5)
                else:
                    await pubsub.get_message(timeout=None)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


def ended(entries: list[LogEntry]) -> bool:
    return bool(entries) and entries[-1].type in ("done", "error")


def at_least(seq: int) -> Callable[[list[LogEntry]], bool]:
    return lambda entries: bool(entries) and entries[-1].seq >= seq


@dataclasses.dataclass
class RunningWorker:
    worker: Worker
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def abort(self) -> None:
        """Kill the worker without cleanup, as a crash would: its leases are left to expire."""
        self.task.cancel()
        await asyncio.wait([self.task])

    async def drain(self) -> None:
        self.stop.set()
        await self.task


StartWorker = Callable[..., Awaitable[RunningWorker]]


@pytest.fixture
async def start_worker(
    store_redis: Redis | RedisCluster, settings: Settings
) -> AsyncIterator[StartWorker]:
    redis = store_redis
    running: list[RunningWorker] = []

    async def start(
        settings: Settings = settings,
        adapters: AdapterResolver | None = None,
        worker_id: str | None = None,
        telemetry: Telemetry | None = None,
    ) -> RunningWorker:
        worker = Worker(
            redis, settings, adapters=adapters, worker_id=worker_id, telemetry=telemetry
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait([task, ready], timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()
        assert worker.ready.is_set()
        started = RunningWorker(worker, stop, task)
        running.append(started)
        return started

    yield start
    for started in running:
        await started.abort()


def spy_appends(
    monkeypatch: pytest.MonkeyPatch,
    log: GenerationLog,
    lose_reply: Callable[[int], bool] = lambda call: False,
) -> list[tuple[int, list[Event]]]:
    """Every append's (first seq, batch), by either way the appender appends; the
    reply of each call `lose_reply(call number)` picks is lost after the script ran."""
    calls: list[tuple[int, list[Event]]] = []
    append, append_soon = log.append, log.append_soon

    async def spied_append(lease: Lease, first_seq: int, batch: Sequence[Event]) -> int:
        calls.append((first_seq, list(batch)))
        last = await append(lease, first_seq, batch)
        if lose_reply(len(calls)):
            raise RedisConnectionError("connection reset after the script ran")
        return last

    def spied_append_soon(lease: Lease, first_seq: int, batch: Sequence[Event]) -> Future[Any]:
        calls.append((first_seq, list(batch)))
        reply = append_soon(lease, first_seq, batch)
        if not lose_reply(len(calls)):
            return reply
        lost: Future[Any] = asyncio.get_running_loop().create_future()
        reply.add_done_callback(
            lambda _: lost.set_exception(
                RedisConnectionError("connection reset after the script ran")
            )
        )
        return lost

    monkeypatch.setattr(log, "append", spied_append)
    monkeypatch.setattr(log, "append_soon", spied_append_soon)
    return calls
