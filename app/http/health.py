"""`GET /healthz` (the process answers) and `GET /readyz` (it can serve: Redis answers and
it is not draining). Both without credentials, and cheap: a load balancer polls them."""

from __future__ import annotations

import asyncio
from typing import Literal

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from app.http.state import LOG

routes = web.RouteTableDef()

# A Redis that does not answer a PING this fast is as good as down to a load balancer.
READY_TIMEOUT_SECONDS = 2.0


class Readiness:
    """Whether this reader still takes new work; `drain` when it stops."""

    __slots__ = ("draining",)

    def __init__(self) -> None:
        self.draining = False

    def drain(self) -> None:
        self.draining = True


READINESS = web.AppKey("readiness", Readiness)


class Health(msgspec.Struct, omit_defaults=True):
    status: Literal["ok", "ready", "draining", "unavailable"]
    reason: str | None = None


def _json(health: Health, status: int) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(health), status=status, content_type="application/json"
    )


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return _json(Health(status="ok"), 200)


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    if request.app[READINESS].draining:
        return _json(Health(status="draining", reason="this reader is stopping"), 503)
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            await request.app[LOG].ping()
    except (RedisError, OSError, TimeoutError):
        # Not the exception's text: it can carry the Redis address.
        return _json(Health(status="unavailable", reason="Redis does not answer"), 503)
    return _json(Health(status="ready"), 200)
