"""The append script against a real Redis: seq, atomicity, idempotency, fencing, retention."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError

from app import events, jobs
from app.errors import AlreadyFinished, Fenced, SeqConflict
from app.generations import parse_request
from app.keys import new_generation_id
from app.log import GenerationLog, pack
from app.settings import Settings
from tests.conftest import RedisServer, leased_generation
from tests.live import parse_live
from workers.appender import Appender, Outcome

REQUEST = parse_request(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')


async def test_seq_is_consecutive_from_one(log: GenerationLog) -> None:
    generation_id, lease = await leased_generation(log)
    assert await log.append(lease, 1, [events.Started(), events.Token(text="a")]) == 2
    assert await log.append(lease, 3, [events.Token(text="b")]) == 3
    entries = await log.read(generation_id, 0, 100)
    assert [e.seq for e in entries] == [1, 2, 3]
    assert [e.event() for e in entries] == [
        events.Started(),
        events.Token(text="a"),
        events.Token(text="b"),
    ]


async def test_retried_batch_is_not_duplicated(log: GenerationLog) -> None:
    generation_id, lease = await leased_generation(log)
    batch = [events.Token(text="x"), events.Token(text="y")]
    assert await log.append(lease, 1, batch) == 2
    assert await log.append(lease, 1, batch) == 2  # the retry of an applied batch
    assert [e.seq for e in await log.read(generation_id, 0, 100)] == [1, 2]


async def test_skipping_or_overlapping_seq_is_refused(log: GenerationLog) -> None:
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Token(text="x")])
    with pytest.raises(SeqConflict):
        await log.append(lease, 3, [events.Token(text="gap")])
    await log.append(lease, 2, [events.Token(text="y")])
    with pytest.raises(SeqConflict):
        await log.append(lease, 2, [events.Token(text="y"), events.Token(text="z")])
    assert [e.seq for e in await log.read(generation_id, 0, 100)] == [1, 2]


async def test_a_worker_that_lost_its_lease_is_fenced(log: GenerationLog, redis: Redis) -> None:
    generation_id, old = await leased_generation(log)
    await log.append(old, 1, [events.Token(text="from old")])
    await redis.delete(log.keys.lease(generation_id))  # the lease expired
    new = await log.acquire(generation_id, "worker-b")
    assert new is not None
    assert new.epoch == old.epoch + 1
    assert new.last_seq == 1
    assert new.attempt == 2
    with pytest.raises(Fenced):
        await log.append(old, 2, [events.Token(text="zombie")])
    with pytest.raises(Fenced):
        await log.renew(old)
    assert await log.append(new, 2, [events.Token(text="from new")]) == 2
    texts = [e.event() for e in await log.read(generation_id, 0, 100)]
    assert texts == [events.Token(text="from old"), events.Token(text="from new")]


async def test_renewing_after_the_holders_terminal_event_is_not_a_lost_lease(
    log: GenerationLog, redis: Redis
) -> None:
    # The lease keeper may renew between the terminal append and dropping the lease.
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Done(reason="stop")])
    with pytest.raises(AlreadyFinished):
        await log.renew(lease)
    await redis.hincrby(log.keys.meta(generation_id), "epoch", 1)  # a system close's fence
    with pytest.raises(Fenced):
        await log.renew(lease)


async def test_a_held_lease_cannot_be_taken(log: GenerationLog) -> None:
    generation_id, _ = await leased_generation(log)
    assert await log.acquire(generation_id, "worker-b") is None


async def test_nothing_follows_the_terminal_event(log: GenerationLog) -> None:
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Token(text="x"), events.Done(reason="stop")])
    assert await log.append(lease, 1, [events.Token(text="x"), events.Done(reason="stop")]) == 2
    with pytest.raises(AlreadyFinished):
        await log.append(lease, 3, [events.Token(text="late")])
    assert await log.close(generation_id, events.Error(code="abandoned", message="m")) is None
    assert await log.acquire(generation_id, "worker-b") is None
    state = await log.state(generation_id)
    assert state is not None
    assert (state.status, state.last_seq, state.finish_reason) == ("done", 2, "stop")


async def test_terminal_event_must_end_its_batch(log: GenerationLog) -> None:
    _, lease = await leased_generation(log)
    with pytest.raises(ValueError, match="last of its batch"):
        await log.append(lease, 1, [events.Done(reason="stop"), events.Token(text="x")])


async def test_concurrent_writers_never_interleave_a_batch(log: GenerationLog) -> None:
    """Two batches race for the same seqs: exactly one lands, whole.

    Under one epoch a batch is identified by (epoch, first seq, length), so the
    loser reads as a retry of the winner; the lease makes two writers per epoch
    impossible in practice.
    """
    generation_id, lease = await leased_generation(log)
    a = [events.Token(text=f"a{i}") for i in range(50)]
    b = [events.Token(text=f"b{i}") for i in range(50)]
    results = await asyncio.gather(
        log.append(lease, 1, a), log.append(lease, 1, b), return_exceptions=True
    )
    assert list(results) == [50, 50]
    texts = [e.event() for e in await log.read(generation_id, 0, 1000)]
    assert texts in (a, b)


async def test_terminal_status_and_retention_ttls(
    log: GenerationLog, redis: Redis, settings: Settings
) -> None:
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Done(reason="cancelled")])
    state = await log.state(generation_id)
    assert state is not None
    assert state.status == "cancelled"
    k = log.keys
    log_ttl = await redis.pttl(k.log(generation_id))
    meta_ttl = await redis.pttl(k.meta(generation_id))
    assert settings.retention_seconds * 1000 - 5000 < log_ttl <= settings.retention_seconds * 1000
    assert meta_ttl > settings.retention_seconds * 1000
    assert await redis.exists(k.lease(generation_id)) == 0
    assert await redis.zscore(k.open_generations, generation_id) is None


async def test_open_generation_keys_expire_even_without_a_sweeper(
    redis: Redis, settings: Settings
) -> None:
    log = GenerationLog(redis, settings.replace(abandon_after_seconds=0.2, retention_seconds=0.3))
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Started()])
    await log.append(lease, 2, [events.Token(text="x")])
    k = log.keys
    keys = (k.meta(generation_id), k.log(generation_id), k.request(generation_id))
    assert await redis.exists(*keys) == len(keys)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    # Nothing to await: Redis expires the keys on its own (the open TTL here is 0.5 s).
    while await redis.exists(*keys):
        assert loop.time() < deadline, "an open generation's keys never expired"
        await asyncio.sleep(0.05)


async def test_a_long_running_generation_keeps_its_keys(
    log: GenerationLog, redis: Redis, settings: Settings
) -> None:
    """Appends refresh the open TTLs only once in a while, never letting a key get
    closer to expiry than the open TTL (abandon deadline plus retention)."""
    generation_id, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Started()])
    k = log.keys
    meta = k.meta(generation_id)
    keys = (meta, k.log(generation_id), k.request(generation_id))
    open_ttl = int((settings.abandon_after_seconds + settings.retention_seconds) * 1000)
    refreshed = min([await redis.pttl(key) for key in keys])  # what a refresh sets
    assert refreshed >= open_ttl

    async def age(ms: int) -> None:
        """Pretend `ms` passed since the last refresh."""
        seconds, micros = await redis.time()
        await redis.hset(meta, "ttl_refreshed_ms", seconds * 1000 + micros // 1000 - ms)
        for key in keys:
            await redis.pexpire(key, refreshed - ms)

    await age(60_000)
    await log.append(lease, 2, [events.Token(text="soon after a refresh")])
    for key in keys:
        assert open_ttl <= await redis.pttl(key) <= refreshed - 60_000  # left alone

    # Without a refresh, this append would leave the keys less than the open TTL.
    await age(refreshed - open_ttl + 1000)
    await log.append(lease, 3, [events.Token(text="much later")])
    for key in keys:
        assert await redis.pttl(key) > refreshed - 1000  # refreshed


async def test_length_cap_trims_oldest_events(redis: Redis, settings: Settings) -> None:
    log = GenerationLog(redis, settings.replace(max_events_per_generation=100))
    generation_id, lease = await leased_generation(log)
    seq = 1
    for _ in range(10):
        batch = [events.Token(text=str(seq + i)) for i in range(100)]
        seq = await log.append(lease, seq, batch) + 1
    first = await log.first_seq(generation_id)
    assert first is not None
    # Approximate trimming keeps at least the cap, and far less than everything.
    assert 100 <= 1001 - first < 1000
    entries = await log.read(generation_id, 0, 10_000)
    assert [e.seq for e in entries] == list(range(first, 1001))


async def test_sweeper_closes_only_abandoned_generations(redis: Redis, settings: Settings) -> None:
    log = GenerationLog(redis, settings.replace(abandon_after_seconds=0.2))
    idle_id, idle_lease = await leased_generation(log)
    await log.append(idle_lease, 1, [events.Token(text="x")])
    active_id, active_lease = await leased_generation(log)
    # Make the idle one look old; the active one appended "just now".
    await redis.hset(log.keys.meta(idle_id), "last_append_ms", 1)
    await redis.zadd(log.keys.open_generations, {idle_id: 1, active_id: 1})
    await log.append(active_lease, 1, [events.Token(text="y")])

    assert await log.sweep_abandoned() == [idle_id]

    idle = await log.read(idle_id, 0, 10)
    assert idle[-1].event() == events.Error(
        code="abandoned", message="no event for 0.2 s; closed", retryable=True
    )
    with pytest.raises(Fenced):
        await log.append(idle_lease, 2, [events.Token(text="late")])
    assert (await log.state(active_id)).status == "running"  # type: ignore[union-attr]
    assert await redis.zscore(log.keys.open_generations, active_id) is not None


async def test_cancel_of_a_queued_generation_closes_it(log: GenerationLog) -> None:
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST)
    state = await log.request_cancel(generation_id)
    assert state.status == "cancelled"
    assert [e.event() for e in await log.read(generation_id, 0, 10)] == [
        events.Done(reason="cancelled")
    ]
    assert await log.acquire(generation_id, "late-worker") is None


async def test_cancel_of_a_running_generation_is_pushed_and_flagged(
    log: GenerationLog, redis: Redis
) -> None:
    generation_id, lease = await leased_generation(log)
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(log.keys.cancel_channel)
        state = await log.request_cancel(generation_id)
        assert state.status == "running"
        message = None
        while message is None or message["type"] != "message":
            message = await pubsub.get_message(timeout=5)
        assert message["data"] == generation_id.encode()
    assert await log.renew(lease) is True


async def test_live_message_carries_the_batch(log: GenerationLog, redis: Redis) -> None:
    generation_id, lease = await leased_generation(log)
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(log.keys.live_channel(generation_id))
        await log.append(lease, 1, [events.Token(text="line\nbreak"), events.Done(reason="stop")])
        message = None
        while message is None or message["type"] != "message":
            message = await pubsub.get_message(timeout=5)
    live = parse_live(message["data"])
    assert live == await log.read(generation_id, 0, 10)


# -- appends of many generations, pipelined ------------------------------------


def count_round_trips(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, *, hold_first: asyncio.Event | None = None
) -> list[int]:
    """One entry per connection taken from the pool (a round trip takes one). With
    `hold_first`, the first round trip waits for its connection until that is set."""
    taken: list[int] = []
    pool = redis.connection_pool
    original: Callable[..., Awaitable[Any]] = pool.get_connection

    async def get_connection(*args: Any, **kwargs: Any) -> Any:
        taken.append(1)
        if hold_first is not None and len(taken) == 1:
            await hold_first.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", get_connection)
    return taken


async def test_appends_requested_together_go_out_as_one_pipeline(
    log: GenerationLog, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [await leased_generation(log) for _ in range(50)]
    round_trips = count_round_trips(monkeypatch, redis)
    lasts = await asyncio.gather(
        *(log.append(lease, 1, [events.Token(text=g)]) for g, lease in runs)
    )
    assert lasts == [1] * 50
    assert len(round_trips) == 1
    for generation_id, _ in runs:
        assert [e.event() for e in await log.read(generation_id, 0, 10)] == [
            events.Token(text=generation_id)
        ]


@pytest.mark.parametrize(
    "args",
    [
        (b"EVALSHA", b"0" * 40, 2, "k:{a}", "k:{b}", "3", 17, -1, 0, "", b""),
        (b"XRANGE", "k:{é}", "5-0", "+", "COUNT", 100),
        ("token", b'{"text": "a\r\nb"}', "Zürich 東京", 10**15),
    ],
)
def test_packed_commands_are_what_redis_py_sends(args: tuple[bytes | str | int, ...]) -> None:
    redis_py = Connection()
    assert pack(*args) == b"".join(redis_py.pack_command(*args))


@pytest.mark.parametrize("arg", [1.5, None, [b"x"]])
def test_packing_refuses_what_redis_py_would_not_send_as_is(arg: Any) -> None:
    with pytest.raises(TypeError):
        pack(b"SET", "k", arg)


async def test_one_generations_refusal_does_not_fail_the_others_in_its_pipeline(
    log: GenerationLog, redis: Redis
) -> None:
    runs = [await leased_generation(log) for _ in range(5)]
    fenced_id, fenced = runs[2]
    await redis.hset(log.keys.meta(fenced_id), "epoch", fenced.epoch + 1)  # taken over
    results = await asyncio.gather(
        *(log.append(lease, 1, [events.Token(text="x")]) for _, lease in runs),
        log.append(runs[0][1], 5, [events.Token(text="gap")]),
        return_exceptions=True,
    )
    assert results[:2] == [1, 1]
    assert results[3:5] == [1, 1]
    assert isinstance(results[2], Fenced)
    assert isinstance(results[5], SeqConflict)
    assert await log.read(fenced_id, 0, 10) == []
    for generation_id, _ in runs[:2] + runs[3:]:
        assert [e.seq for e in await log.read(generation_id, 0, 10)] == [1]


async def test_an_error_reply_reaches_only_its_caller(log: GenerationLog, redis: Redis) -> None:
    runs = [await leased_generation(log) for _ in range(3)]
    broken_id, _ = runs[1]
    await redis.delete(log.keys.meta(broken_id))
    await redis.set(log.keys.meta(broken_id), "not a hash")  # HMGET in append.lua fails
    results = await asyncio.gather(
        *(log.append(lease, 1, [events.Token(text="x")]) for _, lease in runs),
        return_exceptions=True,
    )
    assert results[0] == results[2] == 1
    assert isinstance(results[1], ResponseError)
    assert "WRONGTYPE" in str(results[1])
    assert await log.append(runs[0][1], 2, [events.Token(text="y")]) == 2  # connection still good


class ReplyCutter:
    """A TCP proxy to a Redis that can cut a connection once Redis has replied.

    Armed, it reads the next reply Redis sends on any connection and closes that
    connection instead of passing the reply on: Redis ran the calls, their caller
    never hears of it (the lost reply a retry must not duplicate).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.cut = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> ReplyCutter:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def requests() -> None:
            while data := await client_r.read(65536):
                server_w.write(data)
            server_w.close()

        async def replies() -> None:
            while data := await server_r.read(65536):
                if self.armed:
                    self.armed = False
                    self.cut += 1
                    client_w.transport.abort()
                    server_w.close()
                    return
                client_w.write(data)
            client_w.close()

        for pump in (requests(), replies()):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)


