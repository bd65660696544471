"""A worker's streams to one provider are bounded by `provider_concurrency`, not by aiohttp's
default of 100 connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

from app.events import Event, Token
from app.settings import Settings
from tests.providers.conftest import OPENAI, collect, context
from tests.providers.fake_provider import FakeProvider, OpenAIStream, Reply
from workers.models import Adapters
from workers.models.openai import OpenAIAdapter

STREAM = OpenAIStream()


def open_stream(adapter: OpenAIAdapter) -> AsyncGenerator[Event, None]:
    return cast(AsyncGenerator[Event, None], adapter.stream(context(OPENAI.model)))


async def first_token(stream: AsyncIterator[Event]) -> Event:
    async for event in stream:
        if isinstance(event, Token):
            return event
    raise AssertionError("the stream ended before its first token")


async def test_a_stream_past_the_limit_waits_for_one_to_end(
    fake: FakeProvider, fake_url: str
) -> None:
    adapter = OpenAIAdapter(base_url=f"{fake_url}/v1", api_key="sk-test", max_streams=1)
    fake.script(
        Reply(frames=STREAM.text_start(["held"]), ending="hold"),
        Reply(frames=STREAM.text_reply(["second"])),
    )
    try:
        held = open_stream(adapter)
        await first_token(held)
        second = asyncio.create_task(collect(adapter, context(OPENAI.model)))
        # Nothing to await for a request that must not be sent: give it time to be.
        done, _ = await asyncio.wait([second], timeout=0.3)
        assert not done
        assert len(fake.requests) == 1
        await held.aclose()
        events = await asyncio.wait_for(second, 5.0)
        assert Token(text="second") in events
        assert len(fake.requests) == 2
    finally:
        await adapter.close()


async def test_more_than_a_hundred_streams_are_open_at_once(
    fake: FakeProvider, fake_url: str
) -> None:
    count = 120
    adapter = OpenAIAdapter(base_url=f"{fake_url}/v1", api_key="sk-test", max_streams=count)
    fake.script(*[Reply(frames=STREAM.text_start(["held"]), ending="hold")] * count)
    streams = [open_stream(adapter) for _ in range(count)]
    try:
        tokens = await asyncio.wait_for(asyncio.gather(*map(first_token, streams)), 10.0)
        assert len(tokens) == count
        assert len(fake.requests) == count
    finally:
        for stream in streams:
            await stream.aclose()
        await adapter.close()


def test_the_workers_adapters_take_the_limit_from_the_settings() -> None:
    adapter = Adapters(Settings(provider_concurrency=7))("openai/gpt-4o-mini")
    assert isinstance(adapter, OpenAIAdapter)
    assert adapter.max_streams == 7
