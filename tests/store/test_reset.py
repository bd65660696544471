"""A log that went back (Redis came back with an older copy): the writer that finds it
out records a reset past every seq it sent, and no seq ever names two events."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from app import events
from app.errors import Fenced
from app.store import GenerationLog, Lease
from tests.conftest import leased_generation, roll_back
from tests.live import parse_live


async def test_a_log_behind_its_writer_gets_a_reset_past_everything_it_sent(
    log: GenerationLog, redis: Redis
) -> None:
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Token(text=str(i)) for i in range(1, 11)])
    await roll_back(log, generation_id, 5)
    pubsub = redis.pubsub()
    await pubsub.subscribe(log.keys.live_channel(generation_id))
    try:
        # Confirmed up to 10, and 11-12 were sent when the reply was lost.
        assert await log.reset(lease, confirmed_to=10, sent_to=12) == (13, 6)
        async with asyncio.timeout(5):
            while (message := await pubsub.get_message(timeout=None)) is None or (
                message["type"] != "message"
            ):
                pass
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]

    entries = await log.read(generation_id, 0, 100)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 13]
    assert entries[-1].event() == events.Reset(from_seq=6)
    assert entries[-1].data == events.encode(events.Reset(from_seq=6))  # as the client decodes it
    assert parse_live(message["data"]) == [entries[-1]]  # live readers get it too
    state = await log.state(generation_id)
    assert state is not None
    assert state.last_seq == 13
    assert state.epoch > lease.epoch  # every writer fenced: the next holder continues
    assert await redis.exists(log.keys.lease(generation_id)) == 0
    with pytest.raises(Fenced):  # the writer of the lost events, too
        await log.append(lease, 11, [events.Token(text="late")])
    taken = await log.acquire(generation_id, "worker-b")
    assert taken is not None
    assert taken.last_seq == 13
    assert await log.append(taken, 14, [events.Token(text="on")]) == 14


async def test_a_log_that_holds_what_its_writer_appended_is_left_alone(
    log: GenerationLog,
) -> None:
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Token(text="a"), events.Token(text="b")])
    # A batch sent, never applied (Redis down meanwhile), lost nothing.
    assert await log.reset(lease, confirmed_to=2, sent_to=4) is None
    # Fenced by an ordinary takeover, which continued after what it found.
    other = await _taken_over(log, generation_id)
    await log.append(other, 3, [events.Token(text="c")])
    assert await log.reset(lease, confirmed_to=2, sent_to=2) is None
    assert [e.seq for e in await log.read(generation_id, 0, 10)] == [1, 2, 3]


async def test_a_writer_overtaken_by_a_holder_that_started_before_its_end_voids_from_there(
    log: GenerationLog, redis: Redis
) -> None:
    """Redis lost the writer's acquire too, and another worker took the generation over
    from the older copy: what that one appended reuses seqs the first writer's clients
    hold, so the reset voids it as well."""
    generation_id, first = await leased_generation(log)
    await log.append(first, 1, [events.Token(text="a"), events.Token(text="b")])
    second = await _taken_over(log, generation_id)  # takes over at 2
    await log.append(second, 3, [events.Started(attempt=2), events.Token(text="c")])
    # Back to before the takeover, then a third worker took it from there.
    await roll_back(log, generation_id, 2)
    await redis.hset(log.keys.meta(generation_id), mapping={"epoch": first.epoch, "epoch_from": 0})
    await redis.delete(log.keys.lease(generation_id))
    third = await log.acquire(generation_id, "worker-c")
    assert third is not None
    await log.append(third, 3, [events.Started(attempt=3), events.Token(text="C")])

    assert await log.reset(second, confirmed_to=4, sent_to=4) == (5, 3)
    entries = await log.read(generation_id, 0, 10)
    assert [(e.seq, e.event()) for e in entries][-1] == (5, events.Reset(from_seq=3))
    # An ordinary takeover, started after everything confirmed to the writer, is not one.
    assert await log.reset(first, confirmed_to=2, sent_to=2) is None


async def _taken_over(log: GenerationLog, generation_id: str) -> Lease:
    await log._redis.delete(log.keys.lease(generation_id))
    lease = await log.acquire(generation_id, "worker-b")
    assert lease is not None
    return lease
