"""Server-Sent Events framing, both ways: the bytes we write and a parser for clients.

Rules from the WHATWG EventSource spec that shape this module:
- a line is ended by LF, CR or CRLF; an event ends at an empty line, and an
  unterminated final event is dropped by the client;
- a field value may not contain a line break, so multi-line data becomes several
  `data:` lines (our event JSON never has one: JSON escapes control characters);
- `retry:` must be all digits; a line starting with `:` is a comment (used to
  flush headers through proxies and as a heartbeat);
- an `id:` line sets the client's last event id, which the browser sends back as
  `Last-Event-ID` when it reconnects.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from app.events import TERMINAL_TYPES


def event_frame(seq: int, event_type: str, data: bytes) -> bytes:
    """One event: `id: <seq>`, `event: <type>`, `data: <json>`, blank line."""
    if b"\n" in data or b"\r" in data:
        lines = b"".join(b"data: " + line + b"\n" for line in data.splitlines())
    else:
        lines = b"data: " + data + b"\n"
    return b"id: %d\nevent: %s\n%s\n" % (seq, event_type.encode(), lines)


def line_event_frame(seq: int, event_type: bytes, data: bytes) -> bytes:
    """One event whose `data` is one line, as every event the log holds is: the live hot path."""
    return b"id: %d\nevent: %b\ndata: %b\n\n" % (seq, event_type, data)


def event_frames(events: Iterable[tuple[bytes, bytes, bytes]]) -> bytes:
    """Many events in one piece, each `(seq, type, data)` as bytes: the catch-up hot path.

    `data` must be one line, as every event the log holds is (`events.encode` escapes
    line breaks); `event_frame` handles any data.
    """
    return b"".join([b"id: %b\nevent: %b\ndata: %b\n\n" % event for event in events])


class Frame:
    """A live event's SSE bytes, encoded once and shared by every reader of its generation."""

    __slots__ = ("appended_ms", "data", "seq", "terminal")

    def __init__(self, seq: int, terminal: bool, appended_ms: int, data: bytes) -> None:
        self.seq = seq
        self.terminal = terminal
        self.appended_ms = appended_ms
        self.data = data


_TERMINAL_TYPES = frozenset(t.encode() for t in TERMINAL_TYPES)


def live_frames(payload: bytes) -> list[Frame]:
    """The frames of a live message published by append.lua (its header states the format).

    Framed straight from the payload's bytes, as `event_frames` frames XRANGE rows:
    event data is one line (the format relies on it too). Raises ValueError on
    anything else.
    """
    parts = payload.split(b"\n")
    # A try costs nothing until it catches: cheaper than checking the length first.
    try:
        seq, appended_ms = int(parts[0]), int(parts[1])
        frames = []
        for i in range(2, len(parts), 2):
            kind = parts[i]
            data = line_event_frame(seq, kind, parts[i + 1])
            frames.append(Frame(seq, kind in _TERMINAL_TYPES, appended_ms, data))
            seq += 1
    except IndexError:
        frames = []
    if not frames:
        raise ValueError(f"not a live message: {payload[:60]!r}")
    return frames


def unnumbered_frame(event_type: str, data: bytes) -> bytes:
    """An event without `id:` (a gap notice): it must not move the client's position."""
    return b"event: %s\ndata: %s\n\n" % (event_type.encode(), data)


def message_frame(data: bytes, seq: int | None = None) -> bytes:
    """An event with no `event:` line (a client dispatches it as `message`), with `id: <seq>`
    when given; `data` must be one line."""
    if seq is None:
        return b"data: %b\n\n" % data
    return b"id: %d\ndata: %b\n\n" % (seq, data)


def retry_frame(milliseconds: int) -> bytes:
    return b"retry: %d\n\n" % milliseconds


def comment_frame(text: str = "") -> bytes:
    return b": %s\n\n" % text.encode() if text else b":\n\n"


class ReceivedEvent(msgspec.Struct, frozen=True):
    """One dispatched SSE event as a client sees it."""

    event: str
    data: str
    id: str | None  # the last event id in force when it was dispatched
    retry: int | None = None


class Parser:
    """Incremental SSE parser with the browser's semantics, for our own clients and tests."""

    def __init__(self) -> None:
        self._buffer = b""
        self._skip_lf = False
        self._event = ""
        self._data: list[str] = []
        self._has_data = False
        self.last_event_id: str | None = None
        self.retry: int | None = None
        self.comments: list[str] = []

    def feed(self, chunk: bytes) -> list[ReceivedEvent]:
        """The events that `chunk` completes, in order."""
        messages: list[ReceivedEvent] = []
        if self._skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        self._skip_lf = False
        buffer = self._buffer + chunk
        start = 0
        # Each search's answer holds until `start` passes it: searching again on every
        # line would scan to the end of a chunk with no CR once per line.
        cr = lf = -2  # not searched yet
        while True:
            if cr != -1 and cr < start:
                cr = buffer.find(b"\r", start)
            if lf != -1 and lf < start:
                lf = buffer.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                end, next_start = cr, cr + 1
                if buffer[cr + 1 : cr + 2] == b"\n":
                    next_start += 1
                elif cr + 1 == len(buffer):
                    self._skip_lf = True
            else:
                end, next_start = lf, lf + 1
            message = self._line(buffer[start:end].decode("utf-8", errors="replace"))
            start = next_start
            if message is not None:
                messages.append(message)
        self._buffer = buffer[start:]
        return messages

    def _line(self, line: str) -> ReceivedEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:].lstrip(" "))
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
            self._has_data = True
        elif field == "id" and "\0" not in value:
            self.last_event_id = value
        elif field == "retry" and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> ReceivedEvent | None:
        event, data, has_data = self._event, self._data, self._has_data
        self._event, self._data, self._has_data = "", [], False
        if not has_data:
            return None
        return ReceivedEvent(event=event or "message", data="\n".join(data), id=self.last_event_id)
