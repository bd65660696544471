"""The hub delivers exactly once and in order, whatever happens around it (real Redis): feeds
shared by subscriptions, channels that come and go, the recheck beat, stopping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from app import events, sse
from app.hub import Feed, Hub, Subscription
from app.hub.fanout import RECENT_BATCHES
from app.hub.pubsub import PubSubConnection
from app.keys import new_generation_id
from app.settings import Settings
from app.sse import Frame
from app.store import GenerationLog, RawEntry
from tests.conftest import REDIS_URL, leased_generation
from tests.hub.conftest import REQUEST, read_seqs

operation = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 12)),
    st.tuples(st.just("subscribe"), st.integers(0, 40)),
    # A reader whose live batches the hub writes itself while it waits (its sink).
    st.tuples(st.just("subscribe_with_sink"), st.integers(0, 40)),
    # A reader whose first page was read before it subscribed, as a GET reads it beside
    # the log's state, with appends in between.
    st.tuples(st.just("subscribe_first"), st.integers(0, 40)),
    # The generation's channel subscribed before any reader, as its creation does.
    st.tuples(st.just("listen_ahead"), st.just(0)),
    st.tuples(st.just("fall_behind"), st.integers(0, 7)),
    st.tuples(st.just("append_while_waiting"), st.integers(0, 7)),
    st.tuples(st.just("unsubscribe"), st.integers(0, 7)),
    st.tuples(st.just("consume"), st.integers(0, 7)),
    st.tuples(st.just("drop_next_live"), st.just(0)),
    st.tuples(st.just("settle"), st.just(0)),
    st.tuples(st.just("catch_up"), st.integers(0, 7)),
    st.tuples(st.just("race"), st.integers(0, 7)),
)


class Reader:
    """A client of one subscription; with `sink`, also the subscription's sink, which
    takes writes unless the client has fallen behind."""

    def __init__(self, subscription: Subscription, after: int, *, sink: bool = False) -> None:
        self.subscription = subscription
        self.after = after
        self.parser = sse.Parser()
        self.seqs: list[int] = []
        self.behind = False
        if sink:
            subscription.sink = self

    async def consume(self, wait: float) -> bytes | None:
        """One chunk (b"" when nothing came in time, None when the subscription ended)."""
        chunk = await self.subscription.next_chunk(wait)
        if chunk:
            self._read(chunk)
        return chunk

    async def catch_up(self, last: int) -> None:
        """Read until `last`, or until nothing more comes."""
        while (self.seqs[-1] if self.seqs else self.after) < last:
            if not await self.consume(1.0):
                break

    def _read(self, chunk: bytes) -> None:
        self.seqs.extend(int(m.id or 0) for m in self.parser.feed(chunk) if m.event != "gap")

    def ready(self) -> bool:
        return not self.behind

    def send(self, chunk: bytes, first_seq: int, last_seq: int, appended_ms: int) -> None:
        assert not self.behind
        before = len(self.seqs)
        self._read(chunk)
        assert self.seqs[before:] == list(range(first_seq, last_seq + 1))


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
            elif kind in ("subscribe", "subscribe_with_sink"):
                after = min(value, last)
                subscription = await hub.subscribe(generation_id, after)
                readers.append(Reader(subscription, after, sink=kind == "subscribe_with_sink"))
                subscribed = True
            elif kind == "subscribe_first":
                after = min(value, last)
                first_page = hub.first_page(generation_id, after)
                await asyncio.shield(first_page)
                batch = [events.Token(text=str(last + i + 1)) for i in range(1 + value % 3)]
                last = await log.append(lease, last + 1, batch)
                if subscribed:
                    live_expected = last
                subscription = await hub.subscribe(generation_id, after, first_page=first_page)
                readers.append(Reader(subscription, after))
                subscribed = True
            elif kind == "listen_ahead":
                feed = hub.listen_ahead(generation_id)
                if feed is not None:
                    assert await feed.until_confirmed(5)
                    subscribed = True
            elif kind == "fall_behind" and readers:
                reader = readers[value % len(readers)]
                reader.behind = not reader.behind
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
            elif kind == "append_while_waiting" and readers:
                # A reader waits, caught up, while a batch is appended: with a sink, the hub
                # writes it.
                reader = readers[value % len(readers)]
                await reader.catch_up(last)
                waiting = asyncio.create_task(reader.consume(5.0))
                await asyncio.sleep(0)  # it waits, unless something is ready for it
                batch = [events.Token(text=str(last + i + 1)) for i in range(1 + value % 3)]
                last = live_expected = await log.append(lease, last + 1, batch)
                async with asyncio.timeout(5):
                    while live_seen[0] < last:
                        live_arrived.clear()
                        await live_arrived.wait()
                await asyncio.sleep(0)  # the hub's flush
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
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
                await readers[value % len(readers)].catch_up(last)
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


async def test_concurrent_subscribes_are_each_confirmed(hub: Hub) -> None:
    generations = [await leased_generation(hub.log, "w") for _ in range(20)]
    subscriptions = await asyncio.gather(*(hub.subscribe(g, 0) for g, _ in generations))
    assert all(s.feed.confirmed for s in subscriptions)
    for (_, lease), subscription in zip(generations, subscriptions, strict=True):
        assert await subscription.next_chunk(0.2) == b""  # caught up: live
        await hub.log.append(lease, 1, [events.Token(text="x")])
        assert await read_seqs(subscription, sse.Parser(), 1) == [1]


async def test_a_subscribe_cancelled_before_its_channel_is_confirmed_leaves_nothing(
    redis: Redis, settings: Settings
) -> None:
    # A hub not started confirms no channel: the subscribe waits, as it does for the
    # SUBSCRIBE's reply, when its client goes away and its stream's task is cancelled.
    hub = Hub(GenerationLog(redis, settings), redis, recheck_seconds=60, linger_seconds=0)
    generation_id, _ = await leased_generation(hub.log, "w")
    subscribing = asyncio.create_task(hub.subscribe(generation_id, 0))
    async with asyncio.timeout(5):
        await hub.until_subscriptions(1)
    subscribing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await subscribing
    assert hub.subscription_count == 0
    assert isinstance(hub.pubsub, PubSubConnection)
    assert hub.pubsub.channels == []  # its channel dropped with its feed


async def test_a_subscription_without_its_live_channel_reads_the_log_alone(
    redis: Redis, settings: Settings
) -> None:
    # A hub not started confirms no channel: a live subscribe would wait for it.
    hub = Hub(GenerationLog(redis, settings), redis, recheck_seconds=60, linger_seconds=0)
    generation_id, lease = await leased_generation(hub.log, "w")
    await hub.log.append(lease, 1, [events.Token(text="x"), events.Done(reason="stop")])
    async with asyncio.timeout(5):
        subscription = await hub.subscribe(generation_id, 0, live=False)
    assert isinstance(hub.pubsub, PubSubConnection)
    assert hub.pubsub.channels == []
    assert await read_seqs(subscription, sse.Parser(), 2) == [1, 2]
    assert await subscription.next_chunk(0.1) is None  # its terminal event handed out
    hub.unsubscribe(subscription)
    assert hub.subscription_count == 0


async def test_a_live_subscription_joining_a_feed_without_its_channel_subscribes_it(
    hub: Hub,
) -> None:
    generation_id, lease = await leased_generation(hub.log, "w")
    reading = await hub.subscribe(generation_id, 0, live=False)
    live = await hub.subscribe(generation_id, 0)
    assert live.feed is reading.feed
    assert live.feed.confirmed
    assert await live.next_chunk(0.2) == b""  # caught up: live
    await hub.log.append(lease, 1, [events.Token(text="x")])
    assert await read_seqs(live, sse.Parser(), 1) == [1]
    assert await read_seqs(reading, sse.Parser(), 1) == [1]


async def test_what_follows_an_early_page_is_read_from_the_log_once_subscribed(
    hub: Hub,
) -> None:
    # The last event comes between the early read and the subscribe: no live batch will
    # show its absence, and the recheck beat (60 s here) is too slow to.
    generation_id, lease = await leased_generation(hub.log, "w")
    await hub.log.append(lease, 1, [events.Token(text="x")])
    early = hub.read_page(generation_id, 0)
    await asyncio.shield(early)
    await hub.log.append(lease, 2, [events.Done(reason="stop")])
    subscription = await hub.subscribe(generation_id, 0, first_page=early)
    assert await read_seqs(subscription, sse.Parser(), 2) == [1, 2]


async def test_what_follows_an_early_page_without_a_channel_is_read_from_the_log(
    redis: Redis, settings: Settings
) -> None:
    # Its state said ended, but its page was read before the terminal event came: the
    # log is all a subscription without a channel has (this hub, not started, has no
    # recheck beat either).
    hub = Hub(GenerationLog(redis, settings), redis, recheck_seconds=60, linger_seconds=0)
    generation_id, lease = await leased_generation(hub.log, "w")
    await hub.log.append(lease, 1, [events.Token(text="x")])
    early = hub.read_page(generation_id, 0)
    await asyncio.shield(early)
    await hub.log.append(lease, 2, [events.Done(reason="stop")])
    subscription = await hub.subscribe(generation_id, 0, live=False, first_page=early)
    assert await read_seqs(subscription, sse.Parser(), 2) == [1, 2]
    assert await subscription.next_chunk(0.1) is None


class HeldReads:
    """The log's reads run, then wait to answer until `answer`."""

    def __init__(self, log: GenerationLog, monkeypatch: pytest.MonkeyPatch) -> None:
        self.executed, self._release = asyncio.Event(), asyncio.Event()
        self._log, self._read_rows, self._monkeypatch = log, log.read_rows, monkeypatch
        monkeypatch.setattr(log, "read_rows", self._held)

    async def _held(self, generation_id: str, after_seq: int, count: int) -> list[RawEntry]:
        rows = await self._read_rows(generation_id, after_seq, count)
        self.executed.set()
        await self._release.wait()
        return rows

    def answer(self) -> None:
        """Answer the reads held; the next ones answer at once."""
        self._monkeypatch.setattr(self._log, "read_rows", self._read_rows)
        self._release.set()


