"""An app on the real Redis, and a stand-in worker that appends exactly what a test says."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import events, sse
from app.generations import parse_request
from app.http import HUB, create_app
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog, Lease

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
Client = TestClient[web.Request, web.Application]


@pytest.fixture
def app(settings: Settings, store_redis: Redis | RedisCluster) -> web.Application:
    return create_app(settings, store_redis)


@pytest.fixture
async def client(aiohttp_client: ClientFactory, app: web.Application) -> Client:
    return await aiohttp_client(app)


class Writer:
    """Plays the worker: holds the lease of one generation and appends to it."""

    def __init__(self, log: GenerationLog, generation_id: str, lease: Lease) -> None:
        self.log = log
        self.generation_id = generation_id
        self.lease = lease
        self.next_seq = lease.last_seq + 1

    @classmethod
    async def start(cls, log: GenerationLog, generation_id: str | None = None) -> Writer:
        if generation_id is None:
            generation_id = new_generation_id()
            await log.create(
                generation_id,
                parse_request(b'{"model":"sim","messages":[{"role":"user","content":"x"}]}'),
            )
        lease = await log.acquire(generation_id, "test-writer")
        assert lease is not None
        return cls(log, generation_id, lease)

    async def append(self, *batch: events.Event) -> int:
        last = await self.log.append(self.lease, self.next_seq, batch)
        self.next_seq = last + 1
        return last

    async def tokens(self, count: int, done: bool = True) -> list[events.Event]:
        written: list[events.Event] = [events.Token(text=f"t{i} ") for i in range(count)]
        if done:
            written.append(events.Done(reason="stop"))
        await self.append(*written)
        return written

    @property
    def events_url(self) -> str:
        return f"/v1/generations/{self.generation_id}/events"


@pytest.fixture
def writer_factory(log: GenerationLog) -> Callable[..., Awaitable[Writer]]:
    async def make(generation_id: str | None = None) -> Writer:
        return await Writer.start(log, generation_id)

    return make


class Stream:
    """An open SSE response, parsed as a client would."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.parser = sse.Parser()
        self.raw = b""
        self._ready: list[sse.ReceivedEvent] = []

    async def next_chunk(self) -> bytes:
        chunk = await self.response.content.readany()
        self.raw += chunk
        self._ready.extend(self.parser.feed(chunk))
        return chunk

    async def take(self, count: int) -> list[sse.ReceivedEvent]:
        while len(self._ready) < count:
            if not await self.next_chunk():
                break
        taken, self._ready = self._ready[:count], self._ready[count:]
        return taken

    async def rest(self) -> list[sse.ReceivedEvent]:
        while await self.next_chunk():
            pass
        taken, self._ready = self._ready, []
        return taken


async def read_all(client: Client, url: str, **kwargs: Any) -> tuple[int, list[sse.ReceivedEvent]]:
    async with client.get(url, **kwargs) as response:
        if response.status != 200:
            return response.status, []
        return 200, await Stream(response).rest()


def as_events(messages: Sequence[sse.ReceivedEvent]) -> list[tuple[int, events.Event]]:
    return [(int(m.id or 0), events.decode(m.data)) for m in messages if m.event != "gap"]


async def until_subscriptions(app: web.Application, count: int) -> None:
    async with asyncio.timeout(10):
        await app[HUB].until_subscriptions(count)
