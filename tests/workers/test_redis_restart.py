"""A worker outlives a Redis restart: it reconnects, re-subscribes and recreates its group."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.events import Done
from app.settings import Settings
from app.store import GenerationLog
from tests.workers.conftest import at_least, ended, sim_request, submit, until_log
from workers.runner import Worker


async def test_a_worker_keeps_working_after_redis_restarts_empty(
    redis_server_factory: Callable[..., Any], key_prefix: str
) -> None:
    server = redis_server_factory()
    # Ten-second leases: a cancel can only arrive through the re-subscribed channel.
    settings = Settings(redis_url=server.url, key_prefix=key_prefix, lease_seconds=10.0)
    redis = Redis.from_url(server.url, socket_timeout=None)
    worker = Worker(redis, settings)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(5):
            await worker.ready.wait()
        server.kill()
        server.start()  # same port, no data: the job group is gone
        log = GenerationLog(redis, settings)
        # The worker's subscription is another client's state on the server: poll it.
        for _ in range(200):
            with contextlib.suppress(RedisConnectionError):  # a pooled connection of before
                if (await redis.pubsub_numsub(log.keys.cancel_channel))[0][1] >= 1:
                    break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the worker never re-subscribed to cancel requests")
        generation_id = await submit(log, sim_request(tokens=100_000, rate=100))
        await until_log(log, generation_id, at_least(3))
        await log.request_cancel(generation_id)
        entries = await until_log(log, generation_id, ended)
        assert entries[-1].event() == Done(reason="cancelled")
    finally:
        stop.set()
        await running
        await redis.aclose()
