"""Retention against a real Redis: TTLs of open and ended generations, the length cap,
closing abandoned generations and trimming the job queue."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import events
from app.errors import Fenced
from app.settings import Settings
from app.store import GenerationLog
from tests.conftest import ON_EVERY_BACKEND, leased_generation


async def test_terminal_status_and_retention_ttls(
    log: GenerationLog, redis: Redis, settings: Settings
) -> None:
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Done(reason="cancelled")])
    state = await log.state(generation_id)
    assert state is not None
    assert state.status == "cancelled"
    k = log.keys
    log_ttl = await redis.pttl(k.log(generation_id))
    meta_ttl = await redis.pttl(k.meta(generation_id))
    assert settings.retention_seconds * 1000 - 5000 < log_ttl <= settings.retention_seconds * 1000
    assert meta_ttl > settings.retention_seconds * 1000
    assert await redis.exists(k.lease(generation_id)) == 0
    assert await redis.zscore(k.open_generations, generation_id) is None


async def test_open_generation_keys_expire_even_without_a_sweeper(
    redis: Redis, settings: Settings
) -> None:
    log = GenerationLog(redis, settings.replace(abandon_after_seconds=0.2, retention_seconds=0.3))
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Started()])
    await log.append(lease, 2, [events.Token(text="x")])
    k = log.keys
    keys = (k.meta(generation_id), k.log(generation_id), k.request(generation_id))
    assert await redis.exists(*keys) == len(keys)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    # Nothing to await: Redis expires the keys on its own (the open TTL here is 0.5 s).
    while await redis.exists(*keys):
        assert loop.time() < deadline, "an open generation's keys never expired"
        await asyncio.sleep(0.05)


async def test_a_long_running_generation_keeps_its_keys(
    log: GenerationLog, redis: Redis, settings: Settings
) -> None:
    """Appends refresh the open TTLs only once in a while, never letting a key get
    closer to expiry than the open TTL (abandon deadline plus retention)."""
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Started()])
    k = log.keys
    meta = k.meta(generation_id)
    keys = (meta, k.log(generation_id), k.request(generation_id))
    open_ttl = int((settings.abandon_after_seconds + settings.retention_seconds) * 1000)
    refreshed = min([await redis.pttl(key) for key in keys])  # what a refresh sets
    assert refreshed >= open_ttl

    async def age(ms: int) -> None:
        """Pretend `ms` passed since the last refresh."""
        seconds, micros = await redis.time()
        await redis.hset(meta, "ttl_refreshed_ms", seconds * 1000 + micros // 1000 - ms)
        for key in keys:
            await redis.pexpire(key, refreshed - ms)

    await age(60_000)
    await log.append(lease, 2, [events.Token(text="soon after a refresh")])
    for key in keys:
        assert open_ttl <= await redis.pttl(key) <= refreshed - 60_000  # left alone

    # Without a refresh, this append would leave the keys less than the open TTL.
    await age(refreshed - open_ttl + 1000)
    await log.append(lease, 3, [events.Token(text="much later")])
    for key in keys:
        assert await redis.pttl(key) > refreshed - 1000  # refreshed


async def test_length_cap_trims_oldest_events(redis: Redis, settings: Settings) -> None:
    log = GenerationLog(redis, settings.replace(max_events_per_generation=100))
    generation_id, lease = await leased_generation(log)
    seq = 1
    for _ in range(10):
        batch = [events.Token(text=str(seq + i)) for i in range(100)]
        seq = await log.append(lease, seq, batch) + 1
    first = await log.first_seq(generation_id)
    assert first is not None
    # Approximate trimming keeps at least the cap, and far less than everything.
    assert 100 <= 1001 - first < 1000
    entries = await log.read(generation_id, 0, 10_000)
    assert [e.seq for e in entries] == list(range(first, 1001))


@ON_EVERY_BACKEND
async def test_sweeper_closes_only_abandoned_generations(
    store_redis: Redis | RedisCluster, settings: Settings
) -> None:
    redis = store_redis
    log = GenerationLog(redis, settings.replace(abandon_after_seconds=0.2))
    idle_id, idle_lease = await leased_generation(log)
    await log.append(idle_lease, 1, [events.Token(text="x")])
    active_id, active_lease = await leased_generation(log)
    # Make the idle one look old; the active one appended "just now".
    await redis.hset(log.keys.meta(idle_id), "last_append_ms", 1)
    for generation_id in (idle_id, active_id):
        await redis.zadd(log.keys.shard(generation_id).open_generations, {generation_id: 1})
    await log.append(active_lease, 1, [events.Token(text="y")])

    assert await log.retention.sweep_abandoned() == [idle_id]

    idle = await log.read(idle_id, 0, 10)
    assert idle[-1].event() == events.Error(
        code="abandoned", message="no event for 0.2 s; closed", retryable=True
    )
    with pytest.raises(Fenced):
        await log.append(idle_lease, 2, [events.Token(text="late")])
    assert (await log.state(active_id)).status == "running"  # type: ignore[union-attr]
    assert await redis.zscore(log.keys.shard(active_id).open_generations, active_id) is not None
