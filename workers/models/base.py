"""What a model adapter is: an async stream of events for one generation."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from app.events import Event
from app.generations import GenerationRequest


@dataclasses.dataclass(frozen=True)
class GenerationContext:
    generation_id: str
    request: GenerationRequest
    # Events the log already holds (a takeover after a crash); empty on a first attempt.
    # The adapter continues after them and never repeats one.
    prior: Sequence[Event] = ()
    attempt: int = 1


class ModelAdapter(Protocol):
    """Streams one generation.

    Yields Token, ToolCallDelta, ToolCall and finally Done (or Error); never
    Started, which the runner appends. The runner cancels the iterating task to
    stop a generation: an adapter releases its upstream (closes the HTTP
    response) in `finally`/`async with`, so the provider stops generating.
    """

    def stream(self, context: GenerationContext) -> AsyncIterator[Event]: ...


class ProviderError(Exception):
    """A failure the runner turns into an `error` event with this code."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
