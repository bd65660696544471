"""The service on the real Redis (or the session's cluster, for a test marked
`ON_EVERY_BACKEND`), under the test's own key prefix."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.http import create_app, durable_streams
from app.http.durable_streams import NOTIFIER
from app.settings import Settings


@pytest.fixture
def app(settings: Settings, store_redis: Redis | RedisCluster) -> web.Application:
    return create_app(settings.replace(stream_long_poll_seconds=5.0), store_redis)


def streams_app(app: web.Application) -> web.Application:
    """The Durable Streams sub-application mounted in `app`."""
    for resource in app.router.resources():
        info = resource.get_info()
        if info.get("prefix") == durable_streams.PREFIX:
            sub: web.Application = info["app"]
            return sub
    raise LookupError("no Durable Streams sub-application")


def control_events(body: bytes) -> list[dict[str, object]]:
    """The control events of an SSE body, decoded."""
    return [
        json.loads(block.split(b"\ndata:", 1)[1])
        for block in body.split(b"\n\n")
        if b"event: control" in block
    ]


async def until_waiting(app: web.Application, channel: str, count: int = 1) -> None:
    """Until `count` requests of `app` wait for a write on `channel`."""
    async with asyncio.timeout(10):
        await streams_app(app)[NOTIFIER].until_watchers(channel, count)


class Receiver:
    """A webhook receiver on loopback: keeps every delivery, answers each with the next of
    `answers` (status, JSON body), the last one for good."""

    def __init__(self, *answers: tuple[int, object]) -> None:
        self.answers = list(answers) or [(200, {})]
        self.deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
        self.app = web.Application()
        self.app.router.add_post("/hook", self._receive)

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.deliveries.put_nowait(Delivery(body, request.headers.get("Webhook-Signature", "")))
        status, answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return web.json_response(answer, status=status)

    async def next(self, seconds: float = 10) -> Delivery:
        async with asyncio.timeout(seconds):
            return await self.deliveries.get()


@dataclasses.dataclass(frozen=True)
class Delivery:
    body: bytes
    signature: str

    @property
    def json(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded
