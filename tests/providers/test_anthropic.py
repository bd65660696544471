"""The Anthropic adapter against a fake `/v1/messages` stream."""

from __future__ import annotations

import json

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings

from app.events import Done, Error, Event, Token, ToolCall, ToolCallDelta, Usage
from app.generations import Message
from tests.providers.conftest import ANTHROPIC, RecordedSleep, collect, context
from tests.providers.fake_provider import AnthropicStream, FakeProvider, Reply
from tests.providers.strategies import ARGUMENTS, TOOLS, Interleaving, interleavings
from workers.models._upstream import RetryPolicy
from workers.models.anthropic import AnthropicAdapter
from workers.models.base import ProviderError

MODEL = ANTHROPIC.model
# message_start's input_tokens (25) and message_delta's output_tokens (15).
USAGE = Usage(prompt_tokens=25, completion_tokens=15, total_tokens=40)


def _adapter(session: aiohttp.ClientSession, url: str, retry: RetryPolicy) -> AnthropicAdapter:
    return AnthropicAdapter(session, base_url=url, api_key="sk-ant-test", retry=retry)


@pytest.mark.parametrize(
    ("ascii_only", "bytewise"),
    [(False, False), (True, False), (False, True)],
    ids=["utf8", "escaped", "byte-by-byte"],
)
async def test_text_stream_as_anthropic_sends_it(
    fake: FakeProvider,
    fake_url: str,
    session: aiohttp.ClientSession,
    retry: RetryPolicy,
    ascii_only: bool,
    bytewise: bool,
) -> None:
    stream = AnthropicStream(ascii_only=ascii_only)
    fake.script(Reply(frames=stream.text_reply(["Caf", "é 😀"]), bytewise=bytewise))

    events = await collect(_adapter(session, fake_url, retry), context(MODEL))

    assert events == [Token(text="Caf"), Token(text="é 😀"), Done(reason="stop", usage=USAGE)]


