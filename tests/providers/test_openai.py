"""The OpenAI-compatible adapter against a fake `/v1/chat/completions` stream."""

from __future__ import annotations

import json

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings

from app.events import Done, Error, Event, Started, Token, ToolCall, ToolCallDelta, Usage
from app.generations import Message
from tests.providers.conftest import OPENAI, collect, context
from tests.providers.fake_provider import FakeProvider, OpenAIStream, Reply
from tests.providers.strategies import ARGUMENTS, TOOLS, Interleaving, interleavings
from workers.models._upstream import RetryPolicy
from workers.models.base import ProviderError
from workers.models.openai import OpenAIAdapter

MODEL = OPENAI.model
USAGE = Usage(prompt_tokens=9, completion_tokens=12, total_tokens=21)


def _adapter(session: aiohttp.ClientSession, url: str, retry: RetryPolicy) -> OpenAIAdapter:
    return OpenAIAdapter(session, base_url=f"{url}/v1", api_key="sk-test", retry=retry)


@pytest.mark.parametrize(
    ("ascii_only", "bytewise"),
    [(False, False), (True, False), (False, True)],
    ids=["utf8", "escaped", "byte-by-byte"],
)
async def test_text_stream_as_openai_sends_it(
    fake: FakeProvider,
    fake_url: str,
    session: aiohttp.ClientSession,
    retry: RetryPolicy,
    ascii_only: bool,
    bytewise: bool,
) -> None:
    stream = OpenAIStream(ascii_only=ascii_only)
    frames = [
        stream.keep_alive(),
        stream.role(),
        stream.text("Caf"),
        stream.chunk({}),  # an empty delta
        stream.keep_alive(),
        stream.text("é 😀"),
        stream.finish("stop"),
        stream.usage(),  # usage-only: choices is empty
        stream.done(),
    ]
    fake.script(Reply(frames=frames, bytewise=bytewise))

    events = await collect(_adapter(session, fake_url, retry), context(MODEL))

    assert events == [Token(text="Caf"), Token(text="é 😀"), Done(reason="stop", usage=USAGE)]


async def test_request_passes_the_generation_parameters_through(
    fake: FakeProvider, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    fake.script(Reply(frames=OPENAI.stream.text_reply(["ok"])))
    generation = context(
        MODEL,
        messages=[Message(role="system", content="Be brief."), Message(role="user", content="Hi")],
        tools=tools,
        tool_choice="auto",
        temperature=0.2,
        top_p=0.9,
        max_tokens=50,
        stop=["\n\n"],
        provider_options={"seed": 7, "response_format": {"type": "text"}},
    )

    await collect(_adapter(session, fake_url, retry), generation)

    (request,) = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.body == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": tools,
        "tool_choice": "auto",
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 50,
        "stop": ["\n\n"],
        "seed": 7,
        "response_format": {"type": "text"},
    }


@pytest.mark.parametrize(
    ("finish_reason", "reason"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("content_filter", "content_filter"),
        ("tool_calls", "tool_calls"),
        ("eos", "stop"),
    ],
)
async def test_finish_reasons_map_into_done(
    fake: FakeProvider,
    fake_url: str,
    session: aiohttp.ClientSession,
    retry: RetryPolicy,
    finish_reason: str,
    reason: str,
) -> None:
    fake.script(Reply(frames=OPENAI.stream.text_reply(["x"], finish_reason)))

    events = await collect(_adapter(session, fake_url, retry), context(MODEL))

    assert events[-1] == Done(reason=reason, usage=USAGE)  # type: ignore[arg-type]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(interleaving=interleavings())
async def test_interleaved_tool_calls_split_anywhere(
    fake: FakeProvider,
    fake_url: str,
    session: aiohttp.ClientSession,
    retry: RetryPolicy,
    interleaving: Interleaving,
) -> None:
    stream = OpenAIStream(ascii_only=interleaving.ascii_only)
    frames = [stream.role(), stream.text("Checking.")]
    frames += [stream.tool_start(i, call_id, name) for i, (call_id, name) in enumerate(TOOLS)]
    frames += [stream.tool_arguments(i, piece) for i, piece in interleaving.fragments]
    frames += [stream.finish("tool_calls"), stream.usage(), stream.done()]
    fake.script(Reply(frames=frames))

    events = await collect(_adapter(session, fake_url, retry), context(MODEL))

    starts: list[Event] = [
        ToolCallDelta(index=i, id=call_id, name=name) for i, (call_id, name) in enumerate(TOOLS)
    ]
    deltas: list[Event] = [
        ToolCallDelta(index=i, arguments_delta=piece) for i, piece in interleaving.fragments
    ]
    calls: list[Event] = [
        ToolCall(index=i, id=call_id, name=name, arguments=json.loads(ARGUMENTS[i]))
        for i, (call_id, name) in enumerate(TOOLS)
    ]
    assert events == [
        Token(text="Checking."),
        *starts,
        *deltas,
        *calls,
        Done(reason="tool_calls", usage=USAGE),
    ]


