"""The lease keeper: renews every lease a worker holds, and keeps its jobs from looking abandoned.

One loop per worker renews all held leases every `lease_seconds / 3`. Each pass
also resets the idle time of the held jobs in the consumer group (`JobQueue.touch`),
so a job's idle time is "time since its holder last renewed": other workers claim
a job only once it has been idle for a full lease, by which time the dead
holder's lease has expired and their acquire succeeds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from redis.exceptions import RedisError

from app.errors import AlreadyFinished, Fenced
from app.store import GenerationLog, Lease

logger = logging.getLogger("tokentape.worker")


@dataclasses.dataclass
class HeldLease:
    lease: Lease
    job_id: str
    on_cancel: Callable[[], None]  # a cancel was requested (backstop to the pushed cancel)
    on_lost: Callable[[], None]  # the lease is no longer ours: stop appending


class LeaseKeeper:
    def __init__(self, log: GenerationLog, consumer: str) -> None:
        self.log = log
        self.consumer = consumer
        self.interval = log.settings.lease_seconds / 3
        self._held: dict[str, HeldLease] = {}

    def hold(self, held: HeldLease) -> None:
        self._held[held.lease.generation_id] = held

    def drop(self, generation_id: str) -> None:
        self._held.pop(generation_id, None)

    async def run(self) -> None:
        """Renew every `interval`, until cancelled or a pass fails unexpectedly.

        A pass handles Redis errors itself (the next pass retries). Any other failure
        is raised, not retried: `Worker` then stops, rather than run generations
        whose leases nobody renews (see `Worker.run`).
        """
        while True:
            await asyncio.sleep(self.interval)
            await self.renew_all()

    async def renew_all(self) -> None:
        held = list(self._held.values())
        if not held:
            return
        await asyncio.gather(*(self._renew(h) for h in held))
        still_held = [h for h in held if h.lease.generation_id in self._held]
        jobs = {h.lease.generation_id: h.job_id for h in still_held}
        if not jobs:
            return
        try:
            await self.log.jobs.touch(self.consumer, jobs)
        except RedisError as exc:
            logger.warning("could not refresh %d held jobs: %s", len(jobs), exc)

    async def _renew(self, held: HeldLease) -> None:
        try:
            cancel_requested = await self.log.renew(held.lease)
        except AlreadyFinished:
            return  # our terminal append beat this renewal; the run drops the lease next
        except Fenced:
            if self._held.get(held.lease.generation_id) is held:
                logger.warning("lease on %s lost; stopping it", held.lease.generation_id)
                held.on_lost()
            return
        except RedisError as exc:
            # The next pass retries; appends are fenced if the lease lapses meanwhile.
            logger.warning("could not renew lease on %s: %s", held.lease.generation_id, exc)
            return
        if cancel_requested:
            held.on_cancel()
