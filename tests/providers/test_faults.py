"""Provider faults, for both adapters: retried before the first event, terminal after it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from app.events import Done, Event, Token
from tests.conftest import free_port
from tests.providers.conftest import (
    ANTHROPIC,
    OPENAI,
    Dialect,
    RecordedSleep,
    collect,
    collect_until_error,
    context,
)
from tests.providers.fake_provider import FakeProvider, Reply
from workers.models._upstream import RetryPolicy
from workers.models.base import ModelAdapter, ProviderError


@pytest.fixture(params=[OPENAI, ANTHROPIC], ids=lambda d: d.name)
def dialect(request: pytest.FixtureRequest) -> Dialect:
    chosen: Dialect = request.param
    return chosen


@pytest.fixture
def adapter(
    dialect: Dialect, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> ModelAdapter:
    """The dialect's adapter against the fake provider."""
    return dialect.make_adapter(session, fake_url, retry)


def _error_body(message: str) -> bytes:
    return json.dumps({"error": {"type": "invalid_request_error", "message": message}}).encode()


def _tokens(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Token))


@pytest.mark.parametrize(
    ("headers", "wait"),
    [({"Retry-After": "7"}, 7.0), ({"retry-after-ms": "1500", "Retry-After": "2"}, 1.5)],
    ids=["retry-after", "retry-after-ms"],
)
async def test_429_is_retried_after_the_wait_the_provider_asked_for(
    dialect: Dialect,
    adapter: ModelAdapter,
    fake: FakeProvider,
    sleep: RecordedSleep,
    headers: dict[str, str],
    wait: float,
) -> None:
    fake.script(
        Reply(status=429, headers=headers, body=_error_body("slow down")),
        Reply(frames=dialect.stream.text_reply(["Hel", "lo"])),
    )

    events = await collect(adapter, context(dialect.model))

    assert _tokens(events) == "Hello"
    assert isinstance(events[-1], Done)
    assert sleep.waits == [wait]
    assert len(fake.requests) == 2


async def test_a_retry_after_beyond_the_retry_budget_gives_up_at_once(
    dialect: Dialect,
    adapter: ModelAdapter,
    fake: FakeProvider,
    sleep: RecordedSleep,
) -> None:
    fake.script(Reply(status=429, headers={"Retry-After": "3600"}, body=_error_body("quota")))

    with pytest.raises(ProviderError) as raised:
        await collect(adapter, context(dialect.model))

    assert raised.value.code == "provider_unavailable"
    assert "quota" in raised.value.message
    assert sleep.waits == []


async def test_5xx_is_retried_with_bounded_jittered_backoff(
    dialect: Dialect,
    adapter: ModelAdapter,
    fake: FakeProvider,
    retry: RetryPolicy,
    sleep: RecordedSleep,
) -> None:
    fake.script(
        Reply(status=503, body=b"upstream busy", content_type="text/plain"),
        Reply(status=500, body=_error_body("boom")),
        Reply(frames=dialect.stream.text_reply(["ok"])),
    )

    events = await collect(adapter, context(dialect.model))

    assert _tokens(events) == "ok"
    assert len(sleep.waits) == 2
    assert all(0 < wait <= retry.max_wait for wait in sleep.waits)


async def test_retries_are_bounded_then_provider_unavailable(
    dialect: Dialect,
    adapter: ModelAdapter,
    fake: FakeProvider,
    retry: RetryPolicy,
) -> None:
    fake.script(*[Reply(status=502, body=_error_body("bad gateway"))] * retry.attempts)

    with pytest.raises(ProviderError) as raised:
        await collect(adapter, context(dialect.model))

    assert raised.value.code == "provider_unavailable"
    assert raised.value.retryable
    assert "502" in raised.value.message
    assert len(fake.requests) == retry.attempts


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "provider_rejected"), (404, "provider_rejected"), (401, "provider_unauthorized")],
)
async def test_4xx_is_not_retried_and_names_the_provider_message(
    dialect: Dialect,
    adapter: ModelAdapter,
    fake: FakeProvider,
    sleep: RecordedSleep,
    status: int,
    code: str,
) -> None:
    fake.script(Reply(status=status, body=_error_body("max_tokens is too large")))

    with pytest.raises(ProviderError) as raised:
        await collect(adapter, context(dialect.model))

    assert raised.value.code == code
    assert not raised.value.retryable
    assert "max_tokens is too large" in raised.value.message
    assert str(status) in raised.value.message
    assert sleep.waits == []
    assert len(fake.requests) == 1


