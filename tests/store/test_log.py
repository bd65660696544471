"""The log against a real Redis: seq, atomicity, idempotency, fencing, leases, cancel, create."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from app import events
from app.embedded import RedisProcess
from app.errors import AlreadyFinished, Fenced, SeqConflict
from app.generations import parse_request
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog
from tests.conftest import leased_generation
from tests.live import parse_live

REQUEST = parse_request(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')


async def test_seq_is_consecutive_from_one(log: GenerationLog) -> None:
    generation_id, lease = await leased_generation(log)
    assert await log.append(lease, 1, [events.Started(), events.Token(text="a")]) == 2
    assert await log.append(lease, 3, [events.Token(text="b")]) == 3
    entries = await log.read(generation_id, 0, 100)
    assert [e.seq for e in entries] == [1, 2, 3]
    assert [e.event() for e in entries] == [
        events.Started(),
        events.Token(text="a"),
        events.Token(text="b"),
    ]


async def test_retried_batch_is_not_duplicated(log: GenerationLog) -> None:
    generation_id, lease = await leased_generation(log)
    batch = [events.Token(text="x"), events.Token(text="y")]
    assert await log.append(lease, 1, batch) == 2
    assert await log.append(lease, 1, batch) == 2  # the retry of an applied batch
    assert [e.seq for e in await log.read(generation_id, 0, 100)] == [1, 2]


async def test_skipping_or_overlapping_seq_is_refused(log: GenerationLog) -> None:
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Token(text="x")])
    with pytest.raises(SeqConflict):
        await log.append(lease, 3, [events.Token(text="gap")])
    await log.append(lease, 2, [events.Token(text="y")])
    with pytest.raises(SeqConflict):
        await log.append(lease, 2, [events.Token(text="y"), events.Token(text="z")])
    assert [e.seq for e in await log.read(generation_id, 0, 100)] == [1, 2]


async def test_a_worker_that_lost_its_lease_is_fenced(log: GenerationLog, redis: Redis) -> None:
    generation_id, old = await leased_generation(log)
    await log.append(old, 1, [events.Token(text="from old")])
    await redis.delete(log.keys.lease(generation_id))  # the lease expired
    new = await log.acquire(generation_id, "worker-b")
    assert new is not None
    assert new.epoch > old.epoch
    assert new.last_seq == 1
    assert new.attempt == 2
    with pytest.raises(Fenced):
        await log.append(old, 2, [events.Token(text="zombie")])
    with pytest.raises(Fenced):
        await log.renew(old)
    assert await log.append(new, 2, [events.Token(text="from new")]) == 2
    texts = [e.event() for e in await log.read(generation_id, 0, 100)]
    assert texts == [events.Token(text="from old"), events.Token(text="from new")]


async def test_renewing_after_the_holders_terminal_event_is_not_a_lost_lease(
    log: GenerationLog, redis: Redis
) -> None:
    # The lease keeper may renew between the terminal append and dropping the lease.
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Done(reason="stop")])
    with pytest.raises(AlreadyFinished):
        await log.renew(lease)
    await redis.hincrby(log.keys.meta(generation_id), "epoch", 1)  # a system close's fence
    with pytest.raises(Fenced):
        await log.renew(lease)


async def test_a_held_lease_cannot_be_taken(log: GenerationLog) -> None:
    generation_id, _ = await leased_generation(log)
    assert await log.acquire(generation_id, "worker-b") is None


async def test_nothing_follows_the_terminal_event(log: GenerationLog) -> None:
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Token(text="x"), events.Done(reason="stop")])
    assert await log.append(lease, 1, [events.Token(text="x"), events.Done(reason="stop")]) == 2
    with pytest.raises(AlreadyFinished):
        await log.append(lease, 3, [events.Token(text="late")])
    assert await log.close(generation_id, events.Error(code="abandoned", message="m")) is None
    assert await log.acquire(generation_id, "worker-b") is None
    state = await log.state(generation_id)
    assert state is not None
    assert (state.status, state.last_seq, state.finish_reason) == ("done", 2, "stop")


async def test_terminal_event_must_end_its_batch(log: GenerationLog) -> None:
    _, lease = await leased_generation(log)
    with pytest.raises(ValueError, match="last of its batch"):
        await log.append(lease, 1, [events.Done(reason="stop"), events.Token(text="x")])


async def test_concurrent_writers_never_interleave_a_batch(log: GenerationLog) -> None:
    """Two batches race for the same seqs: exactly one lands, whole.

    Under one epoch a batch is identified by (epoch, first seq, length), so the
    loser reads as a retry of the winner; the lease makes two writers per epoch
    impossible in practice.
    """
    generation_id, lease = await leased_generation(log)
    a = [events.Token(text=f"a{i}") for i in range(50)]
    b = [events.Token(text=f"b{i}") for i in range(50)]
    results = await asyncio.gather(
        log.append(lease, 1, a), log.append(lease, 1, b), return_exceptions=True
    )
    assert list(results) == [50, 50]
    texts = [e.event() for e in await log.read(generation_id, 0, 1000)]
    assert texts in (a, b)


async def test_cancel_of_a_queued_generation_closes_it(log: GenerationLog) -> None:
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST)
    state = await log.request_cancel(generation_id)
    assert state.status == "cancelled"
    assert [e.event() for e in await log.read(generation_id, 0, 10)] == [
        events.Done(reason="cancelled")
    ]
    assert await log.acquire(generation_id, "late-worker") is None


async def test_cancel_of_a_running_generation_is_pushed_and_flagged(
    log: GenerationLog, redis: Redis
) -> None:
    generation_id, lease = await leased_generation(log)
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(log.keys.cancel_channel)
        state = await log.request_cancel(generation_id)
        assert state.status == "running"
        message = None
        while message is None or message["type"] != "message":
            message = await pubsub.get_message(timeout=5)
        assert message["data"] == generation_id.encode()
    assert await log.renew(lease) is True


async def test_live_message_carries_the_batch(log: GenerationLog, redis: Redis) -> None:
    generation_id, lease = await leased_generation(log)
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(log.keys.live_channel(generation_id))
        await log.append(lease, 1, [events.Token(text="line\nbreak"), events.Done(reason="stop")])
        message = None
        while message is None or message["type"] != "message":
            message = await pubsub.get_message(timeout=5)
    live = parse_live(message["data"])
    assert live == await log.read(generation_id, 0, 10)


# -- create ---------------------------------------------------------------------


async def test_a_create_run_again_leaves_the_generation_alone(
    log: GenerationLog, redis: Redis
) -> None:
    # A retry after a lost reply: the create runs twice.
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST, enqueue=True)
    lease = await log.acquire(generation_id, "worker-a")
    assert lease is not None
    await log.append(lease, 1, [events.Started()])
    await log.create(generation_id, REQUEST, enqueue=True)
    state = await log.state(generation_id)
    assert state is not None
    assert (state.status, state.epoch, state.last_seq) == ("running", lease.epoch, 1)
    assert await redis.xlen(log.keys.jobs) == 1


async def test_a_create_refused_for_memory_leaves_nothing_behind(
    redis_server_factory: Callable[..., RedisProcess], settings: Settings
) -> None:
    server = redis_server_factory("--maxmemory-policy", "noeviction")
    async with Redis.from_url(server.url) as redis:
        log = GenerationLog(redis, settings)
        await redis.set("ballast", b"x" * 1_000_000)
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory", used - 500_000)  # every write is refused now
        generation_id = new_generation_id()
        with pytest.raises(OutOfMemoryError):
            await log.create(generation_id, REQUEST, enqueue=True)
        assert await redis.keys(f"{log.keys.prefix}:*") == []
