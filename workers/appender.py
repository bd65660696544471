"""Group commit of one generation's events into the log, with idempotent retries.

While one append is in flight, further events accumulate and go together in the
next, so a fast model costs one round trip per batch, not per event.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Sequence

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from app import events
from app.errors import AlreadyFinished, Fenced, NotFound, SeqConflict
from app.events import Event
from app.log import GenerationLog, Lease
from app.settings import Settings
from app.telemetry import Metrics

logger = logging.getLogger("tokentape.worker")

# Most events one append carries; more wait for the next one.
MAX_BATCH = 512
# Events an adapter may be ahead of the log before it waits (backpressure).
MAX_PENDING = 4096
# Errors after which a retried append may succeed; a refusal never is one.
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class Outcome(enum.Enum):
    """How a generation run ended for this worker, which decides what happens to its job."""

    ENDED = "ended"  # we appended the terminal event
    FINISHED = "finished"  # the generation had already ended (or is gone)
    HELD = "held"  # another worker holds the lease
    FENCED = "fenced"  # we lost the lease: the new holder owns the job
    HANDED_OFF = "handed_off"  # draining: stopped without a terminal event
    FAILED = "failed"  # Redis kept failing; the job is left for a takeover


def retrying(settings: Settings) -> AsyncRetrying:
    """Bounded retries of a Redis call that is safe to repeat (an append is idempotent)."""
    return AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT_ERRORS),
        wait=wait_random_exponential(multiplier=0.02, max=1.0),
        # Past a lease, another worker may have taken over: stop and let fencing decide.
        stop=stop_after_delay(settings.lease_seconds),
        before_sleep=before_sleep_log(logger, logging.WARNING),
        reraise=True,
    )


class Appender:
    """Appends one generation's events in order, group-committed.

    While one append is in flight, further events accumulate and go together in
    the next. Transient Redis errors are retried with the same (lease, first_seq,
    batch), which the log applies at most once.
    """

    def __init__(
        self,
        log: GenerationLog,
        lease: Lease,
        metrics: Metrics | None = None,
        *,
        latency_sample_every: int = 1,
    ) -> None:
        self.log = log
        self.lease = lease
        self._metrics = metrics
        # `append_latency` is recorded for one append in this many: a record costs
        # about as much CPU as packing the append.
        self._latency_sample_every = max(1, latency_sample_every)
        self._appends = 0
        self.next_seq = lease.last_seq + 1
        self.outcome: Outcome | None = None
        self._pending: list[Event] = []
        self._closed = False  # no more events are taken (a terminal was put, or stop)
        self._stop_outcome = Outcome.HANDED_OFF
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.task = asyncio.create_task(self._flush_loop())

    @property
    def accepting(self) -> bool:
        return not self._closed

    async def put(self, event: Event) -> bool:
        """Queue an event; False once the appender takes no more (stop the producer)."""
        while len(self._pending) >= MAX_PENDING and not self._closed:
            self._room.clear()
            await self._room.wait()
        if self._closed:
            return False
        self._pending.append(event)
        if events.is_terminal(event):
            self._closed = True
        self._wake.set()
        return True

    def stop(self, outcome: Outcome) -> None:
        """Take no more events and end without a terminal event, as `outcome`.

        A FENCED appender drops what is pending: nothing more may reach the log.
        Otherwise what the adapter already produced is appended first.
        """
        self._closed = True
        self._stop_outcome = outcome
        if outcome is Outcome.FENCED:
            self._pending.clear()
        self._room.set()
        self._wake.set()

    async def _flush_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending:
                    batch = self._pending[:MAX_BATCH]
                    del self._pending[:MAX_BATCH]
                    self._room.set()
                    await self._append(batch)
                    if events.is_terminal(batch[-1]):
                        self.outcome = Outcome.ENDED
                        return
                if self._closed and not self._pending:
                    self.outcome = self._stop_outcome
                    return
        except Fenced:
            self.outcome = Outcome.FENCED
        except (AlreadyFinished, NotFound):
            self.outcome = Outcome.FINISHED
        except SeqConflict:
            logger.exception("%s: the log disagrees with our seq", self.lease.generation_id)
            self.outcome = Outcome.FAILED
        except RedisError as exc:
            logger.error("%s: append kept failing: %s", self.lease.generation_id, exc)
            self.outcome = Outcome.FAILED
        finally:
            self._closed = True
            self._pending.clear()
            self._room.set()

    async def _append(self, batch: Sequence[Event]) -> None:
        timed = self._metrics is not None and self._appends % self._latency_sample_every == 0
        self._appends += 1
        began = time.perf_counter() if timed else 0.0
        try:
            last = await self.log.append(self.lease, self.next_seq, batch)
        except TRANSIENT_ERRORS:
            # Only now the retry loop: tenacity costs more CPU per call than the append.
            async for attempt in retrying(self.log.settings):
                with attempt:
                    last = await self.log.append(self.lease, self.next_seq, batch)
        if timed and self._metrics is not None:
            self._metrics.append_latency.record(time.perf_counter() - began)
        self.next_seq = last + 1
