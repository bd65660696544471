"""The service on the real Redis, under the test's own key prefix."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from redis.asyncio import Redis

from app.http import create_app, durable_streams
from app.http.durable_streams import NOTIFIER
from app.settings import Settings


@pytest.fixture
def app(settings: Settings, redis: Redis) -> web.Application:
    return create_app(settings.replace(stream_long_poll_seconds=5.0), redis)


def streams_app(app: web.Application) -> web.Application:
    """The Durable Streams sub-application mounted in `app`."""
    for resource in app.router.resources():
        info = resource.get_info()
        if info.get("prefix") == durable_streams.PREFIX:
            sub: web.Application = info["app"]
            return sub
    raise LookupError("no Durable Streams sub-application")


async def until_waiting(app: web.Application, channel: str, count: int = 1) -> None:
    """Until `count` requests of `app` wait for a write on `channel`."""
    async with asyncio.timeout(10):
        await streams_app(app)[NOTIFIER].until_watchers(channel, count)
