"""Stand-ins for `app.http.create_app` and `workers.runner.Worker` with the same signatures.

They let the process runtime (signals, embedded Redis, shutdown order) be tested
before and apart from the real web app and worker.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.settings import Settings
from app.telemetry import Telemetry


def create_app(
    settings: Settings, redis: Redis | RedisCluster, telemetry: Telemetry
) -> web.Application:
    async def ping(request: web.Request) -> web.Response:
        return web.json_response({"redis": await redis.ping(), "url": settings.redis_url})

    app = web.Application()
    app.router.add_get("/ping", ping)
    return app


class Worker:
    """Runs until told to stop; `stopped` says it saw the stop event."""

    instances: list[Worker] = []

    def __init__(
        self, redis: Redis | RedisCluster, settings: Settings, telemetry: Telemetry | None = None
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.stopped = False
        Worker.instances.append(self)

    async def run(self, stop: asyncio.Event) -> None:
        await self.redis.ping()
        await stop.wait()
        self.stopped = True


class FailingWorker(Worker):
    async def run(self, stop: asyncio.Event) -> None:
        raise RuntimeError("worker broke")
