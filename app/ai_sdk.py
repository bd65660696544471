"""The Vercel AI SDK's UI message stream: a generation's events as the chunks `useChat` reads.

The protocol (header `x-vercel-ai-ui-message-stream: v1`) is Server-Sent Events
without `event:` lines: each `data:` is one JSON chunk, and `data: [DONE]` ends the
stream. The chunk shapes are those of the `ai` package's `uiMessageChunkSchema`;
tests/http/ai_sdk_parser/ pins the version whose own parser reads what this module
writes. A generation is one assistant message, whose id is the generation id, of
one step:

    the first event      start {messageId}, start-step, then the event's own chunks
    token                text-start if no text part is open, text-delta
    tool_call_delta      text-end if a text part is open; tool-input-start once the
                         call's id and name are known, tool-input-delta
    tool_call            text-end if open, tool-input-available {input: the arguments}
    done                 text-end if open, finish-step, finish {finishReason}; when
                         cancelled, abort {reason: "cancelled"} instead of finish,
                         as the SDK ends a stream that was stopped
    error                text-end if open, error {errorText}, finish-step,
                         finish {finishReason: "error"}
    started              nothing of its own
    a retention gap      data-gap {data: {requested, first_available}, transient: true}
    a reset voiding      error {errorText: "log_reset: ..."} with no id, then the
    what was sent        response ends (no [DONE]): read the message again from the start

The chunks of one event go out together and only the last carries `id: <seq>`: a
connection cut between them resumes before the event, never in the middle of it.
A stream resumed after seq N goes on exactly as the uninterrupted one went on after
event N (no second `start`, no `text-start` for the text part already open), so a
consumer that keeps its parser across connections ends with the very message it
would have had; docs/ai-sdk.md says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import msgspec

from app import events, sse
from app.events import Event, LogEntry

HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}

DONE_FRAME = sse.message_frame(b"[DONE]")

_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool-calls",
    "content_filter": "content-filter",
}


class _Chunk(msgspec.Struct, tag_field="type", rename="camel", frozen=True):
    pass


class Start(_Chunk, tag="start", frozen=True):
    message_id: str


class StartStep(_Chunk, tag="start-step", frozen=True):
    pass


class TextStart(_Chunk, tag="text-start", frozen=True):
    id: str


class TextDelta(_Chunk, tag="text-delta", frozen=True):
    id: str
    delta: str


class TextEnd(_Chunk, tag="text-end", frozen=True):
    id: str


class ToolInputStart(_Chunk, tag="tool-input-start", frozen=True):
    tool_call_id: str
    tool_name: str


class ToolInputDelta(_Chunk, tag="tool-input-delta", frozen=True):
    tool_call_id: str
    input_text_delta: str


class ToolInputAvailable(_Chunk, tag="tool-input-available", frozen=True):
    tool_call_id: str
    tool_name: str
    input: dict[str, Any]


class FinishStep(_Chunk, tag="finish-step", frozen=True):
    pass


class Finish(_Chunk, tag="finish", frozen=True):
    finish_reason: str


class Abort(_Chunk, tag="abort", frozen=True):
    reason: str


class ErrorChunk(_Chunk, tag="error", frozen=True):
    error_text: str


class DataGap(_Chunk, tag="data-gap", frozen=True):
    """A data part the SDK hands to `onData` and keeps out of the message (transient)."""

    data: msgspec.Raw  # the default stream's gap JSON, as is
    transient: bool


Chunk = (
    Start
    | StartStep
    | TextStart
    | TextDelta
    | TextEnd
    | ToolInputStart
    | ToolInputDelta
    | ToolInputAvailable
    | FinishStep
    | Finish
    | Abort
    | ErrorChunk
    | DataGap
)

_encode = msgspec.json.Encoder().encode
_EVENT_TYPES = frozenset(events.EVENT_TYPES)


@dataclasses.dataclass(slots=True)
class _ToolInput:
    """A tool call whose arguments are streaming; announced once its id and name are known."""

    id: str | None = None
    name: str | None = None
    announced: bool = False
    held: str = ""  # fragments that came before the id and name


class UIMessageStream:
    """One connection's framing state: which text part and which tool inputs are open."""

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self._started = False
        self._text_id: str | None = None
        self._tool_inputs: dict[int, _ToolInput] = {}
        self._parser = sse.Parser()
        self._last_seq = 0  # of the last event framed (or primed)
        # A reset voided events this connection already sent: the SDK cannot take text
        # back, so the response ends after an error that says to read the message again.
        self.voided = False

    def prime(self, entries: Iterable[LogEntry]) -> None:
        """Take in the events a resuming client has had (and their `start`), writing nothing."""
        self._started = True
        for entry in entries:
            self.chunks(entry.seq, events.decode(entry.data))

    def reframe(self, chunk: bytes) -> bytes:
        """This format's bytes for a piece of the default event stream, as the hub hands it out."""
        frames: list[bytes] = []
        for message in self._parser.feed(chunk):
            if message.event == "gap":
                gap = DataGap(data=msgspec.Raw(message.data), transient=True)
                frames.append(sse.message_frame(_encode(gap)))
            elif message.event in _EVENT_TYPES:
                frames.append(self.frame(int(message.id or 0), events.decode(message.data)))
            # Any other notice is for the default format's clients.
        return b"".join(frames)

    def frame(self, seq: int, event: Event) -> bytes:
        """One event's chunks as SSE, the last with `id: <seq>`; `[DONE]` after the end."""
        chunks = self.chunks(seq, event)
        if not chunks:
            return b""
        if isinstance(event, events.Reset):
            # No id: a client that reconnects must not resume past what the reset voids.
            return b"".join([sse.message_frame(_encode(c)) for c in chunks])
        *leading, last = chunks
        framed = b"".join([sse.message_frame(_encode(c)) for c in leading])
        framed += sse.message_frame(_encode(last), seq)
        return framed + DONE_FRAME if events.is_terminal(event) else framed

    def chunks(self, seq: int, event: Event) -> list[Chunk]:
        """The chunks of one event, moving the state on."""
        chunks: list[Chunk] = []
        if isinstance(event, events.Reset):
            # Nothing to say to a reader that holds nothing it voids (the log has no
            # event in the void seqs, so a read from the start never met them).
            if event.from_seq <= self._last_seq:
                self.voided = True
                chunks.append(
                    ErrorChunk(
                        error_text=f"log_reset: Redis lost this answer's events from seq "
                        f"{event.from_seq}; read the message again from the start"
                    )
                )
            return chunks
        self._last_seq = seq
        if not self._started:
            self._started = True
            chunks += [Start(message_id=self.message_id), StartStep()]
        if isinstance(event, events.Token):
            if self._text_id is None:
                self._text_id = f"text-{seq}"
                chunks.append(TextStart(id=self._text_id))
            chunks.append(TextDelta(id=self._text_id, delta=event.text))
        elif isinstance(event, events.ToolCallDelta):
            self._end_text(chunks)
            self._tool_input_delta(event, chunks)
        elif isinstance(event, events.ToolCall):
            self._end_text(chunks)
            self._tool_inputs.pop(event.index, None)
            available = ToolInputAvailable(
                tool_call_id=event.id, tool_name=event.name, input=event.arguments
            )
            chunks.append(available)
        elif isinstance(event, events.Done):
            self._end_text(chunks)
            chunks.append(FinishStep())
            if event.reason == "cancelled":
                chunks.append(Abort(reason="cancelled"))
            else:
                chunks.append(Finish(finish_reason=_FINISH_REASONS[event.reason]))
        elif isinstance(event, events.Error):
            self._end_text(chunks)
            chunks += [
                ErrorChunk(error_text=f"{event.code}: {event.message}"),
                FinishStep(),
                Finish(finish_reason="error"),
            ]
        return chunks

    def _end_text(self, chunks: list[Chunk]) -> None:
        if self._text_id is not None:
            chunks.append(TextEnd(id=self._text_id))
            self._text_id = None

    def _tool_input_delta(self, event: events.ToolCallDelta, chunks: list[Chunk]) -> None:
        call = self._tool_inputs.setdefault(event.index, _ToolInput())
        if call.id is None and isinstance(event.id, str):
            call.id = event.id
        if call.name is None and isinstance(event.name, str):
            call.name = event.name
        if call.id is None or call.name is None:
            # The SDK needs both to show a call; its tool-input-available comes all the same.
            call.held += event.arguments_delta
            return
        delta = event.arguments_delta
        if not call.announced:
            call.announced = True
            chunks.append(ToolInputStart(tool_call_id=call.id, tool_name=call.name))
            delta, call.held = call.held + delta, ""
        if delta:
            chunks.append(ToolInputDelta(tool_call_id=call.id, input_text_delta=delta))
