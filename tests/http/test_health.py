"""`/healthz` says the process answers, `/readyz` that it can serve: Redis answers and it
is not draining. Neither needs a credential."""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import Redis

from app.embedded import RedisProcess
from app.http import create_app
from app.http.health import READINESS
from app.settings import Settings
from tests.http.conftest import Client, ClientFactory

SECURED = {"api_keys": "key-a-0123456789abcdef", "secret": "s" * 32}


async def test_alive_and_ready_without_credentials(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis
) -> None:
    client = await aiohttp_client(create_app(settings.replace(**SECURED), redis))
    alive, ready = await client.get("/healthz"), await client.get("/readyz")
    assert (alive.status, await alive.json()) == (200, {"status": "ok"})
    assert (ready.status, await ready.json()) == (200, {"status": "ready"})


async def test_redis_down_is_alive_but_not_ready(
    aiohttp_client: ClientFactory,
    settings: Settings,
    redis_server_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_server_factory()
    redis = Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
    client = await aiohttp_client(create_app(settings, redis))
    assert (await client.get("/readyz")).status == 200
    server.kill()
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 503
    body = await ready.json()
    assert body["status"] == "unavailable"
    assert server.url.split("//")[1] not in str(body)  # no address in an unauthenticated answer
    await redis.aclose()


async def test_a_draining_reader_is_not_ready(client: Client) -> None:
    assert client.app is not None
    client.app[READINESS].drain()
    ready = await client.get("/readyz")
    assert (ready.status, (await ready.json())["status"]) == (503, "draining")
    assert (await client.get("/healthz")).status == 200
