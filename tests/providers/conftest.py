"""Fixtures for the provider adapters: a fake provider on a free port, and recorded waits."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence

import aiohttp
import pytest
from pytest_aiohttp.plugin import AiohttpServer

from app.events import Event
from app.generations import GenerationRequest, Message
from tests.providers.fake_provider import AnthropicStream, FakeProvider, OpenAIStream
from workers.models._upstream import RetryPolicy
from workers.models.anthropic import AnthropicAdapter
from workers.models.base import GenerationContext, ModelAdapter, ProviderError
from workers.models.openai import OpenAIAdapter


class RecordedSleep:
    """An injected sleep: records each retry wait instead of spending it."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@dataclasses.dataclass(frozen=True)
class Dialect:
    """One provider as the tests drive it: its frames, its model name, its adapter."""

    name: str
    model: str
    stream: OpenAIStream | AnthropicStream
    make_adapter: Callable[[aiohttp.ClientSession, str, RetryPolicy], ModelAdapter]


def _openai(session: aiohttp.ClientSession, url: str, retry: RetryPolicy) -> ModelAdapter:
    return OpenAIAdapter(session, base_url=f"{url}/v1", api_key="sk-test", retry=retry)


def _anthropic(session: aiohttp.ClientSession, url: str, retry: RetryPolicy) -> ModelAdapter:
    return AnthropicAdapter(session, base_url=url, api_key="sk-ant-test", retry=retry)


OPENAI = Dialect("openai", "openai/gpt-4o-mini", OpenAIStream(), _openai)
ANTHROPIC = Dialect("anthropic", "anthropic/claude-sonnet-4-5", AnthropicStream(), _anthropic)


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
async def fake_url(fake: FakeProvider, aiohttp_server: AiohttpServer) -> str:
    server = await aiohttp_server(fake.app())
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
def sleep() -> RecordedSleep:
    return RecordedSleep()


@pytest.fixture
def retry(sleep: RecordedSleep) -> RetryPolicy:
    return RetryPolicy(attempts=4, sleep=sleep)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def context(
    model: str,
    *,
    prior: Sequence[Event] = (),
    messages: Sequence[Message] = (Message(role="user", content="Hi"),),
    **fields: object,
) -> GenerationContext:
    request = GenerationRequest(model=model, messages=list(messages), **fields)  # type: ignore[arg-type]
    return GenerationContext(generation_id="g1", request=request, prior=prior)


async def collect(adapter: ModelAdapter, generation: GenerationContext) -> list[Event]:
    return [event async for event in adapter.stream(generation)]


async def collect_until_error(
    adapter: ModelAdapter, generation: GenerationContext
) -> tuple[list[Event], ProviderError]:
    """The events emitted before the stream failed, and its failure (which must happen)."""
    events: list[Event] = []
    try:
        async for event in adapter.stream(generation):
            events.append(event)
    except ProviderError as exc:
        return events, exc
    raise AssertionError(f"the stream ended without a ProviderError: {events}")
