"""The hub's own pub/sub reading: replies split anywhere, confirmations, a dropped connection."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from app import events, sse
from app.generations import parse_request
from app.hub import Feed, Hub, Subscription
from app.keys import new_generation_id
from app.log import GenerationLog, Lease
from app.settings import Settings
from tests.conftest import REDIS_URL

REQUEST = parse_request(b'{"model":"sim","messages":[{"role":"user","content":"x"}]}')


def _resp(*items: bytes | int) -> bytes:
    """One RESP2 array, as Redis sends pub/sub replies."""
    out = [b"*%d\r\n" % len(items)]
    for item in items:
        if isinstance(item, int):
            out.append(b":%d\r\n" % item)
        else:
            out.append(b"$%d\r\n%b\r\n" % (len(item), item))
    return b"".join(out)


@given(
    batches=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 4)), max_size=30
    ),  # (channel: 3 = nobody's, events)
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_replies_split_anywhere_reach_their_feeds_whole_and_in_order(
    batches: list[tuple[int, int]], cuts: list[int]
) -> None:
    async def run() -> None:
        hub = Hub(GenerationLog(Redis(), Settings(key_prefix="tttest:unused")), Redis())
        feeds, subscriptions = [], []
        for i in range(3):
            feed = Feed(f"g{i}", b"live:%d" % i)
            feed.subscribe_number = 1
            hub._feeds[feed.generation_id] = feed
            hub._channels[feed.channel] = feed
            subscription = Subscription(hub, feed, 0)
            subscription._read_log = False  # live: every batch continues the last
            feed.subscriptions.add(subscription)
            feeds.append(feed)
            subscriptions.append(subscription)
        stream = [_resp(b"subscribe", f.channel, 1) for f in feeds]
        next_seq = [1, 1, 1, 1]
        expected: list[list[bytes]] = [[], [], []]
        for channel, n in batches:
            seq = next_seq[channel]
            fields = [b"%d" % seq, b"1700000000000"]
            for i in range(n):
                data = b'{"type":"token","text":"%d"}' % (seq + i)
                fields += [b"token", data]
                if channel < 3:
                    expected[channel].append(sse.event_frame(seq + i, "token", data))
            next_seq[channel] += n
            stream.append(_resp(b"message", b"live:%d" % channel, b"\n".join(fields)))
        data = b"".join(stream)
        replies = hiredis.Reader()
        start = 0
        for cut in sorted({c % (len(data) + 1) for c in cuts} | {len(data)}):
            hub._received(replies, data[start:cut], 0.0)
            start = cut
        assert all(f.confirmed.done() for f in feeds)
        for subscription, frames in zip(subscriptions, expected, strict=True):
            assert [f.data for f in subscription._pending] == frames

    asyncio.run(run())


# -- on a real Redis ---------------------------------------------------------


@pytest.fixture
async def hub(redis: Redis, settings: Settings) -> AsyncIterator[Hub]:
    # Its own client, named: a test finds its pub/sub connection in CLIENT LIST by it.
    name = f"tttest-hub-{uuid.uuid4().hex[:12]}"
    pubsub_redis = Redis.from_url(REDIS_URL, client_name=name)
    hub = Hub(GenerationLog(redis, settings), pubsub_redis, recheck_seconds=60)
    await hub.start()
    yield hub
    await hub.stop()
    await pubsub_redis.aclose()


async def _generation(hub: Hub) -> tuple[str, Lease]:
    generation_id = new_generation_id()
    await hub.log.create(generation_id, REQUEST)
    lease = await hub.log.acquire(generation_id, "w")
    assert lease is not None
    return generation_id, lease


async def _seqs(subscription: Subscription, parser: sse.Parser, until: int) -> list[int]:
    seqs: list[int] = []
    async with asyncio.timeout(5):  # well under recheck_seconds: only live or a recheck
        while not seqs or seqs[-1] < until:
            chunk = await subscription.next_chunk(1.0)
            assert chunk is not None
            seqs.extend(int(m.id or 0) for m in parser.feed(chunk))
    return seqs


async def test_concurrent_subscribes_are_each_confirmed(hub: Hub) -> None:
    generations = [await _generation(hub) for _ in range(20)]
    subscriptions = await asyncio.gather(*(hub.subscribe(g, 0) for g, _ in generations))
    assert all(hub._feeds[s.generation_id].confirmed.done() for s in subscriptions)
    for (_, lease), subscription in zip(generations, subscriptions, strict=True):
        assert await subscription.next_chunk(0.2) == b""  # caught up: live
        await hub.log.append(lease, 1, [events.Token(text="x")])
        assert await _seqs(subscription, sse.Parser(), 1) == [1]


async def test_a_channel_dropped_and_subscribed_again_stays_live(
    redis: Redis, settings: Settings
) -> None:
    hub = Hub(GenerationLog(redis, settings), redis, recheck_seconds=60)
    await hub.start()
    try:
        generation_id, lease = await _generation(hub)
        first = await hub.subscribe(generation_id, 0)
        hub.unsubscribe(first)
        feed = hub._feeds[generation_id]
        assert feed.linger is not None
        feed.linger.cancel()
        hub._drop_feed(feed)  # the linger ran out
        # Its UNSUBSCRIBE is still queued: it must not undo the SUBSCRIBE of the new feed.
        subscription = await hub.subscribe(generation_id, 0)
        await asyncio.gather(*hub._background)
        assert hub._feeds[generation_id].confirmed.done()
        assert await subscription.next_chunk(0.2) == b""
        await hub.log.append(lease, 1, [events.Token(text="x")])
        assert await _seqs(subscription, sse.Parser(), 1) == [1]
    finally:
        await hub.stop()


async def test_a_dropped_pub_sub_connection_loses_nothing(hub: Hub, redis: Redis) -> None:
    generation_id, lease = await _generation(hub)
    subscription = await hub.subscribe(generation_id, 0)
    parser = sse.Parser()
    assert await subscription.next_chunk(0.2) == b""  # caught up: live
    await hub.log.append(lease, 1, [events.Token(text="1")])
    assert await _seqs(subscription, parser, 1) == [1]

    # Hold the reconnect until events were published to nobody.
    reconnecting, go_on = asyncio.Event(), asyncio.Event()
    connect = hub._connect

    async def held_connect() -> asyncio.StreamReader:
        reconnecting.set()
        await go_on.wait()
        return await connect()

    hub._connect = held_connect  # type: ignore[method-assign]
    name = hub._pool.connection_kwargs["client_name"]
    clients = await redis.client_list()
    (pubsub,) = [c for c in clients if c["name"] == name and c["cmd"] == "subscribe"]
    await redis.client_kill_filter(_id=pubsub["id"])
    async with asyncio.timeout(5):
        await reconnecting.wait()
    await hub.log.append(lease, 2, [events.Token(text="2"), events.Token(text="3")])
    go_on.set()
    # Not live (published while unsubscribed), not the 60 s recheck: the reconnect's.
    assert await _seqs(subscription, parser, 3) == [2, 3]
    await hub.log.append(lease, 4, [events.Done(reason="stop")])
    assert await _seqs(subscription, parser, 4) == [4]
    assert len(await redis.pubsub_channels(hub.log.keys.live_channel(generation_id))) == 1


async def test_heartbeat_wait_ends_at_its_own_deadline(hub: Hub) -> None:
    generation_id, lease = await _generation(hub)
    subscription = await hub.subscribe(generation_id, 0)
    assert await subscription.next_chunk(0.05) == b""  # caught up: live
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await subscription.next_chunk(0.05) == b""
    assert loop.time() - began >= 0.05
    # A long wait ended by an event leaves its timer; a shorter wait still ends in time.
    waiting = asyncio.create_task(subscription.next_chunk(30.0))
    await hub.log.append(lease, 1, [events.Token(text="x")])
    async with asyncio.timeout(5):
        assert await waiting
    async with asyncio.timeout(1):
        assert await subscription.next_chunk(0.05) == b""
    hub.unsubscribe(subscription)
    assert subscription._timer is None


async def test_stop_ends_a_listen_loop_that_swallowed_its_cancellation(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What redis-py has been known to do when a cancellation lands mid-call: the
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
    assert all(task.done() for task in hub._loops)
