"""The benchmark's naive reader, served in-process on the test's Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.store import GenerationLog
from scripts.naive_server import build_app
from tests.conftest import REDIS_URL

Client = TestClient[Any, web.Application]
Producer = Literal["worker", "inprocess"]
StartNaive = Callable[[Producer], Awaitable[Client]]


@pytest.fixture
async def start_naive(
    log: GenerationLog, aiohttp_client: Callable[[web.Application], Awaitable[Client]]
) -> AsyncIterator[StartNaive]:
    """The naive reader, its generations produced by workers or by itself ("inprocess")."""
    # Blocking XREADs: no socket timeout, as the benchmark runs it.
    blocking_redis = Redis.from_url(REDIS_URL, socket_timeout=None)

    async def start(producer: Producer) -> Client:
        return await aiohttp_client(build_app(log, blocking_redis, producer))

    yield start
    await blocking_redis.aclose()
