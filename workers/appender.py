"""Group commit of one generation's events into the log, with idempotent retries.

While one append is in flight, further events accumulate and go together in the
next, so a fast model costs one round trip per batch, not per event.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from asyncio import Future
from collections.abc import Callable, Sequence
from typing import Any

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
from app.settings import Settings
from app.store import GenerationLog, Lease
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

    APPENDED_TERMINAL = "appended_terminal"  # we appended the terminal event
    ALREADY_ENDED = "already_ended"  # someone else did, or the generation is gone
    HELD = "held"  # another worker holds the lease
    FENCED = "fenced"  # we lost the lease: the new holder owns the job
    HANDED_OFF = "handed_off"  # draining: stopped without a terminal event
    FAILED = "failed"  # Redis kept failing; the job is left for a takeover
    # The log lost what we appended (Redis came back with an older copy): a reset entry
    # says so, and the job is handed over to continue from the log.
    WENT_BACK = "went_back"


def retrying(settings: Settings, *, abandoned: Callable[[], bool] = bool) -> AsyncRetrying:
    """Bounded retries of a Redis call that is safe to repeat (an append is idempotent);
    none after a failed attempt once `abandoned()` is true."""
    # Past a lease, another worker may have taken over: stop and let fencing decide.
    past_a_lease = stop_after_delay(settings.lease_seconds)
    return AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT_ERRORS),
        wait=wait_random_exponential(multiplier=0.02, max=1.0),
        stop=lambda attempts: past_a_lease(attempts) or abandoned(),
        before_sleep=before_sleep_log(logger, logging.WARNING),
        reraise=True,
    )


class Appender:
    """Appends one generation's events in order, group-committed.

    While one append is in flight, further events accumulate and go together in
    the next. Transient Redis errors are retried with the same (lease, first_seq,
    batch), which the log applies at most once.

    At a model's pace every event is its own append, so the common one costs no
    task switch: `put` submits it to the log's pipeline when nothing is in
    flight, and its done-callback submits whatever accumulated meanwhile. The
    appender's task takes over for the rest: the terminal batch, a retry after
    a transient error, a refusal, the end.
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
        self.next_seq = lease.last_seq + 1  # the log confirmed every seq before it
        # The last seq an append was sent for, applied or not: clients may hold up to it.
        self.sent_to = lease.last_seq
        self.outcome: Outcome | None = None
        self._pending: list[Event] = []
        self._closed = False  # no more events are taken (a terminal was put, or stop)
        self._stop_outcome = Outcome.HANDED_OFF
        self._in_flight = False  # an append submitted by `_submit_pending` awaits its reply
        # The task appends next (or ends): `_submit_pending` must not, or seqs would cross.
        self._task_turn = False
        self._failed: tuple[Sequence[Event], BaseException] | None = None
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.task = asyncio.create_task(self._flush_loop())

    @property
    def accepting(self) -> bool:
        return not self._closed

    def _fenced(self) -> bool:
        return self._closed and self._stop_outcome is Outcome.FENCED

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
        self._submit_pending()
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
        if not self._in_flight:
            self._to_task()

    def _to_task(self) -> None:
        self._task_turn = True
        self._wake.set()

    def _submit_pending(self) -> None:
        """Submit the next batch from here, if no append is in flight and it is ours."""
        if self._in_flight or self._task_turn or not self._pending or self.task.done():
            return
        batch = self._pending[:MAX_BATCH]
        if events.is_terminal(batch[-1]):
            self._to_task()  # `log.append` also takes the generation out of the open set
            return
        del self._pending[:MAX_BATCH]
        self._room.set()
        began = self._began()
        self._in_flight = True
        self.sent_to = max(self.sent_to, self.next_seq + len(batch) - 1)
        reply = self.log.append_soon(self.lease, self.next_seq, batch)
        reply.add_done_callback(functools.partial(self._appended, batch, began))

    def _appended(self, batch: Sequence[Event], began: float | None, reply: Future[Any]) -> None:
        self._in_flight = False
        if reply.cancelled():  # the loop is shutting down
            self.task.cancel()
            return
        try:
            # Read even when the task has ended: an unread error would be logged as lost.
            last = self.log.appended(self.lease, reply.result())
        except Exception as exc:
            if not self.task.done():
                self._failed = (batch, exc)
                self._to_task()
            return
        if self.task.done():
            return
        self._done(last, began)
        if self._pending:
            self._submit_pending()
        elif self._closed:
            self._to_task()

    async def _flush_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._in_flight:
                    continue  # its callback hands over when it is done
                self._task_turn = True
                if self._failed is not None:
                    batch, error = self._failed
                    self._failed = None
                    if not isinstance(error, TRANSIENT_ERRORS):
                        raise error
                    await self._retry(batch, self._began())
                while self._pending:
                    batch = self._pending[:MAX_BATCH]
                    del self._pending[:MAX_BATCH]
                    self._room.set()
                    await self._append(batch)
                    if events.is_terminal(batch[-1]):
                        self.outcome = Outcome.APPENDED_TERMINAL
                        return
                if self._closed:
                    self.outcome = self._stop_outcome
                    return
                self._task_turn = False
        except Fenced:
            self.outcome = Outcome.FENCED
        except (AlreadyFinished, NotFound):
            self.outcome = Outcome.ALREADY_ENDED
        except SeqConflict as conflict:
            # The log went back under us, most likely (the run checks it).
            logger.warning(
                "%s: the log disagrees with our seq: %s", self.lease.generation_id, conflict
            )
            self.outcome = Outcome.FAILED
        except RedisError as exc:
            if self._stop_outcome is Outcome.FENCED:
                self.outcome = Outcome.FENCED  # the lease was given up while retrying
            else:
                logger.error("%s: append kept failing: %s", self.lease.generation_id, exc)
                self.outcome = Outcome.FAILED
        finally:
            self._closed = True
            self._task_turn = True
            self._pending.clear()
            self._room.set()

    def _began(self) -> float | None:
        """The start time of an append whose latency is recorded, else None."""
        timed = self._metrics is not None and self._appends % self._latency_sample_every == 0
        self._appends += 1
        return time.perf_counter() if timed else None

    def _done(self, last: int, began: float | None) -> None:
        if began is not None and self._metrics is not None:
            self._metrics.append_latency.record(time.perf_counter() - began)
        self.next_seq = last + 1

    async def _append(self, batch: Sequence[Event]) -> None:
        began = self._began()
        self.sent_to = max(self.sent_to, self.next_seq + len(batch) - 1)
        try:
            last = await self.log.append(self.lease, self.next_seq, batch)
        except TRANSIENT_ERRORS:
            await self._retry(batch, began)
            return
        self._done(last, began)

    async def _retry(self, batch: Sequence[Event], began: float | None) -> None:
        # Only now the retry loop: tenacity costs more CPU per call than the append.
        # A lease given up meanwhile (`stop(FENCED)`) ends it: nothing more is appended.
        async for attempt in retrying(self.log.settings, abandoned=self._fenced):
            with attempt:
                last = await self.log.append(self.lease, self.next_seq, batch)
        self._done(last, began)