async def test_request_is_translated_to_the_messages_api(
    fake: FakeProvider, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    messages = [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Weather in Paris?"),
        Message(
            role="assistant",
            content="Checking.",
            tool_calls=[
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        ),
        Message(role="tool", tool_call_id="toolu_1", content="18°C"),
    ]
    fake.script(Reply(frames=ANTHROPIC.stream.text_reply(["ok"])))
    generation = context(
        MODEL,
        messages=messages,
        tools=[weather],
        tool_choice="required",
        temperature=0.5,
        top_p=0.9,
        stop="END",
        provider_options={"metadata": {"user_id": "u1"}},
    )

    await collect(_adapter(session, fake_url, retry), generation)

    (request,) = fake.requests
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == "sk-ant-test"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.body == {
        "model": "claude-sonnet-4-5",
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18°C"}],
            },
        ],
        "max_tokens": 4096,
        "stream": True,
        "tools": [
            {
                "name": "get_weather",
                "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ],
        "tool_choice": {"type": "any"},
        "temperature": 0.5,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u1"},
    }


@pytest.mark.parametrize(
    ("stop_reason", "reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
async def test_stop_reasons_map_into_done(
    fake: FakeProvider,
    fake_url: str,
    session: aiohttp.ClientSession,
    retry: RetryPolicy,
    stop_reason: str,
    reason: str,
) -> None:
    fake.script(Reply(frames=ANTHROPIC.stream.text_reply(["x"], stop_reason)))

    events = await collect(_adapter(session, fake_url, retry), context(MODEL))

    assert events[-1] == Done(reason=reason, usage=USAGE)  # type: ignore[arg-type]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(interleaving=interleavings())
async def test_interleaved_tool_use_blocks_split_anywhere(
    fake: FakeProvider,
    fake_url: str,
    session: aiohttp.ClientSession,
    retry: RetryPolicy,
    interleaving: Interleaving,
) -> None:
    # Content block 0 is text; the tool_use blocks are 1 and 2, each stopped right after
    # its last fragment, so one call completes while the other is still streaming. The
    # events number the calls 0 and 1, the generation's own count.
    stream = AnthropicStream(ascii_only=interleaving.ascii_only)
    frames = [stream.message_start(), stream.text_block_start(0), stream.text(0, "Checking.")]
    frames += [stream.block_stop(0)]
    frames += [
        stream.tool_block_start(i + 1, tool_id, name) for i, (tool_id, name) in enumerate(TOOLS)
    ]
    expected: list[Event] = [Token(text="Checking.")]
    expected += [
        ToolCallDelta(index=i, id=tool_id, name=name) for i, (tool_id, name) in enumerate(TOOLS)
    ]
    for position, (call, piece) in enumerate(interleaving.fragments):
        frames.append(stream.tool_arguments(call + 1, piece))
        expected.append(ToolCallDelta(index=call, arguments_delta=piece))
        if position == interleaving.last_fragment_of(call):
            frames.append(stream.block_stop(call + 1))
            tool_id, name = TOOLS[call]
            arguments = json.loads(ARGUMENTS[call])
            expected.append(ToolCall(index=call, id=tool_id, name=name, arguments=arguments))
    frames += [stream.message_delta("tool_use"), stream.message_stop()]
    expected.append(Done(reason="tool_calls", usage=USAGE))
    fake.script(Reply(frames=frames))

    events = await collect(_adapter(session, fake_url, retry), context(MODEL))

    assert events == expected


async def test_invalid_tool_input_ends_with_an_error_naming_the_tool(
    fake: FakeProvider, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> None:
    stream = AnthropicStream()
    frames = [
        stream.message_start(),
        stream.tool_block_start(0, "toolu_1", "now"),
        stream.block_stop(0),  # no input_json_delta at all: {}
        stream.tool_block_start(1, "toolu_2", "get_weather"),
        stream.tool_arguments(1, '{"city": '),
        stream.block_stop(1),
        stream.message_delta("tool_use"),
        stream.message_stop(),
    ]
    fake.script(Reply(frames=frames))

    events = await collect(_adapter(session, fake_url, retry), context(MODEL))

    assert ToolCall(index=0, id="toolu_1", name="now", arguments={}) in events
    error = events[-1]
    assert isinstance(error, Error)
    assert error.code == "invalid_tool_arguments"
    assert "get_weather" in error.message
    assert not any(isinstance(e, Done) for e in events)


async def test_overloaded_error_event_before_output_is_retried(
    fake: FakeProvider,
    fake_url: str,
    session: aiohttp.ClientSession,
    retry: RetryPolicy,
    sleep: RecordedSleep,
) -> None:
    stream = AnthropicStream()
    fake.script(
        Reply(frames=[stream.message_start(), stream.error("overloaded_error", "Overloaded")]),
        Reply(frames=stream.text_reply(["fine"])),
    )

    events = await collect(_adapter(session, fake_url, retry), context(MODEL))

    assert events[0] == Token(text="fine")
    assert len(sleep.waits) == 1


async def test_invalid_request_error_event_is_not_retried(
    fake: FakeProvider,
    fake_url: str,
    session: aiohttp.ClientSession,
    retry: RetryPolicy,
    sleep: RecordedSleep,
) -> None:
    stream = AnthropicStream()
    fake.script(Reply(frames=[stream.error("invalid_request_error", "prompt is too long")]))

    with pytest.raises(ProviderError) as raised:
        await collect(_adapter(session, fake_url, retry), context(MODEL))

    assert raised.value.code == "provider_error"
    assert "prompt is too long" in raised.value.message
    assert sleep.waits == []


async def test_continuation_prefills_without_trailing_whitespace(
    fake: FakeProvider, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> None:
    # The log holds "The answer is " — the API rejects a prefill ending in whitespace,
    # and the model's continuation repeats the space: it must not reach the log twice.
    fake.script(Reply(frames=AnthropicStream().text_reply([" 4", "2."])))
    prior = [Token(text="The answer"), Token(text=" is ")]

    events = await collect(_adapter(session, fake_url, retry), context(MODEL, prior=prior))

    assert events == [Token(text="4"), Token(text="2."), Done(reason="stop", usage=USAGE)]
    messages = fake.requests[0].body["messages"]
    assert messages[-1] == {"role": "assistant", "content": "The answer is"}


@pytest.mark.parametrize(
    "prior",
    [
        [ToolCallDelta(index=1, id="toolu_1", name="get_weather")],
        [
            ToolCallDelta(index=1, id="toolu_1", name="now"),
            ToolCall(index=1, id="toolu_1", name="now", arguments={}),
        ],
    ],
    ids=["inside-a-tool-call", "after-a-tool-call"],
)
async def test_takeover_around_a_tool_call_is_worker_lost(
    fake: FakeProvider,
    fake_url: str,
    session: aiohttp.ClientSession,
    retry: RetryPolicy,
    prior: list[Event],
) -> None:
    with pytest.raises(ProviderError) as raised:
        await collect(_adapter(session, fake_url, retry), context(MODEL, prior=prior))

    assert raised.value.code == "worker_lost"
    assert fake.requests == []


async def test_configuration_comes_from_the_conventional_environment(
    fake: FakeProvider, fake_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-env")
    fake.script(Reply(frames=ANTHROPIC.stream.text_reply(["hi"])))
    adapter = AnthropicAdapter()

    try:
        events = await collect(adapter, context(MODEL))
    finally:
        await adapter.close()

    assert events[0] == Token(text="hi")
    assert fake.requests[0].headers["x-api-key"] == "sk-ant-env"


async def test_a_retried_continuation_drops_the_repeated_whitespace_afresh(
    fake: FakeProvider, fake_url: str, session: aiohttp.ClientSession, retry: RetryPolicy
) -> None:
    stream = AnthropicStream()
    first_attempt = [*stream.text_start([" "]), stream.error("overloaded_error", "Overloaded")]
    fake.script(Reply(frames=first_attempt), Reply(frames=stream.text_reply([" ", "\nWorld"])))
    prior = [Token(text="Hello \n")]

    events = await collect(_adapter(session, fake_url, retry), context(MODEL, prior=prior))

    assert events == [Token(text="World"), Done(reason="stop", usage=USAGE)]
    assert len(fake.requests) == 2
