"""The store on a real Redis Cluster: a batch reaches each primary in one round trip, and a
call the cluster keeps redirecting fails as a lost connection, which callers retry."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from app import events
from app.embedded import RedisClusterProcesses, RedisProcess
from app.generations import parse_request
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog, cluster
from tests.conftest import leased_generation

pytestmark = pytest.mark.parametrize("backend", ["cluster"], indirect=True)

REQUEST = parse_request(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')


async def test_a_batch_goes_to_each_primary_in_one_round_trip(
    log: GenerationLog, store_redis: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store_redis.initialize()
    primaries = {node.name for node in store_redis.get_primaries()}
    generation_ids: list[str] = []
    while {cluster.node_of(store_redis, log.keys.meta(g)).name for g in generation_ids} != (
        primaries
    ):
        generation_ids.append(new_generation_id())
    await asyncio.gather(*(log.create(g, REQUEST) for g in generation_ids))

    taken: list[str] = []
    acquire = ClusterNode.acquire_connection

    def counted(node: ClusterNode) -> object:
        taken.append(node.name)
        return acquire(node)

    monkeypatch.setattr(ClusterNode, "acquire_connection", counted)
    states = await asyncio.gather(*(log.state(g) for g in generation_ids))
    assert [s.status if s else None for s in states] == ["queued"] * len(generation_ids)
    assert sorted(taken) == sorted(primaries)


def half_migrate(source: RedisProcess, target: RedisProcess, slot: int, key: str) -> None:
    """Start migrating `slot` from `source` to `target`, and move `key` alone."""
    with redis.Redis(port=source.port) as src, redis.Redis(port=target.port) as dst:
        dst.execute_command(
            "CLUSTER", "SETSLOT", slot, "IMPORTING", src.execute_command("CLUSTER", "MYID")
        )
        src.execute_command(
            "CLUSTER", "SETSLOT", slot, "MIGRATING", dst.execute_command("CLUSTER", "MYID")
        )
        src.execute_command("MIGRATE", "127.0.0.1", target.port, key, 0, 5000)


async def test_a_call_the_cluster_keeps_redirecting_fails_as_a_lost_connection(
    log: GenerationLog, redis_cluster: RedisClusterProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster, "REDIRECT_BUDGET_SECONDS", 0.3)
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Started()])
    meta = log.keys.meta(generation_id)
    slot = key_slot(meta.encode())
    source = redis_cluster.primary_of(slot)
    target = next(
        node for node in map(redis_cluster.primary_of, (0, 8000, 16383)) if node is not source
    )
    # A migration stuck half way: the metadata moved, the log not. The source answers
    # TRYAGAIN to a script over both, for as long as the migration lasts.
    await asyncio.to_thread(half_migrate, source, target, slot, meta)
    with pytest.raises(RedisConnectionError) as unsettled:
        await log.append(lease, 2, [events.Token(text="x")])
    assert isinstance(unsettled.value, cluster.ClusterUnsettled)

    await asyncio.to_thread(redis_cluster.move_slot, slot, target)
    # Retried, as after a lost connection: it lands on the slot's new primary.
    assert await log.append(lease, 2, [events.Token(text="x")]) == 2
    assert [e.seq for e in await log.read(generation_id, 0, 10)] == [1, 2]


async def test_routes_on_one_client_share_its_connections_to_a_node(
    settings: Settings, key_prefix: str
) -> None:
    # A reader's generation log and Durable Streams each route calls on the one client.
    assert settings.redis_url is not None
    client = RedisCluster.from_url(settings.redis_url, max_connections=3)
    try:
        await client.initialize()
        first, second = cluster.ClusterRoutes(client), cluster.ClusterRoutes(client)
        key = f"{key_prefix}:shared"
        replies = await asyncio.gather(
            *(routes.call(b"EXISTS", key, key=key) for routes in (first, second) for _ in range(20))
        )
        assert replies == [0] * 40
    finally:
        await client.aclose()
