"""The lease keeper: renewals, and what it does when a renewal is refused."""

from __future__ import annotations

import logging

import pytest

from app import events
from app.log import GenerationLog
from tests.workers.conftest import sim_request, submit
from workers.lease import HeldLease, LeaseKeeper


async def test_a_renewal_racing_the_terminal_append_does_not_stop_the_run(
    log: GenerationLog, caplog: pytest.LogCaptureFixture
) -> None:
    generation_id = await submit(log, sim_request())
    lease = await log.acquire(generation_id, "worker-a")
    assert lease is not None
    lost: list[str] = []
    keeper = LeaseKeeper(log, "worker-a")
    keeper.hold(HeldLease(lease, "0-1", lambda: None, lambda: lost.append(generation_id)))
    await log.append(lease, 1, [events.Done(reason="stop")])
    with caplog.at_level(logging.WARNING, logger="tokentape.worker"):
        await keeper.renew_all()
    assert lost == []
    assert [r.getMessage() for r in caplog.records if "lost" in r.getMessage()] == []


async def test_a_lease_taken_over_is_reported_lost(log: GenerationLog) -> None:
    generation_id = await submit(log, sim_request())
    lease = await log.acquire(generation_id, "worker-a")
    assert lease is not None
    lost: list[str] = []
    keeper = LeaseKeeper(log, "worker-a")
    keeper.hold(HeldLease(lease, "0-1", lambda: None, lambda: lost.append(generation_id)))
    await log.redis.delete(log.keys.lease(generation_id))  # expired
    assert await log.acquire(generation_id, "worker-b") is not None
    await keeper.renew_all()
    assert lost == [generation_id]
