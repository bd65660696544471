"""What a takeover finds in the log, as far as a provider adapter is concerned."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from app.events import Event, Token, ToolCall, ToolCallDelta, is_terminal
from workers.models.base import ProviderError


@dataclasses.dataclass(frozen=True)
class Resume:
    """The partial answer a previous worker left: its text and its completed tool calls."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finished: bool = False

    @property
    def started(self) -> bool:
        return bool(self.text or self.tool_calls)


def resume_from(prior: Sequence[Event], provider: str) -> Resume:
    """Read `prior`; a tool call cut off mid-arguments cannot be continued by any provider."""
    text: list[str] = []
    started_calls: set[int] = set()
    completed: list[ToolCall] = []
    finished = False
    for event in prior:
        if isinstance(event, Token):
            text.append(event.text)
        elif isinstance(event, ToolCallDelta):
            started_calls.add(event.index)
        elif isinstance(event, ToolCall):
            completed.append(event)
        elif is_terminal(event):
            finished = True
    unfinished = started_calls - {call.index for call in completed}
    if unfinished and not finished:
        raise ProviderError(
            "worker_lost",
            f"the worker running this generation was lost in the middle of a tool call, "
            f"which {provider} cannot continue; retry the generation",
            retryable=True,
        )
    return Resume(text="".join(text), tool_calls=tuple(completed), finished=finished)
