"""The generation log: create, append, read, lease, cancel.

The log is a Redis Stream whose entry ids are `<seq>-0`, so "everything after
position P" is `XRANGE (P+1)-0 +`. Every write that must be atomic is one Lua
script (`app.store.scripts`).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import events
from app.errors import AlreadyFinished, Fenced, NotFound, SeqConflict
from app.events import Event, LogEntry
from app.generations import GenerationRequest
from app.keys import Keys
from app.settings import Settings
from app.store.cancels import CancelRequests
from app.store.cluster import ClusterRoutes, routes_for
from app.store.jobs import JobQueue, entry_fields
from app.store.quotas import Quotas
from app.store.retention import Retention, Ttls
from app.store.scripts import (
    ACQUIRE,
    ANNOTATE,
    APPEND,
    APPEND_SHARDED,
    CANCEL,
    CREATE,
    INDEX,
    RENEW,
    RESET,
    RESET_SHARDED,
    AcquireArgs,
    AnnotateArgs,
    AppendArgs,
    AppendKeys,
    CreateArgs,
    CreateKeys,
    IndexArgs,
    IndexKeys,
    LeaseKeys,
    MetaKeys,
    NoArgs,
    RenewArgs,
    Reply,
    ResetArgs,
    ResetKeys,
    UnexpectedReply,
)
from app.store.state import (
    STATE_FIELDS,
    GenerationState,
    Lease,
    RawEntry,
    now_ms,
    parse_entry,
    parse_state,
    scored_reply,
)
from app.store.transport import Pipeline

_OK = Reply.OK.value

# Calls over every generation a reader streams (thousands, each recheck beat) go in
# slices: a round trip each, and only one slice's commands and replies in memory at
# once; all at once they raised an idle reader's peak RSS by ~1.5 KiB per stream.
BULK_SLICE = 256


class GenerationLog:
    """All reads and writes of generation logs go through here.

    Built on a Redis client its caller owns (a `RedisCluster` for a cluster); nothing
    outside `app.store` sends commands on that client.
    """

    def __init__(self, redis: Redis | RedisCluster, settings: Settings) -> None:
        self._redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.key_shards)
        self.ttls = Ttls.of(settings)
        routes = routes_for(redis, settings.redis_timeout_seconds)
        self.cluster = isinstance(routes, ClusterRoutes)
        # Live batches and cancel requests: sharded pub/sub on a cluster, delivered by
        # the node that holds the generation (or the shard) only.
        self._append_script = APPEND_SHARDED if self.cluster else APPEND
        self._reset_script = RESET_SHARDED if self.cluster else RESET
        self._publish = b"SPUBLISH" if self.cluster else b"PUBLISH"
        # A pipeline per kind of call, each with its own bound. A reader's requests share
        # its few connections: one batch of creates and one of commands out at a time.
        timeout = settings.redis_timeout_seconds
        self._creates = Pipeline(routes, in_flight=1, timeout=timeout)
        self._commands = Pipeline(routes, in_flight=1, timeout=timeout)
        self._appends = Pipeline(routes, timeout=timeout)
        # A burst of jobs (a thousand clients starting at once) acquires in a few round trips.
        self._acquires = Pipeline(routes, timeout=timeout)
        # The lease keeper renews every held lease at once: one pipeline, not a call each.
        self._renewals = Pipeline(routes, timeout=timeout)
        # The watched marks of every stream go in one pipeline.
        self._annotations = Pipeline(routes, timeout=timeout)
        # append.lua's limits, the same for every append: encoded once.
        self._maxlen = b"%d" % settings.max_events_per_generation
        self._open_ttl = b"%d" % self.ttls.open_ms
        self._log_ttl = b"%d" % self.ttls.log_ms
        self._meta_ttl = b"%d" % self.ttls.meta_ms
        # And each generation's keys, built once (for as many as a worker runs), not per event.
        cached = settings.worker_concurrency
        self._append_keys = functools.lru_cache(maxsize=cached)(self._keys_of)
        self.jobs = JobQueue(routes, self.keys, settings, self._commands)
        self.retention = Retention(self, self._commands)
        self.quotas = Quotas(self.keys, settings, self._commands)

    async def ping(self) -> None:
        """Raises unless Redis (on a cluster: a node) answers."""
        await self._commands.run(b"PING")

    # -- create -------------------------------------------------------------

    async def create(
        self,
        generation_id: str,
        request: GenerationRequest,
        *,
        enqueue: bool = False,
        traceparent: str | None = None,
        owner: str | None = None,
    ) -> GenerationState:
        """Create the generation, then index it in its shard and, with `enqueue`, queue its
        job (`app.store.jobs`): each step atomic, the second only after the first created
        the generation (on a cluster they are in two slots; a create retried after a lost
        reply queues no second job).

        `owner` is the owner hash of the API key creating it (`app.access`), if any.

        Creates requested in the same loop tick share one round trip: a burst of
        POSTs must not queue one by one for the reader's few Redis connections.
        """
        created = now_ms()
        k = self.keys
        shard = k.shard(generation_id)
        job = entry_fields(generation_id, traceparent) if enqueue else {}
        fresh = await self._creates.run_script(
            CREATE,
            CreateKeys(meta=k.meta(generation_id), request=k.request(generation_id)),
            CreateArgs(
                model=request.model,
                request_json=msgspec.json.encode(request),
                created_ms=created,
                open_ttl_ms=self.ttls.open_ms,
                owner=owner or "",
            ),
        )
        if fresh:
            await self._creates.run_script(
                INDEX,
                IndexKeys(
                    open=shard.open_generations, recent=shard.recent_generations, jobs=shard.jobs
                ),
                IndexArgs(
                    generation_id=generation_id, created_ms=created, meta_ttl_ms=self.ttls.meta_ms
                ),
                [part for field in job.items() for part in field],
            )
        return GenerationState(
            id=generation_id,
            status="queued",
            model=request.model,
            last_seq=0,
            created_ms=created,
            started_ms=None,
            finished_ms=None,
            last_append_ms=None,
            finish_reason=None,
            epoch=0,
            attempts=0,
            cancel_requested=False,
            owner=owner,
        )

    async def request(self, generation_id: str) -> GenerationRequest | None:
        raw = await self._commands.run(b"GET", self.keys.request(generation_id))
        return None if raw is None else msgspec.json.decode(raw, type=GenerationRequest)

    # -- read ---------------------------------------------------------------

    async def state(self, generation_id: str) -> GenerationState | None:
        values = await self._commands.run(b"HMGET", self.keys.meta(generation_id), *STATE_FIELDS)
        return parse_state(generation_id, values)

    async def read(self, generation_id: str, after_seq: int, count: int) -> list[LogEntry]:
        """Up to `count` entries with seq > after_seq, in order."""
        return [parse_entry(row) for row in await self.read_rows(generation_id, after_seq, count)]

    async def pages(
        self, generation_id: str, page_size: int | None = None
    ) -> AsyncIterator[list[LogEntry]]:
        """Every retained entry, page by page, until the terminal event or the log's end."""
        size = page_size or self.settings.catch_up_page_size
        after = 0
        while page := await self.read(generation_id, after, size):
            yield page
            if page[-1].type in events.TERMINAL_TYPES:
                return
            after = page[-1].seq

    async def read_rows(self, generation_id: str, after_seq: int, count: int) -> list[RawEntry]:
        """`read` without building objects: `RawEntry` rows, as Redis sent them."""
        # Catch-up reads are the hot path: no object per entry until a caller wants one.
        rows: list[RawEntry] = await self._commands.run(
            b"XRANGE", self.keys.log(generation_id), f"{after_seq + 1}-0", "+", "COUNT", count
        )
        return rows

    async def snapshot(self, generation_id: str) -> tuple[GenerationState | None, bool]:
        """The state and whether the log still exists, in one round trip."""
        # Both in the same tick: one round trip, shared with every other read of this tick.
        values, log_exists = await asyncio.gather(
            self._commands.run(b"HMGET", self.keys.meta(generation_id), *STATE_FIELDS),
            self._commands.run(b"EXISTS", self.keys.log(generation_id)),
        )
        return parse_state(generation_id, values), bool(log_exists)

    async def last_entry(self, generation_id: str) -> LogEntry | None:
        rows: list[RawEntry] = await self._commands.run(
            b"XREVRANGE", self.keys.log(generation_id), "+", "-", "COUNT", 1
        )
        return parse_entry(rows[0]) if rows else None

    async def last_seqs(self, generation_ids: Sequence[str]) -> list[int]:
        """The last appended seq of each generation (0 when none or gone), a round trip a slice."""
        values: list[bytes | None] = []
        for start in range(0, len(generation_ids), BULK_SLICE):
            values += await asyncio.gather(
                *(
                    self._commands.submit(b"HGET", self.keys.meta(generation_id), "last_seq")
                    for generation_id in generation_ids[start : start + BULK_SLICE]
                )
            )
        return [int(v) if v is not None else 0 for v in values]

    async def first_seq(self, generation_id: str) -> int | None:
        rows = await self.read_rows(generation_id, 0, 1)
        return parse_entry(rows[0]).seq if rows else None

    async def recent(self, *, since_ms: int | None, offset: int, count: int) -> list[str]:
        """Ids of generations created since `since_ms` (all: None), newest first, a page."""
        low = b"-inf" if since_ms is None else since_ms
        shards = self.keys.shards
        if len(shards) == 1:
            ids: list[bytes] = await self._commands.run(
                b"ZREVRANGEBYSCORE",
                shards[0].recent_generations,
                b"+inf",
                low,
                b"LIMIT",
                offset,
                count,
            )
            return [raw.decode() for raw in ids]
        # Each shard's newest offset + count, merged: the page is among them.
        replies: list[list[Any]] = await asyncio.gather(
            *(
                self._commands.submit(
                    b"ZREVRANGEBYSCORE",
                    shard.recent_generations,
                    b"+inf",
                    low,
                    b"WITHSCORES",
                    b"LIMIT",
                    0,
                    offset + count,
                )
                for shard in shards
            )
        )
        newest = heapq.merge(*(scored_reply(reply) for reply in replies), reverse=True)
        return [generation_id for _, generation_id in list(newest)[offset : offset + count]]

    # -- append -------------------------------------------------------------

    async def append(self, lease: Lease, first_seq: int, batch: Sequence[Event]) -> int:
        """Append `batch` as seq first_seq, first_seq+1, …; returns the last seq.

        Idempotent: retrying a batch that was applied returns without writing again.
        Raises Fenced, AlreadyFinished or SeqConflict when the writer must stop.
        """
        code, last = await self._run_append(
            lease.generation_id, str(lease.epoch), first_seq, batch, min_idle_ms=None
        )
        if code is Reply.OK or code is Reply.DUPLICATE:
            return last
        raise _refusal(code, lease.generation_id, last)

    def append_soon(
        self, lease: Lease, first_seq: int, batch: Sequence[Event]
    ) -> asyncio.Future[Any]:
        """`append` of a batch that does not end the generation, as a future of the
        script's reply for `appended`: the appender continues in a done-callback,
        without waking a task per append."""
        if events.is_terminal(batch[-1]):
            raise ValueError("a terminal batch goes through append")
        keys, args, rest = self._append_call(
            lease.generation_id, str(lease.epoch), first_seq, batch, None
        )
        return self._appends.submit_script(self._append_script, keys, args, rest)

    def appended(self, lease: Lease, reply: Any) -> int:
        """What `append` returns or raises, from the reply of `append_soon`."""
        if reply[0] == _OK:  # nearly every reply: skip the lookup (per event)
            return int(reply[1])
        code = APPEND.reply(reply[0])
        if code is Reply.DUPLICATE:
            return int(reply[1])
        raise _refusal(code, lease.generation_id, int(reply[1]))

    async def close(
        self, generation_id: str, terminal: events.TerminalEvent, *, min_idle_ms: int | None = None
    ) -> int | None:
        """Append a terminal event as the system (not a worker), fencing any lease holder.

        Returns the terminal seq, or None when the generation already ended, is gone,
        or (with `min_idle_ms`) saw an append more recently than that.
        """
        code, last = await self._run_append(generation_id, "*", 0, [terminal], min_idle_ms)
        return last if code is Reply.OK else None

    async def _run_append(
        self,
        generation_id: str,
        epoch: str,
        first_seq: int,
        batch: Sequence[Event],
        min_idle_ms: int | None,
    ) -> tuple[Reply, int]:
        keys, args, rest = self._append_call(generation_id, epoch, first_seq, batch, min_idle_ms)
        reply = await self._appends.run_script(self._append_script, keys, args, rest)
        code, last = APPEND.reply(reply[0]), int(reply[1])
        if args.final and code is Reply.OK:
            open_generations = self.keys.shard(generation_id).open_generations
            await self._commands.run(b"ZREM", open_generations, generation_id)
        return code, last

    def _append_call(
        self,
        generation_id: str,
        epoch: str,
        first_seq: int,
        batch: Sequence[Event],
        min_idle_ms: int | None,
    ) -> tuple[AppendKeys, AppendArgs, list[bytes | str]]:
        """append.lua's KEYS, ARGV and events for one batch."""
        if not batch:
            raise ValueError("empty batch")
        for event in batch[:-1]:
            if events.is_terminal(event):
                raise ValueError("a terminal event must be the last of its batch")
        final, reason = "", ""
        last_event = batch[-1]
        if events.is_terminal(last_event):  # checked first: isinstance costs (per batch)
            final = events.status_of(last_event)
            reason = last_event.reason if isinstance(last_event, events.Done) else last_event.code
        pairs: list[bytes | str] = []
        for event in batch:
            pairs.append(events.event_type(event))
            pairs.append(events.encode(event))
        keys, channel = self._append_keys(generation_id)
        args = AppendArgs(
            epoch=epoch,
            first_seq=first_seq,
            maxlen=self._maxlen,
            open_ttl_ms=self._open_ttl,
            log_ttl_ms=self._log_ttl,
            meta_ttl_ms=self._meta_ttl,
            channel=channel,
            final=final,
            reason=reason,
            min_idle_ms="" if min_idle_ms is None else min_idle_ms,
            n=len(batch),
        )
        return keys, args, pairs

    def _keys_of(self, generation_id: str) -> tuple[AppendKeys, str]:
        """append.lua's KEYS for a generation, and its live channel."""
        k = self.keys
        keys = AppendKeys(
            meta=k.meta(generation_id),
            log=k.log(generation_id),
            request=k.request(generation_id),
            lease=k.lease(generation_id),
        )
        return keys, k.live_channel(generation_id)

    # -- leases -------------------------------------------------------------

    async def acquire(self, generation_id: str, worker_id: str) -> Lease | None:
        """Take the lease if nobody holds it; None if held or the generation ended/expired."""
        k = self.keys
        reply = await self._acquires.run_script(
            ACQUIRE,
            LeaseKeys(meta=k.meta(generation_id), lease=k.lease(generation_id)),
            AcquireArgs(worker_id=worker_id, lease_ms=int(self.settings.lease_seconds * 1000)),
        )
        if ACQUIRE.reply(reply[0]) is not Reply.OK:
            return None
        return Lease(
            generation_id=generation_id,
            worker_id=worker_id,
            epoch=int(reply[1]),
            last_seq=int(reply[2]),
            attempt=int(reply[3]),
            cancel_requested=reply[4] == b"1",
        )

    async def renew(self, lease: Lease, *, release: bool = False) -> bool:
        """Extend (or release) the lease; returns whether a cancel was requested.

        Raises Fenced when the lease is no longer ours, AlreadyFinished when the holder
        has appended the terminal event.
        """
        k = self.keys
        reply = await self._renewals.run_script(
            RENEW,
            LeaseKeys(meta=k.meta(lease.generation_id), lease=k.lease(lease.generation_id)),
            RenewArgs(
                worker_id=lease.worker_id,
                epoch=lease.epoch,
                lease_ms=int(self.settings.lease_seconds * 1000),
                release="1" if release else "0",
                unwatched_ms=int(self.settings.cancel_unwatched_seconds * 1000),
            ),
        )
        code = RENEW.reply(reply[0])
        if code is Reply.ALREADY_FINISHED:
            raise AlreadyFinished(message=f"{lease.generation_id} already ended")
        if code is Reply.FENCED:
            raise Fenced(message=f"lease on {lease.generation_id} epoch {lease.epoch} was lost")
        return bool(reply[1] == b"1")

    async def reset(self, lease: Lease, confirmed_to: int, sent_to: int) -> tuple[int, int] | None:
        """Record that the log went back, if it did (see `lua/reset.lua`), for a writer to
        which the log confirmed seqs up to `confirmed_to` and that sent up to `sent_to`.

        Returns (the reset's seq, the first void seq), or None when the log holds what the
        writer appended (or has ended, or is gone). Fences every writer.
        """
        k = self.keys
        generation_id = lease.generation_id
        reply = await self._commands.run_script(
            self._reset_script,
            ResetKeys(
                meta=k.meta(generation_id), log=k.log(generation_id), lease=k.lease(generation_id)
            ),
            ResetArgs(
                epoch=lease.epoch,
                confirmed_to=confirmed_to,
                sent_to=max(sent_to, confirmed_to),
                maxlen=self._maxlen,
                channel=k.live_channel(generation_id),
            ),
        )
        if self._reset_script.reply(reply[0]) is not Reply.RESET:
            return None
        return int(reply[1]), int(reply[2])

    async def mark_watched(self, generation_ids: Sequence[str]) -> None:
        """Readers stream these generations now (the unwatched-cancel policy reads it)."""
        stamp = now_ms()
        for start in range(0, len(generation_ids), BULK_SLICE):
            await asyncio.gather(
                *(
                    self._annotations.submit_script(
                        ANNOTATE,
                        MetaKeys(meta=self.keys.meta(generation_id)),
                        AnnotateArgs(field="watched_ms", value=stamp),
                    )
                    for generation_id in generation_ids[start : start + BULK_SLICE]
                )
            )

    async def set_traceparent(self, generation_id: str, traceparent: str) -> None:
        """Record the generation span's context, so reader spans can link to it."""
        await self._annotations.run_script(
            ANNOTATE,
            MetaKeys(meta=self.keys.meta(generation_id)),
            AnnotateArgs(field="traceparent", value=traceparent),
        )

    # -- cancel -------------------------------------------------------------

    async def request_cancel(self, generation_id: str) -> GenerationState:
        """Mark the generation for cancellation; close it at once if no worker has it yet.

        The worker running it hears of it on its shard's cancel channel (`cancel_requests`).
        """
        status = await self._commands.run_script(
            CANCEL, MetaKeys(meta=self.keys.meta(generation_id)), NoArgs()
        )
        state = await self.state(generation_id)
        if status is None or state is None:
            raise NotFound("generation_not_found", f"no generation {generation_id}")
        if state.terminal:
            return state
        if state.status == "queued":
            await self.close(generation_id, events.Done(reason="cancelled"))
        channel = self.keys.shard(generation_id).cancel_channel
        await self._commands.run(self._publish, channel, generation_id)
        return await self.state(generation_id) or state

    def cancel_requests(self) -> CancelRequests:
        """The cancel requests published to every worker (`async with`, then `async for`)."""
        return CancelRequests(self._redis, self.keys.shards, self.settings.redis_timeout_seconds)


def _refusal(code: Reply, generation_id: str, last: int) -> Exception:
    if code is Reply.FENCED:
        return Fenced(message=f"{generation_id}: another worker holds the lease")
    if code is Reply.ALREADY_FINISHED:
        return AlreadyFinished(message=f"{generation_id} already ended at seq {last}")
    if code is Reply.UNKNOWN:
        return NotFound("generation_not_found", f"no generation {generation_id}")
    if code is Reply.SEQ_CONFLICT:
        return SeqConflict(message=f"{generation_id}: log is at seq {last}")
    return UnexpectedReply(f"append.lua answered {code.value!r} to a worker's append")
