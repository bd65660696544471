"""One client's subscription: bounded buffering, no hole across the hand-over, its heartbeat timer."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from redis.asyncio import Redis

from app import events, sse
from app.events import LogEntry
from app.hub import Hub, Subscription
from app.settings import Settings
from app.store import GenerationLog, RawEntry
from tests.conftest import FakeClock, leased_generation
from tests.live import frame_of


async def test_a_slow_subscription_never_buffers_more_than_its_limit(
    redis: Redis, settings: Settings
) -> None:
    log = GenerationLog(redis, settings)
    hub = Hub(log, redis, buffer_limit=4)
    await hub.start()
    try:
        generation_id, lease = await leased_generation(log, "w")
        subscription = await hub.subscribe(generation_id, 0)
        # Confirmed, not timed out: pub/sub commands racing to connect once lost it.
        assert subscription.feed.confirmed
        assert await subscription.next_chunk(0.2) == b""  # caught up: now live
        entries = []
        seq = 1
        for _ in range(50):  # live batches arrive; the client reads nothing
            batch = [events.Token(text="x")] * 3
            last = await log.append(lease, seq, batch)
            entries = await log.read(generation_id, seq - 1, 3)
            subscription.feed.dispatch([frame_of(e) for e in entries], 0.0)
            assert subscription.buffered <= 4
            seq = last + 1
        assert subscription.fell_behind > 0
        parser = sse.Parser()
        seqs: list[int] = []
        while len(seqs) < 150:
            chunk = await subscription.next_chunk(1.0)
            assert chunk
            seqs.extend(int(m.id or 0) for m in parser.feed(chunk))
        assert seqs == list(range(1, 151))  # everything, from the log, in order
    finally:
        await hub.stop()


async def test_catch_up_never_goes_live_across_a_hole_in_what_it_buffered(
    redis: Redis, settings: Settings
) -> None:
    """Live 7 and 8 arrive while the log is read up to 5, live 6 was lost: read again."""
    log = GenerationLog(redis, settings)
    hub = Hub(log, redis)
    await hub.start()
    try:
        generation_id, lease = await leased_generation(log, "w")
        await log.append(lease, 1, [events.Token(text=str(i)) for i in range(1, 6)])
        subscription = await hub.subscribe(generation_id, 0)
        ahead = [
            LogEntry(seq=seq, type="token", data=b'{"type":"token","text":"x"}', appended_ms=0)
            for seq in (7, 8)
        ]
        subscription.feed.dispatch([frame_of(e) for e in ahead], 0.0)  # buffered while in log mode
        parser = sse.Parser()
        first = await subscription.next_chunk(1.0)
        assert first
        assert [m.id for m in parser.feed(first)] == ["1", "2", "3", "4", "5"]
        # Now 6, 7, 8 are really appended; live or log, they must come in order.
        await log.append(lease, 6, [events.Token(text=str(i)) for i in range(6, 9)])
        seqs: list[int] = []
        async with asyncio.timeout(10):
            while len(seqs) < 3:
                chunk = await subscription.next_chunk(2.0)
                assert chunk is not None
                seqs.extend(int(m.id or 0) for m in parser.feed(chunk))
        assert seqs == [6, 7, 8]
    finally:
        await hub.stop()


async def test_heartbeat_wait_ends_at_its_own_deadline(hub: Hub) -> None:
    generation_id, lease = await leased_generation(hub.log, "w")
    subscription = await hub.subscribe(generation_id, 0)
    assert await subscription.next_chunk(0.05) == b""  # caught up: live
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await subscription.next_chunk(0.05) == b""
    assert loop.time() - began >= 0.05
    # A long wait ended by an event leaves its alarm; a shorter wait still ends in time.
    waiting = asyncio.create_task(subscription.next_chunk(30.0))
    await hub.log.append(lease, 1, [events.Token(text="x")])
    async with asyncio.timeout(5):
        assert await waiting
    async with asyncio.timeout(1):
        assert await subscription.next_chunk(0.05) == b""
    hub.unsubscribe(subscription)
    assert len(hub.alarms) == 0  # closing cancels it: no alarm outlives the stream


async def test_clients_joining_one_generation_together_share_each_page_read(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = GenerationLog(redis, settings)
    hub = Hub(log, redis, page_size=100)
    await hub.start()
    try:
        generation_id, lease = await leased_generation(log, "w")
        await log.append(lease, 1, [events.Token(text=str(i)) for i in range(250)])
        reads: list[int] = []
        read_rows = log.read_rows

        async def counted(generation_id: str, after_seq: int, count: int) -> list[RawEntry]:
            reads.append(after_seq)
            return await read_rows(generation_id, after_seq, count)

        monkeypatch.setattr(log, "read_rows", counted)
        subscriptions = [await hub.subscribe(generation_id, 0) for _ in range(20)]

        async def read_through(subscription: Subscription) -> list[int]:
            parser = sse.Parser()
            seqs: list[int] = []
            while len(seqs) < 250:
                chunk = await subscription.next_chunk(1.0)
                assert chunk
                seqs.extend(int(m.id or 0) for m in parser.feed(chunk))
            return seqs

        seen = await asyncio.gather(*map(read_through, subscriptions))
        assert all(seqs == list(range(1, 251)) for seqs in seen)
        # Three pages (after 0, 100 and 200), each read once for all twenty clients.
        assert sorted(reads) == [0, 100, 200]
    finally:
        await hub.stop()


class _Recorder:
    """A sink that takes writes while `accepting`, and fails them with `failing`."""

    def __init__(self) -> None:
        self.accepting = True
        self.failing = False
        self.sent: list[tuple[bytes, int, int]] = []

    def ready(self) -> bool:
        return self.accepting

    def send(self, chunk: bytes, first_seq: int, last_seq: int, appended_ms: int) -> None:
        if self.failing:
            raise ConnectionResetError("the client went away")
        self.sent.append((chunk, first_seq, last_seq))


def _live(seqs: range, *, terminal: bool = False) -> list[sse.Frame]:
    entries = [LogEntry(seq=seq, type="token", data=b'{"text":"x"}', appended_ms=0) for seq in seqs]
    if terminal:
        entries.append(LogEntry(seq=seqs.stop, type="done", data=b"{}", appended_ms=0))
    return [frame_of(entry) for entry in entries]


async def _parked(subscription: Subscription) -> asyncio.Task[bytes | None]:
    """The client's task, waiting in `next_chunk` with nothing pending."""
    waiting = asyncio.create_task(subscription.next_chunk(30.0))
    await asyncio.sleep(0)  # one turn of the loop: it runs until it waits
    assert not waiting.done()
    return waiting


