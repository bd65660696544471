"""StreamNotifier on a real Redis: wake-ups, the subscribe-then-read order, lost connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from app.durable_streams import notifier as notifier_module
from app.durable_streams.notifier import StreamNotifier
from app.embedded import RedisProcess


@pytest.fixture
async def notifier(redis: Redis) -> AsyncIterator[StreamNotifier]:
    notifier = StreamNotifier(redis)
    yield notifier
    await notifier.stop()


async def subscribers(redis: Redis, channel: str) -> int:
    reply = await redis.pubsub_numsub(channel)
    return int(reply[0][1])


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


async def test_watchers_share_one_connection_and_a_channel_lingers(
    notifier: StreamNotifier, redis: Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notifier_module, "LINGER_SECONDS", 0.05)
    channels = [f"{key_prefix}:a", f"{key_prefix}:b"]
    async with (
        notifier.watch(channels[0]),
        notifier.watch(channels[0]),
        notifier.watch(channels[1]),
    ):
        assert [await subscribers(redis, c) for c in channels] == [1, 1]
    async with asyncio.timeout(10):
        # What Redis holds is checked: it tells nobody when a subscription ends.
        while any([await subscribers(redis, c) for c in channels]):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    async with notifier.watch(channels[0]) as watch:  # subscribed again, and it works
        await redis.publish(channels[0], b"1")
        assert await watch.wait_for_append(10)


async def test_a_lost_connection_wakes_every_watcher_to_read_again(
    redis_server_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_server_factory()
    client = Redis.from_url(server.url, socket_timeout=None)
    notifier = StreamNotifier(client)
    try:
        async with notifier.watch("s:live") as watch:
            waiting = asyncio.create_task(watch.wait_for_append(30))
            await client.client_kill_filter(_type="pubsub")
            assert await waiting  # nothing was published: woken to read again
            async with asyncio.timeout(10):
                # Resubscribed by the reconnect, as Redis sees it.
                while await subscribers(client, "s:live") == 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            while await watch.wait_for_append(0.1):
                pass  # the wake of the resubscription, whenever its reply came
            await client.publish("s:live", b"1")
            assert await watch.wait_for_append(10)
    finally:
        await notifier.stop()
        await client.aclose()
