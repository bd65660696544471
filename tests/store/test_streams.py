"""The Durable Streams store on a real Redis: what the protocol's HTTP tests cannot see.

Producer and closure refusals in their precedence, byte-wise Stream-Seq order,
retention (length cap, TTLs), snapshots, fork tombstones with their collection, and
the transport every call goes through. What crosses streams (forks, tombstones) and the
core of each write runs on a Redis Cluster too (`ON_EVERY_BACKEND`), where a fork and its
source live in different slots.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
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
from app.settings import Settings
from app.store import UnexpectedReply
from app.store.streams import Fork, StreamConfig, StreamStore
from app.store.transport import Pipeline
from tests.conftest import ON_EVERY_BACKEND
from tests.store.conftest import count_round_trips

TEXT = StreamConfig(content_type="text/plain")
START = Position(start=True)


@pytest.fixture
def store(store_redis: Redis | RedisCluster, settings: Settings) -> StreamStore:
    return StreamStore(store_redis, settings)


async def append(store: StreamStore, name: str, data: bytes, **options: object) -> int:
    appended = await store.append(name, content_type="text/plain", data=data, **options)  # type: ignore[arg-type]
    return appended.tail_seq


@ON_EVERY_BACKEND
async def test_create_is_idempotent_on_the_same_configuration(store: StreamStore) -> None:
    created = await store.create("s", TEXT, [b"first"])
    assert (created.created, created.tail_seq, created.closed) == (True, 1, False)
    again = await store.create("s", StreamConfig(content_type="TEXT/PLAIN".lower()), [b"ignored"])
    assert (again.created, again.tail_seq) == (False, 1)
    for other in [
        StreamConfig(content_type="application/json"),
        StreamConfig(content_type="text/plain", ttl_seconds=60),
        StreamConfig(content_type="text/plain", closed=True),
    ]:
        with pytest.raises(Conflict):
            await store.create("s", other, [])


@ON_EVERY_BACKEND
async def test_producer_sequence_epochs_and_duplicates(store: StreamStore) -> None:
    await store.create("s", TEXT, [])
    p = "writer"
    first = await store.append(
        "s", content_type="text/plain", data=b"a", producer=Producer(p, 0, 0)
    )
    assert (first.tail_seq, first.duplicate, first.producer_seq) == (1, False, 0)
    await store.append("s", content_type="text/plain", data=b"b", producer=Producer(p, 0, 1))
    retry = await store.append(
        "s", content_type="text/plain", data=b"a", producer=Producer(p, 0, 0)
    )
    assert (retry.tail_seq, retry.duplicate, retry.producer_seq) == (2, True, 1)
    with pytest.raises(ProducerSeqGap) as gap:
        await store.append("s", content_type="text/plain", data=b"x", producer=Producer(p, 0, 3))
    assert gap.value.headers == {"Producer-Expected-Seq": "2", "Producer-Received-Seq": "3"}
    with pytest.raises(InvalidRequest):  # a new epoch starts at 0
        await store.append("s", content_type="text/plain", data=b"x", producer=Producer(p, 1, 1))
    await store.append("s", content_type="text/plain", data=b"c", producer=Producer(p, 1, 0))
    with pytest.raises(StaleProducerEpoch) as stale:
        await store.append("s", content_type="text/plain", data=b"z", producer=Producer(p, 0, 2))
    assert stale.value.headers == {"Producer-Epoch": "1"}
    page = await store.read("s", START)
    assert page.entries == [b"a", b"b", b"c"]


@ON_EVERY_BACKEND
async def test_a_closed_stream_refuses_appends_but_repeats_of_its_close_succeed(
    store: StreamStore,
) -> None:
    await store.create("s", TEXT, [b"x"])
    closing = Producer("p", 0, 0)
    closed = await store.append(
        "s", content_type="text/plain", data=b"last", close=True, producer=closing
    )
    assert (closed.tail_seq, closed.closed, closed.duplicate) == (2, True, False)
    repeat = await store.append(
        "s", content_type="text/plain", data=b"other body", close=True, producer=closing
    )
    assert (repeat.tail_seq, repeat.closed, repeat.duplicate) == (2, True, True)
    bare = await store.append("s", content_type="", data=None, close=True)
    assert (bare.closed, bare.duplicate) == (True, True)
    # Closure comes first: even a wrong content type hears that the stream is closed.
    with pytest.raises(StreamClosed) as refused:
        await store.append("s", content_type="application/json", data=b"1")
    assert refused.value.headers == {
        "Stream-Closed": "true",
        "Stream-Next-Offset": protocol.format_offset(2),
    }
    assert (await store.read("s", START)).entries == [b"x", b"last"]


async def test_stream_seq_sorts_bytewise_whatever_the_locale(store: StreamStore) -> None:
    await store.create("s", TEXT, [])
    await append(store, "s", b"1", stream_seq="a")
    with pytest.raises(Conflict):
        await append(store, "s", b"2", stream_seq="B")  # "B" < "a" in bytes, not in en_US
    await append(store, "s", b"2", stream_seq="b")
    with pytest.raises(Conflict):
        await append(store, "s", b"3", stream_seq="b")
    await append(store, "s", b"3", stream_seq="ba")


async def test_retention_trims_the_log_and_an_offset_before_it_is_gone(
    redis: Redis, settings: Settings
) -> None:
    # Trimming is approximate: Redis drops whole nodes of 100 entries.
    store = StreamStore(redis, settings.replace(max_entries_per_stream=10))
    await store.create("s", TEXT, [])
    for i in range(350):
        await append(store, "s", b"%d," % i)
    with pytest.raises(Expired) as gone:
        await store.read("s", Position(seq=1))
    assert gone.value.code == "offset_expired"
    page = await store.read("s", START)
    first = page.next_seq - len(page.entries) + 1
    assert 1 < first <= 341
    assert page.entries[0] == b"%d," % (first - 1)
    assert (await store.read("s", Position(seq=349))).entries == [b"349,"]


@ON_EVERY_BACKEND
async def test_every_stream_has_a_lifetime(
    store: StreamStore, store_redis: Redis | RedisCluster, settings: Settings
) -> None:
    keys = store.keys.stream_keys
    await store.create("kept", TEXT, [b"x"])
    retention_ms = settings.stream_retention_seconds * 1000
    assert retention_ms - 5000 < await store_redis.pttl(keys("kept")[1]) <= retention_ms

    await store.create("ttl", StreamConfig(content_type="text/plain", ttl_seconds=60), [b"x"])
    await append(store, "ttl", b"y", producer=Producer("p", 0, 0))
    for key in keys("ttl")[:3]:
        assert 55_000 < await store_redis.pttl(key) <= 60_000
    for key in keys("ttl")[:3]:
        await store_redis.pexpire(key, 10_000)
    await store.metadata("ttl")  # HEAD does not slide the TTL
    assert await store_redis.pttl(keys("ttl")[0]) <= 10_000
    await store.read("ttl", START)  # a read does
    assert await store_redis.pttl(keys("ttl")[0]) > 55_000

    expires_ms = int(time.time() * 1000) + 3_600_000
    await store.create("until", StreamConfig(content_type="text/plain", expires_ms=expires_ms), [])
    await append(store, "until", b"x")
    for key in keys("until")[:2]:
        assert await store_redis.pexpiretime(key) == expires_ms


async def test_a_read_snapshot_says_closed_only_at_the_tail(store: StreamStore) -> None:
    await store.create("s", TEXT, [b"a", b"b"])
    await store.append("s", content_type="", data=None, close=True)
    partial = await store.read("s", Position(seq=1))
    assert (partial.entries, partial.up_to_date, partial.end_of_stream) == ([b"b"], True, True)
    at_tail = await store.read("s", Position(now=True))
    assert (at_tail.entries, at_tail.end_of_stream) == ([], True)
    with pytest.raises(InvalidRequest):
        await store.read("s", Position(seq=3))


@ON_EVERY_BACKEND
async def test_forks_copy_what_they_inherit(store: StreamStore) -> None:
    await store.create("src", TEXT, [b"a", b"b", b"cdef"])
    fork = Fork("src", Position(seq=2), sub_offset=2)
    created = await store.create("f", StreamConfig(content_type="", fork=fork), [b"!"])
    assert (created.tail_seq, created.content_type) == (4, "text/plain")
    assert (await store.read("f", START)).entries == [b"a", b"b", b"cd", b"!"]
    await store.delete("src")
    with pytest.raises(StreamDeleted):
        await store.read("src", START)
    assert (await store.read("f", START)).entries == [b"a", b"b", b"cd", b"!"]


@ON_EVERY_BACKEND
async def test_a_tombstone_goes_with_its_last_fork_up_the_chain(store: StreamStore) -> None:
    await store.create("l0", TEXT, [b"x"])
    await store.create("l1", StreamConfig(content_type="", fork=Fork("l0", None)), [])
    await store.create("l2", StreamConfig(content_type="", fork=Fork("l1", None)), [])
    await store.delete("l0")
    await store.delete("l1")
    with pytest.raises(Conflict):  # the name is held while forks live
        await store.create("l0", TEXT, [])
    await store.delete("l2")
    for name in ("l0", "l1", "l2"):
        with pytest.raises(NotFound):
            await store.metadata(name)


@ON_EVERY_BACKEND
async def test_a_fork_that_expired_frees_its_source_when_the_source_is_next_looked_at(
    store: StreamStore, store_redis: Redis | RedisCluster
) -> None:
    await store.create("src", TEXT, [b"x"])
    await store.create("f", StreamConfig(content_type="", fork=Fork("src", None)), [])
    await store.delete("src")
    await store_redis.delete(*store.keys.stream_keys("f"))  # as its TTL would
    assert await store.collect("src")
    with pytest.raises(NotFound):
        await store.metadata("src")


async def test_calls_of_one_tick_share_a_round_trip(
    store: StreamStore, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "b"):
        await store.create(name, TEXT, [b"x"])
    round_trips = count_round_trips(monkeypatch, redis)
    first, second, tail = await asyncio.gather(
        store.read("a", START),
        store.read("b", START),
        store.metadata("a"),
    )
    assert (first.entries, second.entries, tail.tail_seq) == ([b"x"], [b"x"], 1)
    assert len(round_trips) == 1


async def test_an_unknown_reply_code_raises_instead_of_passing_for_another(
    store: StreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.create("s", TEXT, [])

    async def answering_a_new_code(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        return [b"no_such_code", b"1"]

    monkeypatch.setattr(Pipeline, "run_script", answering_a_new_code)
    with pytest.raises(UnexpectedReply, match=r"stream_append\.lua answered b'no_such_code'"):
        await store.append("s", content_type="text/plain", data=b"x")
    with pytest.raises(UnexpectedReply, match=r"stream_read\.lua answered b'no_such_code'"):
        await store.read("s", START)


@ON_EVERY_BACKEND
async def test_streams_are_found_by_prefix_with_their_tails(store: StreamStore) -> None:
    # Enough names that a cluster spreads them over every primary.
    names = [f"events/{i}" for i in range(12)]
    for i, name in enumerate(names):
        await store.create(name, TEXT, [b"x"] * (i % 3))
    await store.create("other/0", TEXT, [])
    found = await store.names("events/")
    assert found == sorted(names)
    assert await store.tails(["events/1", "events/2", "missing"]) == [1, 2, None]
    await store.create("events/src", TEXT, [b"x"])
    await store.create("fork", StreamConfig(content_type="", fork=Fork("events/src", None)), [])
    await store.delete("events/src")  # a tombstone has no tail
    assert await store.tails(["events/src"]) == [None]
