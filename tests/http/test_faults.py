"""A passing Redis fault never turns the SSE endpoint into an error the browser gives up on."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app import events
from app.embedded import RedisProcess
from app.http import create_app
from app.settings import Settings
from app.store import GenerationLog
from tests.http.conftest import ClientFactory, Stream, Writer, until_subscriptions


async def test_redis_down_before_the_stream_is_a_200_that_says_retry(
    aiohttp_client: ClientFactory,
    settings: Settings,
    redis_server_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_server_factory()
    redis = Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
    client = await aiohttp_client(create_app(settings.replace(retry_milliseconds=250), redis))
    writer = await Writer.start(GenerationLog(redis, settings))
    server.kill()
    async with client.get(writer.events_url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        body = await response.read()
    assert body == b"retry: 250\n\n: unavailable, retry\n\n"
    status = await client.get(f"/v1/generations/{writer.generation_id}")
    assert status.status == 503  # JSON endpoints may say so plainly
    assert (await status.json())["error"]["code"] == "unavailable"
    await redis.aclose()


async def test_stream_survives_a_redis_restart_with_no_gap_or_duplicate(
    aiohttp_client: ClientFactory,
    settings: Settings,
    redis_server_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_server_factory("--appendonly", "yes", "--appendfsync", "always")
    redis = Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
    settings = settings.replace(heartbeat_seconds=0.1)
    app: web.Application = create_app(settings, redis)
    app_client = await aiohttp_client(app)
    log = GenerationLog(redis, settings)
    writer = await Writer.start(log)
    await writer.append(*[events.Token(text=f"{i} ") for i in range(5)])

    async with app_client.get(writer.events_url) as response:
        stream = Stream(response)
        assert [m.id for m in await stream.take(5)] == ["1", "2", "3", "4", "5"]
        await until_subscriptions(app, 1)

        server.kill()
        # The connection is held: heartbeats keep flowing while Redis is away.
        heartbeats = stream.raw.count(b": keep-alive")
        while stream.raw.count(b": keep-alive") < heartbeats + 2:
            await stream.next_chunk()
        server.start()  # same port, same AOF: the log is intact

        # Like a worker, the writer retries an append that met a connection the restart
        # closed (the one its pool kept idle); appends are idempotent.
        for batch in (
            [events.Token(text=f"{i} ") for i in range(5, 10)],
            [events.Done(reason="stop")],
        ):
            for attempt in range(3):
                try:
                    await writer.append(*batch)
                    break
                except RedisConnectionError:
                    if attempt == 2:
                        raise
        rest = await stream.rest()
    assert [int(m.id or 0) for m in rest] == list(range(6, 12))
    assert response.status == 200
    await redis.aclose()
