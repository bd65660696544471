"""The job queue: one Redis Stream that workers consume through a consumer group.

A job names a generation and carries the caller's trace context; the request
itself lives with the generation (`Keys.request`), where a worker that takes a
job over after a crash finds it too.
"""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.keys import Keys


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


async def enqueue(redis: Redis, keys: Keys, generation_id: str, traceparent: str | None) -> str:
    fields = entry_fields(generation_id, traceparent)
    entry_id = await redis.xadd(keys.jobs, fields)  # type: ignore[arg-type]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def ensure_group(redis: Redis, keys: Keys) -> None:
    try:
        await redis.xgroup_create(keys.jobs, keys.worker_group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def job_from_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Job:
    traceparent = fields.get(b"traceparent")
    return Job(
        id=entry_id.decode(),
        generation_id=fields[b"generation"].decode(),
        traceparent=traceparent.decode() if traceparent else None,
    )
