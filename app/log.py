"""The durable generation log on Redis: create, append, read, lease, cancel, retention.

Every write that must be atomic is one Lua script in `app/lua/` over the keys of
one generation (one hash tag, one Cluster slot); creating a generation also writes
the global indexes and the job queue. The log is a Redis Stream whose
entry ids are `<seq>-0`, so "everything after position P" is `XRANGE (P+1)-0 +`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any, cast

import msgspec
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from app import events, jobs
from app.errors import AlreadyFinished, Fenced, NotFound, SeqConflict
from app.events import Event, LogEntry
from app.generations import TERMINAL_STATUSES, GenerationRequest
from app.keys import Keys
from app.settings import Settings

RawEntry = tuple[bytes, list[bytes]]


def _script(name: str) -> str:
    return resources.files("app").joinpath("lua", f"{name}.lua").read_text()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclasses.dataclass(frozen=True)
class GenerationState:
    """A generation's metadata as the log's hash holds it."""

    id: str
    status: str
    model: str
    last_seq: int
    created_ms: int
    started_ms: int | None
    finished_ms: int | None
    last_append_ms: int | None
    finish_reason: str | None
    epoch: int
    attempts: int
    cancel_requested: bool
    # The generation span's W3C traceparent (reader spans link to it).
    traceparent: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclasses.dataclass(frozen=True)
class Lease:
    """The right to append to one generation, fenced by `epoch`."""

    generation_id: str
    worker_id: str
    epoch: int
    last_seq: int  # what the log held when the lease was taken
    attempt: int
    cancel_requested: bool


# Calls over every generation a reader streams (thousands, each recheck beat) go in
# slices: a round trip each, and only one slice's commands and replies in memory at
# once; all at once they raised an idle reader's peak RSS by ~1.5 KiB per stream.
BULK_SLICE = 256

_STATE_FIELDS = (
    "status",
    "model",
    "last_seq",
    "created_ms",
    "started_ms",
    "finished_ms",
    "last_append_ms",
    "finish_reason",
    "epoch",
    "attempts",
    "cancel_requested",
    "traceparent",
)


def _int(raw: bytes | None) -> int | None:
    return None if raw is None else int(raw)


def pack(*args: bytes | str | int) -> bytes:
    """One command in RESP, as redis-py's `pack_command` writes it, at a third of its CPU.

    A worker packs one EVALSHA of ~17 arguments per append; redis-py's packer and
    encoder were a quarter of its CPU per event.
    """
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        elif not isinstance(arg, bytes):
            # A float would be truncated by %d; redis-py refuses what it cannot encode too.
            raise TypeError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class _TickPipeline:
    """Calls requested in the same event-loop tick go to Redis as one pipeline.

    A worker running a thousand generations at 20 tokens/s appends one event per
    generation at a time, and a reader catching up a thousand streams reads a page
    each: one round trip per call would queue them all on a few connections, and
    redis-py spends more CPU per command than Redis does. The pipeline is not a
    transaction: each call stays atomic on its own, and one call's error reaches only
    its caller. A lost connection fails every call of the pipeline, applied or not,
    and nothing is re-sent here: callers retry only what is idempotent (appends,
    renewals, reads; an acquire whose reply was lost is not retried, its lease
    expires).

    Calls are queued already packed (`pack`), and sent on one connection of the
    client's pool without redis-py's pipeline machinery, which cost more CPU than
    the packing it wraps.
    """

    def __init__(self, redis: Redis, *, in_flight: int | None = None) -> None:
        self._redis = redis
        self._queued: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._sender_waiting = False  # a sender exists that has not taken the queue yet
        # With a bound, calls made while that many batches are out wait and leave
        # together in the next one: a burst makes a few large round trips instead of
        # many small ones queueing one by one for the pool's few connections.
        self._slots = asyncio.Semaphore(in_flight) if in_flight else None

    def _submit(self, command: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((command, future))
        if not self._sender_waiting:
            # Starts at the next tick (or once a batch comes back) and takes
            # everything queued by then.
            self._sender_waiting = True
            task = asyncio.create_task(self._send_queued())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        return future

    async def _send_queued(self) -> None:
        if self._slots is None:
            await self._send_batch()
            return
        try:
            await self._slots.acquire()
        except asyncio.CancelledError:
            for _, future in self._take_queued():
                future.cancel()
            raise
        try:
            await self._send_batch()
        finally:
            self._slots.release()

    def _take_queued(self) -> list[tuple[bytes, asyncio.Future[Any]]]:
        queued, self._queued = self._queued, []
        self._sender_waiting = False
        return queued

    async def _send_batch(self) -> None:
        queued = self._take_queued()
        try:
            results = await self._execute([command for command, _ in queued])
        except asyncio.CancelledError:
            for _, future in queued:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in queued:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(queued, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, commands: Sequence[bytes]) -> list[Any]:
        return await self._round_trip(commands)

    async def _round_trip(self, commands: Sequence[bytes]) -> list[Any]:
        """Each command's reply, or its error reply as the exception, in order."""
        pool = self._redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(commands)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as error:
                    replies.append(error)
            return replies
        except BaseException:
            # Replies may be left unread (a lost connection, a cancellation): the
            # socket must not serve another call.
            await connection.disconnect(nowait=True)
            raise
        finally:
            await pool.release(connection)


