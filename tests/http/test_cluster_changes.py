"""A generation read over SSE while the Redis Cluster changes under it.

A worker streams a simulated generation and a client reads it through the app,
resuming after `Last-Event-ID` whenever a response ends. Mid-generation, the
primary that holds the generation's slot fails over to its replica, or the slot
migrates to another primary. Each test ends with the client holding every event
once, in order, the same events the log replays, and the reader's live channel on
a node of the generation's shard.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from app import events
from app.embedded import RedisClusterProcesses
from app.http import HUB
from app.hub.pubsub import ShardedPubSub
from app.settings import Settings
from app.store import GenerationLog
from tests.http.conftest import Client, Stream, as_events
from tests.workers.conftest import expected_events, read_all, sim_request, submit
from workers.runner import Worker

pytestmark = pytest.mark.parametrize("backend", ["cluster"], indirect=True)

# Long enough that the change lands mid-generation: 400 tokens at 200 a second.
TOKENS, RATE = 400, 200.0
CHANGE_AT_SEQ = 40

Received = list[tuple[int, events.Event]]


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker on a cluster client of its own, as in a process of its own."""
    assert settings.redis_url is not None
    redis = RedisCluster.from_url(settings.redis_url, socket_timeout=None)
    worker = Worker(redis, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    async with asyncio.timeout(10):
        await worker.ready.wait()
    yield worker
    stop.set()
    await task
    await redis.aclose()


async def read_to_the_end(client: Client, url: str, reached: Callable[[int], None]) -> Received:
    """Everything the reader sends, across as many responses as it takes, as received."""
    received: Received = []
    while not received or not events.is_terminal(received[-1][1]):
        headers = {"Last-Event-ID": str(received[-1][0])} if received else {}
        async with client.get(url, headers=headers) as response:
            assert response.status == 200
            stream = Stream(response)
            while messages := await stream.take(1):
                received += as_events(messages)
                reached(received[-1][0])
    return received


async def read_through(
    client: Client, log: GenerationLog, change: Callable[[str], Awaitable[None]]
) -> tuple[str, Received]:
    """A generation read to its end, with `change(generation id)` made once the client
    holds CHANGE_AT_SEQ events."""
    request = sim_request(tokens=TOKENS, rate=RATE, seed=3)
    generation_id = await submit(log, request)
    midway = asyncio.Event()

    def reached(seq: int) -> None:
        if seq >= CHANGE_AT_SEQ:
            midway.set()

    reading = asyncio.create_task(
        read_to_the_end(client, f"/v1/generations/{generation_id}/events", reached)
    )
    await midway.wait()
    assert not reading.done(), "the generation ended before the cluster changed"
    await change(generation_id)
    received = await reading
    entries = await read_all(log, generation_id)
    assert [seq for seq, _ in received] == list(range(1, len(entries) + 1))
    assert received == [(entry.seq, entry.event()) for entry in entries]
    assert [event for _, event in received if not isinstance(event, events.Started)] == (
        expected_events(request)
    )
    return generation_id, received


def live_node(app: web.Application, log: GenerationLog, generation_id: str) -> set[str]:
    """The nodes on which the reader listens to the generation's live channel."""
    pubsub = app[HUB].pubsub
    assert isinstance(pubsub, ShardedPubSub)
    channel = log.keys.live_channel(generation_id).encode()
    return {name for name, each in pubsub.connections.items() if channel in each.channels}


def slot_of(log: GenerationLog, generation_id: str) -> int:
    return key_slot(log.keys.meta(generation_id).encode())


async def test_a_failover_of_the_generations_primary_loses_nothing(
    client: Client,
    app: web.Application,
    log: GenerationLog,
    worker: Worker,
    redis_cluster: RedisClusterProcesses,
) -> None:
    shard: list[str] = []

    async def fail_over(generation_id: str) -> None:
        primary = redis_cluster.primary_of(slot_of(log, generation_id))
        replica = redis_cluster.replica_of(primary)
        await asyncio.to_thread(redis_cluster.fail_over, replica)
        shard.extend(f"127.0.0.1:{node.port}" for node in (replica, primary))

    generation_id, _ = await read_through(client, log, fail_over)
    # The promoted replica, or the old primary if it kept the channel as the new one's
    # replica (Redis passes a shard's messages on to its replicas).
    (node,) = live_node(app, log, generation_id)
    assert node in shard


async def test_a_slot_migrated_mid_generation_loses_nothing(
    client: Client,
    app: web.Application,
    log: GenerationLog,
    worker: Worker,
    redis_cluster: RedisClusterProcesses,
) -> None:
    targets: list[str] = []

    async def migrate(generation_id: str) -> None:
        slot = slot_of(log, generation_id)
        source = redis_cluster.primary_of(slot)
        target = next(
            redis_cluster.primary_of(other)
            for other in (0, 8000, 16383)
            if redis_cluster.primary_of(other) is not source
        )
        # Key by key, 50 ms apart: appends meet ASK and TRYAGAIN on the way.
        await asyncio.to_thread(redis_cluster.move_slot, slot, target, pause=0.05)
        targets.append(f"127.0.0.1:{target.port}")

    generation_id, _ = await read_through(client, log, migrate)
    assert live_node(app, log, generation_id) == set(targets)