@pytest.fixture
async def cutter(redis_server_factory: Callable[..., RedisServer]) -> AsyncIterator[ReplyCutter]:
    async with ReplyCutter(redis_server_factory().port) as proxy:
        yield proxy


async def log_with_scripts_loaded(redis: Redis, settings: Settings) -> GenerationLog:
    """A log whose first append has run: a cut reply is an append's, not NOSCRIPT."""
    log = GenerationLog(redis, settings)
    _, lease = await leased_generation(log)
    await log.append(lease, 1, [events.Token(text="warm-up")])
    return log


async def test_a_lost_pipeline_reply_fails_every_caller_and_a_retry_appends_once(
    cutter: ReplyCutter, settings: Settings
) -> None:
    async with Redis.from_url(cutter.url) as redis:
        log = await log_with_scripts_loaded(redis, settings)
        runs = [await leased_generation(log) for _ in range(3)]
        cutter.armed = True
        results = await asyncio.gather(
            *(log.append(lease, 1, [events.Token(text="x")]) for _, lease in runs),
            return_exceptions=True,
        )
        assert cutter.cut == 1
        assert all(isinstance(result, RedisConnectionError) for result in results)
        for generation_id, _ in runs:  # applied all the same
            assert [e.seq for e in await log.read(generation_id, 0, 10)] == [1]
        retried = await asyncio.gather(
            *(log.append(lease, 1, [events.Token(text="x")]) for _, lease in runs)
        )
        assert retried == [1, 1, 1]
        for generation_id, _ in runs:
            assert [e.seq for e in await log.read(generation_id, 0, 10)] == [1]


