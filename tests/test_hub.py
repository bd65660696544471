"""The hub delivers exactly once and in order, whatever happens around it (real Redis)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from app import events, sse
from app.events import LogEntry
from app.generations import parse_request
from app.hub import Feed, Hub, Subscription
from app.keys import new_generation_id
from app.log import GenerationLog
from app.settings import Settings
from app.sse import Frame
from tests.conftest import REDIS_URL
from tests.live import frame_of

REQUEST = parse_request(b'{"model":"sim","messages":[{"role":"user","content":"x"}]}')

operation = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 12)),
    st.tuples(st.just("subscribe"), st.integers(0, 40)),
    st.tuples(st.just("unsubscribe"), st.integers(0, 7)),
    st.tuples(st.just("consume"), st.integers(0, 7)),
    st.tuples(st.just("drop_next_live"), st.just(0)),
    st.tuples(st.just("settle"), st.just(0)),
    st.tuples(st.just("catch_up"), st.integers(0, 7)),
    st.tuples(st.just("race"), st.integers(0, 7)),
)


class Reader:
    def __init__(self, subscription: Subscription, after: int) -> None:
        self.subscription = subscription
        self.after = after
        self.parser = sse.Parser()
        self.seqs: list[int] = []

    async def consume(self, wait: float) -> bytes | None:
        """One chunk (b"" when nothing came in time, None when the subscription ended)."""
        chunk = await self.subscription.next_chunk(wait)
        if chunk:
            self.seqs.extend(int(m.id or 0) for m in self.parser.feed(chunk) if m.event != "gap")
        return chunk


async def run_program(program: list[tuple[str, int]], buffer_limit: int) -> None:
    prefix = f"tttest:{uuid.uuid4().hex[:12]}"
    redis = Redis.from_url(REDIS_URL)
    settings = Settings(key_prefix=prefix)
    log = GenerationLog(redis, settings)
    hub = Hub(log, redis, page_size=7, buffer_limit=buffer_limit, recheck_seconds=0.1)
    await hub.start()
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST)
    lease = await log.acquire(generation_id, "w")
    assert lease is not None
    last = 0
    readers: list[Reader] = []
    drop = [False]
    subscribed = False
    live_seen = [0]
    live_expected = 0  # the last seq appended while the feed was subscribed
    live_arrived = asyncio.Event()
    deliver = Feed.dispatch

    def dispatch(feed: Feed, frames: list[Frame], now: float) -> None:
        """Live batches pass a switch that can lose one, as pub/sub may."""
        live_seen[0] = max(live_seen[0], frames[-1].seq)
        live_arrived.set()
        if drop[0]:
            drop[0] = False
            return
        deliver(feed, frames, now)

    Feed.dispatch = dispatch  # type: ignore[method-assign,assignment]
    try:
        for kind, value in program:
            if kind == "append":
                batch = [events.Token(text=str(last + i + 1)) for i in range(value)]
                last = await log.append(lease, last + 1, batch)
                if subscribed:
                    live_expected = last
            elif kind == "subscribe":
                after = min(value, last)
                readers.append(Reader(await hub.subscribe(generation_id, after), after))
                subscribed = True
            elif kind == "unsubscribe" and readers:
                reader = readers.pop(value % len(readers))
                hub.unsubscribe(reader.subscription)
                assert reader.seqs == list(
                    range(reader.after + 1, reader.after + 1 + len(reader.seqs))
                )
            elif kind == "race" and readers:
                # Two appends racing a reader's read: live batches arrive mid-read (and
                # with drop_next_live before, the first is lost: a hole in what it buffers).
                async def append_twice(first: int, size: int) -> int:
                    for _ in range(2):
                        batch = [events.Token(text=str(first + i)) for i in range(size)]
                        first = await log.append(lease, first, batch) + 1
                    return first - 1

                appending = asyncio.create_task(append_twice(last + 1, 1 + value % 3))
                await readers[value % len(readers)].consume(0.01)
                last = await appending
                if subscribed:
                    live_expected = last
            elif kind == "consume" and readers:
                await readers[value % len(readers)].consume(0.01)
            elif kind == "drop_next_live":
                drop[0] = True
            elif kind == "settle":
                # Wait until the live batches of every append so far have arrived.
                async with asyncio.timeout(5):
                    while live_seen[0] < live_expected:
                        live_arrived.clear()
                        await live_arrived.wait()
            elif kind == "catch_up" and readers:
                reader = readers[value % len(readers)]
                while (reader.seqs[-1] if reader.seqs else reader.after) < last:
                    if not await reader.consume(1.0):
                        break
        last = await log.append(lease, last + 1, [events.Done(reason="stop")])
        for reader in readers:
            async with asyncio.timeout(10):
                while await reader.consume(1.0) is not None:
                    pass
            assert reader.seqs == list(range(reader.after + 1, last + 1)), reader.after
    finally:
        Feed.dispatch = deliver  # type: ignore[method-assign]
        await hub.stop()
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


# 150 programs against a real Redis: 15-25 s on an idle machine, near a minute on a
# loaded one, so it gets more than the suite's 60 s per test.
@pytest.mark.timeout(240)
@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(operation, max_size=40), buffer_limit=st.integers(1, 16))
def test_exactly_once_in_order_under_any_interleaving(
    program: list[tuple[str, int]], buffer_limit: int
) -> None:
    asyncio.run(run_program(program, buffer_limit))


async def test_a_slow_subscription_never_buffers_more_than_its_limit(
    redis: Redis, settings: Settings
) -> None:
    log = GenerationLog(redis, settings)
    hub = Hub(log, redis, buffer_limit=4)
    await hub.start()
    try:
        generation_id = new_generation_id()
        await log.create(generation_id, REQUEST)
        lease = await log.acquire(generation_id, "w")
        assert lease is not None
        subscription = await hub.subscribe(generation_id, 0)
        # Confirmed, not timed out: pub/sub commands racing to connect once lost it.
        assert hub._feeds[generation_id].confirmed.done()
        assert await subscription.next_chunk(0.2) == b""  # caught up: now live
        feed = hub._feeds[generation_id]
        entries = []
        seq = 1
        for _ in range(50):  # live batches arrive; the client reads nothing
            batch = [events.Token(text="x")] * 3
            last = await log.append(lease, seq, batch)
            entries = await log.read(generation_id, seq - 1, 3)
            feed.dispatch([frame_of(e) for e in entries], 0.0)
            assert len(subscription._pending) <= 4
            seq = last + 1
        assert subscription.fell_behind > 0
        parser = sse.Parser()
        seqs: list[int] = []
        while len(seqs) < 150:
            chunk = await subscription.next_chunk(1.0)
            assert chunk
            seqs.extend(int(m.id or 0) for m in parser.feed(chunk))
        assert seqs == list(range(1, 151))  # everything, from the log, in order
    finally:
        await hub.stop()


async def test_catch_up_never_goes_live_across_a_hole_in_what_it_buffered(
    redis: Redis, settings: Settings
) -> None:
    """Live 7 and 8 arrive while the log is read up to 5, live 6 was lost: read again."""
    log = GenerationLog(redis, settings)
    hub = Hub(log, redis)
    await hub.start()
    try:
        generation_id = new_generation_id()
        await log.create(generation_id, REQUEST)
        lease = await log.acquire(generation_id, "w")
        assert lease is not None
        await log.append(lease, 1, [events.Token(text=str(i)) for i in range(1, 6)])
        subscription = await hub.subscribe(generation_id, 0)
        ahead = [
            LogEntry(seq=seq, type="token", data=b'{"type":"token","text":"x"}', appended_ms=0)
            for seq in (7, 8)
        ]
        hub._feeds[generation_id].dispatch(
            [frame_of(e) for e in ahead], 0.0
        )  # buffered while in log mode
        parser = sse.Parser()
        first = await subscription.next_chunk(1.0)
        assert first
        assert [m.id for m in parser.feed(first)] == ["1", "2", "3", "4", "5"]
        # Now 6, 7, 8 are really appended; live or log, they must come in order.
        await log.append(lease, 6, [events.Token(text=str(i)) for i in range(6, 9)])
        seqs: list[int] = []
        async with asyncio.timeout(10):
            while len(seqs) < 3:
                chunk = await subscription.next_chunk(2.0)
                assert chunk is not None
                seqs.extend(int(m.id or 0) for m in parser.feed(chunk))
        assert seqs == [6, 7, 8]
    finally:
        await hub.stop()
