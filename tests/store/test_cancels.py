"""Cancel requests as a worker hears them: one subscription, ids as they are published."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from app.embedded import RedisProcess
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog
from tests.conftest import ON_EVERY_BACKEND, Awaited, leased_generation


@ON_EVERY_BACKEND
async def test_a_requested_cancel_is_heard_by_every_subscribed_worker(log: GenerationLog) -> None:
    generation_id, _ = await leased_generation(log)
    async with log.cancel_requests() as first, log.cancel_requests() as second:
        await log.request_cancel(generation_id)
        async with asyncio.timeout(5):
            heard = [await anext(aiter(first)), await anext(aiter(second))]
    assert heard == [generation_id, generation_id]


async def test_a_message_that_is_no_generation_id_is_dropped(
    log: GenerationLog, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    generation_id = new_generation_id()
    async with log.cancel_requests() as requests:
        await redis.publish(log.keys.cancel_channel, b"\xff\xfe")
        await redis.publish(log.keys.cancel_channel, generation_id)
        with caplog.at_level(logging.WARNING, logger="tokentape.store"):
            async with asyncio.timeout(5):
                assert await anext(aiter(requests)) == generation_id
    (dropped,) = [r.getMessage() for r in caplog.records if r.name == "tokentape.store"]
    assert dropped.startswith("dropped a cancel request")


async def test_a_new_iteration_continues_the_same_subscription(
    log: GenerationLog, redis: Redis
) -> None:
    ids = [new_generation_id() for _ in range(2)]
    async with log.cancel_requests() as requests:
        for generation_id in ids:
            await redis.publish(log.keys.cancel_channel, generation_id)
        async with asyncio.timeout(5):
            heard = [await anext(aiter(requests)), await anext(aiter(requests))]
    assert heard == ids


async def test_a_subscription_to_a_frozen_redis_is_dropped_and_made_again(
    redis_server_factory: Callable[..., RedisProcess], key_prefix: str
) -> None:
    server = redis_server_factory()
    settings = Settings(redis_url=server.url, key_prefix=key_prefix, redis_timeout_seconds=0.2)
    silent = Awaited("no reply to a ping")
    logging.getLogger("tokentape.store").addHandler(silent)
    generation_id = new_generation_id()
    try:
        async with Redis.from_url(server.url, socket_timeout=None) as redis:
            log = GenerationLog(redis, settings)
            async with log.cancel_requests() as requests:
                heard = asyncio.ensure_future(anext(aiter(requests)))
                server.freeze()  # the socket stays open; nothing answers, nothing closes it
                async with asyncio.timeout(10):
                    await silent.seen.wait()
                server.thaw()
                # Published until heard: subscribed again, on a new connection, soon.
                async with asyncio.timeout(10):
                    while not heard.done():
                        await redis.publish(log.keys.cancel_channel, generation_id)
                        await asyncio.wait([heard], timeout=0.1)
        assert heard.result() == generation_id
    finally:
        logging.getLogger("tokentape.store").removeHandler(silent)
        server.thaw()
