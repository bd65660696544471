"""Subscriptions kept in Redis: cursors, one wake at a time handed to one deliverer, acks
fenced by generation, leases that run out, and the deliveries due. The wake's life runs
on a Redis Cluster too (`ON_EVERY_BACKEND`), where streams and subscriptions live in
different slots."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.durable_streams.errors import (
    AlreadyClaimed,
    InvalidAckOffset,
    InvalidSubscriptionRequest,
    NoPendingWork,
    SubscriptionExists,
    SubscriptionNotFound,
    WakeFenced,
)
from app.durable_streams.subscriptions import (
    Interest,
    Pattern,
    StreamLink,
    SubscriptionConfig,
    Wake,
    parse_config,
)
from app.settings import Settings
from app.store.subscriptions import SubscriptionStore
from tests.conftest import ON_EVERY_BACKEND

HOOK = parse_config(
    b'{"type":"webhook","pattern":"events/*","webhook":{"url":"https://h.example/w"}}'
)
PULL = parse_config(b'{"type":"pull-wake","pattern":"events/*","wake_stream":"wake/pool"}')
BASE = "https://tokentape.example"
ATTEMPT_MS = 60_000


@pytest.fixture
def store(store_redis: Redis | RedisCluster, settings: Settings) -> SubscriptionStore:
    return SubscriptionStore(store_redis, settings)


async def created(
    store: SubscriptionStore, config: SubscriptionConfig, *links: tuple[str, str, int]
) -> str:
    await store.create("sub", config, BASE, links)
    return "sub"


async def due_now(store: SubscriptionStore) -> list[str]:
    ready, _, _ = await store.due(10)
    return ready


async def run_out_lease(store_redis: Redis | RedisCluster, store: SubscriptionStore) -> None:
    """What the lease's end does, without waiting for it."""
    await store_redis.hset(store.keys.subscription_keys("sub")[0], "lease_until", "1")


@ON_EVERY_BACKEND
async def test_a_put_again_confirms_and_another_configuration_conflicts(
    store: SubscriptionStore,
) -> None:
    assert await store.create("sub", HOOK, BASE, [("events/old", "g", 4), ("m/a", "e", 0)])
    assert not await store.create("sub", HOOK, BASE, [])
    with pytest.raises(SubscriptionExists) as refused:
        await store.create("sub", PULL, BASE, [])
    assert refused.value.code == "SUBSCRIPTION_ALREADY_EXISTS"
    subscription = await store.read("sub")
    assert subscription.config.config_hash == HOOK.config_hash
    assert subscription.links == (
        StreamLink("events/old", explicit=False, acked_seq=4, tail_seq=4),
        StreamLink("m/a", explicit=True, acked_seq=0, tail_seq=0),
    )
    await store.delete("sub")
    with pytest.raises(SubscriptionNotFound):
        await store.read("sub")


@ON_EVERY_BACKEND
async def test_a_write_issues_one_wake_that_one_deliverer_gets_and_done_acks_what_it_showed(
    store: SubscriptionStore,
) -> None:
    await created(store, HOOK, ("events/a", "g", 2))
    assert not await store.touch("sub", [("events/a", 2, "g")])  # nothing new
    assert await store.touch("sub", [("events/a", 3, "g"), ("events/new", 1, "g")])
    assert await due_now(store) == ["sub"]
    wake = await store.deliver("sub", ATTEMPT_MS)
    assert wake is not None
    assert (wake.generation, wake.webhook_url, wake.callback_base) == (1, HOOK.webhook_url, BASE)
    assert [(link.path, link.acked_seq, link.tail_seq) for link in wake.links] == [
        ("events/a", 2, 3),
        ("events/new", -1, 1),  # found by a write: its cursor before its first append
    ]
    assert await store.deliver("sub", ATTEMPT_MS) is None  # the delivery is the first's
    assert not await store.touch("sub", [("events/a", 4, "g")])  # one wake at a time
    await store.delivered(wake, done=True)
    subscription = await store.read("sub")
    assert {link.path: link.acked_seq for link in subscription.links} == {
        "events/a": 3,
        "events/new": 1,
    }
    # Written past the snapshot: a new wake at once.
    again = await store.deliver("sub", ATTEMPT_MS)
    assert again is not None
    assert again.generation == 2
    assert again.wake_id != wake.wake_id


async def test_a_failed_delivery_is_scheduled_and_marks_the_subscription_failed(
    store: SubscriptionStore,
) -> None:
    await created(store, HOOK)
    await store.touch("sub", [("events/a", 1, "g")])
    wake = await store.deliver("sub", ATTEMPT_MS)
    assert wake is not None
    assert await store.failed(wake, delay_ms=30_000, attempt_ms=ATTEMPT_MS)
    assert (await store.read("sub")).failing
    ready, next_at, _ = await store.due(10)
    assert (ready, next_at is not None) == ([], True)
    assert await store.deliver("sub", ATTEMPT_MS) is None  # not before its next try
    retried = await store.attempt(wake, ATTEMPT_MS)
    assert retried is not None
    assert (retried.generation, retried.retry_count) == (1, 1)
    await store.delivered(retried, done=False)
    assert not (await store.read("sub")).failing


