"""Durable Streams kept in Redis: create, append, close, read, delete and fork.

Every key of a stream carries its hash tag (`app.keys.Keys.stream_keys`) and every
atomic write is one Lua script (`app.store.stream_scripts`) over those keys, sent
through the store's transport like every other command: on a Redis Cluster each call
goes to the primary that holds its stream, and live readers are woken by sharded pub/sub
from that primary alone. An entry of the log is one
append, with id `<seq>-0`; a JSON-mode entry holds the messages of its append,
comma-separated, so a read frames them as one array without parsing them.

Retention: every stream has a length cap (`max_entries_per_stream`, approximate
trimming) and a lifetime: its own TTL (sliding on reads and writes) or expiry, else
`stream_retention_seconds` after its last write.

Forks copy what they inherit: each stream stays within its own slot and lifetime,
and a source that expires or is deleted takes nothing from its forks. The source
keeps the names of its forks only so that deleting it leaves a tombstone (410, its
name not reusable) while they live, as the protocol requires; a fork that expired is
noticed the next time its source's tombstone is looked at.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.durable_streams import protocol
from app.durable_streams.errors import (
    ProducerSeqGap,
    StaleProducerEpoch,
    StreamClosed,
    StreamDeleted,
)
from app.durable_streams.protocol import Position, Producer
from app.errors import Conflict, Expired, InvalidRequest, NotFound
from app.keys import Keys
from app.settings import Settings
from app.store import transport
from app.store.cluster import ClusterRoutes, routes_for
from app.store.scripts import Reply, UnexpectedReply
from app.store.stream_scripts import (
    STREAM_ADD_FORK,
    STREAM_APPEND,
    STREAM_APPEND_SHARDED,
    STREAM_CREATE,
    STREAM_DELETE,
    STREAM_DELETE_SHARDED,
    STREAM_READ,
    AddForkArgs,
    AppendStreamArgs,
    CreateStreamArgs,
    DeleteStreamArgs,
    ForkKeys,
    ReadStreamArgs,
    StreamKeys,
)
from app.store.transport import Pipeline

# One read returns at most this much: a client pages on with Stream-Next-Offset.
PAGE_ENTRIES = 1000
PAGE_BYTES = 1 << 20
# Forking reads everything the fork inherits in one go (bounded by the length cap).
_UNBOUNDED = 1 << 62


@dataclasses.dataclass(frozen=True)
class Fork:
    """What a PUT forks from: a source stream, a position in it, and a sub-offset past it."""

    source: str
    offset: Position | None  # None: the source's tail
    sub_offset: int = 0


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    content_type: str
    ttl_seconds: int | None = None
    expires_ms: int | None = None
    closed: bool = False
    fork: Fork | None = None


@dataclasses.dataclass(frozen=True)
class Created:
    created: bool  # False: the stream existed with this configuration
    tail_seq: int
    closed: bool
    content_type: str


@dataclasses.dataclass(frozen=True)
class Page:
    """Entries after a position, as one snapshot of the stream."""

    entries: list[bytes]
    next_seq: int  # the position after the page
    tail_seq: int
    closed: bool
    content_type: str
    stream_id: str  # names this incarnation of the stream
    ttl_seconds: int | None = None
    expires_ms: int | None = None

    @property
    def up_to_date(self) -> bool:
        return self.next_seq >= self.tail_seq

    @property
    def end_of_stream(self) -> bool:
        return self.closed and self.up_to_date


@dataclasses.dataclass(frozen=True)
class Appended:
    tail_seq: int
    closed: bool
    duplicate: bool = False  # a producer's retry (or a repeated close): nothing written
    producer_seq: int | None = None  # the highest seq accepted from this producer


class StreamStore:
    """All reads and writes of Durable Streams go through here.

    Built on a Redis client its caller owns (a `RedisCluster` for a cluster); nothing
    outside `app.store` sends commands on that client.
    """

    def __init__(self, redis: Redis | RedisCluster, settings: Settings) -> None:
        self.keys = Keys(settings.key_prefix, settings.key_shards)
        timeout = settings.redis_timeout_seconds
        routes = routes_for(redis, timeout)
        self._routes = routes
        self._timeout = timeout
        sharded = isinstance(routes, ClusterRoutes)
        self._append_script = STREAM_APPEND_SHARDED if sharded else STREAM_APPEND
        self._delete_script = STREAM_DELETE_SHARDED if sharded else STREAM_DELETE
        # One batch out at a time, as the log's plain commands: a reader's requests
        # share its few connections.
        self._commands = Pipeline(routes, in_flight=1, timeout=timeout)
        self._retention_ms = str(int(settings.stream_retention_seconds * 1000))
        self._maxlen = str(settings.max_entries_per_stream)

    def channel(self, name: str) -> str:
        return self.keys.stream_channel(name)

    def _keys(self, name: str) -> StreamKeys:
        return StreamKeys(*self.keys.stream_keys(name))

    # -- create -------------------------------------------------------------

    async def create(self, name: str, config: StreamConfig, body: Sequence[bytes]) -> Created:
        """Create the stream with `body` as its first entries (none when empty), or
        confirm an existing one of the same configuration. Raises Conflict otherwise."""
        keys = self._keys(name)
        content_type, ttl, expires_ms = config.content_type, config.ttl_seconds, config.expires_ms
        fork_of, fork_offset, fork_sub = "", "", "0"
        fork_seq: int | None = None
        inherited: list[tuple[int, bytes]] = []
        fork = config.fork
        if fork is not None:
            existing = await self._commands.run(b"HGET", keys.meta, "content_type")
            if existing is None:
                content_type, ttl, expires_ms, fork_seq, inherited = await self._inherit(
                    config, fork
                )
            else:
                # A repeated PUT: compared by the script, nothing is copied. Without a
                # Content-Type a fork has its source's, so the existing one.
                content_type = content_type or existing.decode()
                if fork.offset is not None and not fork.offset.now:
                    fork_seq = fork.offset.seq
            fork_of = fork.source
            fork_offset = "1" if fork.offset is not None and not fork.offset.now else ""
            fork_sub = str(fork.sub_offset)
        first_seq = max([seq for seq, _ in inherited] + [fork_seq or 0]) + 1
        entries = inherited + [(first_seq + i, data) for i, data in enumerate(body)]
        reply = await self._commands.run_script(
            STREAM_CREATE,
            keys,
            CreateStreamArgs(
                content_type=content_type,
                ttl_seconds="" if ttl is None else str(ttl),
                expires_ms="" if expires_ms is None else str(expires_ms),
                closed="1" if config.closed else "",
                fork_of=fork_of,
                fork_seq="" if fork_seq is None else str(fork_seq),
                fork_offset=fork_offset,
                fork_sub=fork_sub,
                retention_ms=self._retention_ms,
                maxlen=self._maxlen,
                stream_id=secrets.token_urlsafe(9),
            ),
            [part for seq, data in entries for part in (str(seq), data)],
        )
        code = STREAM_CREATE.reply(reply[0])
        if code is Reply.DELETED:
            raise Conflict(
                "stream_deleted",
                f"stream {name} was deleted but forks still hold it: its name is not free yet",
            )
        if code is Reply.CONFLICT:
            raise Conflict(
                "stream_exists",
                f"stream {name} exists with another configuration (content type, TTL or "
                "expiry, closure, fork)",
            )
        if code is Reply.CREATED and fork is not None:
            source = self._keys(fork.source)
            added = await self._commands.run_script(
                STREAM_ADD_FORK,
                ForkKeys(meta=source.meta, forks=source.forks),
                AddForkArgs(fork=name),
            )
            # Every code it may answer will do (only an unexpected one raises): a source
            # deleted or gone since it was copied has no tombstone to keep.
            STREAM_ADD_FORK.reply(added[0])
        return Created(
            created=code is Reply.CREATED,
            tail_seq=int(reply[1]),
            closed=reply[2] == b"1",
            content_type=reply[3].decode(),
        )

    async def _inherit(
        self, config: StreamConfig, fork: Fork
    ) -> tuple[str, int | None, int | None, int, list[tuple[int, bytes]]]:
        """The fork's content type, TTL and expiry, the source position it forks at,
        and the entries it copies (a sub-offset's part of the next one included)."""
        try:
            source = await self.metadata(fork.source)
        except StreamDeleted:
            raise Conflict(
                "source_deleted", f"stream {fork.source} was deleted: it cannot be forked"
            ) from None
        if config.content_type and protocol.media_type(config.content_type) != protocol.media_type(
            source.content_type
        ):
            raise Conflict(
                "content_type_mismatch",
                f"a fork has its source's content type, {source.content_type}",
            )
        at_tail = fork.offset is None or fork.offset.now
        fork_seq = source.tail_seq if at_tail or fork.offset is None else fork.offset.seq
        if fork_seq > source.tail_seq:
            raise InvalidRequest(
                "invalid_fork_offset", f"{protocol.FORK_OFFSET} is past the source's tail"
            )
        through = fork_seq + (1 if fork.sub_offset else 0)
        page = await self._snapshot(
            fork.source, "0", from_start=True, count=_UNBOUNDED, budget=_UNBOUNDED, through=through
        )
        first = page.next_seq - len(page.entries) + 1
        rows = [(first + i, data) for i, data in enumerate(page.entries)]
        if fork.sub_offset:
            if not rows or rows[-1][0] != fork_seq + 1:
                raise InvalidRequest(
                    "invalid_fork_sub_offset",
                    f"{protocol.FORK_SUB_OFFSET} needs an append after {protocol.FORK_OFFSET}",
                )
            seq, data = rows.pop()
            parts: list[bytes] | bytes = (
                protocol.split_json_entry(data) if protocol.is_json(source.content_type) else data
            )
            if fork.sub_offset > len(parts):
                raise InvalidRequest(
                    "invalid_fork_sub_offset",
                    f"{protocol.FORK_SUB_OFFSET} is past the end of the append after "
                    f"{protocol.FORK_OFFSET} ({len(parts)} messages or bytes)",
                )
            kept = parts[: fork.sub_offset]
            rows.append((seq, b",".join(kept) if isinstance(kept, list) else kept))
        ttl, expires_ms = config.ttl_seconds, config.expires_ms
        if ttl is None and expires_ms is None:
            ttl, expires_ms = source.ttl_seconds, source.expires_ms
        return source.content_type, ttl, expires_ms, fork_seq, rows

    # -- append -------------------------------------------------------------

    async def append(
        self,
        name: str,
        *,
        content_type: str,
        data: bytes | None,
        close: bool = False,
        producer: Producer | None = None,
        stream_seq: str | None = None,
    ) -> Appended:
        """Append `data` (one entry) and/or close the stream. Raises the protocol's refusals."""
        reply = await self._commands.run_script(
            self._append_script,
            self._keys(name),
            AppendStreamArgs(
                body_type=protocol.media_type(content_type) if data is not None else "",
                close="1" if close else "",
                producer_id=producer.id if producer else "",
                producer_epoch=producer.epoch if producer else "",
                producer_seq=producer.seq if producer else "",
                stream_seq=stream_seq or "",
                retention_ms=self._retention_ms,
                maxlen=self._maxlen,
                channel=self.keys.stream_channel(name),
                data=data or b"",
                has_data="1" if data is not None else "",
            ),
        )
        code, tail = STREAM_APPEND.reply(reply[0]), int(reply[1])
        extra = reply[2].decode() if len(reply) > 2 else ""
        if code is Reply.OK:
            return Appended(tail, extra == "1", producer_seq=producer.seq if producer else None)
        if code is Reply.DUPLICATE:
            return Appended(tail, False, duplicate=True, producer_seq=int(extra))
        if code is Reply.CLOSED_AGAIN or code is Reply.CLOSED_DUPLICATE:
            return Appended(tail, True, duplicate=True, producer_seq=int(extra) if extra else None)
        if code is Reply.CLOSED:
            raise StreamClosed(name, tail)
        if code is Reply.MISSING:
            raise NotFound("stream_not_found", f"no stream {name}")
        if code is Reply.DELETED:
            raise StreamDeleted(message=f"stream {name} was deleted")
        if code is Reply.CONTENT_TYPE_MISMATCH:
            raise Conflict(
                "content_type_mismatch", f"the body's Content-Type is not stream {name}'s"
            )
        if code is Reply.STALE_EPOCH:
            raise StaleProducerEpoch(extra)
        if code is Reply.EPOCH_SEQ:
            raise InvalidRequest(
                "invalid_producer",
                f"a new {protocol.PRODUCER_EPOCH} starts at {protocol.PRODUCER_SEQ} 0",
            )
        if code is Reply.SEQ_GAP and producer is not None:
            raise ProducerSeqGap(extra, producer.seq)
        if code is Reply.STREAM_SEQ_REGRESSION:
            raise Conflict(
                "stream_seq_regression", f"{protocol.SEQ} must sort after the last one appended"
            )
        raise UnexpectedReply(f"stream_append.lua answered {code.value!r} to {name}")

    # -- read ---------------------------------------------------------------

    async def read(self, name: str, position: Position, *, refresh: bool = True) -> Page:
        """A page after `position`; a read slides the stream's TTL unless `refresh` is off."""
        return await self._snapshot(
            name,
            "now" if position.now else str(position.seq),
            from_start=position.start,
            count=PAGE_ENTRIES,
            budget=PAGE_BYTES,
            refresh=refresh,
        )

    async def metadata(self, name: str) -> Page:
        """The stream's tail and configuration, with no entries and no TTL refresh (HEAD)."""
        return await self._snapshot(name, "now", count=0, budget=0)

    async def _snapshot(
        self,
        name: str,
        after: str,
        *,
        count: int,
        budget: int,
        from_start: bool = False,
        through: int | None = None,
        refresh: bool = False,
    ) -> Page:
        reply: list[Any] = await self._commands.run_script(
            STREAM_READ,
            self._keys(name),
            ReadStreamArgs(
                after=after,
                from_start="1" if from_start else "",
                max_entries=count,
                max_bytes=budget,
                through="" if through is None else through,
                refresh="1" if refresh else "",
            ),
        )
        code = STREAM_READ.reply(reply[0])
        if code is Reply.MISSING:
            raise NotFound("stream_not_found", f"no stream {name}")
        if code is Reply.DELETED:
            raise StreamDeleted(message=f"stream {name} was deleted")
        if code is Reply.BEYOND:
            raise InvalidRequest("invalid_offset", "the offset is past the stream's tail")
        if code is Reply.TRIMMED:
            raise Expired(
                "offset_expired",
                "the entries after that offset are past retention; "
                f"the oldest kept is number {int(reply[1])}: read from -1",
            )
        entries: list[bytes] = reply[9::2]
        return Page(
            entries=entries,
            next_seq=int(reply[-2]) if entries else int(reply[7]),
            tail_seq=int(reply[1]),
            closed=reply[2] == b"1",
            content_type=reply[3].decode(),
            stream_id=reply[6].decode(),
            ttl_seconds=int(reply[4]) if reply[4] else None,
            expires_ms=int(reply[5]) if reply[5] else None,
        )

    async def tails(self, names: Sequence[str]) -> list[int | None]:
        """Each stream's tail (the seq of its last append), None for one that does not
        exist (or is a tombstone); looked up together, a round trip per node."""
        replies: list[list[bytes | None]] = await asyncio.gather(
            *(
                self._commands.submit(b"HMGET", self._keys(name).meta, "last_seq", "deleted")
                for name in names
            )
        )
        return [
            None if last is None or deleted is not None else int(last) for last, deleted in replies
        ]

    async def names(self, prefix: str) -> list[str]:
        """Every stream whose name starts with `prefix` (tombstones too), found by SCAN over
        all the keys (on every primary of a cluster): for a rare caller, never per request."""
        match = self.keys.stream_metas(prefix)
        if isinstance(self._routes, ClusterRoutes):
            found = await self._routes.scan(match)
        else:
            found = []
            cursor = b"0"
            while True:
                command = (b"SCAN", cursor, b"MATCH", match, b"COUNT", 1000)
                cursor, keys = await transport.call(self._routes, *command, seconds=self._timeout)
                found.extend(keys)
                if cursor == b"0":
                    break
        return sorted({self.keys.stream_of(key.decode()) for key in found})

    # -- delete -------------------------------------------------------------

    async def delete(self, name: str) -> None:
        """Delete the stream, or leave a tombstone while forks of it live."""
        await self._prune_forks(name)
        code, fork_of = await self._delete(name, purge=False)
        if code is Reply.MISSING:
            raise NotFound("stream_not_found", f"no stream {name}")
        if code is Reply.DELETED:
            if await self.collect(name):
                raise NotFound("stream_not_found", f"no stream {name}")
            raise StreamDeleted(message=f"stream {name} was deleted")
        if fork_of:
            await self._release(fork_of, name)

    async def collect(self, name: str) -> bool:
        """Remove the tombstone `name` if no fork holds it any more; whether it is gone."""
        await self._prune_forks(name)
        code, fork_of = await self._delete(name, purge=True)
        if fork_of:
            await self._release(fork_of, name)
        return code is Reply.REMOVED or code is Reply.MISSING

    async def _delete(self, name: str, *, purge: bool) -> tuple[Reply, str]:
        """stream_delete.lua's code, and the stream `name` forked if it removed a fork."""
        reply = await self._commands.run_script(
            self._delete_script,
            self._keys(name),
            DeleteStreamArgs(channel=self.keys.stream_channel(name), purge="1" if purge else ""),
        )
        code = STREAM_DELETE.reply(reply[0])
        return code, reply[1].decode() if code is Reply.REMOVED else ""

    async def _release(self, source: str, fork: str) -> None:
        """A fork of `source` is gone: the source's tombstone may go too (and up the chain)."""
        await self._commands.run(b"SREM", self._keys(source).forks, fork)
        await self.collect(source)

    async def _prune_forks(self, name: str) -> None:
        """Forget forks that expired or were replaced by a stream that is not a fork of `name`."""
        forks_key = self._keys(name).forks
        members: list[bytes] = await self._commands.run(b"SMEMBERS", forks_key)
        # Looked up in one round trip.
        origins: list[bytes | None] = await asyncio.gather(
            *(
                self._commands.submit(b"HGET", self._keys(member.decode()).meta, "fork_of")
                for member in members
            )
        )
        stale = [
            member
            for member, origin in zip(members, origins, strict=True)
            if origin != name.encode()
        ]
        if stale:
            await self._commands.run(b"SREM", forks_key, *stale)
