"""The transport against a real Redis: per-tick pipelines, packing, one caller's error
reaching only that caller, lost replies, NOSCRIPT, bounded batches and slices."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import events
from app.embedded import RedisProcess
from app.errors import Fenced, SeqConflict
from app.generations import parse_request
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog
from app.store.jobs import job_from_entry
from app.store.transport import pack
from tests.conftest import leased_generation
from tests.store.conftest import count_round_trips
from workers.appender import Appender, Outcome

REQUEST = parse_request(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')


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
        # Exactly, not truncated to an integer.
        (b"SET", "k", 1.5),
        (b"SET", "k", 0.1),
    ],
)
def test_packed_commands_are_what_redis_py_sends(
    args: tuple[bytes | str | int | float, ...],
) -> None:
    redis_py = Connection()
    assert pack(*args) == b"".join(redis_py.pack_command(*args))


@pytest.mark.parametrize("arg", [None, [b"x"]])
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
async def cutter(redis_server_factory: Callable[..., RedisProcess]) -> AsyncIterator[ReplyCutter]:
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
    (sending,) = log._appends._sending
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await append
    assert released == [False]  # its replies unread: disconnected, not reused
    monkeypatch.undo()
    # Applied or not, the retry reads its own reply.
    assert await log.append(lease, 1, [events.Token(text="x")]) == 1
    assert [e.seq for e in await log.read(generation_id, 0, 10)] == [1]


async def test_pipelined_appends_load_the_script_where_redis_lacks_it(
    redis_server_factory: Callable[..., RedisProcess], settings: Settings
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


async def test_creates_in_one_tick_share_their_round_trips_and_enqueue_their_jobs(
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
    assert len(round_trips) == 2  # the generations, then their indexes and jobs
    states = await asyncio.gather(*(log.state(g) for g in generation_ids))
    assert [s.status if s else None for s in states] == ["queued"] * 20
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(log.keys.jobs))
    enqueued = [job_from_entry(entry_id, fields) for entry_id, fields in entries]
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
    assert [(lease.generation_id, lease.attempt) for lease in leases if lease] == [
        (g, 1) for g in generation_ids
    ]
    assert requests == [REQUEST] * 20
    assert await log.acquire(generation_ids[0], "worker-b") is None  # held


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
    monkeypatch.setattr("app.store.log.BULK_SLICE", 2)
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


@pytest.fixture
def frozen(redis_server_factory: Callable[..., RedisProcess]) -> Iterator[RedisProcess]:
    """A Redis of the test's own, frozen (SIGSTOP) once the test calls `freeze()`; thawed after."""
    server = redis_server_factory()
    yield server
    server.thaw()


async def test_a_frozen_redis_fails_a_call_within_its_timeout_instead_of_hanging(
    frozen: RedisProcess, settings: Settings
) -> None:
    settings = settings.replace(redis_timeout_seconds=0.3)
    async with Redis.from_url(frozen.url, socket_timeout=None) as redis:
        log = GenerationLog(redis, settings)
        generation_id, lease = await leased_generation(log)
        frozen.freeze()
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(RedisTimeoutError):
            # Not the test's own timeout: the store's.
            async with asyncio.timeout(5):
                await log.append(lease, 1, [events.Token(text="x")])
        assert 0.3 <= loop.time() - began < 2
        # A connection nobody answers on is not the only trap: new ones connect (the
        # kernel accepts them) and wait as long.
        with pytest.raises(RedisTimeoutError):
            async with asyncio.timeout(5):
                await log.state(generation_id)
        frozen.thaw()
        # The connection that timed out was dropped: the next call reads its own reply.
        assert await log.append(lease, 1, [events.Token(text="x")]) == 1
        state = await log.state(generation_id)
        assert state is not None
        assert state.last_seq == 1


async def test_a_blocking_job_read_on_a_frozen_redis_fails_after_its_block_and_timeout(
    frozen: RedisProcess, settings: Settings
) -> None:
    settings = settings.replace(redis_timeout_seconds=0.3)
    async with Redis.from_url(frozen.url, socket_timeout=None) as redis:
        log = GenerationLog(redis, settings)
        await log.jobs.ensure_group()
        reader = log.jobs.reader("worker-a")
        try:
            assert await reader.read(10, 100) == []  # blocked 0.1 s: well within the bound
            frozen.freeze()
            began = asyncio.get_running_loop().time()
            with pytest.raises(RedisTimeoutError):
                async with asyncio.timeout(5):
                    await reader.read(10, 100)
            assert asyncio.get_running_loop().time() - began >= 0.4
        finally:
            await reader.aclose()
