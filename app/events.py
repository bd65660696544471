"""The events of a generation: one tagged union, encoded once to JSON.

An event's JSON carries its type (`{"type": "token", "text": "Hi"}`); its
position in the generation, `seq`, is not part of the event but of the log
entry that holds it (see `LogEntry`), because seq is assigned by the log at
append time, atomically, never by the writer.
"""

from __future__ import annotations

from typing import Any, Literal, TypeGuard

import msgspec
from msgspec import UNSET, UnsetType

FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "content_filter"]


class _Event(msgspec.Struct, tag_field="type", frozen=True):
    """Every field is encoded, defaults too, so a client reads what the README lists unguarded.

    A field the README marks `?` is `UNSET` when absent (msgspec leaves it out); the
    defaults are there so that logs written before a field was always sent still decode.
    """


class Started(_Event, tag="started", frozen=True):
    """The worker picked the generation up; `attempt` counts takeovers from 1."""

    model: str | None = None
    attempt: int | None = None


class Token(_Event, tag="token", frozen=True):
    text: str


class ToolCallDelta(_Event, tag="tool_call_delta", frozen=True):
    """A fragment of a tool call's arguments as the model streams it: show it, never parse it."""

    index: int  # the generation's tool calls counted from 0, whatever the provider numbers
    arguments_delta: str = ""
    id: str | UnsetType = UNSET  # on the first delta of a call only
    name: str | UnsetType = UNSET


class ToolCall(_Event, tag="tool_call", frozen=True):
    """A complete tool call; `arguments` is the parsed JSON object."""

    index: int
    id: str
    name: str
    arguments: dict[str, Any]


class Usage(msgspec.Struct, omit_defaults=True, frozen=True):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class Done(_Event, tag="done", frozen=True):
    reason: FinishReason
    usage: Usage = msgspec.field(default_factory=Usage)  # `{}` when the model reported none


class Error(_Event, tag="error", frozen=True):
    code: str
    message: str
    retryable: bool = False


class Reset(_Event, tag="reset", frozen=True):
    """The log went back (Redis came back with an older copy of it): every event from
    `from_seq` on that a client holds is void; the log continues after this event.

    Written into the log by the worker that finds it behind what it appended, at a seq
    no client can hold, so no seq ever names two different events. A reader sends one
    of its own (from 1, with `id: 0`) to a client whose position the log cannot vouch for.
    """

    from_seq: int


class Gap(msgspec.Struct, frozen=True):
    """Sent (without an SSE id) when retention removed part of what a client asked for."""

    requested: int
    first_available: int


Event = Started | Token | ToolCallDelta | ToolCall | Done | Error | Reset
TerminalEvent = Done | Error

EVENT_TYPES: tuple[str, ...] = tuple(
    t.__struct_config__.tag  # type: ignore[misc]
    for t in (Started, Token, ToolCallDelta, ToolCall, Done, Error, Reset)
)
TERMINAL_TYPES = frozenset({"done", "error"})

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def encode(event: Event | Gap) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes | str) -> Event:
    return _decoder.decode(data)


def event_type(event: Event) -> str:
    tag: str = event.__struct_config__.tag  # type: ignore[assignment]
    return tag


# Every event type is a leaf, so its exact type answers what isinstance would, at a
# fraction of isinstance's cost on a msgspec Struct (a worker asks several times per event).
_TERMINAL_TYPES = frozenset((Done, Error))


def is_terminal(event: Event) -> TypeGuard[TerminalEvent]:
    return type(event) in _TERMINAL_TYPES


def status_of(event: TerminalEvent) -> str:
    """The generation status a terminal event leaves behind."""
    if isinstance(event, Error):
        return "error"
    return "cancelled" if event.reason == "cancelled" else "done"


class LogEntry(msgspec.Struct, frozen=True):
    """One event as the log holds it: its seq, append time and encoded JSON."""

    seq: int
    type: str
    data: bytes
    appended_ms: int

    def event(self) -> Event:
        return decode(self.data)
