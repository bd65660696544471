"""The event union: JSON shape and round trip."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import msgspec
import pytest

from app import events

ALL: list[events.Event] = [
    events.Started(model="sim", attempt=2),
    events.Started(),
    events.Token(text='héllo\n"world" \u2028 😀'),
    events.ToolCallDelta(index=0, id="call_1", name="get_weather", arguments_delta='{"ci'),
    events.ToolCallDelta(index=1, arguments_delta='ty": "Paris"}'),
    events.ToolCall(index=0, id="call_1", name="get_weather", arguments={"city": "Paris"}),
    events.Done(reason="stop", usage=events.Usage(prompt_tokens=3, completion_tokens=5)),
    events.Done(reason="cancelled"),
    events.Error(code="worker_lost", message="the worker died", retryable=True),
    events.Reset(from_seq=91),
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
    assert events.encode(events.Started(model="sim", attempt=1)) == (
        b'{"type":"started","model":"sim","attempt":1}'
    )
    assert events.encode(events.Done(reason="length")) == (
        b'{"type":"done","reason":"length","usage":{}}'
    )
    assert events.encode(events.ToolCallDelta(index=0, id="call_1", name="f")) == (
        b'{"type":"tool_call_delta","index":0,"arguments_delta":"","id":"call_1","name":"f"}'
    )
    assert events.encode(events.Error(code="x", message="y")) == (
        b'{"type":"error","code":"x","message":"y","retryable":false}'
    )


def _documented_fields() -> dict[str, tuple[set[str], set[str]]]:
    """The README's event table: per type, the fields always present and those marked `?`."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table: dict[str, tuple[set[str], set[str]]] = {}
    for row in re.finditer(r"^\s*\| `(\w+)` \| `(\{[^`]*\})`", readme, re.MULTILINE):
        fields = re.findall(r'"(\w+)"(\?)?', row[2])
        table[row[1]] = (
            {name for name, optional in fields if not optional},
            {name for name, optional in fields if optional},
        )
    return table


# Each type with every default left in place: what a model that reports little produces.
BAREST = [
    events.Started(),
    events.Token(text=""),
    events.ToolCallDelta(index=0),
    events.ToolCall(index=0, id="call_0", name="f", arguments={}),
    events.Done(reason="cancelled"),
    events.Error(code="internal", message="m"),
    events.Reset(from_seq=1),
]


@pytest.mark.parametrize("event", [*BAREST, *ALL], ids=lambda e: events.event_type(e))
def test_every_documented_field_is_present_and_no_other(event: events.Event) -> None:
    required, optional = _documented_fields()[events.event_type(event)]
    encoded = set(msgspec.json.decode(events.encode(event)))

    assert required <= encoded
    assert encoded <= required | optional | {"type"}


def test_the_table_documents_every_event_type() -> None:
    assert set(_documented_fields()) == set(events.EVENT_TYPES)


def test_events_written_before_every_field_was_sent_still_decode() -> None:
    assert events.decode(b'{"type":"tool_call_delta","index":0,"id":"c","name":"f"}') == (
        events.ToolCallDelta(index=0, id="c", name="f", arguments_delta="")
    )
    assert events.decode(b'{"type":"done","reason":"stop"}') == events.Done(reason="stop")
    assert events.decode(b'{"type":"error","code":"x","message":"y"}').retryable is False  # type: ignore[union-attr]


def test_unknown_type_and_bad_reason_are_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):
        events.decode(b'{"type":"telepathy"}')
    with pytest.raises(msgspec.ValidationError):
        events.decode(b'{"type":"done","reason":"bored"}')


def test_terminal_events_and_statuses() -> None:
    assert set(events.EVENT_TYPES) == {
        "started", "token", "tool_call_delta", "tool_call", "done", "error", "reset"
    }  # fmt: skip
    assert {"done", "error"} == events.TERMINAL_TYPES
    assert events.status_of(events.Done(reason="stop")) == "done"
    assert events.status_of(events.Done(reason="cancelled")) == "cancelled"
    assert events.status_of(events.Error(code="x", message="y")) == "error"
    terminal = [events.event_type(event) for event in ALL if events.is_terminal(event)]
    assert terminal == ["done", "done", "error"]


def test_event_types_are_leaves() -> None:
    # is_terminal compares exact types: a subclass of an event type would slip past it.
    for event_type in typing.get_args(events.Event):
        assert event_type.__subclasses__() == [], event_type
