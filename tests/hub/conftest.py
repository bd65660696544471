"""A hub on the real Redis, and reading what a subscription hands out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app import sse
from app.generations import parse_request
from app.hub import Hub, Subscription
from app.settings import Settings
from app.store import GenerationLog
from tests.conftest import REDIS_URL, FakeClock

REQUEST = parse_request(b'{"model":"sim","messages":[{"role":"user","content":"x"}]}')


@pytest.fixture
def hub_name() -> str:
    """The client name of the hub's pub/sub connection: a test finds it in CLIENT LIST by it."""
    return f"tttest-hub-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def hub(redis: Redis, settings: Settings, hub_name: str) -> AsyncIterator[Hub]:
    """A started hub whose recheck beat is too slow to matter: only live delivery counts.
    Its clock stands still, so a round of live writes never looks long enough to pause the
    next (tests of that pause make a hub of their own)."""
    pubsub_redis = Redis.from_url(REDIS_URL, client_name=hub_name)
    hub = Hub(GenerationLog(redis, settings), pubsub_redis, recheck_seconds=60, clock=FakeClock())
    await hub.start()
    yield hub
    await hub.stop()
    await pubsub_redis.aclose()


async def read_seqs(subscription: Subscription, parser: sse.Parser, until: int) -> list[int]:
    """The seqs handed out until `until`, within 5 s: well under a recheck beat of 60 s."""
    seqs: list[int] = []
    async with asyncio.timeout(5):
        while not seqs or seqs[-1] < until:
            chunk = await subscription.next_chunk(1.0)
            assert chunk is not None
            seqs.extend(int(m.id or 0) for m in parser.feed(chunk))
    return seqs
