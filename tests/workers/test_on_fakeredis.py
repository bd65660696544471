"""The worker on the in-process fakeredis that `tokentape serve` falls back to without a Redis."""

from __future__ import annotations

import asyncio

from fakeredis import FakeAsyncRedis

from app.events import Done
from app.settings import Settings
from app.store import GenerationLog
from tests.workers.conftest import ended, expected_events, sim_request, submit, until_log
from workers.runner import Worker


async def test_a_worker_runs_and_cancels_generations_on_fakeredis() -> None:
    redis = FakeAsyncRedis()
    settings = Settings(key_prefix="fake")
    log = GenerationLog(redis, settings)
    worker = Worker(redis, settings)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(5):
            await worker.ready.wait()
        request = sim_request(tokens=100, rate=5000, tool_calls=1)
        generation_id = await submit(log, request)
        entries = await until_log(log, generation_id, ended)
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
        assert [e.event() for e in entries[1:]] == expected_events(request)

        endless = await submit(log, sim_request(tokens=100_000, rate=100))
        await until_log(log, endless, lambda entries: len(entries) >= 2)
        await log.request_cancel(endless)
        entries = await until_log(log, endless, ended)
        assert entries[-1].event() == Done(reason="cancelled")
    finally:
        stop.set()
        await running
        await redis.aclose()
