"""Streamed tool calls: collect the fragments, parse the arguments only once a call is complete.

Both providers stream a tool call as an id and a name, then its arguments as a
JSON string cut at arbitrary points (inside a key, inside a `\\u00e9` escape,
between the halves of a surrogate pair). Parsing a prefix is the guide's
mistake no. 2; this module only ever parses the whole string.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from msgspec import UNSET

from app.events import ToolCall, ToolCallDelta


class InvalidToolArguments(Exception):
    """A complete tool call whose arguments are not a JSON object; `message` names the tool."""

    code = "invalid_tool_arguments"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclasses.dataclass
class _PendingCall:
    index: int
    id: str | None = None
    name: str | None = None
    fragments: list[str] = dataclasses.field(default_factory=list)


class ToolCallAccumulator:
    """The tool calls of one response, keyed by the provider's index (OpenAI's tool call
    index, Anthropic's content block index).

    The events carry the generation's own numbering instead, the calls counted from 0
    in the order they start, so a client sees the same indexes from every provider.
    Calls may interleave: fragments of call 1 can arrive between fragments of call 0.
    """

    def __init__(self) -> None:
        self._pending: dict[int, _PendingCall] = {}
        self._started = 0
        self.completed: list[ToolCall] = []

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def add(
        self,
        index: int,
        *,
        id: str | None = None,
        name: str | None = None,
        arguments_delta: str = "",
    ) -> ToolCallDelta | None:
        """Record a fragment; returns the delta to show, or None when it carries nothing new.

        An id or name is reported the first time it is known. Some OpenAI-compatible
        servers repeat them on every fragment, so a later value never replaces (or
        is appended to) the first.
        """
        call = self._pending.get(index)
        if call is None:
            call = self._pending[index] = _PendingCall(self._started)
            self._started += 1
        new_id = id if id and call.id is None else None
        new_name = name if name and call.name is None else None
        if new_id is not None:
            call.id = new_id
        if new_name is not None:
            call.name = new_name
        if arguments_delta:
            call.fragments.append(arguments_delta)
        if new_id is None and new_name is None and not arguments_delta:
            return None
        return ToolCallDelta(
            index=call.index,
            arguments_delta=arguments_delta,
            id=UNSET if new_id is None else new_id,
            name=UNSET if new_name is None else new_name,
        )

    def finish(self, index: int) -> ToolCall:
        """Complete the call at the provider's `index` and parse its arguments.

        Raises `InvalidToolArguments`.
        """
        call = self._pending.pop(index, None)
        if call is None:
            raise InvalidToolArguments(
                f"tool call at provider index {index} ended but never started"
            )
        if not call.name:
            raise InvalidToolArguments(f"tool call #{call.index} has no function name")
        arguments = _parse_arguments(call)
        completed = ToolCall(
            index=call.index,
            id=call.id or f"call_{call.index}",
            name=call.name,
            arguments=arguments,
        )
        self.completed.append(completed)
        return completed

    def finish_all(self) -> list[ToolCall]:
        """Complete every pending call in the order they started (OpenAI: at `finish_reason`)."""
        return [self.finish(index) for index in list(self._pending)]


def _parse_arguments(call: _PendingCall) -> dict[str, Any]:
    text = "".join(call.fragments)
    if not text.strip():
        return {}  # a tool without parameters: providers send "" (OpenAI) or nothing (Anthropic)
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise InvalidToolArguments(
            f"tool {call.name!r} (call #{call.index}) got arguments that are not valid JSON: {exc}"
        ) from None
    if not isinstance(value, dict):
        raise InvalidToolArguments(
            f"tool {call.name!r} (call #{call.index}) got arguments that are not a JSON object: "
            f"{type(value).__name__}"
        )
    return value
