"""The job queue: a Redis Stream per shard that workers consume through a consumer group.

A job names a generation and carries the caller's trace context; the request
itself lives with the generation (`Keys.request`), where a worker that takes a
job over after a crash finds it too. A job goes to the shard of its generation
(`Keys.shard`), queued by `index.lua` right after the generation is created, and
every worker consumes every shard.

A job stays pending in the group until its worker settles it: acknowledged when
the generation ended, handed back (`requeue`) when the worker stops. A job whose
worker died goes idle, since a live worker resets its idle time with every lease
renewal (`touch`), and another worker claims it after a full lease
(`claim_idle`), when the dead worker's lease has expired too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.keys import Keys, Shard
from app.settings import Settings
from app.store.transport import Arg, Pipeline, call, dedicated

if TYPE_CHECKING:
    from app.store.cluster import ClusterRoutes

logger = logging.getLogger("tokentape.store")


class Job(msgspec.Struct, frozen=True):
    id: str  # the job's stream entry id, acknowledged when the generation ends
    generation_id: str
    traceparent: str | None = None


def entry_fields(generation_id: str, traceparent: str | None) -> dict[str, str]:
    """A job's stream entry, as `enqueue` and `create.lua` write it and `job_from_entry`
    reads it back."""
    fields = {"generation": generation_id}
    if traceparent:
        fields["traceparent"] = traceparent
    return fields


def job_from_entry(entry_id: bytes, fields: Mapping[bytes, bytes]) -> Job:
    traceparent = fields.get(b"traceparent")
    return Job(
        id=entry_id.decode(),
        generation_id=fields[b"generation"].decode(),
        traceparent=traceparent.decode() if traceparent else None,
    )


def _jobs(entries: Sequence[Any]) -> list[Job]:
    """Jobs from stream entries as Redis sends them (`[id, [field, value, ...]]`); an
    entry trimmed from the stream (no fields) is skipped."""
    jobs: list[Job] = []
    for entry in entries:
        if entry is None or not entry[1]:
            continue
        entry_id, flat = entry
        jobs.append(job_from_entry(entry_id, dict(zip(flat[::2], flat[1::2], strict=True))))
    return jobs


class JobQueue:
    """Enqueue, settle, claim and hold jobs of the `workers` consumer group, in every shard."""

    def __init__(
        self, redis: Redis | ClusterRoutes, keys: Keys, settings: Settings, commands: Pipeline
    ) -> None:
        self._redis = redis
        self.keys = keys
        self._commands = commands
        # A job idle this long lost its worker: its lease expired (see workers.lease).
        self.takeover_idle_ms = int(settings.lease_seconds * 1000)
        self.timeout = settings.redis_timeout_seconds  # beyond a blocking read's block
        self._claim_cursors = [b"0-0"] * len(keys.shards)
        self._claim_from = 0  # the shard a claim pass starts with, in turn

    def _jobs_of(self, generation_id: str) -> str:
        return self.keys.shard(generation_id).jobs

    async def ensure_group(self) -> None:
        """The consumer group of every shard's stream, created where missing."""
        group = self.keys.worker_group
        replies = await asyncio.gather(
            *(
                self._commands.submit(
                    b"XGROUP", b"CREATE", shard.jobs, group, b"0", b"MKSTREAM", key=shard.jobs
                )
                for shard in self.keys.shards
            ),
            return_exceptions=True,
        )
        for reply in replies:
            if isinstance(reply, BaseException) and not (
                isinstance(reply, ResponseError) and "BUSYGROUP" in str(reply)
            ):
                raise reply

    async def enqueue(self, generation_id: str, traceparent: str | None) -> str:
        fields = entry_fields(generation_id, traceparent)
        flat = [part for field in fields.items() for part in field]
        entry_id: bytes = await self._commands.run(
            b"XADD", self._jobs_of(generation_id), b"*", *flat
        )
        return entry_id.decode()

    async def ack(self, job: Job) -> None:
        """The generation ended: the job is done."""
        jobs = self._jobs_of(job.generation_id)
        await self._commands.run(b"XACK", jobs, self.keys.worker_group, job.id)

    async def requeue(self, job: Job) -> None:
        """Hand the job back: a live worker takes it at once. Enqueued again before the
        acknowledgement, so a crash in between leaves a duplicate (harmless: acquire is
        exclusive), never a lost job."""
        await self.enqueue(job.generation_id, job.traceparent)
        await self.ack(job)

    async def touch(self, consumer: str, held: Mapping[str, str]) -> None:
        """Reset the idle time of jobs `consumer` holds (job id by generation id): they do
        not look abandoned. One XCLAIM per shard."""
        by_shard: dict[str, list[str]] = {}
        for generation_id, job_id in held.items():
            by_shard.setdefault(self._jobs_of(generation_id), []).append(job_id)
        group = self.keys.worker_group
        await asyncio.gather(
            *(
                self._commands.submit(b"XCLAIM", jobs, group, consumer, 0, *ids, b"JUSTID")
                for jobs, ids in by_shard.items()
            )
        )

    async def retry_when_lease_expires(self, job: Job, consumer: str) -> None:
        """Another worker holds the job's lease (alive, or dead with its lease not yet
        expired): make the job claimable again right when that lease runs out, not a
        full lease later."""
        k = self.keys
        remaining_ms: int = await self._commands.run(b"PTTL", k.lease(job.generation_id))
        idle_ms = self.takeover_idle_ms - max(0, min(remaining_ms, self.takeover_idle_ms))
        jobs = self._jobs_of(job.generation_id)
        await self._commands.run(
            b"XCLAIM", jobs, k.worker_group, consumer, 0, job.id, b"IDLE", idle_ms, b"JUSTID"
        )

    async def claim_idle(self, consumer: str, count: int) -> list[Job]:
        """Up to `count` jobs idle for a full lease, now `consumer`'s (an XAUTOCLAIM pass
        per shard, until `count`, from a different shard each time)."""
        shards = self.keys.shards
        start, self._claim_from = self._claim_from, (self._claim_from + 1) % len(shards)
        claimed: list[Job] = []
        for shard in (*shards[start:], *shards[:start]):
            if len(claimed) >= count:
                break
            reply = await self._commands.run(
                b"XAUTOCLAIM",
                shard.jobs,
                self.keys.worker_group,
                consumer,
                self.takeover_idle_ms,
                self._claim_cursors[shard.index],
                b"COUNT",
                count - len(claimed),
            )
            self._claim_cursors[shard.index] = reply[0]
            claimed += _jobs(reply[1])
        return claimed

    def reader(self, consumer: str) -> JobReader:
        redis = self._redis
        if isinstance(redis, Redis):
            # A connection for each shard's blocking read.
            return JobReader(self, dedicated(redis, len(self.keys.shards)), consumer)
        return JobReader(self, redis, consumer)


