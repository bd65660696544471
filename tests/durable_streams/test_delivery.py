"""Delivering wakes from a reader: the address check at connection time, the retry schedule,
a receiver that never answers, a delivery whose reader went away, and the sweep that
catches up with a write no subscription heard of."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from app.durable_streams import delivery
from app.durable_streams.delivery import AddressRefused, PublicAddressResolver, Subscriptions
from app.durable_streams.subscriptions import parse_config
from app.durable_streams.webhooks import WebhookPolicy
from app.http import create_app
from app.http.durable_streams import STORE, SUBSCRIPTIONS
from app.settings import Settings
from app.store.streams import StreamConfig
from tests.durable_streams.conftest import Receiver, streams_app
from tests.http.conftest import Client, ClientFactory

ServerFactory = Callable[..., Awaitable[TestServer]]
TEXT = StreamConfig(content_type="text/plain")


async def test_a_name_that_resolves_inside_is_not_connected_to() -> None:
    strict = PublicAddressResolver(WebhookPolicy())
    allowing = PublicAddressResolver(WebhookPolicy(["localhost"]))
    try:
        with pytest.raises(AddressRefused, match="not a public address"):
            await strict.resolve("localhost", 443)
        assert [found["host"] for found in await allowing.resolve("localhost", 443)]
    finally:
        await strict.close()
        await allowing.close()


def test_retries_double_from_a_second_to_a_minute_with_a_fifth_of_jitter() -> None:
    for failures, base in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (40, 60.0)]:
        assert base * 0.8 <= delivery.retry_delay(failures) <= base * 1.2


@pytest.fixture
async def service(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis
) -> tuple[Client, Subscriptions]:
    app = create_app(
        settings.replace(webhook_allowed_hosts="127.0.0.1", webhook_timeout_seconds=0.5), redis
    )
    client = await aiohttp_client(app)
    return client, streams_app(app)[SUBSCRIPTIONS]


async def subscribe(subscriptions: Subscriptions, url: str) -> None:
    body = b'{"type":"webhook","pattern":"events/*","webhook":{"url":"%s"}}' % url.encode()
    await subscriptions.create("sub", parse_config(body), "http://tokentape.test")


async def test_a_receiver_that_never_answers_is_given_up_on_and_tried_again(
    service: tuple[Client, Subscriptions],
    aiohttp_server: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(delivery, "FIRST_RETRY_SECONDS", 0.01)
    client, subscriptions = service
    never = asyncio.Event()
    calls: asyncio.Queue[int] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        calls.put_nowait(1)
        if calls.qsize() == 1:
            await never.wait()  # hangs past webhook_timeout_seconds
        return web.json_response({"done": True})

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    server = await aiohttp_server(receiver, host="127.0.0.1")
    await subscribe(subscriptions, f"http://127.0.0.1:{server.port}/hook")
    async with client.put("/v1/stream/events/a", data=b"x") as response:
        assert response.status == 201
    async with asyncio.timeout(10):
        for _ in range(2):
            await calls.get()


async def test_a_delivery_whose_reader_went_away_is_made_by_another(
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
    settings: Settings,
    redis: Redis,
) -> None:
    # A delivery is a reader's for the webhook's timeout and Redis's, and a second: 2 s.
    quick = settings.replace(
        webhook_allowed_hosts="127.0.0.1", webhook_timeout_seconds=0.5, redis_timeout_seconds=0.5
    )
    first = await aiohttp_client(create_app(quick, redis))
    second = await aiohttp_client(create_app(quick, redis))
    never = asyncio.Event()
    calls: asyncio.Queue[bytes] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        calls.put_nowait(await request.read())
        if calls.qsize() == 1:
            await never.wait()  # the first reader goes away while it waits for an answer
        return web.json_response({})

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    server = await aiohttp_server(receiver, host="127.0.0.1")
    await subscribe(streams_app(first.app)[SUBSCRIPTIONS], f"http://127.0.0.1:{server.port}/hook")
    async with first.put("/v1/stream/events/a", data=b"x") as response:
        assert response.status == 201
    async with asyncio.timeout(10):
        sent = await calls.get()
        await first.close()
        taken_over = await calls.get()
    assert msgspec.json.decode(taken_over)["wake_id"] == msgspec.json.decode(sent)["wake_id"]
    assert not second.server.closed


async def test_the_sweep_catches_up_with_a_write_no_subscription_heard_of(
    service: tuple[Client, Subscriptions], aiohttp_server: ServerFactory
) -> None:
    client, subscriptions = service
    receiver = Receiver()
    server = await aiohttp_server(receiver.app, host="127.0.0.1")
    store = streams_app(client.app)[STORE]
    await store.create("events/a", TEXT, [])
    await subscribe(subscriptions, f"http://127.0.0.1:{server.port}/hook")
    # Written with no touch, as by a reader that died between its write and its touch.
    await store.append("events/a", content_type="text/plain", data=b"x")
    assert receiver.deliveries.empty()
    await subscriptions.sweep()
    (stream,) = (await receiver.next()).json["streams"]
    assert (stream["path"], stream["has_pending"]) == ("events/a", True)