async def test_live_batches_go_to_a_waiting_subscriptions_sink_once_per_turn(hub: Hub) -> None:
    """While its client's task waits, the batches of one turn of the loop go to the sink in
    one write; the task never gets them again."""
    generation_id, _ = await leased_generation(hub.log, "w")
    subscription = await hub.subscribe(generation_id, 0)
    assert await subscription.next_chunk(0.05) == b""  # caught up: live
    sink = _Recorder()
    subscription.sink = sink
    parser = sse.Parser()
    waiting = await _parked(subscription)
    subscription.feed.dispatch(_live(range(1, 3)), 0.0)
    subscription.feed.dispatch(_live(range(3, 4)), 0.0)  # read together with 1 and 2
    assert sink.sent == []  # written once the read's batches are all in
    await asyncio.sleep(0)
    assert [(first, last) for _, first, last in sink.sent] == [(1, 3)]
    assert [m.id for chunk, _, _ in sink.sent for m in parser.feed(chunk)] == ["1", "2", "3"]
    assert (subscription.handed_after, subscription.delivered) == (0, 3)
    subscription.feed.dispatch(_live(range(4, 5)), 0.0)
    await asyncio.sleep(0)
    assert [(first, last) for _, first, last in sink.sent] == [(1, 3), (4, 4)]
    assert not waiting.done()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert await subscription.next_chunk(0.01) == b""  # nothing left for the task
    hub.unsubscribe(subscription)


