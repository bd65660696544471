"""The hub on a real Redis Cluster: one sharded pub/sub connection per primary, a channel
a node refuses handed back to be subscribed where it lives, and Durable Streams' watches
on the primary of their channel's slot, following it when it moves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from app import events, sse
from app.embedded import RedisClusterProcesses
from app.hub import Hub, StreamNotifier
from app.hub import notifier as notifier_module
from app.hub.pubsub import Endpoint, PubSubConnection, ShardedPubSub
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog, cluster
from tests.hub.conftest import REQUEST, read_seqs
from tests.hub.test_pubsub import Recorder

pytestmark = pytest.mark.parametrize("backend", ["cluster"], indirect=True)


async def test_the_hub_listens_on_one_connection_per_primary(
    log: GenerationLog, store_redis: RedisCluster, settings: Settings, hub_name: str
) -> None:
    await store_redis.initialize()
    primaries = {node.name: int(node.port) for node in store_redis.get_primaries()}
    generation_ids: list[str] = []
    while {cluster.node_of(store_redis, log.keys.meta(g)).name for g in generation_ids} != set(
        primaries
    ):
        generation_ids.append(new_generation_id())
    assert settings.redis_url is not None
    client = RedisCluster.from_url(settings.redis_url, client_name=hub_name)
    hub = Hub(log, client, recheck_seconds=60)
    await hub.start()
    try:
        subscriptions = [await hub.subscribe(g, 0) for g in generation_ids]
        for generation_id in generation_ids:
            await log.create(generation_id, REQUEST)
            lease = await log.acquire(generation_id, "worker-a")
            assert lease is not None
            await log.append(lease, 1, [events.Started()])
        for subscription in subscriptions:
            assert await read_seqs(subscription, sse.Parser(), until=1) == [1]
        assert isinstance(hub.pubsub, ShardedPubSub)
        assert set(hub.pubsub.connections) == set(primaries)

        def hub_connections(port: int) -> int:
            """The hub's connections to a node that hold shard channels (the cluster
            client it was built from has its own, to read the slot map)."""
            with redis.Redis(port=port) as node:
                clients = node.client_list()
            return sum(1 for c in clients if c["name"] == hub_name and int(c["ssub"]) > 0)

        counts = [await asyncio.to_thread(hub_connections, p) for p in primaries.values()]
        assert counts == [1] * len(primaries)
    finally:
        await hub.stop()
        await client.aclose()


async def test_a_channel_its_node_does_not_serve_is_handed_back(
    log: GenerationLog, redis_cluster: RedisClusterProcesses
) -> None:
    channel = log.keys.live_channel(new_generation_id()).encode()
    owner = redis_cluster.primary_of(redis.crc.key_slot(channel))
    elsewhere = next(
        node for node in map(redis_cluster.primary_of, (0, 8000, 16383)) if node is not owner
    )
    handed_back = asyncio.Event()
    lost: list[bytes] = []

    def lose(lost_channel: bytes) -> None:
        lost.append(lost_channel)
        handed_back.set()

    connection = PubSubConnection(
        Endpoint(host="127.0.0.1", port=elsewhere.port), None, sse.live_frames, lost=lose
    )
    listener = Recorder()
    connection.subscribe(channel, listener)
    listening = asyncio.create_task(connection.listen())
    try:
        async with asyncio.timeout(5):
            await handed_back.wait()  # refused with MOVED
    finally:
        connection.close()
        await listening
    assert lost == [channel]
    assert listener.confirmations == 0


@pytest.fixture
async def cluster_hub(log: GenerationLog, settings: Settings) -> AsyncIterator[Hub]:
    """A started hub on a cluster client of its own, its recheck beat too slow to matter."""
    assert settings.redis_url is not None
    client = RedisCluster.from_url(settings.redis_url)
    hub = Hub(log, client, recheck_seconds=60)
    await hub.start()
    yield hub
    await hub.stop()
    await client.aclose()


def nodes_holding(hub: Hub, channel: bytes) -> set[str]:
    assert isinstance(hub.pubsub, ShardedPubSub)
    return {name for name, each in hub.pubsub.connections.items() if channel in each.channels}


async def test_a_watch_is_woken_from_its_channels_primary_and_follows_its_slot(
    cluster_hub: Hub,
    store_redis: RedisCluster,
    redis_cluster: RedisClusterProcesses,
    key_prefix: str,
) -> None:
    notifier = StreamNotifier(cluster_hub)
    channel = f"{key_prefix}:{{ds:moving}}:live"
    slot = redis.crc.key_slot(channel.encode())
    try:
        async with notifier.watch(channel) as watch:
            owner = redis_cluster.primary_of(slot)
            assert nodes_holding(cluster_hub, channel.encode()) == {f"127.0.0.1:{owner.port}"}
            assert await store_redis.spublish(channel, b"1") == 1
            assert await watch.wait_for_append(10)

            target = next(
                node
                for node in map(redis_cluster.primary_of, (0, 8000, 16383))
                if node is not owner
            )
            await asyncio.to_thread(redis_cluster.move_slot, slot, target)
            # Nothing was published: woken to read again once subscribed on the new primary.
            assert await watch.wait_for_append(10)
            while await watch.wait_for_append(0.1):
                pass
            assert nodes_holding(cluster_hub, channel.encode()) == {f"127.0.0.1:{target.port}"}
            await store_redis.initialize()  # the test's client learns where the slot went
            assert await store_redis.spublish(channel, b"2") == 1
            assert await watch.wait_for_append(10)
    finally:
        notifier.stop()


async def test_a_watch_and_a_feed_share_a_channel_and_each_keeps_it_for_the_other(
    cluster_hub: Hub, log: GenerationLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notifier_module, "LINGER_SECONDS", 0.0)
    cluster_hub.linger_seconds = 0.0
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST)
    lease = await log.acquire(generation_id, "worker-a")
    assert lease is not None
    channel = log.keys.live_channel(generation_id)
    notifier = StreamNotifier(cluster_hub)
    try:
        async with notifier.watch(channel) as watch:  # placed by the watch
            subscription = await cluster_hub.subscribe(generation_id, 0)
            await log.append(lease, 1, [events.Started()])
            assert await watch.wait_for_append(10)
            assert await read_seqs(subscription, sse.Parser(), until=1) == [1]
            cluster_hub.unsubscribe(subscription)
            await log.append(lease, 2, [events.Token(text="x")])
            assert await watch.wait_for_append(10)
            assert len(nodes_holding(cluster_hub, channel.encode())) == 1
        subscription = await cluster_hub.subscribe(generation_id, 2)  # placed by the feed
        async with notifier.watch(channel) as watch:
            await log.append(lease, 3, [events.Done(reason="stop")])
            assert await watch.wait_for_append(10)
            assert await read_seqs(subscription, sse.Parser(), until=3) == [3]
        cluster_hub.unsubscribe(subscription)
    finally:
        notifier.stop()
