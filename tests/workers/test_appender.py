"""The appender's own instruments (its group commit and retries are in tests/test_log.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from app import events
from app.generations import parse_request
from app.keys import new_generation_id
from app.log import GenerationLog
from app.telemetry import Telemetry
from workers.appender import Appender, Outcome

REQUEST = parse_request(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')


async def test_append_latency_is_recorded_for_one_append_in_n(
    log: GenerationLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST)
    lease = await log.acquire(generation_id, "worker-a")
    assert lease is not None
    appended = asyncio.Event()
    append = log.append

    async def append_and_tell(*args: Any) -> int:
        last = await append(*args)
        appended.set()
        return last

    monkeypatch.setattr(log, "append", append_and_tell)
    reader = InMemoryMetricReader()
    telemetry = Telemetry(metric_readers=[reader])
    appender = Appender(log, lease, telemetry.metrics, latency_sample_every=3)
    for i in range(7):  # one append each
        assert await appender.put(events.Token(text=str(i)))
        await appended.wait()
        appended.clear()
    assert await appender.put(events.Done(reason="stop"))
    await appender.task
    assert appender.outcome is Outcome.ENDED
    data = reader.get_metrics_data()
    assert data is not None
    (point,) = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "tokentape.append_latency"
        for point in metric.data.data_points
    ]
    assert isinstance(point, HistogramDataPoint)
    assert point.count == 3  # appends 1, 4 and 7 of 8
    assert [e.seq for e in await log.read(generation_id, 0, 10)] == list(range(1, 9))
    telemetry.shutdown()
