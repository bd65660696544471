"""The lease keeper: renews every lease a worker holds, and keeps its jobs from looking abandoned.

One loop per worker renews all held leases every `lease_seconds / 3`. Each pass
also resets the idle time of the held jobs in the consumer group (`JobQueue.touch`),
so a job's idle time is "time since its holder last renewed": other workers claim
a job only once it has been idle for a full lease, by which time the dead
holder's lease has expired and their acquire succeeds.

A lease the keeper could not renew for a full lease period (Redis down, frozen,
unreachable) is given up like one taken over: by then another worker may hold it,
so the run stops appending and its job is left for the takeover, which continues
the generation from the log.
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
    # Loop time at which the last renewal that succeeded (or the acquire) was sent; the
    # lease lasts at least a lease period from then. None: when `hold` is called.
    renewed_at: float | None = None


class LeaseKeeper:
    def __init__(self, log: GenerationLog, consumer: str) -> None:
        self.log = log
        self.consumer = consumer
        self.lease_seconds = log.settings.lease_seconds
        self.interval = self.lease_seconds / 3
        self._held: dict[str, HeldLease] = {}

    def hold(self, held: HeldLease) -> None:
        if held.renewed_at is None:
            held.renewed_at = asyncio.get_running_loop().time()
        self._held[held.lease.generation_id] = held

    def drop(self, generation_id: str) -> None:
        self._held.pop(generation_id, None)

    async def run(self) -> None:
        """Renew every `interval` (sooner when a lease would run out first), until
        cancelled or a pass fails unexpectedly.

        A pass handles Redis errors itself (the next pass retries). Any other failure
        is raised, not retried: `Worker` then stops, rather than run generations
        whose leases nobody renews (see `Worker.run`).
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._pause(loop.time()))
            await self.renew_all()

    def _pause(self, now: float) -> float:
        pause = self.interval
        for held in self._held.values():
            pause = min(pause, self._expiry(held) - now)
        return max(0.0, pause)

    def _expiry(self, held: HeldLease) -> float:
        assert held.renewed_at is not None  # set by `hold`
        return held.renewed_at + self.lease_seconds

    async def renew_all(self) -> None:
        now = asyncio.get_running_loop().time()
        for held in list(self._held.values()):
            if now >= self._expiry(held):
                self._lose(held, f"not renewed for {self.lease_seconds:g} s")
        holding = list(self._held.values())
        if not holding:
            return
        await asyncio.gather(*(self._renew(h) for h in holding))
        still_held = [h for h in holding if h.lease.generation_id in self._held]
        jobs = {h.lease.generation_id: h.job_id for h in still_held}
        if not jobs:
            return
        try:
            await self.log.jobs.touch(self.consumer, jobs)
        except RedisError as exc:
            logger.warning("could not refresh %d held jobs: %s", len(jobs), exc)

    async def _renew(self, held: HeldLease) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        expiry = self._expiry(held)
        try:
            # A renewal answered after the lease may have run out does not count:
            # by then the lease may be another worker's.
            async with asyncio.timeout_at(expiry):
                cancel_requested = await self.log.renew(held.lease)
        except AlreadyFinished:
            return  # our terminal append beat this renewal; the run drops the lease next
        except Fenced:
            self._lose(held, "taken over")
            return
        except TimeoutError:
            self._lose(held, f"not renewed for {self.lease_seconds:g} s")
            return
        except RedisError as exc:
            # The next pass retries (before the lease runs out); appends are fenced if
            # it is taken over meanwhile.
            logger.warning("could not renew lease on %s: %s", held.lease.generation_id, exc)
            if loop.time() >= expiry:
                self._lose(held, f"not renewed for {self.lease_seconds:g} s")
            return
        held.renewed_at = sent
        if cancel_requested:
            held.on_cancel()

    def _lose(self, held: HeldLease, why: str) -> None:
        generation_id = held.lease.generation_id
        if self._held.get(generation_id) is held:
            del self._held[generation_id]
            logger.warning("lease on %s lost (%s); stopping it", generation_id, why)
            held.on_lost()