class _CommandPipeline(_TickPipeline):
    """Commands of many generations in one tick (reads, index upkeep): one round trip.

    Replies come back as Redis sent them (no redis-py reply callbacks).
    """

    async def run(self, *command: bytes | str | int) -> Any:
        return await self.submit(*command)

    def submit(self, *command: bytes | str | int) -> asyncio.Future[Any]:
        """`run` as a future: many calls gathered make no task each."""
        return self._submit(pack(*command))


class _ScriptPipeline(_TickPipeline):
    """Runs of one script in one tick: one pipeline of EVALSHAs."""

    def __init__(self, redis: Redis, script: AsyncScript, *, in_flight: int | None = None) -> None:
        super().__init__(redis, in_flight=in_flight)
        self._script = script
        self._sha = script.sha.encode()

    async def run(self, keys: Sequence[str], args: Sequence[bytes | str | int]) -> Any:
        return await self.submit(keys, args)

    def submit(self, keys: Sequence[str], args: Sequence[bytes | str | int]) -> asyncio.Future[Any]:
        """`run` as a future: a caller that continues in a done-callback needs no task."""
        return self._submit(pack(b"EVALSHA", self._sha, len(keys), *keys, *args))

    async def _execute(self, commands: Sequence[bytes]) -> list[Any]:
        # EVALSHA, not redis-py's Script: its pipelines check registered scripts
        # with SCRIPT EXISTS on every execute, a round trip more per batch.
        results = await self._round_trip(commands)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            # Redis lost its script cache (a restart, SCRIPT FLUSH); NOSCRIPT ran nothing.
            await self._redis.script_load(self._script.script)
            again = await self._round_trip([commands[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results


class GenerationLog:
    """All reads and writes of generation logs go through here."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._append = _ScriptPipeline(redis, redis.register_script(_script("append")))
        # A reader's requests share its few connections: one batch of each out at a time.
        self._create = _ScriptPipeline(redis, redis.register_script(_script("create")), in_flight=1)
        self._commands = _CommandPipeline(redis, in_flight=1)
        # append.lua's ARGV 3-6 (maxlen and TTLs), the same for every append: encoded once.
        self._append_limits = [
            str(n).encode()
            for n in (
                settings.max_events_per_generation,
                self._open_ttl_ms,
                self._log_ttl_ms,
                self._meta_ttl_ms,
            )
        ]
        # A burst of jobs (a thousand clients starting at once) acquires in a few round trips.
        self._acquire = _ScriptPipeline(redis, redis.register_script(_script("acquire")))
        # The lease keeper renews every held lease at once: one pipeline, not a call each.
        self._renew = _ScriptPipeline(redis, redis.register_script(_script("renew")))
        self._cancel = redis.register_script(_script("cancel"))
        # The watched marks of every stream go in one pipeline.
        self._annotate = _ScriptPipeline(redis, redis.register_script(_script("annotate")))

    # -- TTLs ---------------------------------------------------------------

    @property
    def _open_ttl_ms(self) -> int:
        # An open generation's keys outlive its last write (create, then each append)
        # by at least the abandon deadline plus retention, and expire even when no
        # sweeper runs: Redis memory never grows without bound. append.lua refreshes
        # their TTLs only now and then, to up to an eighth more (see its header).
        return int((self.settings.abandon_after_seconds + self.settings.retention_seconds) * 1000)

    @property
    def _log_ttl_ms(self) -> int:
        return int(self.settings.retention_seconds * 1000)

    @property
    def _meta_ttl_ms(self) -> int:
        s = self.settings
        return int(max(s.metadata_retention_seconds, s.retention_seconds) * 1000)

    # -- create -------------------------------------------------------------

    async def create(
        self,
        generation_id: str,
        request: GenerationRequest,
        *,
        enqueue: bool = False,
        traceparent: str | None = None,
    ) -> GenerationState:
        """Create the generation; with `enqueue`, also its job (`app.jobs`), atomically.

        Creates requested in the same loop tick share one round trip: a burst of
        POSTs must not queue one by one for the reader's few Redis connections.
        """
        created = now_ms()
        k = self.keys
        job = jobs.entry_fields(generation_id, traceparent) if enqueue else {}
        await self._create.run(
            [
                k.meta(generation_id),
                k.request(generation_id),
                k.open_generations,
                k.recent_generations,
                k.jobs,
            ],
            [
                generation_id,
                request.model,
                msgspec.json.encode(request),
                created,
                self._open_ttl_ms,
                self._meta_ttl_ms,
                *(part for field in job.items() for part in field),
            ],
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
        )

    async def request(self, generation_id: str) -> GenerationRequest | None:
        raw = await self._commands.run(b"GET", self.keys.request(generation_id))
        return None if raw is None else msgspec.json.decode(raw, type=GenerationRequest)

    # -- read ---------------------------------------------------------------

    async def state(self, generation_id: str) -> GenerationState | None:
        values = await self.redis.hmget(self.keys.meta(generation_id), _STATE_FIELDS)
        return self._state(generation_id, cast(list[bytes | None], values))

    def _state(self, generation_id: str, values: Sequence[bytes | None]) -> GenerationState | None:
        m = dict(zip(_STATE_FIELDS, values, strict=True))
        if m["status"] is None:
            return None

        def text(name: str) -> str | None:
            raw = m[name]
            return None if raw is None else raw.decode()

        return GenerationState(
            id=generation_id,
            status=text("status") or "queued",
            model=text("model") or "",
            last_seq=_int(m["last_seq"]) or 0,
            created_ms=_int(m["created_ms"]) or 0,
            started_ms=_int(m["started_ms"]),
            finished_ms=_int(m["finished_ms"]),
            last_append_ms=_int(m["last_append_ms"]),
            finish_reason=text("finish_reason") or None,
            epoch=_int(m["epoch"]) or 0,
            attempts=_int(m["attempts"]) or 0,
            cancel_requested=m["cancel_requested"] == b"1",
            traceparent=text("traceparent"),
        )

    async def read(self, generation_id: str, after_seq: int, count: int) -> list[LogEntry]:
        """Up to `count` entries with seq > after_seq, in order."""
        return [_entry(row) for row in await self.read_rows(generation_id, after_seq, count)]

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
        """`read` without building objects: `(b"<seq>-0", [b"type", type, b"data", data,
        b"t", appended_ms])` per entry (append.lua writes the fields in that order)."""
        # The command name as bytes skips redis-py's reply callback, which builds a dict
        # per entry: catch-up reads are the hot path.
        rows: list[RawEntry] = await self._commands.run(
            b"XRANGE", self.keys.log(generation_id), f"{after_seq + 1}-0", "+", "COUNT", count
        )
        return rows

    async def snapshot(self, generation_id: str) -> tuple[GenerationState | None, bool]:
        """The state and whether the log still exists, in one round trip."""
        # Both in the same tick: one round trip, shared with every other read of this tick.
        values, log_exists = await asyncio.gather(
            self._commands.run(b"HMGET", self.keys.meta(generation_id), *_STATE_FIELDS),
            self._commands.run(b"EXISTS", self.keys.log(generation_id)),
        )
        return self._state(generation_id, values), bool(log_exists)

    async def last_entry(self, generation_id: str) -> LogEntry | None:
        rows: list[RawEntry] = await self._commands.run(
            b"XREVRANGE", self.keys.log(generation_id), "+", "-", "COUNT", 1
        )
        return _entry(rows[0]) if rows else None

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
        return _entry(rows[0]).seq if rows else None

    # -- append -------------------------------------------------------------

    async def append(self, lease: Lease, first_seq: int, batch: Sequence[Event]) -> int:
        """Append `batch` as seq first_seq, first_seq+1, …; returns the last seq.

        Idempotent: retrying a batch that was applied returns without writing again.
        Raises Fenced, AlreadyFinished or SeqConflict when the writer must stop.
        """
        code, last = await self._run_append(
            lease.generation_id, str(lease.epoch), first_seq, batch, min_idle_ms=None
        )
        if code in ("ok", "duplicate"):
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
        keys, args, _ = self._append_call(
            lease.generation_id, str(lease.epoch), first_seq, batch, None
        )
        return self._append.submit(keys, args)

    def appended(self, lease: Lease, reply: Any) -> int:
        """What `append` returns or raises, from the reply of `append_soon`."""
        code, last = reply[0].decode(), int(reply[1])
        if code in ("ok", "duplicate"):
            return last
        raise _refusal(code, lease.generation_id, last)

    async def close(
        self, generation_id: str, terminal: events.TerminalEvent, *, min_idle_ms: int | None = None
    ) -> int | None:
        """Append a terminal event as the system (not a worker), fencing any lease holder.

        Returns the terminal seq, or None when the generation already ended, is gone,
        or (with `min_idle_ms`) saw an append more recently than that.
        """
        code, last = await self._run_append(generation_id, "*", 0, [terminal], min_idle_ms)
        return last if code == "ok" else None

    async def _run_append(
        self,
        generation_id: str,
        epoch: str,
        first_seq: int,
        batch: Sequence[Event],
        min_idle_ms: int | None,
    ) -> tuple[str, int]:
        keys, args, final = self._append_call(generation_id, epoch, first_seq, batch, min_idle_ms)
        result = await self._append.run(keys, args)
        code, last = result[0].decode(), int(result[1])
        if final and code == "ok":
            await self._commands.run(b"ZREM", self.keys.open_generations, generation_id)
        return code, last

    def _append_call(
        self,
        generation_id: str,
        epoch: str,
        first_seq: int,
        batch: Sequence[Event],
        min_idle_ms: int | None,
    ) -> tuple[list[str], list[bytes | str | int], bool]:
        """append.lua's KEYS and ARGV for one batch, and whether it ends the generation."""
        if not batch:
            raise ValueError("empty batch")
        for event in batch[:-1]:
            if events.is_terminal(event):
                raise ValueError("a terminal event must be the last of its batch")
        final, reason = "", ""
        last_event = batch[-1]
        if isinstance(last_event, events.Done):
            final, reason = events.status_of(last_event), last_event.reason
        elif isinstance(last_event, events.Error):
            final, reason = "error", last_event.code
        args: list[bytes | str | int] = [
            epoch,
            first_seq,
            *self._append_limits,
            self.keys.live_channel(generation_id),
            final,
            reason,
            "" if min_idle_ms is None else min_idle_ms,
            len(batch),
        ]
        for event in batch:
            args.append(events.event_type(event))
            args.append(events.encode(event))
        return self.keys.generation_keys(generation_id), args, bool(final)

    # -- leases -------------------------------------------------------------

    async def acquire(self, generation_id: str, worker_id: str) -> Lease | None:
        """Take the lease if nobody holds it; None if held or the generation ended/expired."""
        k = self.keys
        result = await self._acquire.run(
            [k.meta(generation_id), k.lease(generation_id)],
            [worker_id, int(self.settings.lease_seconds * 1000)],
        )
        if result[0] != b"ok":
            return None
        return Lease(
            generation_id=generation_id,
            worker_id=worker_id,
            epoch=int(result[1]),
            last_seq=int(result[2]),
            attempt=int(result[3]),
            cancel_requested=result[4] == b"1",
        )

    async def renew(self, lease: Lease, *, release: bool = False) -> bool:
        """Extend (or release) the lease; returns whether a cancel was requested.

        Raises Fenced when the lease is no longer ours, AlreadyFinished when the holder
        has appended the terminal event.
        """
        k = self.keys
        result = await self._renew.run(
            [k.meta(lease.generation_id), k.lease(lease.generation_id)],
            [
                lease.worker_id,
                lease.epoch,
                int(self.settings.lease_seconds * 1000),
                "1" if release else "0",
                int(self.settings.cancel_unwatched_seconds * 1000),
            ],
        )
        if result[0] == b"finished":
            raise AlreadyFinished(message=f"{lease.generation_id} already ended")
        if result[0] != b"ok":
            raise Fenced(message=f"lease on {lease.generation_id} epoch {lease.epoch} was lost")
        return bool(result[1] == b"1")

    async def mark_watched(self, generation_ids: Sequence[str]) -> None:
        """Readers stream these generations now (the unwatched-cancel policy reads it)."""
        stamp = now_ms()
        for start in range(0, len(generation_ids), BULK_SLICE):
            await asyncio.gather(
                *(
                    self._annotate.submit([self.keys.meta(generation_id)], ["watched_ms", stamp])
                    for generation_id in generation_ids[start : start + BULK_SLICE]
                )
            )

    async def set_traceparent(self, generation_id: str, traceparent: str) -> None:
        """Record the generation span's context, so reader spans can link to it."""
        await self._annotate.run([self.keys.meta(generation_id)], ["traceparent", traceparent])

    # -- cancel & retention -------------------------------------------------

    async def request_cancel(self, generation_id: str) -> GenerationState:
        """Mark the generation for cancellation; close it at once if no worker has it yet."""
        k = self.keys
        status = await self._cancel(keys=[k.meta(generation_id)])
        state = await self.state(generation_id)
        if status is None or state is None:
            raise NotFound("generation_not_found", f"no generation {generation_id}")
        if state.terminal:
            return state
        if state.status == "queued":
            await self.close(generation_id, events.Done(reason="cancelled"))
        await self.redis.publish(k.cancel_channel, generation_id)
        return await self.state(generation_id) or state

    async def sweep_abandoned(self, limit: int = 100) -> list[str]:
        """Close open generations with no append for `abandon_after_seconds`.

        Generations that ended or expired leave the open set; active ones are
        re-scored with their last activity, so each sweep only looks at candidates.
        """
        k = self.keys
        idle_ms = int(self.settings.abandon_after_seconds * 1000)
        candidates = await self.redis.zrangebyscore(
            k.open_generations, "-inf", now_ms() - idle_ms, start=0, num=limit
        )
        closed: list[str] = []
        for raw in cast(list[bytes], candidates):
            generation_id = raw.decode()
            error = events.Error(
                code="abandoned",
                message=f"no event for {self.settings.abandon_after_seconds:g} s; closed",
                retryable=True,
            )
            if await self.close(generation_id, error, min_idle_ms=idle_ms) is not None:
                closed.append(generation_id)
                continue
            state = await self.state(generation_id)
            if state is None or state.terminal:
                await self.redis.zrem(k.open_generations, generation_id)
            else:
                active = state.last_append_ms or state.created_ms
                await self.redis.zadd(k.open_generations, {generation_id: active})
        return closed


def _entry(row: RawEntry) -> LogEntry:
    """One raw XRANGE/XREVRANGE row (see `GenerationLog.read_rows`) as an entry."""
    entry_id, fields = row
    return LogEntry(
        seq=int(entry_id[:-2]),  # "<seq>-0"
        type=fields[1].decode(),
        data=fields[3],
        appended_ms=int(fields[5]),
    )


def _refusal(code: str, generation_id: str, last: int) -> Exception:
    if code == "fenced":
        return Fenced(message=f"{generation_id}: another worker holds the lease")
    if code == "already_finished":
        return AlreadyFinished(message=f"{generation_id} already ended at seq {last}")
    if code == "unknown":
        return NotFound("generation_not_found", f"no generation {generation_id}")
    return SeqConflict(message=f"{generation_id}: log is at seq {last}")
