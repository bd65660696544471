"""The demo page and the health check."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web
from redis.exceptions import RedisError

from app.http.state import LOG

routes = web.RouteTableDef()
# The page's vendored scripts (app/static/vendor/), shipped as package data.
routes.static("/static", Path(str(resources.files("app").joinpath("static"))))


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    page = resources.files("app").joinpath("static", "index.html").read_bytes()
    return web.Response(body=page, content_type="text/html", charset="utf-8")


@routes.get("/healthz")
async def health(request: web.Request) -> web.Response:
    try:
        await request.app[LOG].ping()
    except (RedisError, OSError) as exc:
        return web.json_response(
            {"status": "unavailable", "error": {"code": "unavailable", "message": str(exc)}},
            status=503,
        )
    return web.json_response({"status": "ok"})
