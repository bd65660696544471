"""The hub on a real Redis Cluster: one sharded pub/sub connection per primary, and a channel
a node refuses handed back to be subscribed where it lives."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from app import events, sse
from app.embedded import RedisClusterProcesses
from app.hub import Hub
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
