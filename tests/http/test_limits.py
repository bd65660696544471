"""Every limit of a request, with its setting named in the error, against a real Redis;
and the events endpoint past its limit answering as for a passing fault."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from app import sse
from app.http import create_app
from app.keys import Keys
from app.settings import Settings
from app.store import GenerationLog
from tests.durable_streams.conftest import until_waiting
from tests.http.conftest import Client, ClientFactory, Stream, Writer, until_subscriptions
from tests.telemetry.conftest import samples_by_name

KEY = "key-a-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET = "s" * 32

AppFactory = Callable[..., Awaitable[tuple[Client, web.Application]]]


@pytest.fixture
def limited(aiohttp_client: ClientFactory, settings: Settings, redis: Redis) -> AppFactory:
    async def make(**changes: Any) -> tuple[Client, web.Application]:
        app = create_app(settings.replace(**changes), redis)
        return await aiohttp_client(app), app

    return make


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(
    ("limits", "request_body", "code", "setting", "field"),
    [
        ({"max_messages": 2}, body(messages=[{"role": "user", "content": "x"}] * 3), "too_many_messages", "TOKENTAPE_MAX_MESSAGES", "messages"),
        ({"max_tools": 1}, body(tools=[{"type": "function"}] * 2), "too_many_tools", "TOKENTAPE_MAX_TOOLS", "tools"),
        ({"max_prompt_chars": 10}, body(messages=[{"role": "system", "content": "x" * 6}, {"role": "user", "content": [{"type": "text", "text": "y" * 5}]}]), "prompt_too_long", "TOKENTAPE_MAX_PROMPT_CHARS", "messages"),
        ({"max_sim_tokens": 100}, body(sim={"tokens": 101}), "sim_too_large", "TOKENTAPE_MAX_SIM_TOKENS", "sim.tokens"),
        ({"max_sim_seconds": 10}, body(sim={"tokens": 100, "tokens_per_second": 5}), "sim_too_long", "TOKENTAPE_MAX_SIM_SECONDS", "sim.tokens_per_second"),
    ],
    ids=["messages", "tools", "prompt-chars", "sim-tokens", "sim-seconds"],
)  # fmt: skip
async def test_a_request_past_a_size_limit_is_400_naming_it_and_writes_nothing(
    limited: AppFactory,
    redis: Redis,
    log: GenerationLog,
    limits: dict[str, int],
    request_body: dict[str, Any],
    code: str,
    setting: str,
    field: str,
) -> None:
    client, _ = await limited(**limits)
    response = await client.post("/v1/generations", json=request_body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["code"], error["setting"], error["field"]) == (code, setting, field)
    assert error["limit"] == next(iter(limits.values()))
    assert await redis.exists(log.keys.jobs) == 0


async def test_a_request_at_every_limit_is_accepted(limited: AppFactory) -> None:
    client, _ = await limited(max_messages=2, max_tools=1, max_prompt_chars=4, max_sim_tokens=8)
    at_limits = body(
        messages=[{"role": "user", "content": "ab"}, {"role": "user", "content": "cd"}],
        tools=[{"type": "function"}],
        sim={"tokens": 8},
    )
    assert (await client.post("/v1/generations", json=at_limits)).status == 201


async def test_running_generations_per_key_are_429_with_retry_after(
    limited: AppFactory, log: GenerationLog
) -> None:
    client, _ = await limited(api_keys=KEY, secret=SECRET, max_running_per_key=2)
    created = [await client.post("/v1/generations", json=body(), headers=AUTH) for _ in range(2)]
    assert [r.status for r in created] == [201, 201]
    refused = await client.post("/v1/generations", json=body(), headers=AUTH)
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    error = (await refused.json())["error"]
    assert (error["code"], error["setting"], error["limit"]) == (
        "too_many_running",
        "TOKENTAPE_MAX_RUNNING_PER_KEY",
        2,
    )
    # One ends: its place is free.
    first = (await created[0].json())["id"]
    writer = await Writer.start(log, first)
    await writer.tokens(1)
    assert (await client.post("/v1/generations", json=body(), headers=AUTH)).status == 201
    samples = samples_by_name(await (await client.get("/metrics")).read())
    refusals = samples["tokentape_limit_refusals_total"]
    assert [(s.labels["limit"], s.value) for s in refusals if s.value] == [
        ("max_running_per_key", 1.0)
    ]


async def test_creations_per_key_per_minute_are_429_with_retry_after(
    limited: AppFactory,
) -> None:
    client, _ = await limited(api_keys=KEY, secret=SECRET, max_creations_per_minute=3)
    statuses = [
        (await client.post("/v1/generations", json=body(), headers=AUTH)).status for _ in range(3)
    ]
    assert statuses == [201, 201, 201]
    refused = await client.post("/v1/generations", json=body(), headers=AUTH)
    assert refused.status == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    error = (await refused.json())["error"]
    assert (error["code"], error["setting"]) == (
        "too_many_creations",
        "TOKENTAPE_MAX_CREATIONS_PER_MINUTE",
    )


async def test_an_open_service_has_no_per_key_quota(limited: AppFactory) -> None:
    client, _ = await limited(max_running_per_key=1, max_creations_per_minute=1)
    for _ in range(3):
        assert (await client.post("/v1/generations", json=body())).status == 201


async def test_past_the_open_streams_limit_a_client_is_told_to_come_back(
    limited: AppFactory, log: GenerationLog
) -> None:
    client, app = await limited(max_streams=1, retry_milliseconds=1000)
    live, other = await Writer.start(log), await Writer.start(log)
    async with client.get(live.events_url) as holding:
        assert holding.status == 200
        await Stream(holding).next_chunk()
        await until_subscriptions(app, 1)
        async with client.get(other.events_url) as turned_away:
            assert turned_away.status == 200  # never a status that ends an EventSource
            assert turned_away.headers["Content-Type"] == "text/event-stream"
            raw = await turned_away.read()  # the response ends: the client comes back
        retry = raw.split(b"\n")[0]
        assert retry.startswith(b"retry: ")
        assert 1000 <= int(retry.removeprefix(b"retry: ")) <= 5000
        assert b"\n: busy, retry\n" in raw
        assert sse.Parser().feed(raw) == []  # no event
    await until_subscriptions(app, 0)
    await other.tokens(1)
    async with client.get(other.events_url) as served:
        assert [m.event for m in await Stream(served).rest()] == ["token", "done"]
    samples = samples_by_name(await (await client.get("/metrics")).read())
    refusals = {s.labels["limit"]: s.value for s in samples["tokentape_limit_refusals_total"]}
    assert refusals == {
        "max_streams": 1.0,
        "max_running_per_key": 0.0,
        "max_creations_per_minute": 0.0,
    }


async def test_durable_streams_sse_reads_and_event_streams_share_the_open_streams_limit(
    limited: AppFactory, log: GenerationLog, settings: Settings
) -> None:
    """One TOKENTAPE_MAX_STREAMS for both kinds of long-lived read: past it, an SSE read of
    a Durable Stream is a 503 with Retry-After naming the setting (its clients retry), an
    event stream the 200 that tells an EventSource to come back."""
    client, app = await limited(max_streams=1, retry_milliseconds=1000)
    text = {"Content-Type": "text/plain"}
    assert (await client.put("/v1/stream/s", headers=text)).status == 201
    writer = await Writer.start(log)
    async with client.get("/v1/stream/s?offset=-1&live=sse") as holding:
        assert holding.status == 200
        await until_waiting(app, Keys(settings.key_prefix).stream_channel("s"))
        async with client.get(writer.events_url) as turned_away:
            assert turned_away.status == 200
            assert b"\n: busy, retry\n" in await turned_away.read()
        refused = await client.get("/v1/stream/s?offset=-1&live=sse")
        assert refused.status == 503
        assert 1 <= int(refused.headers["Retry-After"]) <= 5
        error = (await refused.json())["error"]
        assert (error["code"], error["setting"], error["limit"]) == (
            "busy",
            "TOKENTAPE_MAX_STREAMS",
            1,
        )
        # Reads that end at once are not held: they pass.
        assert (await client.get("/v1/stream/s?offset=-1")).status == 200
    await writer.tokens(1)
    async with asyncio.timeout(10):
        while True:  # the held read's task ends once its client has gone
            async with client.get(writer.events_url) as served:
                kinds = [m.event for m in await Stream(served).rest()]
            if kinds:
                break
    assert kinds == ["token", "done"]
    samples = samples_by_name(await (await client.get("/metrics")).read())
    refusals = {s.labels["limit"]: s.value for s in samples["tokentape_limit_refusals_total"]}
    assert refusals["max_streams"] == 2.0
