"""Retention: how long a generation's keys live, and what a sweeper pass removes.

Redis expires every key by itself (`Ttls`, set by `create.lua` and `append.lua`),
so memory never grows without bound even when no sweeper runs. A worker's sweeper
(`Retention.sweep`) adds what TTLs cannot do: it closes generations nobody
appends to any more with `error {code: "abandoned"}`, so their readers get an end,
and trims acknowledged jobs from the job stream; a pass covers every shard.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from app import events
from app.keys import Shard
from app.settings import Settings
from app.store.state import map_reply, now_ms
from app.store.transport import Pipeline

if TYPE_CHECKING:
    from app.store.log import GenerationLog

logger = logging.getLogger("tokentape.store")

# Open generations a sweeper pass looks at, at most.
SWEEP_LIMIT = 100


@dataclasses.dataclass(frozen=True)
class Ttls:
    """The TTLs of a generation's keys, in ms."""

    # An open generation's keys outlive its last write (create, then each append)
    # by at least the abandon deadline plus retention. append.lua refreshes them
    # only now and then, to up to an eighth more (see its header).
    open_ms: int
    log_ms: int  # the log and request, after the terminal event
    meta_ms: int  # the metadata, after the terminal event (a status outlives its events)

    @classmethod
    def of(cls, settings: Settings) -> Ttls:
        return cls(
            open_ms=int((settings.abandon_after_seconds + settings.retention_seconds) * 1000),
            log_ms=int(settings.retention_seconds * 1000),
            meta_ms=int(
                max(settings.metadata_retention_seconds, settings.retention_seconds) * 1000
            ),
        )


def _stream_id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.decode().partition("-")
    return int(ms), int(seq or 0)


class Retention:
    """The sweeper's work: closing abandoned generations and trimming the job queue."""

    def __init__(self, log: GenerationLog, commands: Pipeline) -> None:
        self._log = log
        self._commands = commands
        self.keys = log.keys
        self.settings = log.settings

    async def sweep(self) -> None:
        """One sweeper pass: abandoned generations closed, acknowledged jobs trimmed."""
        closed = await self.sweep_abandoned()
        if closed:
            logger.info("closed %d abandoned generations", len(closed))
        await self.trim_jobs()

    async def sweep_abandoned(self, limit: int = SWEEP_LIMIT) -> list[str]:
        """Close open generations with no append for `abandon_after_seconds`, up to
        `limit` candidates per shard.

        Generations that ended or expired leave the open set; active ones are
        re-scored with their last activity, so each sweep only looks at candidates.
        """
        closed: list[str] = []
        for shard in self.keys.shards:
            closed += await self._sweep_shard(shard, limit)
        return closed

    async def _sweep_shard(self, shard: Shard, limit: int) -> list[str]:
        idle_ms = int(self.settings.abandon_after_seconds * 1000)
        open_generations = shard.open_generations
        candidates: list[bytes] = await self._commands.run(
            b"ZRANGEBYSCORE", open_generations, b"-inf", now_ms() - idle_ms, b"LIMIT", 0, limit
        )
        closed: list[str] = []
        for raw in candidates:
            generation_id = raw.decode()
            error = events.Error(
                code="abandoned",
                message=f"no event for {self.settings.abandon_after_seconds:g} s; closed",
                retryable=True,
            )
            if await self._log.close(generation_id, error, min_idle_ms=idle_ms) is not None:
                closed.append(generation_id)
                continue
            state = await self._log.state(generation_id)
            if state is None or state.terminal:
                await self._commands.run(b"ZREM", open_generations, generation_id)
            else:
                active = state.last_append_ms or state.created_ms
                await self._commands.run(b"ZADD", open_generations, active, generation_id)
        return closed

    async def trim_jobs(self) -> int:
        """Drop acknowledged jobs from every shard's job stream; returns how many were removed.

        Everything older than both the oldest pending job and the group's last
        delivered one was delivered and acknowledged: the stream never grows without
        bound, and a pending job (a takeover candidate) is never trimmed.
        """
        removed = 0
        for shard in self.keys.shards:
            removed += await self._trim_shard(shard.jobs)
        return removed

    async def _trim_shard(self, jobs: str) -> int:
        group_name = self.keys.worker_group
        groups = [
            map_reply(g) for g in await self._commands.run(b"XINFO", b"GROUPS", jobs, key=jobs)
        ]
        group = next((g for g in groups if g[b"name"] == group_name.encode()), None)
        if group is None:
            return 0
        floor = _stream_id(group[b"last-delivered-id"])
        pending, oldest, _, _ = await self._commands.run(b"XPENDING", jobs, group_name)
        if pending:
            floor = min(floor, _stream_id(oldest))
        if floor == (0, 0):
            return 0
        removed: int = await self._commands.run(b"XTRIM", jobs, b"MINID", f"{floor[0]}-{floor[1]}")
        return removed
