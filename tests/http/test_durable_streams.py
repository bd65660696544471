"""/v1/stream/ beyond what the conformance suite checks: generations read through the
protocol, Last-Event-ID, SSE heartbeats and lifetime, and headers on every response. The
reads, live wake-ups and deletes run on a Redis Cluster too (`ON_EVERY_BACKEND`)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import ClientPayloadError, web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import events
from app.durable_streams import protocol
from app.http import create_app
from app.keys import Keys
from app.settings import Settings
from tests.conftest import ON_EVERY_BACKEND
from tests.durable_streams.conftest import control_events, until_waiting
from tests.http.conftest import Client, ClientFactory, Writer

WriterFactory = Callable[..., Awaitable[Writer]]


@pytest.fixture
async def quick(
    aiohttp_client: ClientFactory, settings: Settings, store_redis: Redis | RedisCluster
) -> Client:
    """A service whose long-polls, SSE responses and heartbeats are short."""
    fast = settings.replace(
        stream_long_poll_seconds=5.0, stream_sse_seconds=0.5, heartbeat_seconds=0.1
    )
    app: web.Application = create_app(fast, store_redis)
    return await aiohttp_client(app)


@ON_EVERY_BACKEND
async def test_a_generation_reads_as_a_closed_json_stream(
    client: Client, writer_factory: WriterFactory
) -> None:
    writer = await writer_factory()
    await writer.append(events.Started(model="sim"))
    await writer.tokens(2)
    url = f"/v1/stream/generations/{writer.generation_id}"
    async with client.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers[protocol.NEXT_OFFSET] == protocol.format_offset(4)
        assert response.headers[protocol.CLOSED] == "true"
        assert [e["type"] for e in await response.json()] == ["started", "token", "token", "done"]
    async with client.get(url, params={"offset": protocol.format_offset(2)}) as response:
        assert await response.json() == [
            {"type": "token", "text": "t1 "},
            {"type": "done", "reason": "stop", "usage": {}},
        ]
    async with client.head(url) as response:
        assert response.headers[protocol.CLOSED] == "true"


async def test_a_generation_is_read_only(client: Client, writer_factory: WriterFactory) -> None:
    writer = await writer_factory()
    url = f"/v1/stream/generations/{writer.generation_id}"
    for method in ("PUT", "POST", "DELETE"):
        async with client.request(method, url, data=b"x") as response:
            assert response.status == 405
            assert response.headers["Allow"] == "GET,HEAD,OPTIONS"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    async with client.get("/v1/stream/generations/not-an-id") as response:
        assert response.status == 400
    async with client.get("/v1/stream/generations/AAAAAAAAAAAAAAAAAAAAAA") as response:
        assert response.status == 404


@ON_EVERY_BACKEND
async def test_a_live_read_of_a_generation_wakes_on_its_next_event(
    quick: Client, writer_factory: WriterFactory, settings: Settings
) -> None:
    writer = await writer_factory()
    await writer.append(events.Started(model="sim"))
    url = f"/v1/stream/generations/{writer.generation_id}"
    channel = Keys(settings.key_prefix).live_channel(writer.generation_id)

    async def write_once_waited_on() -> None:
        await until_waiting(quick.app, channel)
        await writer.tokens(1)

    writing = asyncio.create_task(write_once_waited_on())
    params = {"offset": protocol.format_offset(1), "live": "long-poll"}
    async with quick.get(url, params=params) as response:
        assert response.status == 200
        assert await response.json() == [
            {"type": "token", "text": "t0 "},
            {"type": "done", "reason": "stop", "usage": {}},
        ]
    await writing
    async with quick.get(url, params={"offset": "-1", "live": "sse"}) as response:
        body = await response.read()  # ends after the closing control event
    assert control_events(body)[-1] == {
        "streamNextOffset": protocol.format_offset(3),
        "upToDate": True,
        "streamClosed": True,
    }


@ON_EVERY_BACKEND
async def test_sse_resumes_from_last_event_id(quick: Client) -> None:
    await quick.put("/v1/stream/s", headers={"Content-Type": "text/plain"}, data=b"one")
    await quick.post("/v1/stream/s", headers={"Content-Type": "text/plain"}, data=b"two")
    # EventSource reconnects to the URL it was given, with the id of the last control event.
    headers = {"Last-Event-ID": protocol.format_offset(1)}
    async with quick.get(
        "/v1/stream/s", params={"offset": "-1", "live": "sse"}, headers=headers
    ) as response:
        body = await response.read()
    assert b"data:one" not in body
    assert b"event: data\ndata:two\n\n" in body
    assert b"id: " + protocol.format_offset(2).encode() + b"\nevent: control" in body
    bad = {"Last-Event-ID": "42"}
    async with quick.get(
        "/v1/stream/s", params={"offset": "-1", "live": "sse"}, headers=bad
    ) as response:
        assert response.status == 400


async def test_idle_sse_sends_heartbeats_then_ends_for_the_client_to_reconnect(
    quick: Client,
) -> None:
    await quick.put("/v1/stream/s", headers={"Content-Type": "text/plain"})
    async with quick.get("/v1/stream/s", params={"offset": "now", "live": "sse"}) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        body = await response.read()  # ends after stream_sse_seconds
    assert body.count(b": keep-alive\n\n") >= 2
    assert control_events(body) == [
        {
            "streamNextOffset": protocol.format_offset(0),
            "streamCursor": control_events(body)[0]["streamCursor"],
            "upToDate": True,
        }
    ]


@ON_EVERY_BACKEND
async def test_deleting_a_stream_ends_its_live_readers(quick: Client, settings: Settings) -> None:
    await quick.put("/v1/stream/s", headers={"Content-Type": "text/plain"})

    async def delete_once_waited_on() -> None:
        await until_waiting(quick.app, Keys(settings.key_prefix).stream_channel("s"))
        await quick.delete("/v1/stream/s")

    deleting = asyncio.create_task(delete_once_waited_on())
    async with quick.get("/v1/stream/s", params={"offset": "now", "live": "sse"}) as response:
        # Sooner than the SSE lifetime (0.5 s): the delete ended the response.
        async with asyncio.timeout(0.45):
            await response.read()
    await deleting
    async with quick.get("/v1/stream/s") as response:
        assert response.status == 404


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/stream/missing", 404),
        ("GET", "/v1/stream/a%2F..%2Fb", 400),
        ("GET", "/v1/stream/a%7Bb", 400),
        ("POST", "/v1/stream/missing", 400),  # no body
        ("OPTIONS", "/v1/stream/any", 204),
    ],
    ids=["not found", "traversal", "brace", "bad request", "preflight"],
)
async def test_every_response_carries_the_browser_headers(
    client: Client, method: str, path: str, status: int
) -> None:
    headers = {"Origin": "https://example.com", "Access-Control-Request-Headers": "if-none-match"}
    async with client.request(method, path, headers=headers) as response:
        assert response.status == status
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Stream-Next-Offset" in response.headers["Access-Control-Expose-Headers"]
        if method == "OPTIONS":
            assert response.headers["Access-Control-Allow-Headers"] == "if-none-match"
        else:
            assert (await response.json())["error"]["code"]


async def test_an_append_over_the_request_limit_is_413(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis
) -> None:
    client = await aiohttp_client(create_app(settings.replace(max_body_bytes=1024), redis))
    await client.put("/v1/stream/s", headers={"Content-Type": "application/octet-stream"})
    async with client.post(
        "/v1/stream/s", headers={"Content-Type": "application/octet-stream"}, data=b"x" * 2048
    ) as response:
        assert response.status == 413
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_an_sse_client_that_stops_reading_is_let_go(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis
) -> None:
    patient = settings.replace(write_timeout_seconds=0.3, max_body_bytes=8 << 20)
    app = create_app(patient, redis)
    client = await aiohttp_client(app)
    binary = {"Content-Type": "application/octet-stream"}
    await client.put("/v1/stream/s", headers=binary)
    channel = Keys(settings.key_prefix).stream_channel("s")
    async with client.get("/v1/stream/s", params={"offset": "now", "live": "sse"}) as response:
        await response.content.readany()  # the first control event; from now on it reads nothing
        for _ in range(10):  # far more than the socket buffers hold on both ends
            await client.post("/v1/stream/s", headers=binary, data=io.BytesIO(b"x" * (4 << 20)))
        await until_waiting(app, channel, 0)  # the server let go of it
        with pytest.raises(ClientPayloadError):  # the response was cut, not ended
            await response.read()
