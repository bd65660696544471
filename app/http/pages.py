"""The demo page."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web

routes = web.RouteTableDef()
# The page's vendored scripts (app/static/vendor/), shipped as package data.
routes.static("/static", Path(str(resources.files("app").joinpath("static"))))


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    page = resources.files("app").joinpath("static", "index.html").read_bytes()
    return web.Response(body=page, content_type="text/html", charset="utf-8")
