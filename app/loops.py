"""Background loops that never die silently.

Every long-lived task of a reader or a worker (the lease keeper, the job claimer,
the sweeper, the cancel listener, the hub's listen and recheck loops, the Durable
Streams subscriptions' registry, delivery and sweep loops) runs under
`supervise`: when its body fails unexpectedly, the failure is logged with its
traceback and the body starts again after a backoff that grows with consecutive
failures. A loop that must not be restarted names what to do instead
(`on_failure`, which typically stops the process with a non-zero exit).

`periodic` is the common shape of those loops: a step every few seconds, where
one failed step is logged and the next one runs on time.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

logger = logging.getLogger("tokentape.loops")

# Backoff between restarts of a failing loop: doubles per consecutive failure, capped,
# jittered so the loops of many processes do not retry in step.
FIRST_DELAY_SECONDS = 0.1
MAX_DELAY_SECONDS = 10.0
# A run that lasted this long was healthy: the next failure starts the backoff over.
HEALTHY_AFTER_SECONDS = 30.0

Body = Callable[[], Awaitable[None]]
OnFailure = Callable[[BaseException], None]


def backoff(failures: int) -> float:
    """The pause before restart number `failures` (1, 2, …), with jitter."""
    delay: float = min(MAX_DELAY_SECONDS, FIRST_DELAY_SECONDS * 2 ** min(failures - 1, 16))
    return delay * (0.5 + random.random() / 2)


async def supervise(name: str, body: Body, *, on_failure: OnFailure | None = None) -> None:
    """Run `body` until it returns, restarting it after every unexpected failure.

    With `on_failure`, a failure is not retried: it is logged, handed to
    `on_failure`, and `supervise` returns. Cancellation ends it at once.
    """
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        started = loop.time()
        try:
            await body()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if on_failure is not None:
                logger.exception("%s failed; not restarted", name)
                on_failure(exc)
                return
            failures = 1 if loop.time() - started >= HEALTHY_AFTER_SECONDS else failures + 1
            delay = backoff(failures)
            logger.exception("%s failed (%d in a row); restarting in %.2f s", name, failures, delay)
            await asyncio.sleep(delay)


async def periodic(name: str, every: float, step: Body) -> None:
    """Run `step` every `every` seconds, forever; a failed step is logged, the next runs on time."""
    while True:
        await asyncio.sleep(every)
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s failed; trying again in %g s", name, every)


def start(name: str, body: Body, *, on_failure: OnFailure | None = None) -> asyncio.Task[None]:
    """`supervise(name, body)` as a task named `name`."""
    return asyncio.create_task(supervise(name, body, on_failure=on_failure), name=name)


class LoopLag:
    """How late this event loop runs: a timer every `interval` seconds notes how late it fired.

    A saturated CPU shows here first: every task waits its turn that much longer.
    `run` is the probe (start it with `start`); `calm` waits until the latest reading
    is at most `limit`; `on_busy` is called each time a reading goes above it.
    """

    def __init__(
        self,
        limit: float,
        interval: float = 0.05,
        on_busy: Callable[[float], None] | None = None,
    ) -> None:
        self.limit = limit
        self.interval = interval
        self.seconds = 0.0
        self._on_busy = on_busy
        self._calm = asyncio.Event()
        self._calm.set()

    @property
    def busy(self) -> bool:
        return not self._calm.is_set()

    def note(self, seconds: float) -> None:
        """Record one reading."""
        self.seconds = seconds
        if self.limit and seconds > self.limit:
            if self._on_busy is not None and not self.busy:
                self._on_busy(seconds)
            self._calm.clear()
        else:
            self._calm.set()

    async def calm(self) -> None:
        await self._calm.wait()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.note(max(0.0, loop.time() - due))
