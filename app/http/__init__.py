"""The HTTP face of tokentape: generations (create, status, cancel) and their events (SSE)."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.access import Access
from app.http import (
    connection,
    cors,
    durable_streams,
    event_stream,
    generations,
    health,
    openapi,
    pages,
)
from app.http.checks import checked_requests
from app.http.errors import json_errors
from app.http.state import ACCESS, HUB, LOG, OPEN_STREAMS, SETTINGS, TELEMETRY
from app.hub import Hub
from app.settings import Settings
from app.store import GenerationLog
from app.telemetry import Telemetry
from app.telemetry.web import metrics_handler

__all__ = ["HUB", "LOG", "SETTINGS", "TELEMETRY", "create_app"]


def create_app(
    settings: Settings, redis: Redis | RedisCluster, telemetry: Telemetry | None = None
) -> web.Application:
    """The aiohttp application. `redis` and `telemetry` are owned by the caller.

    Without `telemetry`, spans are no-ops and metrics are only served at /metrics.
    Raises ConfigError when the access settings do not make a usable whole.
    """
    app = web.Application(
        middlewares=[json_errors, checked_requests], client_max_size=settings.max_body_bytes
    )
    log = GenerationLog(redis, settings)
    app[SETTINGS] = settings
    app[ACCESS] = access = Access.from_settings(settings)
    app[openapi.DOCUMENT] = openapi.encoded(settings, secured=not access.open)
    app[OPEN_STREAMS] = connection.OpenStreams(settings.max_streams)
    app[health.READINESS] = health.Readiness()
    app[LOG] = log
    app[TELEMETRY] = telemetry if telemetry is not None else Telemetry()
    app[HUB] = Hub(
        log,
        redis,
        page_size=settings.catch_up_page_size,
        buffer_limit=settings.client_buffer_events,
        recheck_seconds=settings.reader_recheck_seconds,
    )
    app.add_routes(generations.routes)
    app.add_routes(event_stream.routes)
    app.add_routes(pages.routes)
    app.add_routes(health.routes)
    app.add_routes(openapi.routes)
    app.router.add_get("/metrics", metrics_handler)
    app.add_subapp(
        durable_streams.PREFIX,
        durable_streams.create_app(settings, redis, app[HUB], app[OPEN_STREAMS]),
    )
    cors.allow_origins(app, settings)

    async def start_hub(app: web.Application) -> None:
        await app[HUB].start()

    async def stop_hub(app: web.Application) -> None:
        app[health.READINESS].drain()
        # Ends every open event stream cleanly: clients reconnect to another reader.
        await app[HUB].stop()
        await app[OPEN_STREAMS].ended(settings.stream_drain_seconds)

    app.on_startup.append(start_hub)
    app.on_shutdown.append(stop_hub)
    return app
