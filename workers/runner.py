"""The worker runtime: consume generation jobs, run model adapters, append their events.

A `Worker` reads jobs from the consumer group, takes each generation's lease,
appends `started` and then the adapter's events in group-committed batches
(`workers.appender`), and ends every generation with exactly one terminal
event. Besides that it runs five loops under `app.loops`: the lease keeper
(`workers.lease`), a claimer that takes over jobs whose worker died, the
retention sweeper, the listener of cancel requests (pushed, one subscription
per process), and the probe of its event loop's lag, which holds new jobs back
while the worker's CPU is saturated.

The worker talks to Redis only through `app.store`: commands go through the
client the caller passes in (give it a bounded pool, as `tokentape worker` does);
the job reader and the cancel subscription hold one more connection each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from app import events, loops
from app.errors import AlreadyFinished, Fenced
from app.events import Done, Error, Event, Reset, Started, Token, ToolCall
from app.generations import GenerationRequest
from app.settings import Settings
from app.store import CancelRequests, GenerationLog, Job, JobReader, Lease
from app.telemetry import Telemetry
from app.telemetry.tracing import GenerationSpan
from workers.appender import TRANSIENT_ERRORS, Appender, Outcome, retrying
from workers.lease import HeldLease, LeaseKeeper
from workers.models import Adapters
from workers.models.base import GenerationContext, ModelAdapter, ProviderError

logger = logging.getLogger("tokentape.worker")

AdapterResolver = Callable[[str], ModelAdapter]

# Longest a job read blocks, so `stop` is noticed this soon.
READ_BLOCK_MS = 500
# A generation taken over this many times (crashes, hand-offs) ends with an error
# instead of crashing yet another worker.
MAX_ATTEMPTS = 10


class _GenerationRun:
    """One attempt at one generation by this worker: from acquire to its job's outcome."""

    def __init__(self, worker: Worker, job: Job) -> None:
        self.worker = worker
        self.job = job
        self.generation_id = job.generation_id
        self.lease: Lease | None = None
        self.appender: Appender | None = None
        self.span: GenerationSpan | None = None
        self.producer: asyncio.Task[None] | None = None
        self._cancel_wanted = False
        self._handing_off = False
        self._cancelling: asyncio.Task[None] | None = None

    # -- signals from the cancel subscription, the lease keeper and the drain --

    def cancel(self) -> None:
        """Stop the adapter (closing its upstream) and append done(cancelled)."""
        self._cancel_wanted = True
        if self.appender is None or self.producer is None or self._cancelling is not None:
            return  # `execute` checks the flag once it has a lease
        if self.appender.accepting:
            self._cancelling = asyncio.create_task(self._cancel(self.producer, self.appender))

    async def _cancel(self, producer: asyncio.Task[None], appender: Appender) -> None:
        producer.cancel()
        await asyncio.wait([producer])
        await self.put(Done(reason="cancelled"))

    def lose(self) -> None:
        """The lease is gone: stop at once and append nothing more."""
        if self.producer is not None:
            self.producer.cancel()
        if self.appender is not None:
            self.appender.stop(Outcome.FENCED)

    def hand_off(self) -> None:
        """Draining: stop the adapter, append what it already produced, end without a terminal."""
        self._handing_off = True
        if self.producer is not None and self._cancelling is None:
            self.producer.cancel()

    # -- the run --------------------------------------------------------------

    async def execute(self) -> Outcome:
        log = self.worker.log
        asked = asyncio.get_running_loop().time()
        # The request is read beside the acquire, not after it: one round trip sooner
        # to the first token, and a read wasted only when the lease is held elsewhere.
        reading = asyncio.ensure_future(log.request(self.generation_id))
        reading.add_done_callback(_seen)  # its failure is raised below, or of no interest
        try:
            lease = await log.acquire(self.generation_id, self.worker.worker_id)
        except BaseException:
            reading.cancel()
            raise
        if lease is None:
            reading.cancel()
            state = await log.state(self.generation_id)
            return Outcome.ALREADY_ENDED if state is None or state.terminal else Outcome.HELD
        self.lease = lease
        keeper = self.worker.keeper
        keeper.hold(HeldLease(lease, self.job.id, self.cancel, self.lose, renewed_at=asked))
        try:
            # Its failure (a request that does not decode) is the run's, with the lease held.
            return await self._execute(lease, await reading)
        finally:
            keeper.drop(self.generation_id)

    async def _execute(self, lease: Lease, request: GenerationRequest | None) -> Outcome:
        log = self.worker.log
        telemetry = self.worker.telemetry
        model = request.model if request else "unknown"
        previous_attempt = None
        if lease.attempt > 1 and telemetry.tracing:
            # A takeover links to the span of the attempt that died.
            state = await log.state(self.generation_id)
            previous_attempt = state.traceparent if state else None
        with telemetry.generation_span(
            self.generation_id,
            model=model,
            provider=model.split("/", 1)[0],
            attempt=lease.attempt,
            takeover=lease.attempt > 1,
            parent_traceparent=self.job.traceparent,
            previous_attempt=previous_attempt,
        ) as span:
            self.span = span
            if span.traceparent is not None:
                await log.set_traceparent(self.generation_id, span.traceparent)
            return await self._execute_traced(lease, request)

    async def put(self, event: Event) -> bool:
        """Append `event` (through the appender) and record it on the generation's span."""
        assert self.appender is not None
        span = self.span
        if span is not None:
            if isinstance(event, Token):
                span.token()
            elif isinstance(event, ToolCall):
                span.tool_call(event.name)
            elif isinstance(event, Done):
                span.finish(event.reason, event.usage)  # counts a cancellation
            elif isinstance(event, Error):
                span.error(event.code, event.message)
        return await self.appender.put(event)

    async def _execute_traced(self, lease: Lease, request: GenerationRequest | None) -> Outcome:
        log = self.worker.log
        telemetry = self.worker.telemetry
        # Per-event instruments share one sampling knob (GAP_SAMPLE_EVERY).
        appender = self.appender = Appender(
            log, lease, telemetry.metrics, latency_sample_every=telemetry.gap_sample_every
        )
        try:
            if self._handing_off:
                appender.stop(Outcome.HANDED_OFF)
            elif lease.cancel_requested or self._cancel_wanted:
                logger.info("%s: cancelled before it started", self.generation_id)
                await self.put(Done(reason="cancelled"))
            elif lease.attempt > MAX_ATTEMPTS:
                message = f"gave up after {lease.attempt - 1} attempts lost their worker"
                await self.put(Error(code="worker_lost", message=message, retryable=True))
            else:
                await self.put(
                    Started(model=request.model if request else None, attempt=lease.attempt)
                )
                self.producer = asyncio.create_task(self._produce(appender, lease, request))
                if self._cancel_wanted:
                    self.cancel()
                await asyncio.wait([self.producer])
                if self._cancelling is None and appender.accepting:
                    # The producer ended without a terminal event: handed off, or it died.
                    appender.stop(Outcome.HANDED_OFF if self._handing_off else Outcome.FAILED)
            await asyncio.wait([appender.task])
            if not appender.task.cancelled() and (failure := appender.task.exception()):
                raise failure  # not a refusal nor Redis failing: a bug, for _run_job
        finally:
            # Reached early only when the worker aborts: leave the lease to expire.
            for task in (self.producer, self._cancelling, appender.task):
                if task is not None:
                    task.cancel()
        return await self._check_log(appender)

    async def _check_log(self, appender: Appender) -> Outcome:
        """A run stopped by a refusal or by Redis failing may have met a log that went
        back (Redis lost writes): this run alone knows what it appended, so it looks,
        and records it in the log if so (`GenerationLog.reset`)."""
        outcome = appender.outcome or Outcome.FAILED
        if outcome not in (Outcome.FENCED, Outcome.FAILED):
            return outcome
        confirmed_to = appender.next_seq - 1
        try:
            async for attempt in retrying(self.worker.settings):
                with attempt:
                    reset = await self.worker.log.reset(
                        appender.lease, confirmed_to, appender.sent_to
                    )
        except RedisError as exc:
            logger.warning("%s: could not check the log after the run: %s", self.generation_id, exc)
            return outcome
        if reset is None:
            return outcome
        seq, from_seq = reset
        self.worker.telemetry.metrics.log_resets.add(1)
        logger.warning(
            "%s: the log went back: it lost seqs this run appended (up to %d); seqs %d..%d "
            "are void, as the reset at %d says; handing the generation over",
            self.generation_id,
            confirmed_to,
            from_seq,
            seq - 1,
            seq,
        )
        return Outcome.WENT_BACK

    async def end_after_failure(self, failure: Exception) -> Outcome:
        """The run failed unexpectedly: end the generation with an internal error.

        Its readers get an end now instead of after a takeover that would likely
        fail the same way. Only while the lease is ours: a generation another
        worker took over is theirs to end.
        """
        if self.lease is None:
            return Outcome.FAILED  # never held: its job waits for a takeover
        log = self.worker.log
        try:
            await log.renew(self.lease)
        except Fenced:
            return Outcome.FENCED
        except AlreadyFinished:
            return Outcome.ALREADY_ENDED
        error = Error(code="internal", message=f"{type(failure).__name__}: {failure}")
        # As the system, not under the lease: appends of the failed run still in
        # flight are fenced, and cannot follow the terminal event.
        if await log.close(self.generation_id, error) is None:
            return Outcome.ALREADY_ENDED
        return Outcome.APPENDED_TERMINAL

    async def _produce(
        self, appender: Appender, lease: Lease, request: GenerationRequest | None
    ) -> None:
        """Run the adapter into the appender; every way out but cancellation puts a terminal."""
        terminal: events.TerminalEvent
        try:
            if request is None:
                raise ProviderError("request_missing", "the generation's request has expired")
            prior: list[Event] = []
            if lease.last_seq:
                # A takeover. A first run sets up no retry loop: tenacity's was a fifth
                # of the worker's CPU for a generation of a few events.
                async for attempt in retrying(self.worker.settings):
                    with attempt:
                        prior = await self._read_prior(lease)
            adapter = self.worker.resolve(request.model)
            context = GenerationContext(
                generation_id=self.generation_id,
                request=request,
                prior=prior,
                attempt=lease.attempt,
            )
            async with _closing(adapter.stream(context)) as stream:
                async for event in stream:
                    if type(event) is Started:  # isinstance costs more (per event)
                        continue
                    if not await self.put(event) or events.is_terminal(event):
                        return
            terminal = Error(code="internal", message="the model stream ended without finishing")
        except ProviderError as exc:
            terminal = Error(code=exc.code, message=exc.message, retryable=exc.retryable)
        except Exception as exc:
            logger.exception("%s: the adapter failed", self.generation_id)
            terminal = Error(code="internal", message=f"{type(exc).__name__}: {exc}")
        await self.put(terminal)

    async def _read_prior(self, lease: Lease) -> list[Event]:
        """What the log already holds (a takeover): every event, in pages, less what a
        reset declared void (the log went back; see `GenerationLog.reset`)."""
        prior: list[tuple[int, Event]] = []
        expected = 1  # every seq before it is an entry, or void
        async for page in self.worker.log.pages(self.generation_id):
            for entry in page:
                # Our own `started` may already follow what the lease saw.
                if entry.seq > lease.last_seq:
                    break
                event = entry.event()
                if isinstance(event, Reset):
                    if event.from_seq > expected:
                        break  # the entries before it were trimmed
                    prior = [(seq, held) for seq, held in prior if seq < event.from_seq]
                elif entry.seq != expected:
                    break
                else:
                    prior.append((entry.seq, event))
                expected = entry.seq + 1
            if expected > lease.last_seq:
                return [event for _, event in prior]
            if expected <= page[-1].seq:
                break
        raise ProviderError(
            "worker_lost",
            "the worker died and retention already trimmed the start of the log",
            retryable=True,
        )


