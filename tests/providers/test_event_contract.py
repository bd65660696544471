"""One event contract for every model: the same answer reads the same whoever produced it.

The scenario is the sim's (text, then two tool calls with arguments cut at arbitrary
points); the fake OpenAI and Anthropic servers stream that very answer in their own
shapes, Anthropic with its text in content block 0 and the calls in blocks 1 and 2.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec
import pytest

from app import events
from app.events import Done, Event, Token, ToolCall, ToolCallDelta
from app.generations import SimParams
from tests.providers.conftest import ANTHROPIC, OPENAI, Dialect, collect, context
from tests.providers.fake_provider import AnthropicStream, FakeProvider, OpenAIStream, Reply
from workers.models._upstream import RetryPolicy
from workers.models.sim import SimModel, plan, prompt_tokens

SCENARIO = SimParams(tokens=40, tokens_per_second=1e9, seed=21, tool_calls=2)


def _sim_answer() -> list[Event]:
    return list(plan(SCENARIO, prompt_tokens(context("sim").request)))


def _openai_frames(answer: list[Event]) -> list[bytes]:
    stream = OpenAIStream()
    frames = [stream.role()]
    for event in answer:
        if isinstance(event, Token):
            frames.append(stream.text(event.text))
        elif isinstance(event, ToolCallDelta) and isinstance(event.id, str):
            assert isinstance(event.name, str)
            frames.append(stream.tool_start(event.index, event.id, event.name))
        elif isinstance(event, ToolCallDelta):
            frames.append(stream.tool_arguments(event.index, event.arguments_delta))
        elif isinstance(event, Done):
            usage = event.usage
            assert usage.prompt_tokens is not None
            assert usage.completion_tokens is not None
            frames += [
                stream.finish("tool_calls"),
                stream.usage(usage.prompt_tokens, usage.completion_tokens),
                stream.done(),
            ]
    return frames


def _anthropic_frames(answer: list[Event]) -> list[bytes]:
    stream = AnthropicStream()
    done = answer[-1]
    assert isinstance(done, Done)
    assert done.usage.prompt_tokens is not None
    assert done.usage.completion_tokens is not None
    frames = [stream.message_start(done.usage.prompt_tokens), stream.text_block_start(0)]
    for event in answer:
        block = event.index + 1 if isinstance(event, ToolCallDelta | ToolCall) else 0
        if isinstance(event, Token):
            frames.append(stream.text(0, event.text))
        elif isinstance(event, ToolCallDelta) and isinstance(event.id, str):
            assert isinstance(event.name, str)
            if event.index == 0:
                frames.append(stream.block_stop(0))
            frames.append(stream.tool_block_start(block, event.id, event.name))
        elif isinstance(event, ToolCallDelta):
            frames.append(stream.tool_arguments(block, event.arguments_delta))
        elif isinstance(event, ToolCall):
            frames.append(stream.block_stop(block))
    frames += [
        stream.message_delta("tool_use", done.usage.completion_tokens),
        stream.message_stop(),
    ]
    return frames


def _as_sent(answer: list[Event]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The events as a client decodes them: complete calls apart, since OpenAI can only
    complete its calls at the end while the others complete each after its fragments."""
    wire = [msgspec.json.decode(events.encode(event)) for event in answer]
    calls = [event for event in wire if event["type"] == "tool_call"]
    return [event for event in wire if event["type"] != "tool_call"], calls


@pytest.mark.parametrize("dialect", [OPENAI, ANTHROPIC], ids=lambda d: d.name)
async def test_a_provider_streams_the_sims_answer_as_the_same_events(
    fake: FakeProvider,
    fake_url: str,
    session: aiohttp.ClientSession,
    retry: RetryPolicy,
    dialect: Dialect,
) -> None:
    answer = _sim_answer()
    streamed = [event async for event in SimModel().stream(context("sim", sim=SCENARIO))]
    assert streamed == answer
    frames = _openai_frames(answer) if dialect is OPENAI else _anthropic_frames(answer)
    fake.script(Reply(frames=frames))

    produced = await collect(dialect.make_adapter(session, fake_url, retry), context(dialect.model))

    (sim_events, sim_calls), (provider_events, provider_calls) = (
        _as_sent(answer),
        _as_sent(produced),
    )
    for sim_event, provider_event in zip(sim_events, provider_events, strict=True):
        assert provider_event == sim_event
    assert provider_calls == sim_calls
    # What a client reads unguarded is there, numbered from 0 by the generation.
    first_deltas = [e for e in provider_events if e["type"] == "tool_call_delta" and "id" in e]
    assert [(e["index"], e["arguments_delta"]) for e in first_deltas] == [(0, ""), (1, "")]
