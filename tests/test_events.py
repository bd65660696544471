"""The event union: JSON shape and round trip."""

from __future__ import annotations

import msgspec
import pytest

from app import events

ALL = [
    events.Started(model="sim", attempt=2),
    events.Started(),
    events.Token(text='héllo\n"world" \u2028 😀'),
    events.ToolCallDelta(index=0, id="call_1", name="get_weather", arguments_delta='{"ci'),
    events.ToolCallDelta(index=1, arguments_delta='ty": "Paris"}'),
    events.ToolCall(index=0, id="call_1", name="get_weather", arguments={"city": "Paris"}),
    events.Done(reason="stop", usage=events.Usage(prompt_tokens=3, completion_tokens=5)),
    events.Done(reason="cancelled"),
    events.Error(code="worker_lost", message="the worker died", retryable=True),
]


@pytest.mark.parametrize("event", ALL, ids=lambda e: events.event_type(e))
def test_round_trip(event: events.Event) -> None:
    data = events.encode(event)
    assert b"\n" not in data  # one SSE data line
    assert b"\r" not in data
    assert events.decode(data) == event
    assert msgspec.json.decode(data)["type"] == events.event_type(event)


def test_json_shape_is_the_documented_one() -> None:
    assert events.encode(events.Token(text="Hi")) == b'{"type":"token","text":"Hi"}'
    assert events.encode(events.Started()) == b'{"type":"started"}'
    assert events.encode(events.Done(reason="length")) == b'{"type":"done","reason":"length"}'


def test_unknown_type_and_bad_reason_are_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):
        events.decode(b'{"type":"telepathy"}')
    with pytest.raises(msgspec.ValidationError):
        events.decode(b'{"type":"done","reason":"bored"}')


def test_terminal_events_and_statuses() -> None:
    assert set(events.EVENT_TYPES) == {
        "started", "token", "tool_call_delta", "tool_call", "done", "error"
    }  # fmt: skip
    assert {"done", "error"} == events.TERMINAL_TYPES
    assert events.status_of(events.Done(reason="stop")) == "done"
    assert events.status_of(events.Done(reason="cancelled")) == "cancelled"
    assert events.status_of(events.Error(code="x", message="y")) == "error"
