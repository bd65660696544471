"""Create, status and cancel; every bad input answered with a JSON 4xx, nothing half-written.

The contract's core (`ON_EVERY_BACKEND`) runs on a Redis Cluster too."""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import events
from app.http.state import HUB
from app.store import GenerationLog
from tests.conftest import ON_EVERY_BACKEND
from tests.http.conftest import Client, Writer

VALID: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}


@ON_EVERY_BACKEND
async def test_create_queues_a_job_and_answers_201(
    client: Client, log: GenerationLog, store_redis: Redis | RedisCluster
) -> None:
    response = await client.post("/v1/generations", json={**VALID, "sim": {"tokens": 5}})
    assert response.status == 201
    body = await response.json()
    generation_id = body["id"]
    assert body["events_url"] == f"/v1/generations/{generation_id}/events"
    assert body["status_url"] == f"/v1/generations/{generation_id}"
    assert response.headers["Location"] == body["status_url"]
    state = await log.state(generation_id)
    assert state is not None
    assert state.status == "queued"
    request = await log.request(generation_id)
    assert request is not None
    assert request.sim is not None
    assert request.sim.tokens == 5
    jobs: Any = await store_redis.xrange(log.keys.shard(generation_id).jobs)
    assert [fields[b"generation"].decode() for _, fields in jobs] == [generation_id]


async def test_a_generation_is_listened_for_from_its_creation(
    client: Client, app: web.Application
) -> None:
    # Its reader usually comes at once: its GET finds the live channel confirmed and
    # waits for no SUBSCRIBE.
    response = await client.post("/v1/generations", json=VALID)
    feed = app[HUB].feed((await response.json())["id"])
    assert feed is not None
    assert await feed.until_confirmed(5)
    assert not feed.subscriptions  # no reader yet


async def test_trace_context_travels_with_the_job(
    client: Client, log: GenerationLog, redis: Redis
) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await client.post("/v1/generations", json=VALID, headers={"traceparent": traceparent})
    rows: Any = await redis.xrange(log.keys.jobs)
    [(_, fields)] = rows
    assert fields[b"traceparent"] == traceparent.encode()


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[]", 400, "invalid_request", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "invalid_request", "model"),
        (b'{"model": "sim", "messages": [{"content": "x"}]}', 400, "invalid_request", "messages[0].role"),
        (b'{"model": "sim", "messages": []}', 400, "invalid_request", "messages"),
        (b'{"model": 3, "messages": [{"role": "user"}]}', 400, "invalid_request", "model"),
        (b'{"model": "sim", "messages": [{"role": "robot"}]}', 400, "invalid_request", "messages[0].role"),
        (b'{"model": "gpt-9", "messages": [{"role": "user"}]}', 400, "unknown_model", "model"),
        (b'{"model": "sim", "messages": [{"role": "user"}], "tempurature": 1}', 400, "invalid_request", "tempurature"),
        (b'{"model": "sim", "messages": [{"role": "user", "rol": "x"}]}', 400, "invalid_request", "messages[0].rol"),
        (b'{"model": "sim", "messages": [{"role": "user"}], "sim": {"tokens": -1}}', 400, "invalid_request", "sim.tokens"),
        (b'{"model": "openai/x", "messages": [{"role": "user"}], "sim": {}}', 400, "invalid_request", "sim"),
        (b'{"model": "sim", "messages": [{"role": "user"}], "temperature": 9}', 400, "invalid_request", "temperature"),
    ],
    ids=[
        "not-json", "not-an-object", "no-model", "no-role", "no-messages", "model-type", "bad-role",
        "unknown-model", "unknown-field", "unknown-nested-field", "negative-tokens",
        "sim-params-on-other-model",
        "temperature-range",
    ],
)  # fmt: skip
async def test_bad_bodies_are_named_and_write_nothing(
    client: Client,
    redis: Redis,
    log: GenerationLog,
    body: bytes,
    status: int,
    code: str,
    field: str | None,
) -> None:
    response = await client.post(
        "/v1/generations", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status == status
    error = (await response.json())["error"]
    assert error["code"] == code
    assert error["message"]
    assert error.get("field") == field
    assert await redis.exists(log.keys.jobs) == 0
    assert await redis.zcard(log.keys.open_generations) == 0


async def test_oversized_body_is_413(client: Client) -> None:
    big = json.dumps({**VALID, "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    response = await client.post("/v1/generations", data=io.BytesIO(big.encode()))
    assert response.status == 413
    error = (await response.json())["error"]
    assert error["code"] == "body_too_large"
    assert (error["setting"], error["limit"]) == ("TOKENTAPE_MAX_BODY_BYTES", 1 << 20)


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/generations/AAAAAAAAAAAAAAAAAAAAAA", 404, "generation_not_found"),
        ("GET", "/v1/generations/bad%20id", 400, "invalid_id"),
        ("POST", "/v1/generations/AAAAAAAAAAAAAAAAAAAAAA/cancel", 404, "generation_not_found"),
        ("GET", "/v1/nothing-here", 404, "route_not_found"),
        ("DELETE", "/v1/generations", 405, "method_not_allowed"),
    ],
)
async def test_unknown_and_malformed_targets(
    client: Client, method: str, path: str, status: int, code: str
) -> None:
    response = await client.request(method, path)
    assert response.status == status
    assert (await response.json())["error"]["code"] == code


@ON_EVERY_BACKEND
async def test_status_follows_the_generation(
    client: Client, writer_factory: Callable[[], Awaitable[Writer]]
) -> None:
    writer = await writer_factory()
    url = f"/v1/generations/{writer.generation_id}"
    running = await (await client.get(url)).json()
    assert running["status"] == "running"
    assert running["last_seq"] == 0
    assert running["started_at"].endswith("Z")
    assert "finished_at" not in running
    await writer.tokens(3)
    done = await (await client.get(url)).json()
    assert done["status"] == "done"
    assert done["finish_reason"] == "stop"
    assert done["last_seq"] == 4
    assert done["attempts"] == 1
    assert done["expired"] is False
    assert done["finished_at"] >= done["started_at"] >= done["created_at"]


async def test_status_of_an_error_carries_its_code_and_message(
    client: Client, writer_factory: Callable[[], Awaitable[Writer]]
) -> None:
    writer = await writer_factory()
    await writer.append(events.Error(code="provider_rejected", message="bad key", retryable=False))
    body = await (await client.get(f"/v1/generations/{writer.generation_id}")).json()
    assert body["status"] == "error"
    assert body["error"] == {"code": "provider_rejected", "message": "bad key"}
    assert "finish_reason" not in body


@ON_EVERY_BACKEND
async def test_cancel_of_a_queued_generation(client: Client, log: GenerationLog) -> None:
    generation_id = (await (await client.post("/v1/generations", json=VALID)).json())["id"]
    response = await client.post(f"/v1/generations/{generation_id}/cancel")
    assert response.status == 202
    assert (await response.json()) == {"id": generation_id, "status": "cancelled"}
    again = await client.post(f"/v1/generations/{generation_id}/cancel")
    assert again.status == 202  # idempotent
    entries = await log.read(generation_id, 0, 10)
    assert [e.event() for e in entries] == [events.Done(reason="cancelled")]


@ON_EVERY_BACKEND
async def test_cancel_of_a_finished_generation_is_409(
    client: Client, writer_factory: Callable[[], Awaitable[Writer]]
) -> None:
    writer = await writer_factory()
    await writer.tokens(1)
    response = await client.post(f"/v1/generations/{writer.generation_id}/cancel")
    assert response.status == 409
    error = (await response.json())["error"]
    assert (error["code"], error["status"]) == ("already_finished", "done")