async def test_a_lease_that_runs_out_ends_the_wake_and_a_new_generation_follows(
    store: SubscriptionStore, store_redis: Redis
) -> None:
    await created(store, HOOK)
    await store.touch("sub", [("events/a", 1, "g")])
    wake = await store.deliver("sub", ATTEMPT_MS)
    assert wake is not None
    await store.delivered(wake, done=False)  # delivered; no callback comes
    await run_out_lease(store_redis, store)
    assert not await store.failed(wake, 1000, ATTEMPT_MS)  # stale: the wake is over
    _, incarnation = await store.token_key("sub")
    with pytest.raises(WakeFenced):
        await store.ack(
            "sub",
            webhook=True,
            incarnation=incarnation,
            generation=1,
            wake_id=wake.wake_id,
            acks=[("events/a", 1, 1)],
            done=True,
        )
    again = await store.deliver("sub", ATTEMPT_MS)
    assert again is not None
    assert again.generation == 2


@ON_EVERY_BACKEND
async def test_a_claim_is_one_workers_and_its_acks_are_fenced_by_generation(
    store: SubscriptionStore,
) -> None:
    await created(store, PULL)
    with pytest.raises(NoPendingWork):
        await store.claim("sub", "worker-1")
    await store.touch("sub", [("events/a", 2, "g")])
    event = await store.deliver("sub", ATTEMPT_MS)  # its wake event, for the wake stream
    assert event is not None
    assert event.wake_stream == "wake/pool"
    await store.delivered(event, done=False)
    claim = await store.claim("sub", "worker-1")
    assert (claim.generation, claim.wake_id) == (event.generation, event.wake_id)
    with pytest.raises(AlreadyClaimed) as busy:
        await store.claim("sub", "worker-2")
    assert busy.value.detail == {"current_holder": "worker-1", "generation": 1}
    _, incarnation = await store.token_key("sub")

    async def ack(acks: Sequence[tuple[str, int, int | None]], *, done: bool, wake: Wake) -> bool:
        return await store.ack(
            "sub",
            webhook=False,
            incarnation=incarnation,
            generation=wake.generation,
            wake_id=wake.wake_id,
            acks=acks,
            done=done,
        )

    for acks in ([("events/zzz", 1, 1)], [("events/a", 3, 2)]):
        with pytest.raises(InvalidAckOffset):
            await ack(acks, done=True, wake=claim)
    assert not await ack([("events/a", 1, 2)], done=False, wake=claim)  # a heartbeat
    with pytest.raises(InvalidAckOffset):  # behind the cursor now
        await ack([("events/a", 0, 2)], done=False, wake=claim)
    # Acked short of the tail: done releases the lease and wakes again.
    assert await ack([], done=True, wake=claim)
    with pytest.raises(WakeFenced):
        await ack([("events/a", 2, 2)], done=True, wake=claim)
    second = await store.claim("sub", "worker-2")
    assert second.generation == 2
    with pytest.raises(InvalidSubscriptionRequest):  # a webhook's callback on a pull-wake
        await store.ack(
            "sub",
            webhook=True,
            incarnation=incarnation,
            generation=2,
            wake_id=second.wake_id,
            acks=[],
            done=True,
        )
    await store.release("sub", incarnation=incarnation, generation=2, wake_id=second.wake_id)
    third = await store.deliver("sub", ATTEMPT_MS)  # work pending: a new wake, its event due
    assert third is not None
    assert third.generation == 3


async def test_a_deleted_subscriptions_tokens_and_acks_are_refused(
    store: SubscriptionStore,
) -> None:
    await created(store, PULL)
    await store.touch("sub", [("events/a", 1, "g")])
    claim = await store.claim("sub", "worker-1")
    _, incarnation = await store.token_key("sub")
    await store.delete("sub")
    await store.create("sub", PULL, BASE, [])  # the same id again: another incarnation
    with pytest.raises(SubscriptionNotFound):
        await store.release(
            "sub", incarnation=incarnation, generation=claim.generation, wake_id=claim.wake_id
        )


async def test_streams_that_go_leave_their_pattern_links_and_reset_explicit_ones(
    store: SubscriptionStore,
) -> None:
    await created(store, HOOK, ("m/a", "e", 5))
    await store.touch("sub", [("events/a", 3, "g")])
    await store.touch("sub", [("events/a", 0, "gone"), ("m/a", 0, "gone")])
    assert (await store.read("sub")).links == (StreamLink("m/a", True, 0, 0),)
    assert await store.add_streams("sub", [("m/b", 2)]) == ["m/a", "m/b"]
    await store.touch("sub", [("m/b", 2, "g")])
    assert await store.remove_stream("sub", "m/b") == ["m/a"]  # its pattern does not match
    assert await store.remove_stream("sub", "m/missing") == ["m/a"]


async def test_the_registry_is_what_readers_match_writes_against(
    store: SubscriptionStore,
) -> None:
    interest = Interest(Pattern("events/*"), frozenset({"m/a"}))
    await store.register("sub", interest)
    assert await store.registry() == {"sub": interest}
    await store.register("sub", None)
    assert await store.registry() == {}


async def test_one_reader_at_a_time_sweeps_and_every_reader_signs_with_one_seed(
    store: SubscriptionStore,
) -> None:
    assert await store.take_sweep("reader-a", 30)
    assert not await store.take_sweep("reader-b", 30)
    assert await store.signing_seed() == await store.signing_seed()
