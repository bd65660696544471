"""StreamNotifier on the hub's pub/sub connection, on a real Redis: wake-ups, the
subscribe-then-read order, one connection beside the feeds, lost connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from redis.asyncio import Redis

from app import events, sse
from app.embedded import RedisProcess
from app.hub import Hub, StreamNotifier
from app.hub import notifier as notifier_module
from app.settings import Settings
from app.store import GenerationLog
from tests.conftest import leased_generation
from tests.hub.conftest import read_seqs


@pytest.fixture
def notifier(hub: Hub) -> Iterator[StreamNotifier]:
    notifier = StreamNotifier(hub)
    yield notifier
    notifier.stop()


async def subscribers(redis: Redis, channel: str) -> int:
    reply = await redis.pubsub_numsub(channel)
    return int(reply[0][1])


async def pubsub_connections(redis: Redis, client_name: str) -> int:
    return len([c for c in await redis.client_list() if c["name"] == client_name])


async def test_a_write_wakes_the_watcher_and_silence_times_out(
    notifier: StreamNotifier, redis: Redis, key_prefix: str
) -> None:
    channel = f"{key_prefix}:live"
    async with notifier.watch(channel) as watch:
        assert not await watch.wait_for_append(0.05)
        waiting = asyncio.create_task(watch.wait_for_append(10))
        await redis.publish(channel, b"1")
        assert await waiting


async def test_a_write_between_subscribing_and_waiting_counts(
    notifier: StreamNotifier, redis: Redis, key_prefix: str
) -> None:
    channel = f"{key_prefix}:live"
    async with notifier.watch(channel) as watch:
        # Subscribed (confirmed) before the block runs: the reader would read here.
        assert await redis.publish(channel, b"1") == 1
        assert await watch.wait_for_append(10)
        assert not await watch.wait_for_append(0.01)  # that write was consumed


async def test_watchers_share_the_hubs_connection_and_a_channel_lingers(
    notifier: StreamNotifier,
    redis: Redis,
    key_prefix: str,
    hub_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(notifier_module, "LINGER_SECONDS", 0.05)
    channels = [f"{key_prefix}:a", f"{key_prefix}:b"]
    async with (
        notifier.watch(channels[0]),
        notifier.watch(channels[0]),
        notifier.watch(channels[1]),
    ):
        assert [await subscribers(redis, c) for c in channels] == [1, 1]
        assert await pubsub_connections(redis, hub_name) == 1
    async with asyncio.timeout(10):
        # What Redis holds is checked: it tells nobody when a subscription ends.
        while any([await subscribers(redis, c) for c in channels]):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    async with notifier.watch(channels[0]) as watch:  # subscribed again, and it works
        await redis.publish(channels[0], b"1")
        assert await watch.wait_for_append(10)


async def test_a_generation_watched_beside_its_feed_wakes_both_and_keeps_the_other(
    hub: Hub, notifier: StreamNotifier, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notifier_module, "LINGER_SECONDS", 0.0)
    hub.linger_seconds = 0.0
    generation_id, lease = await leased_generation(hub.log, "w")
    channel = hub.log.keys.live_channel(generation_id)
    subscription = await hub.subscribe(generation_id, 0)
    parser = sse.Parser()
    assert await subscription.next_chunk(0.2) == b""  # caught up: live
    async with notifier.watch(channel) as watch:
        await hub.log.append(lease, 1, [events.Token(text="1")])
        assert await watch.wait_for_append(10)
        assert await read_seqs(subscription, parser, 1) == [1]
        hub.unsubscribe(subscription)  # the feed goes; the watch stays subscribed
        await hub.log.append(lease, 2, [events.Token(text="2")])
        assert await watch.wait_for_append(10)
        assert await subscribers(redis, channel) == 1
    # The channel is let go of once neither holds it.
    async with asyncio.timeout(10):
        while await subscribers(redis, channel):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    # And a feed after a watch still hears its batches.
    async with notifier.watch(channel):
        subscription = await hub.subscribe(generation_id, 2)
        assert await subscription.next_chunk(0.2) == b""
        await hub.log.append(lease, 3, [events.Done(reason="stop")])
        assert await read_seqs(subscription, sse.Parser(), 3) == [3]


async def test_a_lost_connection_wakes_every_watcher_to_read_again(
    redis_server_factory: Callable[..., RedisProcess], settings: Settings
) -> None:
    server = redis_server_factory()
    client = Redis.from_url(server.url, socket_timeout=None)
    hub = Hub(GenerationLog(client, settings), client, recheck_seconds=60)
    await hub.start()
    notifier = StreamNotifier(hub)
    try:
        async with notifier.watch("s:live") as watch:
            waiting = asyncio.create_task(watch.wait_for_append(30))
            await client.client_kill_filter(_type="pubsub")
            # Nothing was published: woken to read again once subscribed again.
            assert await waiting
            assert await subscribers(client, "s:live") == 1
            while await watch.wait_for_append(0.1):
                pass
            await client.publish("s:live", b"1")
            assert await watch.wait_for_append(10)
    finally:
        notifier.stop()
        await hub.stop()
        await client.aclose()
