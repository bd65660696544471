"""The job queue: one Redis Stream that workers consume through a consumer group.

A job names a generation and carries the caller's trace context; the request
itself lives with the generation (`Keys.request`), where a worker that takes a
job over after a crash finds it too. `create.lua` enqueues a generation's job
atomically with creating it.

A job stays pending in the group until its worker settles it: acknowledged when
the generation ended, handed back (`requeue`) when the worker stops. A job whose
worker died goes idle, since a live worker resets its idle time with every lease
renewal (`touch`), and another worker claims it after a full lease
(`claim_idle`), when the dead worker's lease has expired too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.keys import Keys
from app.settings import Settings
from app.store.transport import Pipeline, call, dedicated

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
    """Enqueue, settle, claim and hold jobs of the `workers` consumer group."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings, commands: Pipeline) -> None:
        self._redis = redis
        self.keys = keys
        self._commands = commands
        # A job idle this long lost its worker: its lease expired (see workers.lease).
        self.takeover_idle_ms = int(settings.lease_seconds * 1000)
        self.timeout = settings.redis_timeout_seconds  # beyond a blocking read's block
        self._claim_cursor = b"0-0"

    async def ensure_group(self) -> None:
        try:
            await self._commands.run(
                b"XGROUP", b"CREATE", self.keys.jobs, self.keys.worker_group, b"0", b"MKSTREAM"
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, generation_id: str, traceparent: str | None) -> str:
        fields = entry_fields(generation_id, traceparent)
        flat = [part for field in fields.items() for part in field]
        entry_id: bytes = await self._commands.run(b"XADD", self.keys.jobs, b"*", *flat)
        return entry_id.decode()

    async def ack(self, job: Job) -> None:
        """The generation ended: the job is done."""
        await self._commands.run(b"XACK", self.keys.jobs, self.keys.worker_group, job.id)

    async def requeue(self, job: Job) -> None:
        """Hand the job back: a live worker takes it at once. Enqueued again before the
        acknowledgement, so a crash in between leaves a duplicate (harmless: acquire is
        exclusive), never a lost job."""
        await self.enqueue(job.generation_id, job.traceparent)
        await self.ack(job)

    async def touch(self, consumer: str, job_ids: Sequence[str]) -> None:
        """Reset the idle time of jobs `consumer` holds: they do not look abandoned."""
        k = self.keys
        await self._commands.run(
            b"XCLAIM", k.jobs, k.worker_group, consumer, 0, *job_ids, b"JUSTID"
        )

    async def retry_when_lease_expires(self, job: Job, consumer: str) -> None:
        """Another worker holds the job's lease (alive, or dead with its lease not yet
        expired): make the job claimable again right when that lease runs out, not a
        full lease later."""
        k = self.keys
        remaining_ms: int = await self._commands.run(b"PTTL", k.lease(job.generation_id))
        idle_ms = self.takeover_idle_ms - max(0, min(remaining_ms, self.takeover_idle_ms))
        await self._commands.run(
            b"XCLAIM", k.jobs, k.worker_group, consumer, 0, job.id, b"IDLE", idle_ms, b"JUSTID"
        )

    async def claim_idle(self, consumer: str, count: int) -> list[Job]:
        """Up to `count` jobs idle for a full lease, now `consumer`'s (one XAUTOCLAIM pass)."""
        k = self.keys
        reply = await self._commands.run(
            b"XAUTOCLAIM",
            k.jobs,
            k.worker_group,
            consumer,
            self.takeover_idle_ms,
            self._claim_cursor,
            b"COUNT",
            count,
        )
        self._claim_cursor = reply[0]
        return _jobs(reply[1])

    def reader(self, consumer: str) -> JobReader:
        return JobReader(self, dedicated(self._redis), consumer)


class JobReader:
    """New jobs for one consumer, read with XREADGROUP BLOCK on a connection of its own."""

    def __init__(self, queue: JobQueue, redis: Redis, consumer: str) -> None:
        self._queue = queue
        self._redis = redis
        self.consumer = consumer

    async def read(self, count: int, block_ms: int) -> list[Job]:
        """Up to `count` new jobs, waiting up to `block_ms` for the first."""
        k = self._queue.keys
        try:
            reply = await call(
                self._redis,
                b"XREADGROUP",
                b"GROUP",
                k.worker_group,
                self.consumer,
                b"COUNT",
                count,
                b"BLOCK",
                block_ms,
                b"STREAMS",
                k.jobs,
                b">",
                within=block_ms / 1000 + self._queue.timeout,
            )
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
        await self._redis.aclose()
