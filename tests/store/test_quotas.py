"""Per API key quotas on a real Redis, shared by every reader: never past a limit."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from app import events
from app.generations import parse_request
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog, quotas
from tests.conftest import REDIS_URL

REQUEST = parse_request(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')
OWNER = "b3duZXItaGFzaC0xMjM0NQ"


async def create(log: GenerationLog, owner: str = OWNER) -> tuple[str, quotas.Admission]:
    generation_id = new_generation_id()
    admission = await log.quotas.admit(owner, generation_id)
    if admission.admitted:
        await log.create(generation_id, REQUEST, owner=owner)
    return generation_id, admission


async def test_the_owner_is_stored_with_the_generation(log: GenerationLog) -> None:
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST, owner=OWNER)
    state, _ = await log.snapshot(generation_id)
    assert state is not None
    assert state.owner == OWNER
    open_id = new_generation_id()
    await log.create(open_id, REQUEST)
    assert (await log.state(open_id)).owner is None  # type: ignore[union-attr]


@pytest.mark.parametrize("limit", [1, 7])
async def test_a_burst_from_many_readers_creates_exactly_the_limit_per_minute(
    settings: Settings, redis: Redis, limit: int
) -> None:
    capped = settings.replace(max_creations_per_minute=limit, max_running_per_key=0)
    clients = [Redis.from_url(REDIS_URL) for _ in range(3)]
    try:
        logs = [GenerationLog(client, capped) for client in clients]
        results = await asyncio.gather(*(create(logs[i % 3]) for i in range(limit * 3)))
        refused = [admission for _, admission in results if not admission.admitted]
        assert len(results) - len(refused) == limit
        assert {admission.refused_by for admission in refused} == {"rate"}
        assert all(0 < admission.retry_after_seconds <= 60 for admission in refused)
        # Another key has its own minute.
        _, other = await create(logs[0], owner="another-owner-hash-0001")
        assert other.admitted
    finally:
        for client in clients:
            await client.aclose()


async def test_running_generations_are_capped_and_an_ended_one_frees_its_place(
    settings: Settings, redis: Redis
) -> None:
    capped = settings.replace(max_running_per_key=3, max_creations_per_minute=0)
    clients = [Redis.from_url(REDIS_URL) for _ in range(3)]
    try:
        logs = [GenerationLog(client, capped) for client in clients]
        results = await asyncio.gather(*(create(logs[i % 3]) for i in range(9)))
        admitted = [generation_id for generation_id, a in results if a.admitted]
        assert len(admitted) == 3
        refused = [a for _, a in results if not a.admitted]
        assert {a.refused_by for a in refused} == {"running"}
        assert all(a.retry_after_seconds > 0 for a in refused)
        # Still running: still refused.
        assert not (await create(logs[0]))[1].admitted
        await logs[1].close(admitted[0], events.Done(reason="stop"))
        _, again = await create(logs[2])
        assert again.admitted
        assert not (await create(logs[0]))[1].admitted
    finally:
        for client in clients:
            await client.aclose()


async def test_an_admission_whose_create_never_ran_is_held_a_moment_then_dropped(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    capped = GenerationLog(redis, settings.replace(max_running_per_key=1))
    assert (await capped.quotas.admit(OWNER, new_generation_id())).admitted  # never created
    # Just admitted: its create may be on the way.
    assert not (await capped.quotas.admit(OWNER, new_generation_id())).admitted
    monkeypatch.setattr(quotas, "CREATE_GRACE_MS", -1)
    assert (await capped.quotas.admit(OWNER, new_generation_id())).admitted


async def test_without_limits_no_key_is_written(settings: Settings, redis: Redis) -> None:
    log = GenerationLog(redis, settings.replace(max_running_per_key=0, max_creations_per_minute=0))
    assert (await log.quotas.admit(OWNER, new_generation_id())).admitted
    assert not await redis.exists(log.keys.owner_running(OWNER), log.keys.owner_created(OWNER))