class JobReader:
    """New jobs for one consumer, read with XREADGROUP BLOCK from every shard at once,
    each read on a connection of its own.

    A shard's read that has not answered when another did stays out, and its jobs come
    with a later `read`. The reads out never ask for more than `count` jobs together: a
    job read is this consumer's, and one read while the worker is full would wait,
    unstarted, until a slot frees (as long as a generation takes).
    """

    def __init__(self, queue: JobQueue, redis: Redis | ClusterRoutes, consumer: str) -> None:
        self._queue = queue
        self._redis = redis
        self.consumer = consumer
        # Reads out, by shard index: the task, and how many jobs it asked for.
        self._reads: dict[int, tuple[asyncio.Task[list[Job]], int]] = {}
        self._turn = 0  # which shard is asked first, when `count` is less than the shards

    async def read(self, count: int, block_ms: int) -> list[Job]:
        """Up to `count` new jobs, waiting up to `block_ms` for the first."""
        budget = count - sum(asked for _, asked in self._reads.values())
        idle = [shard for shard in self._queue.keys.shards if shard.index not in self._reads]
        if budget > 0 and idle:
            turn, self._turn = self._turn % len(idle), self._turn + 1
            share = -(-budget // len(idle))
            for shard in (*idle[turn:], *idle[:turn]):
                asked = min(share, budget)
                if asked <= 0:
                    break
                task = asyncio.create_task(self._read_shard(shard, asked, block_ms))
                self._reads[shard.index] = (task, asked)
                budget -= asked
        if not self._reads:
            return []
        await asyncio.wait(
            [task for task, _ in self._reads.values()], return_when=asyncio.FIRST_COMPLETED
        )
        jobs: list[Job] = []
        failure: BaseException | None = None
        for index, (task, _) in list(self._reads.items()):
            if not task.done():
                continue
            del self._reads[index]
            if (error := task.exception()) is not None:
                failure = failure or error
            else:
                jobs += task.result()
        if failure is not None:
            if not jobs:
                raise failure
            logger.warning("reading jobs from a shard failed: %s", failure)
        return jobs

    async def _read_shard(self, shard: Shard, count: int, block_ms: int) -> list[Job]:
        command: tuple[Arg, ...] = (
            b"XREADGROUP",
            b"GROUP",
            self._queue.keys.worker_group,
            self.consumer,
            b"COUNT",
            count,
            b"BLOCK",
            block_ms,
            b"STREAMS",
            shard.jobs,
            b">",
        )
        redis = self._redis
        try:
            if isinstance(redis, Redis):
                reply = await call(redis, *command, seconds=block_ms / 1000 + self._queue.timeout)
            else:
                reply = await redis.call(*command, key=shard.jobs, extra_seconds=block_ms / 1000)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis came back without its data (no persistence): recreate the group.
            logger.warning("the job group is gone; recreating it")
            await self._queue.ensure_group()
            return []
        if not reply:
            return []
        # RESP3 answers a map of stream to entries, RESP2 a list of [stream, entries].
        streams = reply.values() if isinstance(reply, dict) else (s[1] for s in reply)
        return [job for entries in streams for job in _jobs(entries)]

    async def aclose(self) -> None:
        reads = [task for task, _ in self._reads.values()]
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        if isinstance(self._redis, Redis):
            await self._redis.aclose()  # its own client; a cluster's routes are the log's
