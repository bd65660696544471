"""The aiohttp face of telemetry: `GET /metrics` for the reader, or a worker's own port."""

from __future__ import annotations

from aiohttp import web

from app.telemetry.metrics import PROMETHEUS_CONTENT_TYPE
from app.telemetry.setup import Telemetry

TELEMETRY = web.AppKey("telemetry", Telemetry)


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text of the `Telemetry` stored under `TELEMETRY` in the app."""
    body = request.app[TELEMETRY].render_prometheus()
    # The content type carries its own charset: set the header, not content_type=.
    return web.Response(body=body, headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


def metrics_app(telemetry: Telemetry) -> web.Application:
    """A bare app serving only `GET /metrics`, for a worker's metrics port."""
    app = web.Application()
    app[TELEMETRY] = telemetry
    app.router.add_get("/metrics", metrics_handler)
    return app
