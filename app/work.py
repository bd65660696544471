"""`tokentape worker`: a process that runs generations, and a worker run beside the
readers of `tokentape serve`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from aiohttp import web

from app.errors import ConfigError
from app.runtime import announce, connect, reachable, run_loop, stop_on_signals
from app.settings import Settings
from app.telemetry import Telemetry
from app.telemetry.web import metrics_app
from workers.runner import Worker

logger = logging.getLogger("tokentape")


class WorkerRuntime(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


# Called as factory(redis, settings, telemetry=...), like workers.runner.Worker.
WorkerFactory = Callable[..., WorkerRuntime]


def main(settings: Settings, *, metrics_port: int | None = None) -> int:
    """Run a worker process until SIGTERM/SIGINT; its exit status."""
    if settings.redis_url is None:
        raise ConfigError(
            "no_redis_url", "a worker needs a Redis: pass --redis URL or set TOKENTAPE_REDIS_URL"
        )
    return run_loop(settings, work(settings, metrics_port=metrics_port))


async def work(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    worker_factory: WorkerFactory | None = None,
    metrics_port: int | None = None,
) -> int:
    """Run a worker until SIGTERM/SIGINT or `stop`."""
    stop = stop or asyncio.Event()
    with stop_on_signals(stop):
        redis = connect(settings, "worker")
        try:
            if not await reachable(redis, settings):
                return 1
        finally:
            await redis.aclose()
        telemetry = Telemetry.from_env("tokentape-worker")
        metrics = None
        if metrics_port is not None:
            metrics = web.AppRunner(metrics_app(telemetry))
            await metrics.setup()
            await web.TCPSite(metrics, "127.0.0.1", metrics_port).start()
        announce(f"tokentape worker consuming from {settings.redis_url}")
        try:
            async with beside(settings, worker_factory or Worker, stop, telemetry) as worker:
                await stop.wait()
        finally:
            if metrics is not None:
                await metrics.cleanup()
            telemetry.shutdown()  # flushes the exporters
    return 1 if worker.failed else 0


@dataclasses.dataclass
class WorkerOutcome:
    failed: bool = False


@contextlib.asynccontextmanager
async def beside(
    settings: Settings, factory: WorkerFactory | None, stop: asyncio.Event, telemetry: Telemetry
) -> AsyncIterator[WorkerOutcome]:
    """Run a worker (on a Redis client of its own) beside the body; on exit stop it.

    With no `factory`, no worker runs and the outcome stays a success.
    """
    outcome = WorkerOutcome()
    if factory is None:
        yield outcome
        return
    redis = connect(settings, "worker", settings.worker_redis_connections)
    worker = factory(redis, settings, telemetry=telemetry)
    task = asyncio.create_task(worker.run(stop), name="tokentape-worker")
    # A worker that dies on its own stops the process: a silent half-service is worse.
    task.add_done_callback(lambda _: stop.set())
    try:
        yield outcome
    finally:
        stop.set()
        # The worker finishes or hands off its generations; past that it is cancelled and
        # another worker takes them over when their leases expire.
        deadline = settings.shutdown_grace_seconds + settings.lease_seconds
        try:
            await asyncio.wait_for(task, timeout=deadline)
        except TimeoutError:
            logger.warning("worker did not stop within %.0f s; cancelled", deadline)
        except Exception:
            outcome.failed = True
            logger.exception("worker failed")
        finally:
            await redis.aclose()