async def test_connection_refused_is_retried_then_unavailable(
    dialect: Dialect, session: aiohttp.ClientSession, retry: RetryPolicy, sleep: RecordedSleep
) -> None:
    adapter = dialect.make_adapter(session, f"http://127.0.0.1:{free_port()}", retry)

    with pytest.raises(ProviderError) as raised:
        await collect(adapter, context(dialect.model))

    assert raised.value.code == "provider_unavailable"
    assert len(sleep.waits) == retry.attempts - 1


async def test_disconnect_before_any_event_is_retried(
    dialect: Dialect,
    adapter: ModelAdapter,
    fake: FakeProvider,
    sleep: RecordedSleep,
) -> None:
    fake.script(
        Reply(frames=[dialect.stream.text_start([])[0]], ending="abort"),
        Reply(frames=dialect.stream.text_reply(["again"])),
    )

    events = await collect(adapter, context(dialect.model))

    assert _tokens(events) == "again"
    assert len(sleep.waits) == 1


@pytest.mark.parametrize("ending", ["abort", "end"], ids=["connection-dropped", "clean-eof"])
async def test_stream_cut_after_tokens_is_an_error_not_done(
    dialect: Dialect,
    adapter: ModelAdapter,
    fake: FakeProvider,
    ending: str,
) -> None:
    fake.script(
        Reply(frames=dialect.stream.text_start(["Hel", "lo"]), ending=ending)  # type: ignore[arg-type]
    )

    events, error = await collect_until_error(adapter, context(dialect.model))

    assert error.code == "provider_disconnected"
    assert error.retryable
    assert _tokens(events) == "Hello"
    assert not any(isinstance(e, Done) for e in events)
    assert len(fake.requests) == 1


async def test_server_error_after_tokens_ends_the_stream_without_retry(
    dialect: Dialect,
    adapter: ModelAdapter,
    fake: FakeProvider,
    sleep: RecordedSleep,
) -> None:
    stream = dialect.stream
    if dialect is OPENAI:
        # How vLLM and LiteLLM report a failure once the 200 is sent.
        failure = b'data: {"error":{"message":"Internal server error","type":"server_error"}}\n\n'
    else:
        failure = ANTHROPIC.stream.error("api_error", "Internal server error")  # type: ignore[union-attr]
    fake.script(Reply(frames=[*stream.text_start(["partial"]), failure]))

    events, error = await collect_until_error(adapter, context(dialect.model))

    assert error.code == "provider_disconnected"
    assert "Internal server error" in error.message
    assert _tokens(events) == "partial"
    assert sleep.waits == []
    assert len(fake.requests) == 1


async def test_non_event_stream_200_is_rejected(
    dialect: Dialect,
    adapter: ModelAdapter,
    fake: FakeProvider,
) -> None:
    fake.script(Reply(body=b'{"choices": []}', content_type="application/json"))

    with pytest.raises(ProviderError) as raised:
        await collect(adapter, context(dialect.model))

    assert raised.value.code == "provider_bad_response"


async def test_cancel_closes_the_upstream_connection(
    dialect: Dialect,
    adapter: ModelAdapter,
    fake: FakeProvider,
) -> None:
    fake.script(Reply(frames=dialect.stream.text_start(["first"]), ending="hold"))
    first_token = asyncio.Event()

    async def run() -> None:
        async for event in adapter.stream(context(dialect.model)):
            if isinstance(event, Token):
                first_token.set()

    task = asyncio.create_task(run())
    await asyncio.wait_for(first_token.wait(), timeout=5)
    await asyncio.wait_for(fake.holding.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await asyncio.wait_for(fake.client_left.wait(), timeout=5)


async def test_cancel_before_the_first_event_closes_the_upstream_without_retrying(
    dialect: Dialect,
    adapter: ModelAdapter,
    fake: FakeProvider,
    sleep: RecordedSleep,
) -> None:
    fake.script(Reply(frames=[dialect.stream.keep_alive()], ending="hold"))
    task = asyncio.create_task(collect(adapter, context(dialect.model)))

    await asyncio.wait_for(fake.holding.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await asyncio.wait_for(fake.client_left.wait(), timeout=5)
    assert len(fake.requests) == 1
    assert sleep.waits == []