@contextlib.asynccontextmanager
async def _closing(stream: AsyncIterator[Event]) -> AsyncIterator[AsyncIterator[Event]]:
    """Close an adapter's stream on every way out, so it releases its upstream at once."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


class WorkerFailed(Exception):
    """A loop the worker cannot run without failed: it handed its generations off and stopped."""


class Worker:
    """Consumes generation jobs until `stop` is set, then drains.

    Cancel `run` instead to abort at once, as a crash would: leases are left to
    expire and other workers take the generations over.
    """

    def __init__(
        self,
        redis: Redis | RedisCluster,
        settings: Settings,
        *,
        adapters: AdapterResolver | None = None,
        worker_id: str | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.log = GenerationLog(redis, settings)
        self.jobs = self.log.jobs
        self.worker_id = (
            worker_id
            or settings.worker_id
            or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.keeper = LeaseKeeper(self.log, self.worker_id)
        self._adapters = Adapters(settings)
        self._resolve = adapters or self._adapters
        self.ready = asyncio.Event()  # set once subscribed and consuming
        self._runs: dict[str, _GenerationRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        # New jobs wait while this worker's CPU is saturated; running ones go on.
        self.lag = loops.LoopLag(
            settings.worker_max_loop_lag_seconds,
            on_busy=lambda _seconds: self.telemetry.metrics.worker_busy.add(1),
        )
        self._halt = asyncio.Event()  # stop was set, or a loop the worker needs failed
        self._failure: BaseException | None = None

    @property
    def active_generations(self) -> frozenset[str]:
        return frozenset(self._runs)

    @property
    def claim_interval_seconds(self) -> float:
        return self.settings.lease_seconds / 4

    async def until_idle(self) -> None:
        """Wait until no generation runs here."""
        while self._tasks:
            await asyncio.wait(self._tasks)

    def resolve(self, model: str) -> ModelAdapter:
        return self._resolve(model)

    # -- the main loop ----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume jobs until `stop` is set, then drain.

        Raises WorkerFailed, after handing its generations off, when the lease
        keeper fails: the process should exit non-zero and be restarted.
        """
        await self.jobs.ensure_group()
        reader = self.jobs.reader(self.worker_id)
        halting = asyncio.create_task(self._halt_on(stop))
        try:
            async with self.log.cancel_requests() as cancels:
                await self._run_subscribed(cancels, reader)
        finally:
            halting.cancel()
            await asyncio.wait([halting])
            await reader.aclose()
            await self._adapters.close()
        if self._failure is not None:
            raise WorkerFailed(f"worker {self.worker_id} stopped") from self._failure

    async def _halt_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._halt.set()

    async def _run_subscribed(self, cancels: CancelRequests, reader: JobReader) -> None:
        background = [
            # Restarted when it fails: the subscription outlives the loop, and a cancel
            # missed meanwhile still reaches its run through the next lease renewal.
            loops.start("cancel listener", lambda: self._listen_for_cancels(cancels)),
            # A failed pass of these two is logged and the next runs on time: what one
            # pass missed, the next one (or another worker's) catches up.
            loops.start("job claimer", self._claim_loop),
            loops.start("sweeper", self._sweep_loop),
            loops.start("loop lag probe", self.lag.run),
            # Not restarted: a pass handles Redis errors itself, so a failure is a bug
            # that would likely recur, and meanwhile every lease held here lapses and
            # is taken over mid-generation. Stopping hands the generations off at once
            # and lets the process supervisor start a clean worker.
            loops.start("lease keeper", self.keeper.run, on_failure=self._fail),
        ]
        try:
            self.ready.set()
            logger.info("worker %s ready", self.worker_id)
            await self._consume(reader)
            await self._drain()
        finally:
            for task in [*background, *self._tasks]:
                task.cancel()
            # Their failures are logged where they happen (loops.supervise, _run_job).
            await asyncio.wait([*background, *self._tasks])

    def _fail(self, failure: BaseException) -> None:
        self._failure = failure
        self._halt.set()

    async def _consume(self, reader: JobReader) -> None:
        halt = self._halt
        while not halt.is_set():
            free = self.settings.worker_concurrency - len(self._tasks)
            if free <= 0:
                self._slot_free.clear()
                await _first(self._slot_free.wait(), halt.wait())
                continue
            if self.lag.busy:
                await _first(self.lag.calm(), halt.wait())
                continue
            try:
                jobs = await reader.read(free, READ_BLOCK_MS)
            except TRANSIENT_ERRORS as exc:
                logger.warning("reading jobs failed: %s; retrying", exc)
                await _first(asyncio.sleep(1.0), halt.wait())
                continue
            for job in jobs:
                self._start(job)

    def _start(self, job: Job) -> None:
        if job.generation_id in self._runs:
            return  # a duplicate job of a generation we run; the claimer settles it later
        run = _GenerationRun(self, job)
        self._runs[job.generation_id] = run
        task = asyncio.create_task(self._run_job(run))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_free.set()

    async def _run_job(self, run: _GenerationRun) -> None:
        try:
            try:
                outcome = await run.execute()
            except RedisError as exc:
                logger.warning("%s: Redis failed: %s", run.generation_id, exc)
                outcome = Outcome.FAILED
            except Exception as exc:
                logger.exception("%s: the run failed", run.generation_id)
                outcome = await run.end_after_failure(exc)
            finally:
                del self._runs[run.generation_id]
            logger.info("%s: %s", run.generation_id, outcome.value)
            await self._settle(run, outcome)
        except RedisError as exc:
            # The job stays pending; the claimer of some worker settles it later.
            logger.warning("%s: settling the job failed: %s", run.generation_id, exc)
        except Exception:
            logger.exception("%s: settling the job failed; left for a takeover", run.generation_id)

    async def _settle(self, run: _GenerationRun, outcome: Outcome) -> None:
        """Acknowledge, leave or hand over the job according to how the run ended."""
        if outcome in (Outcome.APPENDED_TERMINAL, Outcome.ALREADY_ENDED):
            await self.jobs.ack(run.job)
        elif outcome in (Outcome.HANDED_OFF, Outcome.WENT_BACK):
            # Release the lease and hand the job back: a live worker takes it over at
            # once, instead of after the takeover delay.
            lease = run.appender.lease if run.appender is not None else None
            if lease is not None:
                with contextlib.suppress(Fenced, AlreadyFinished):
                    await self.log.renew(lease, release=True)
            await self.jobs.requeue(run.job)
        elif outcome is Outcome.HELD:
            await self.jobs.retry_when_lease_expires(run.job, self.worker_id)
        # FENCED, FAILED: the job stays pending until a worker that can take the lease
        # claims it.

    async def _drain(self) -> None:
        """Let in-flight generations finish within the grace period, then hand the rest off.

        After a failure there is no grace: nobody renews the leases any more.
        """
        grace = 0.0 if self._failure is not None else self.settings.shutdown_grace_seconds
        if self._tasks and grace > 0:
            logger.info("draining %d generations for up to %g s", len(self._tasks), grace)
            await asyncio.wait(self._tasks, timeout=grace)
        if self._runs:
            logger.info(
                "interrupting %d generations: each continues from its log with the next "
                "worker that takes its job",
                len(self._runs),
            )
        for run in self._runs.values():
            run.hand_off()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.lease_seconds)

    # -- background loops -------------------------------------------------------

    async def _listen_for_cancels(self, cancels: CancelRequests) -> None:
        """Cancel requests are pushed, not polled: one subscription per process."""
        async for generation_id in cancels:
            run = self._runs.get(generation_id)
            if run is not None:
                logger.info("%s: cancel requested", generation_id)
                run.cancel()

    async def _sweep_loop(self) -> None:
        await loops.periodic("sweeper", self.settings.sweep_interval_seconds, self._sweep)

    async def _sweep(self) -> None:
        try:
            await self.log.retention.sweep()
        except RedisError as exc:
            logger.warning("sweeping abandoned generations failed: %s", exc)

    async def _claim_loop(self) -> None:
        await loops.periodic("job claimer", self.claim_interval_seconds, self._claim)

    async def _claim(self) -> None:
        """Take over jobs whose worker stopped renewing (died) for a full lease."""
        free = self.settings.worker_concurrency - len(self._tasks)
        if self._halt.is_set() or free <= 0 or self.lag.busy:
            return
        try:
            await self.claim(free)
        except RedisError as exc:
            logger.warning("claiming idle jobs failed: %s", exc)

    async def claim(self, count: int) -> int:
        """One pass over idle jobs, up to `count`; returns how many were started."""
        jobs = await self.jobs.claim_idle(self.worker_id, count)
        for job in jobs:
            logger.info("taking over job %s", job.id)
            self._start(job)
        return len(jobs)


def _seen(task: asyncio.Future[Any]) -> None:
    """Mark a task's failure as retrieved, for a task whose result may go unused."""
    if not task.cancelled():
        task.exception()


async def _first(*awaitables: Awaitable[Any]) -> None:
    """Wait until the first of these finishes; cancel the rest that were made here."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    made = [t for t, a in zip(tasks, awaitables, strict=True) if t is not a]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in made:
            task.cancel()