async def test_a_retry_after_a_lost_pipeline_reply_is_not_duplicated(
    cutter: ReplyCutter, settings: Settings
) -> None:
    async with Redis.from_url(cutter.url) as redis:
        log = await log_with_scripts_loaded(redis, settings)
        runs = [await leased_generation(log) for _ in range(3)]
        cutter.armed = True
        appenders = [Appender(log, lease) for _, lease in runs]
        for appender in appenders:  # all in one tick: one pipeline, whose reply is lost
            assert await appender.put(events.Token(text="once"))
            assert await appender.put(events.Done(reason="stop"))
        await asyncio.wait([a.task for a in appenders])
        assert cutter.cut == 1
        assert [a.outcome for a in appenders] == [Outcome.APPENDED_TERMINAL] * 3
        for generation_id, _ in runs:
            entries = await log.read(generation_id, 0, 10)
            assert [(e.seq, e.type) for e in entries] == [(1, "token"), (2, "done")]


async def test_a_cancelled_pipeline_does_not_leave_its_replies_to_the_next_caller(
    log: GenerationLog, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    generation_id, lease = await leased_generation(log)
    pool = redis.connection_pool
    reading = asyncio.Event()
    released: list[bool] = []
    get_connection: Callable[..., Awaitable[Any]] = pool.get_connection
    release = pool.release

    async def get_reading_connection(*args: Any, **kwargs: Any) -> Any:
        connection = await get_connection(*args, **kwargs)
        read_response = connection.read_response

        async def announced_read(*args: Any, **kwargs: Any) -> Any:
            reading.set()
            return await read_response(*args, **kwargs)

        monkeypatch.setattr(connection, "read_response", announced_read)
        return connection

    async def recorded_release(connection: Any) -> None:
        released.append(connection.is_connected)
        await release(connection)

    monkeypatch.setattr(pool, "get_connection", get_reading_connection)
    monkeypatch.setattr(pool, "release", recorded_release)
    append = asyncio.create_task(log.append(lease, 1, [events.Token(text="x")]))
    await reading.wait()
    # The pipeline's own task, as the loop's shutdown cancels it.
    (sending,) = log._append._sending
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await append
    assert released == [False]  # its replies unread: disconnected, not reused
    monkeypatch.undo()
    # Applied or not, the retry reads its own reply.
    assert await log.append(lease, 1, [events.Token(text="x")]) == 1
    assert [e.seq for e in await log.read(generation_id, 0, 10)] == [1]


async def test_pipelined_appends_load_the_script_where_redis_lacks_it(
    redis_server_factory: Callable[..., RedisServer], settings: Settings
) -> None:
    server = redis_server_factory()
    async with Redis.from_url(server.url) as redis:
        log = GenerationLog(redis, settings)
        runs = [await leased_generation(log) for _ in range(3)]
        for seq in (1, 2):  # a fresh server has no scripts; then it loses them
            lasts = await asyncio.gather(
                *(log.append(lease, seq, [events.Token(text="x")]) for _, lease in runs)
            )
            assert lasts == [seq] * 3
            await redis.script_flush()
        for generation_id, _ in runs:
            assert [e.seq for e in await log.read(generation_id, 0, 10)] == [1, 2]


async def test_reads_of_many_generations_in_one_tick_each_get_their_own(
    log: GenerationLog,
) -> None:
    generation_ids = []
    for i in range(30):
        generation_id, lease = await leased_generation(log)
        await log.append(lease, 1, [events.Token(text=f"{i}.{j}") for j in range(i % 4 + 1)])
        generation_ids.append(generation_id)
    pages = await asyncio.gather(*(log.read(g, 0, 10) for g in generation_ids))
    for i, page in enumerate(pages):
        assert [e.event() for e in page] == [
            events.Token(text=f"{i}.{j}") for j in range(i % 4 + 1)
        ]


# -- the request path: creates and snapshots of many generations -----------------


async def test_creates_in_one_tick_share_a_round_trip_and_enqueue_their_jobs(
    log: GenerationLog, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    generation_ids = [new_generation_id() for _ in range(20)]
    round_trips = count_round_trips(monkeypatch, redis)
    await asyncio.gather(
        *(
            log.create(g, REQUEST, enqueue=True, traceparent=f"tp-{g}" if i % 2 else None)
            for i, g in enumerate(generation_ids)
        )
    )
    assert len(round_trips) == 1
    states = await asyncio.gather(*(log.state(g) for g in generation_ids))
    assert [s.status if s else None for s in states] == ["queued"] * 20
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(log.keys.jobs))
    enqueued = [jobs.job_from_entry(entry_id, fields) for entry_id, fields in entries]
    assert [(j.generation_id, j.traceparent) for j in enqueued] == [
        (g, f"tp-{g}" if i % 2 else None) for i, g in enumerate(generation_ids)
    ]
    assert await redis.zcard(log.keys.open_generations) == 20


async def test_a_burst_of_jobs_acquires_and_reads_requests_in_shared_round_trips(
    log: GenerationLog, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    generation_ids = [new_generation_id() for _ in range(20)]
    await asyncio.gather(*(log.create(g, REQUEST) for g in generation_ids))
    round_trips = count_round_trips(monkeypatch, redis)
    leases = await asyncio.gather(*(log.acquire(g, "worker-a") for g in generation_ids))
    requests = await asyncio.gather(*(log.request(g) for g in generation_ids))
    assert len(round_trips) == 2
    assert [(lease.generation_id, lease.epoch) for lease in leases if lease] == [
        (g, 1) for g in generation_ids
    ]
    assert requests == [REQUEST] * 20
    assert await log.acquire(generation_ids[0], "worker-b") is None  # held


async def test_a_create_run_again_leaves_the_generation_alone(
    log: GenerationLog, redis: Redis
) -> None:
    # A retry after a lost reply: the create runs twice.
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST, enqueue=True)
    lease = await log.acquire(generation_id, "worker-a")
    assert lease is not None
    await log.append(lease, 1, [events.Started()])
    await log.create(generation_id, REQUEST, enqueue=True)
    state = await log.state(generation_id)
    assert state is not None
    assert (state.status, state.epoch, state.last_seq) == ("running", lease.epoch, 1)
    assert await redis.xlen(log.keys.jobs) == 1


async def test_a_create_refused_for_memory_leaves_nothing_behind(
    redis_server_factory: Callable[..., RedisServer], settings: Settings
) -> None:
    server = redis_server_factory("--maxmemory-policy", "noeviction")
    async with Redis.from_url(server.url) as redis:
        log = GenerationLog(redis, settings)
        await redis.set("ballast", b"x" * 1_000_000)
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory", used - 500_000)  # every write is refused now
        generation_id = new_generation_id()
        with pytest.raises(OutOfMemoryError):
            await log.create(generation_id, REQUEST, enqueue=True)
        assert await redis.keys(f"{log.keys.prefix}:*") == []


async def test_reads_made_while_a_batch_is_out_leave_together_in_the_next(
    log: GenerationLog, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    generation_ids = [new_generation_id() for _ in range(10)]
    for generation_id in generation_ids:
        await log.create(generation_id, REQUEST)
    release = asyncio.Event()
    round_trips = count_round_trips(monkeypatch, redis, hold_first=release)
    first = asyncio.create_task(log.snapshot(generation_ids[0]))
    later = []
    for generation_id in generation_ids[1:]:  # one per tick while the first batch is out
        await asyncio.sleep(0)
        later.append(asyncio.create_task(log.snapshot(generation_id)))
    await asyncio.sleep(0)
    assert not first.done()
    release.set()
    snapshots = await asyncio.gather(first, *later)
    assert len(round_trips) == 2
    assert [(s.id if s else None, exists) for s, exists in snapshots] == [
        (g, False) for g in generation_ids
    ]


async def test_a_failed_read_reaches_only_its_caller(
    log: GenerationLog, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, broken = new_generation_id(), new_generation_id()
    await log.create(good, REQUEST)
    await redis.set(log.keys.meta(broken), "not a hash")
    round_trips = count_round_trips(monkeypatch, redis)
    results = await asyncio.gather(
        log.snapshot(good), log.snapshot(broken), log.snapshot(good), return_exceptions=True
    )
    assert len(round_trips) == 1
    assert isinstance(results[1], ResponseError)
    for result in (results[0], results[2]):
        assert not isinstance(result, BaseException)
        state, _ = result
        assert state is not None
        assert state.status == "queued"


async def test_calls_over_many_generations_go_in_slices_and_answer_each_in_order(
    log: GenerationLog, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.log.BULK_SLICE", 2)
    started_ones = [await leased_generation(log) for _ in range(5)]
    for count, (_, lease) in enumerate(started_ones):
        if count:
            await log.append(lease, 1, [events.Token(text="x")] * count)
    generation_ids = [generation_id for generation_id, _ in started_ones]
    gone = new_generation_id()

    assert await log.last_seqs([*generation_ids, gone]) == [0, 1, 2, 3, 4, 0]
    await log.mark_watched([*generation_ids, gone])
    for generation_id in generation_ids:
        assert await redis.hget(log.keys.meta(generation_id), "watched_ms") is not None
    assert not await redis.exists(log.keys.meta(gone))  # never re-created