class CountedReads:
    """How many times the log is read."""

    def __init__(self, log: GenerationLog, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count, self._read_rows = 0, log.read_rows
        monkeypatch.setattr(log, "read_rows", self._counted)

    async def _counted(self, generation_id: str, after_seq: int, count: int) -> list[RawEntry]:
        self.count += 1
        return await self._read_rows(generation_id, after_seq, count)


class HeardBatches:
    """How many live batches the feeds have heard."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count, self._changed, dispatch = 0, asyncio.Event(), Feed.dispatch

        def dispatched(feed: Feed, frames: list[Frame], now: float) -> None:
            dispatch(feed, frames, now)
            self.count += 1
            self._changed.set()

        monkeypatch.setattr(Feed, "dispatch", dispatched)

    async def until(self, count: int) -> None:
        async with asyncio.timeout(5):
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()


def seqs_of(chunk: bytes | None) -> list[int]:
    return [int(m.id or 0) for m in sse.Parser().feed(chunk or b"")]


async def test_a_subscription_sharing_a_read_begun_before_a_live_batch_reads_again(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read in flight is shared with a subscription made after a live batch it does not
    # hold: that batch was offered to the subscriptions of the moment only. The batch is
    # the generation's last, so no later one shows its absence, and the recheck beat
    # (60 s here) is too slow to.
    generation_id, lease = await leased_generation(hub.log, "w")
    first = await hub.subscribe(generation_id, 0)
    held, heard = HeldReads(hub.log, monkeypatch), HeardBatches(monkeypatch)
    async with asyncio.timeout(5):
        reading = asyncio.create_task(first.next_chunk(5.0))
        await held.executed.wait()
        await hub.log.append(lease, 1, [events.Done(reason="stop")])
        await heard.until(1)
    second = await hub.subscribe(generation_id, 0)
    joining = asyncio.create_task(second.next_chunk(5.0))
    await asyncio.sleep(0)  # it asks for the page: the read in flight
    held.answer()
    assert seqs_of(await reading) == [1]
    assert seqs_of(await joining) == [1]


async def test_a_read_sent_before_the_channel_was_confirmed_is_not_caught_up(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader of the log alone (its generation had ended, by its state) is reading when
    # a live reader joins the feed: what was appended before the live reader's channel was
    # confirmed reaches it neither live nor in that read.
    generation_id, lease = await leased_generation(hub.log, "w")
    alone = await hub.subscribe(generation_id, 0, live=False)
    held = HeldReads(hub.log, monkeypatch)
    async with asyncio.timeout(5):
        reading = asyncio.create_task(alone.next_chunk(0.5))
        await held.executed.wait()
        await hub.log.append(lease, 1, [events.Done(reason="stop")])
        live = await hub.subscribe(generation_id, 0)
    assert live.feed is alone.feed
    assert live.feed.confirmed
    joining = asyncio.create_task(live.next_chunk(5.0))
    await asyncio.sleep(0)  # it asks for the page: the read in flight
    held.answer()
    assert seqs_of(await joining) == [1]
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading


async def test_a_generation_listened_ahead_is_read_once_then_live(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its channel is confirmed before its reader comes: the page read beside the log's
    # state is caught up, and live delivery takes over without reading the log again.
    generation_id, lease = await leased_generation(hub.log, "w")
    await hub.log.append(lease, 1, [events.Token(text="x")])
    feed = hub.listen_ahead(generation_id)
    assert feed is not None
    assert await feed.until_confirmed(5)
    reads = CountedReads(hub.log, monkeypatch)
    first_page = hub.first_page(generation_id, 0)
    subscription = await hub.subscribe(generation_id, 0, first_page=first_page)
    assert subscription.feed is feed
    parser = sse.Parser()
    assert await read_seqs(subscription, parser, 1) == [1]
    assert await subscription.next_chunk(0.1) == b""  # live
    await hub.log.append(lease, 2, [events.Done(reason="stop")])
    assert await read_seqs(subscription, parser, 2) == [2]
    assert reads.count == 1


@pytest.mark.parametrize(
    ("batches", "reads"), [(1, 0), (RECENT_BATCHES, 0), (RECENT_BATCHES + 1, 1)]
)
async def test_batches_heard_between_a_first_page_and_its_subscribe_are_offered_or_read(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, batches: int, reads: int
) -> None:
    # The page was read under a confirmed channel; the generation's next batches, its last
    # among them, were heard before the subscription was there to be offered them. The
    # feed kept the last RECENT_BATCHES for it; past those, the log is read again.
    generation_id, lease = await leased_generation(hub.log, "w")
    feed = hub.listen_ahead(generation_id)
    assert feed is not None
    assert await feed.until_confirmed(5)
    first_page = hub.first_page(generation_id, 0)
    assert (await asyncio.shield(first_page)).rows == []
    heard = HeardBatches(monkeypatch)
    for seq in range(1, batches + 1):
        last = seq == batches
        await hub.log.append(
            lease, seq, [events.Done(reason="stop") if last else events.Token(text="x")]
        )
    await heard.until(batches)
    counted = CountedReads(hub.log, monkeypatch)
    subscription = await hub.subscribe(generation_id, 0, first_page=first_page)
    assert await read_seqs(subscription, sse.Parser(), batches) == list(range(1, batches + 1))
    assert counted.count == reads


async def test_a_channel_listened_ahead_goes_unless_a_reader_comes(hub: Hub, redis: Redis) -> None:
    read, unread = new_generation_id(), new_generation_id()
    read_channel, unread_channel = (hub.log.keys.live_channel(g) for g in (read, unread))
    feed = hub.listen_ahead(read)  # waits LISTEN_AHEAD_SECONDS for its reader
    hub.linger_seconds = 1.0  # caps that: long enough to see the channel subscribed
    unread_feed = hub.listen_ahead(unread)
    assert hub.listen_ahead(read) is None  # it has its feed
    assert feed is not None
    assert await feed.until_confirmed(5)
    assert unread_feed is not None
    assert await unread_feed.until_confirmed(5)
    assert await redis.pubsub_numsub(unread_channel) == [(unread_channel.encode(), 1)]
    subscription = await hub.subscribe(read, 0)
    assert subscription.feed is feed
    assert feed.linger is None  # its reader keeps it
    async with asyncio.timeout(10):
        # What Redis holds is checked: it tells nobody when a channel is let go.
        while await redis.pubsub_numsub(unread_channel) != [(unread_channel.encode(), 0)]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert await redis.pubsub_numsub(read_channel) == [(read_channel.encode(), 1)]


async def test_a_channel_dropped_and_subscribed_again_stays_live(
    redis: Redis, settings: Settings
) -> None:
    # No linger: the last unsubscribe drops the feed and its channel at once.
    hub = Hub(GenerationLog(redis, settings), redis, recheck_seconds=60, linger_seconds=0)
    await hub.start()
    try:
        generation_id, lease = await leased_generation(hub.log, "w")
        first = await hub.subscribe(generation_id, 0)
        hub.unsubscribe(first)
        # Its UNSUBSCRIBE is not answered yet: it must not undo the SUBSCRIBE of the new feed.
        subscription = await hub.subscribe(generation_id, 0)
        assert subscription.feed is not first.feed
        assert subscription.feed.confirmed
        assert await subscription.next_chunk(0.2) == b""
        await hub.log.append(lease, 1, [events.Token(text="x")])
        assert await read_seqs(subscription, sse.Parser(), 1) == [1]
        channel = hub.log.keys.live_channel(generation_id)
        assert await redis.pubsub_numsub(channel) == [(channel.encode(), 1)]
    finally:
        await hub.stop()


async def test_a_failed_recheck_is_logged_and_the_next_beat_runs(
    redis: Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = GenerationLog(redis, settings)
    hub = Hub(log, redis, recheck_seconds=0.1)
    await hub.start()
    try:
        generation_id, lease = await leased_generation(log, "w")
        subscription = await hub.subscribe(generation_id, 0)
        assert await subscription.next_chunk(0.2) == b""  # caught up: live
        # Live batch 1 is lost: only a recheck can find it.
        lost = asyncio.Event()
        dispatch = Feed.dispatch

        def lose_one(feed: Feed, frames: list[Frame], now: float) -> None:
            monkeypatch.setattr(Feed, "dispatch", dispatch)
            lost.set()

        monkeypatch.setattr(Feed, "dispatch", lose_one)
        last_seqs = log.last_seqs
        failed = asyncio.Event()

        async def broken_once(generation_ids: list[str]) -> list[int]:
            monkeypatch.setattr(log, "last_seqs", last_seqs)
            failed.set()
            raise RuntimeError("a bug in the recheck")

        monkeypatch.setattr(log, "last_seqs", broken_once)
        caplog.set_level(logging.ERROR, "tokentape.loops")
        await log.append(lease, 1, [events.Token(text="1")])
        async with asyncio.timeout(5):
            await lost.wait()
            await failed.wait()
        assert await read_seqs(subscription, sse.Parser(), 1) == [1]
        (failure,) = [r for r in caplog.records if r.name == "tokentape.loops"]
        assert failure.getMessage().startswith("hub-recheck failed")
        assert failure.exc_info is not None
    finally:
        await hub.stop()


async def test_stop_ends_a_listen_loop_that_swallowed_its_cancellation(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What libraries have been known to do when a cancellation lands mid-call: the
    # listen loop goes on reading. stop() must still end it, not wait forever.
    hub = Hub(GenerationLog(redis, settings), redis, recheck_seconds=60)
    reading = asyncio.Event()
    original = asyncio.StreamReader.read

    async def read_swallowing_one_cancel(stream: asyncio.StreamReader, n: int = -1) -> bytes:
        reading.set()
        try:
            return await original(stream, n)
        except asyncio.CancelledError:
            monkeypatch.setattr(asyncio.StreamReader, "read", original)
            return await original(stream, n)

    monkeypatch.setattr(asyncio.StreamReader, "read", read_swallowing_one_cancel)
    await hub.start()
    await reading.wait()
    stopping = asyncio.create_task(hub.stop())
    # A bound on a hang, not a speed check: without the fix stop() never returns.
    await asyncio.wait([stopping], timeout=10)
    assert stopping.done()
    assert not hub.running
