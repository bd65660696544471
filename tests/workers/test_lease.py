"""The lease keeper: renewals, and what it does when a renewal is refused."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from app import events
from app.embedded import RedisProcess
from app.settings import Settings
from app.store import GenerationLog, Lease
from tests.conftest import leased_generation
from workers.lease import HeldLease, LeaseKeeper


async def held_by_keeper(log: GenerationLog) -> tuple[Lease, LeaseKeeper, list[str]]:
    """A leased generation held by a keeper, and the list its lost-lease callback fills."""
    generation_id, lease = await leased_generation(log)
    lost: list[str] = []
    keeper = LeaseKeeper(log, lease.worker_id)
    keeper.hold(HeldLease(lease, "0-1", lambda: None, lambda: lost.append(generation_id)))
    return lease, keeper, lost


async def test_a_renewal_racing_the_terminal_append_does_not_stop_the_run(
    log: GenerationLog, caplog: pytest.LogCaptureFixture
) -> None:
    lease, keeper, lost = await held_by_keeper(log)
    await log.append(lease, 1, [events.Done(reason="stop")])
    with caplog.at_level(logging.WARNING, logger="tokentape.worker"):
        await keeper.renew_all()
    assert lost == []
    assert [r.getMessage() for r in caplog.records if "lost" in r.getMessage()] == []


async def test_a_lease_taken_over_is_reported_lost(log: GenerationLog, redis: Redis) -> None:
    lease, keeper, lost = await held_by_keeper(log)
    await redis.delete(log.keys.lease(lease.generation_id))  # expired
    assert await log.acquire(lease.generation_id, "worker-b") is not None
    await keeper.renew_all()
    assert lost == [lease.generation_id]


@pytest.mark.parametrize("fault", ["frozen", "down"])
async def test_a_lease_not_renewed_for_a_lease_period_is_given_up(
    fault: str, redis_server_factory: Callable[..., RedisProcess], key_prefix: str
) -> None:
    server = redis_server_factory()
    # Renewals would wait longer than a lease for their reply: the lease decides.
    settings = Settings(
        redis_url=server.url, key_prefix=key_prefix, lease_seconds=0.6, redis_timeout_seconds=5
    )
    async with Redis.from_url(server.url, socket_timeout=None) as redis:
        log = GenerationLog(redis, settings)
        _, lease = await leased_generation(log)
        loop = asyncio.get_running_loop()
        lost = loop.create_future()
        keeper = LeaseKeeper(log, lease.worker_id)
        held_at = loop.time()
        keeper.hold(HeldLease(lease, "0-1", lambda: None, lambda: lost.set_result(loop.time())))
        renewing = asyncio.create_task(keeper.run())
        try:
            server.freeze() if fault == "frozen" else server.kill()
            async with asyncio.timeout(5):
                lost_at = await lost
        finally:
            renewing.cancel()
            server.thaw()
    # Not before the lease could have run out, and not much after.
    assert settings.lease_seconds <= lost_at - held_at < settings.lease_seconds + 0.5
