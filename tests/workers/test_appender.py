"""The appender's own instruments (its group commit and retries are in tests/store/test_transport.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from redis.asyncio import Redis

from app import events
from app.embedded import RedisProcess
from app.generations import parse_request
from app.settings import Settings
from app.store import GenerationLog
from app.telemetry import Telemetry
from tests.conftest import leased_generation
from tests.telemetry.conftest import metric_points
from tests.workers.conftest import spy_appends
from workers.appender import MAX_BATCH, Appender, Outcome

REQUEST = parse_request(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')


async def test_a_producer_faster_than_redis_is_appended_in_batches_of_up_to_max_batch(
    log: GenerationLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    generation_id, lease = await leased_generation(log)
    calls = spy_appends(monkeypatch, log)
    appender = Appender(log, lease)
    count = 3 * MAX_BATCH
    for i in range(count):  # no await yields to the loop: all queued before any reply
        assert await appender.put(events.Token(text=str(i)))
    assert await appender.put(events.Done(reason="stop"))
    await appender.task
    assert appender.outcome is Outcome.APPENDED_TERMINAL
    # The first goes alone, the rest waits for its reply and goes MAX_BATCH at a time.
    assert [len(batch) for _, batch in calls] == [1, MAX_BATCH, MAX_BATCH, MAX_BATCH]
    entries = await log.read(generation_id, 0, count + 10)
    assert [e.seq for e in entries] == list(range(1, count + 2))


@pytest.mark.parametrize("outcome", [Outcome.FENCED, Outcome.HANDED_OFF])
async def test_a_stop_while_an_append_is_in_flight(
    log: GenerationLog, monkeypatch: pytest.MonkeyPatch, outcome: Outcome
) -> None:
    generation_id, lease = await leased_generation(log)
    calls = spy_appends(monkeypatch, log)
    appender = Appender(log, lease)
    assert await appender.put(events.Token(text="in flight"))
    assert await appender.put(events.Token(text="pending"))
    appender.stop(outcome)
    assert not await appender.put(events.Token(text="refused"))
    await appender.task
    assert appender.outcome is outcome
    texts = [e.event() for e in await log.read(generation_id, 0, 10)]
    if outcome is Outcome.FENCED:  # what was pending must not reach the log
        assert texts == [events.Token(text="in flight")]
    else:  # what the adapter produced is appended before handing off
        assert texts == [events.Token(text="in flight"), events.Token(text="pending")]
    assert len(calls) == len(texts)


async def test_append_latency_is_recorded_for_one_append_in_n(
    log: GenerationLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    generation_id, lease = await leased_generation(log)
    appended = asyncio.Event()
    reply_read = log.appended  # how the appender reads each non-terminal append's reply

    def read_and_tell(*args: Any) -> int:
        appended.set()
        return reply_read(*args)

    monkeypatch.setattr(log, "appended", read_and_tell)
    reader = InMemoryMetricReader()
    telemetry = Telemetry(metric_readers=[reader])
    appender = Appender(log, lease, telemetry.metrics, latency_sample_every=3)
    for i in range(7):  # one append each
        assert await appender.put(events.Token(text=str(i)))
        await appended.wait()
        appended.clear()
    assert await appender.put(events.Done(reason="stop"))
    await appender.task
    assert appender.outcome is Outcome.APPENDED_TERMINAL
    (point,) = metric_points(reader, "tokentape.append_latency")
    assert isinstance(point, HistogramDataPoint)
    assert point.count == 3  # appends 1, 4 and 7 of 8
    assert [e.seq for e in await log.read(generation_id, 0, 10)] == list(range(1, 9))
    telemetry.shutdown()


async def test_a_lease_given_up_while_appends_are_retried_ends_the_retries(
    redis_server_factory: Callable[..., RedisProcess], key_prefix: str
) -> None:
    server = redis_server_factory()
    # Retries could go on for the whole lease: giving the lease up must end them sooner.
    settings = Settings(redis_url=server.url, key_prefix=key_prefix, lease_seconds=30)
    async with Redis.from_url(server.url, socket_timeout=None) as redis:
        log = GenerationLog(redis, settings)
        _, lease = await leased_generation(log)
        appender = Appender(log, lease)
        server.kill()
        assert await appender.put(events.Token(text="never confirmed"))
        appender.stop(Outcome.FENCED)
        async with asyncio.timeout(5):
            await appender.task
    assert appender.outcome is Outcome.FENCED