async def test_deprecated_function_call_is_a_tool_call(
    fake: FakeProvider, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> None:
    stream = OPENAI.stream
    assert isinstance(stream, OpenAIStream)
    frames = [
        stream.chunk({"role": "assistant", "function_call": {"name": "now", "arguments": ""}}),
        stream.chunk({"function_call": {"arguments": '{"tz": "UTC"}'}}),
        stream.finish("function_call"),
        stream.usage(),
        stream.done(),
    ]
    fake.script(Reply(frames=frames))

    events = await collect(_adapter(session, fake_url, retry), context(MODEL))

    assert events[-2:] == [
        ToolCall(index=0, id="call_0", name="now", arguments={"tz": "UTC"}),
        Done(reason="tool_calls", usage=USAGE),
    ]


@pytest.mark.parametrize("arguments", ['{"city": "Par', "[1, 2]"], ids=["truncated", "array"])
async def test_invalid_final_tool_arguments_end_with_an_error_naming_the_tool(
    fake: FakeProvider,
    fake_url: str,
    session: aiohttp.ClientSession,
    retry: RetryPolicy,
    arguments: str,
) -> None:
    stream = OpenAIStream()
    frames = [
        stream.role(),
        stream.tool_start(0, "call_1", "get_weather"),
        stream.tool_arguments(0, arguments),
        stream.finish("tool_calls"),
        stream.usage(),
        stream.done(),
    ]
    fake.script(Reply(frames=frames))

    events = await collect(_adapter(session, fake_url, retry), context(MODEL))

    error = events[-1]
    assert isinstance(error, Error)
    assert error.code == "invalid_tool_arguments"
    assert "get_weather" in error.message
    assert not any(isinstance(e, ToolCall | Done) for e in events)


async def test_a_tool_without_arguments_gets_an_empty_object(
    fake: FakeProvider, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> None:
    stream = OpenAIStream()
    frames = [
        stream.role(),
        stream.tool_start(0, "call_1", "now"),
        stream.finish("tool_calls"),
        stream.done(),
    ]
    fake.script(Reply(frames=frames))

    events = await collect(_adapter(session, fake_url, retry), context(MODEL))

    assert events[-2:] == [
        ToolCall(index=0, id="call_1", name="now", arguments={}),
        Done(reason="tool_calls"),
    ]


async def test_continuation_appends_the_partial_answer_and_emits_only_new_text(
    fake: FakeProvider, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> None:
    fake.script(Reply(frames=OPENAI.stream.text_reply([" time", "."])))
    adapter = OpenAIAdapter(
        session,
        base_url=f"{fake_url}/v1",
        retry=retry,
        continuation_options={"continue_final_message": True, "add_generation_prompt": False},
    )
    prior: list[Event] = [
        Started(model=MODEL, attempt=1),
        Token(text="Once upon"),
        Token(text=" a"),
    ]

    events = await collect(adapter, context(MODEL, prior=prior))

    assert events == [Token(text=" time"), Token(text="."), Done(reason="stop", usage=USAGE)]
    body = fake.requests[0].body
    assert body["messages"][-1] == {"role": "assistant", "content": "Once upon a"}
    assert body["continue_final_message"] is True
    assert body["add_generation_prompt"] is False


async def test_first_attempt_sends_no_continuation_options(
    fake: FakeProvider, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> None:
    fake.script(Reply(frames=OPENAI.stream.text_reply(["hi"])))
    adapter = OpenAIAdapter(
        session,
        base_url=f"{fake_url}/v1",
        retry=retry,
        continuation_options={"continue_final_message": True},
    )

    await collect(adapter, context(MODEL))

    assert "continue_final_message" not in fake.requests[0].body


async def test_takeover_inside_a_tool_call_is_worker_lost(
    fake: FakeProvider, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> None:
    prior: list[Event] = [
        Token(text="Let me look."),
        ToolCallDelta(index=0, id="c", name="get_weather"),
    ]

    with pytest.raises(ProviderError) as raised:
        await collect(_adapter(session, fake_url, retry), context(MODEL, prior=prior))

    assert raised.value.code == "worker_lost"
    assert raised.value.retryable
    assert fake.requests == []


async def test_takeover_after_complete_tool_calls_only_finishes(
    fake: FakeProvider, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> None:
    prior: list[Event] = [
        ToolCallDelta(index=0, id="c", name="now"),
        ToolCall(index=0, id="c", name="now", arguments={}),
    ]

    events = await collect(_adapter(session, fake_url, retry), context(MODEL, prior=prior))

    assert events == [Done(reason="tool_calls")]
    assert fake.requests == []


async def test_configuration_comes_from_the_conventional_environment(
    fake: FakeProvider, fake_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", f"{fake_url}/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    fake.script(Reply(frames=OPENAI.stream.text_reply(["hi"])))
    adapter = OpenAIAdapter()  # its own session

    try:
        events = await collect(adapter, context(MODEL))
    finally:
        await adapter.close()

    assert events[0] == Token(text="hi")
    assert fake.requests[0].headers["Authorization"] == "Bearer sk-from-env"
