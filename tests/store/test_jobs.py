"""The job queue against a real Redis: reading, settling, claiming and holding jobs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog, Job, JobReader
from tests.conftest import ON_EVERY_BACKEND


@pytest.fixture
async def reader(log: GenerationLog) -> JobReader:
    await log.jobs.ensure_group()
    return log.jobs.reader("worker-a")


async def pending(redis: Redis, log: GenerationLog) -> list[tuple[str, str, int]]:
    """(job id, consumer, idle ms) of every pending job."""
    rows: list[dict[str, Any]] = await redis.xpending_range(
        log.keys.jobs, log.keys.worker_group, "-", "+", 100
    )
    return [
        (row["message_id"].decode(), row["consumer"].decode(), row["time_since_delivered"])
        for row in rows
    ]


async def test_a_worker_reads_each_new_job_once(log: GenerationLog, reader: JobReader) -> None:
    first, second = new_generation_id(), new_generation_id()
    first_id = await log.jobs.enqueue(first, "00-trace-parent-01")
    second_id = await log.jobs.enqueue(second, None)
    try:
        assert await reader.read(10, 100) == [
            Job(id=first_id, generation_id=first, traceparent="00-trace-parent-01"),
            Job(id=second_id, generation_id=second),
        ]
        assert await reader.read(10, 1) == []  # delivered: pending, not new
    finally:
        await reader.aclose()


async def test_a_job_group_lost_with_redis_data_is_recreated(
    log: GenerationLog, redis: Redis, reader: JobReader
) -> None:
    await redis.delete(log.keys.jobs)  # Redis came back empty: no stream, no group
    try:
        assert await reader.read(10, 1) == []
        generation_id = new_generation_id()
        await log.jobs.enqueue(generation_id, None)
        assert [job.generation_id for job in await reader.read(10, 100)] == [generation_id]
    finally:
        await reader.aclose()


async def test_only_jobs_idle_for_a_full_lease_are_claimed(
    redis: Redis, settings: Settings
) -> None:
    log = GenerationLog(redis, settings.replace(lease_seconds=0.2))
    await log.jobs.ensure_group()
    dead = log.jobs.reader("dead")
    try:
        generation_id = new_generation_id()
        await log.jobs.enqueue(generation_id, None)
        (job,) = await dead.read(10, 100)
        assert await log.jobs.claim_idle("worker-b", 10) == []  # its worker may be alive
        # Idle for a lease: Redis's clock decides, nothing to await but time passing.
        await redis.xclaim(
            log.keys.jobs, log.keys.worker_group, "dead", 0, [job.id], idle=200, justid=True
        )
        assert await log.jobs.claim_idle("worker-b", 10) == [job]
        assert [(job_id, consumer) for job_id, consumer, _ in await pending(redis, log)] == [
            (job.id, "worker-b")
        ]
    finally:
        await dead.aclose()


async def test_a_held_job_is_claimable_when_its_lease_expires_not_a_lease_later(
    log: GenerationLog, redis: Redis, reader: JobReader
) -> None:
    generation_id = new_generation_id()
    await log.jobs.enqueue(generation_id, None)
    try:
        (job,) = await reader.read(10, 100)
    finally:
        await reader.aclose()
    lease_ms = log.jobs.takeover_idle_ms
    await redis.set(log.keys.lease(generation_id), "other:1", px=lease_ms // 4)
    await log.jobs.retry_when_lease_expires(job, "worker-a")
    ((_, _, idle),) = await pending(redis, log)
    # Claimable (idle for a lease) once the other holder's lease has run out.
    assert lease_ms - lease_ms // 4 <= idle < lease_ms - lease_ms // 4 + 1000
    await log.jobs.touch("worker-a", {generation_id: job.id})
    ((_, _, idle),) = await pending(redis, log)
    assert idle < 1000


async def test_a_requeued_job_is_new_again_and_the_old_one_settled(
    log: GenerationLog, redis: Redis, reader: JobReader
) -> None:
    generation_id = new_generation_id()
    await log.jobs.enqueue(generation_id, "00-trace-parent-01")
    try:
        (job,) = await reader.read(10, 100)
        await log.jobs.requeue(job)
        assert await pending(redis, log) == []
        (again,) = await reader.read(10, 100)
    finally:
        await reader.aclose()
    assert (again.generation_id, again.traceparent) == (generation_id, "00-trace-parent-01")
    assert again.id != job.id


@ON_EVERY_BACKEND
async def test_a_worker_reads_settles_and_claims_the_jobs_of_every_shard(
    store_redis: Redis | RedisCluster, settings: Settings
) -> None:
    # Sharded on one Redis too: the shards are named and consumed alike there.
    sharded = settings if settings.redis_cluster else settings.replace(shards=4)
    log = GenerationLog(store_redis, sharded)
    shards = len(log.keys.shards)
    generation_ids: list[str] = []
    while len({log.keys.shard(g).index for g in generation_ids}) < shards:
        generation_ids.append(new_generation_id())
    await log.jobs.ensure_group()
    for generation_id in generation_ids:
        await log.jobs.enqueue(generation_id, None)
    dead = log.jobs.reader("dead")
    try:
        taken: list[Job] = []
        async with asyncio.timeout(10):
            while len(taken) < len(generation_ids):
                taken += await dead.read(len(generation_ids), 500)
    finally:
        await dead.aclose()
    assert sorted(job.generation_id for job in taken) == sorted(generation_ids)
    # The reader died holding them all, and no lease holds their generations: each is
    # claimable at once, and another worker claims them all in one pass over the
    # shards, then settles each in the stream it was queued in.
    for job in taken:
        await log.jobs.retry_when_lease_expires(job, "dead")
    claimed = await log.jobs.claim_idle("worker-b", len(taken))

    def by_generation(job: Job) -> str:
        return job.generation_id  # two shards' streams may give two jobs one id

    assert sorted(claimed, key=by_generation) == sorted(taken, key=by_generation)
    for job in claimed:
        await log.jobs.ack(job)
    # Every shard's stream is trimmed, down to its last delivered entry (MINID keeps it).
    assert await log.retention.trim_jobs() == len(generation_ids) - shards


async def test_the_reads_out_never_take_more_jobs_than_a_worker_asked_for(
    redis: Redis, settings: Settings
) -> None:
    # A worker with room for 2 generations, and jobs waiting in each of 4 shards: a job
    # read is its own, and one it has no room for would wait unstarted for a free slot.
    log = GenerationLog(redis, settings.replace(shards=4))
    await log.jobs.ensure_group()
    per_shard = {shard.index: 0 for shard in log.keys.shards}
    while min(per_shard.values()) < 2:
        generation_id = new_generation_id()
        per_shard[log.keys.shard(generation_id).index] += 1
        await log.jobs.enqueue(generation_id, None)
    reader = log.jobs.reader("worker-a")
    try:
        assert len(await reader.read(2, 100)) <= 2
    finally:
        await reader.aclose()
    taken = 0
    for shard in log.keys.shards:
        summary = await redis.xpending(shard.jobs, log.keys.worker_group)
        taken += int(summary["pending"])
    assert taken <= 2
