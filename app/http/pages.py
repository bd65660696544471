"""The demo page."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

routes = web.RouteTableDef()


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    page = resources.files("app").joinpath("static", "index.html").read_bytes()
    return web.Response(body=page, content_type="text/html", charset="utf-8")
