"""CORS for browsers on other origins: off by default; the configured origins get
preflights that allow Authorization and Last-Event-ID, and responses they may read."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from app.http import create_app
from app.settings import Settings
from tests.http.conftest import Client, ClientFactory

APP_ORIGIN = "https://app.example.com"
STATUS = "/v1/generations/AAAAAAAAAAAAAAAAAAAAAA"
EVENTS = f"{STATUS}/events"


async def cors_client(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis, origins: str
) -> Client:
    return await aiohttp_client(create_app(settings.replace(cors_origins=origins), redis))


def preflight(origin: str, method: str, headers: str) -> dict[str, Any]:
    return {
        "headers": {
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        }
    }


async def test_off_by_default(client: Client) -> None:
    response = await client.options(
        "/v1/generations", **preflight(APP_ORIGIN, "POST", "authorization")
    )
    assert response.status == 405
    response = await client.get(STATUS, headers={"Origin": APP_ORIGIN})
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize(
    ("path", "method", "headers"),
    [
        ("/v1/generations", "POST", "authorization, content-type, traceparent"),
        (EVENTS, "GET", "last-event-id, authorization"),
        (f"{STATUS}/read-tokens", "POST", "authorization"),
    ],
)
async def test_a_listed_origin_is_allowed_with_credentials(
    aiohttp_client: ClientFactory,
    settings: Settings,
    redis: Redis,
    path: str,
    method: str,
    headers: str,
) -> None:
    client = await cors_client(
        aiohttp_client, settings, redis, f"{APP_ORIGIN},http://localhost:3000"
    )
    response = await client.options(path, **preflight(APP_ORIGIN, method, headers))
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    allowed = {
        h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")
    }
    assert allowed == {h.strip() for h in headers.split(",")}
    actual = await client.request(method, path, headers={"Origin": APP_ORIGIN})
    assert actual.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "Origin" in actual.headers.getall("Vary")
    exposed = actual.headers["Access-Control-Expose-Headers"]
    assert "WWW-Authenticate" in exposed
    assert "Retry-After" in exposed


async def test_another_origin_is_refused(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis
) -> None:
    client = await cors_client(aiohttp_client, settings, redis, APP_ORIGIN)
    response = await client.options(
        "/v1/generations", **preflight("https://evil.example", "POST", "authorization")
    )
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "forbidden"
    actual = await client.get(STATUS, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in actual.headers


async def test_star_allows_any_origin_without_credentials(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis
) -> None:
    client = await cors_client(aiohttp_client, settings, redis, "*")
    response = await client.options(
        EVENTS, **preflight("https://anywhere.example", "GET", "last-event-id")
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://anywhere.example"
    assert "Access-Control-Allow-Credentials" not in response.headers


async def test_durable_streams_keep_their_own_cors(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis
) -> None:
    client = await cors_client(aiohttp_client, settings, redis, APP_ORIGIN)
    response = await client.get("/v1/stream/none", headers={"Origin": "https://other.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
