"""A client holding seqs past the end of a log that went back (Redis came back with an
older copy of it): it is told, never left holding events the log does not have."""

from __future__ import annotations

import json

from app import events, sse
from app.hub import Hub, Subscription
from app.store import Lease
from tests.conftest import leased_generation, roll_back


async def received(subscription: Subscription, parser: sse.Parser) -> list[tuple[str, int]]:
    """(type, id) of what the next chunk holds."""
    chunk = await subscription.next_chunk(2.0)
    assert chunk is not None
    return [(m.event, int(m.id or 0)) for m in parser.feed(chunk)]


async def written(hub: Hub) -> tuple[str, Lease]:
    """A generation whose writer appended 1..8."""
    generation_id, lease = await leased_generation(hub.log, "w")
    await hub.log.append(lease, 1, [events.Token(text=str(i)) for i in range(1, 9)])
    return generation_id, lease


async def went_back(hub: Hub) -> tuple[str, Lease]:
    """A generation whose writer appended 1..8, of which the log kept 1..5."""
    generation_id, lease = await written(hub)
    await roll_back(hub.log, generation_id, 5)
    return generation_id, lease


async def test_a_client_past_the_end_waits_for_the_logs_reset_and_reads_on(hub: Hub) -> None:
    generation_id, lease = await went_back(hub)
    subscription = await hub.subscribe(generation_id, 8)  # it holds 6..8, which are lost
    parser = sse.Parser()
    assert await subscription.next_chunk(0.2) == b""  # held open, waiting
    assert await hub.log.reset(lease, confirmed_to=8, sent_to=8) == (9, 6)
    assert await received(subscription, parser) == [("reset", 9)]
    taken = await hub.log.acquire(generation_id, "w2")
    assert taken is not None
    await hub.log.append(taken, 10, [events.Started(attempt=2), events.Done(reason="stop")])
    assert await received(subscription, parser) == [("started", 10), ("done", 11)]


async def test_a_log_that_grows_back_past_a_client_with_no_reset_restarts_it(hub: Hub) -> None:
    """Its writer died too: a new one continued from the log's end, reusing seqs the
    client holds. Nothing says which of its events are still true: all are dropped."""
    generation_id, _ = await went_back(hub)
    subscription = await hub.subscribe(generation_id, 8)
    parser = sse.Parser()
    assert await subscription.next_chunk(0.2) == b""
    await hub.log._redis.delete(hub.log.keys.lease(generation_id))
    taken = await hub.log.acquire(generation_id, "w2")
    assert taken is not None
    await hub.log.append(taken, 6, [events.Started(attempt=2)] + [events.Token(text="n")] * 4)
    messages = parser.feed(await subscription.next_chunk(2.0) or b"")
    assert [(m.event, m.id) for m in messages] == [("reset", "0")]
    assert json.loads(messages[0].data) == {"type": "reset", "from_seq": 1}
    seqs = [seq for _, seq in await received(subscription, parser)]
    assert seqs == list(range(1, 11))


async def test_a_live_client_finds_out_when_pub_sub_comes_back(hub: Hub) -> None:
    generation_id, lease = await written(hub)
    subscription = await hub.subscribe(generation_id, 0)
    parser = sse.Parser()
    assert [seq for _, seq in await received(subscription, parser)] == list(range(1, 9))
    assert await subscription.next_chunk(0.2) == b""  # live
    await roll_back(hub.log, generation_id, 5)
    subscription.feed.missed()  # the pub/sub connection came back: Redis restarted
    assert await subscription.next_chunk(0.2) == b""  # the log's end is below it: it waits
    assert await hub.log.reset(lease, confirmed_to=8, sent_to=8) == (9, 6)
    assert await received(subscription, parser) == [("reset", 9)]