class _SlowWrites(_Recorder):
    """A sink whose every write takes `seconds` of `clock`'s time."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        super().__init__()
        self.clock = clock
        self.seconds = seconds
        self.wrote = asyncio.Event()

    def send(self, chunk: bytes, first_seq: int, last_seq: int, appended_ms: int) -> None:
        super().send(chunk, first_seq, last_seq, appended_ms)
        self.clock.advance(self.seconds)
        self.wrote.set()


async def test_after_a_long_round_of_live_writes_the_next_waits_as_long_and_takes_more(
    redis: Redis, settings: Settings
) -> None:
    """A round of writes that took 20 ms holds the next back for 20 ms; what arrives in
    that pause goes out with it, in one write."""
    clock = FakeClock()
    hub = Hub(GenerationLog(redis, settings), redis, recheck_seconds=60, clock=clock)
    await hub.start()
    try:
        generation_id, _ = await leased_generation(hub.log, "w")
        subscription = await hub.subscribe(generation_id, 0)
        assert await subscription.next_chunk(0.05) == b""
        sink = _SlowWrites(clock, 0.02)
        subscription.sink = sink
        waiting = await _parked(subscription)
        subscription.feed.dispatch(_live(range(1, 2)), 0.0)
        await asyncio.sleep(0)
        assert [(first, last) for _, first, last in sink.sent] == [(1, 1)]
        sink.wrote.clear()
        subscription.feed.dispatch(_live(range(2, 3)), 0.0)
        await asyncio.sleep(0)
        assert [(first, last) for _, first, last in sink.sent] == [(1, 1)]  # paused
        subscription.feed.dispatch(_live(range(3, 4)), 0.0)
        async with asyncio.timeout(5):
            await sink.wrote.wait()
        assert [(first, last) for _, first, last in sink.sent] == [(1, 1), (2, 3)]
        # A round that took a minute (a process that was not scheduled, say) holds the
        # next back for no more than a few tokens' time.
        sink.seconds = 60.0
        sink.wrote.clear()
        subscription.feed.dispatch(_live(range(4, 5)), 0.0)
        async with asyncio.timeout(5):
            await sink.wrote.wait()
        sink.wrote.clear()
        subscription.feed.dispatch(_live(range(5, 6)), 0.0)
        async with asyncio.timeout(5):
            await sink.wrote.wait()
        assert [(first, last) for _, first, last in sink.sent][2:] == [(4, 4), (5, 5)]
        assert not waiting.done()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        hub.unsubscribe(subscription)
    finally:
        await hub.stop()


async def test_the_task_writes_for_a_client_that_is_behind_and_ends_the_stream(hub: Hub) -> None:
    generation_id, _ = await leased_generation(hub.log, "w")
    subscription = await hub.subscribe(generation_id, 0)
    assert await subscription.next_chunk(0.05) == b""
    sink = _Recorder()
    subscription.sink = sink
    parser = sse.Parser()

    sink.accepting = False  # the client is behind: its task writes, and drains
    waiting = await _parked(subscription)
    subscription.feed.dispatch(_live(range(1, 3)), 0.0)
    async with asyncio.timeout(5):
        assert [m.id for m in parser.feed(await waiting or b"")] == ["1", "2"]
    assert (subscription.handed_after, subscription.delivered) == (0, 2)

    sink.accepting = True  # the terminal batch: the task ends the stream
    waiting = await _parked(subscription)
    subscription.feed.dispatch(_live(range(3, 4), terminal=True), 0.0)
    async with asyncio.timeout(5):
        assert [m.id for m in parser.feed(await waiting or b"")] == ["3", "4"]
    assert subscription.finished
    assert sink.sent == []
    hub.unsubscribe(subscription)


async def test_a_sink_that_fails_ends_its_stream_alone(hub: Hub) -> None:
    generation_id, _ = await leased_generation(hub.log, "w")
    subscriptions = [await hub.subscribe(generation_id, 0) for _ in range(2)]
    sinks = [_Recorder(), _Recorder()]
    for subscription, sink in zip(subscriptions, sinks, strict=True):
        assert await subscription.next_chunk(0.05) == b""
        subscription.sink = sink
    sinks[0].failing = True
    waiting = [await _parked(subscription) for subscription in subscriptions]
    subscriptions[0].feed.dispatch(_live(range(1, 2)), 0.0)
    async with asyncio.timeout(5):
        assert await waiting[0] is None  # closed: its client reconnects from its last event
    assert [(first, last) for _, first, last in sinks[1].sent] == [(1, 1)]
    assert not waiting[1].done()
    waiting[1].cancel()
    for subscription in subscriptions:
        hub.unsubscribe(subscription)
