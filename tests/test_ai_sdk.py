"""The AI SDK's UI message stream to the byte: chunk shapes, positions, and resuming anywhere."""

from __future__ import annotations

import pytest

from app import events, sse
from app.ai_sdk import UIMessageStream
from app.events import Event, LogEntry

GENERATION = "5r1Yx0dQmYtJ1S4r9OZ2wA"

# Text, two tool calls whose fragments interleave (the second's name arrives after a
# fragment), a takeover in the middle of the text, then more text.
EVENTS: list[Event] = [
    events.Started(model="sim", attempt=1),
    events.Token(text="Let me "),
    events.Started(model="sim", attempt=2),
    events.Token(text="check."),
    events.ToolCallDelta(index=0, id="call_a", name="get_weather"),
    events.ToolCallDelta(index=0, arguments_delta='{"city": '),
    events.ToolCallDelta(index=1, id="call_b"),
    events.ToolCallDelta(index=1, arguments_delta='{"q"'),
    events.ToolCallDelta(index=1, name="search_docs"),
    events.ToolCallDelta(index=0, arguments_delta='"Paris"}'),
    events.ToolCallDelta(index=1, arguments_delta=': "x"}'),
    events.ToolCall(index=0, id="call_a", name="get_weather", arguments={"city": "Paris"}),
    events.ToolCall(index=1, id="call_b", name="search_docs", arguments={"q": "x"}),
    events.Token(text="Both done."),
    events.Done(reason="tool_calls"),
]

EXPECTED = (
    b'data: {"type":"start","messageId":"5r1Yx0dQmYtJ1S4r9OZ2wA"}\n\n'
    b'id: 1\ndata: {"type":"start-step"}\n\n'
    b'data: {"type":"text-start","id":"text-2"}\n\n'
    b'id: 2\ndata: {"type":"text-delta","id":"text-2","delta":"Let me "}\n\n'
    b'id: 4\ndata: {"type":"text-delta","id":"text-2","delta":"check."}\n\n'
    b'data: {"type":"text-end","id":"text-2"}\n\n'
    b'id: 5\ndata: {"type":"tool-input-start","toolCallId":"call_a","toolName":"get_weather"}\n\n'
    b'id: 6\ndata: {"type":"tool-input-delta","toolCallId":"call_a","inputTextDelta":"{\\"city\\": "}\n\n'
    b'data: {"type":"tool-input-start","toolCallId":"call_b","toolName":"search_docs"}\n\n'
    b'id: 9\ndata: {"type":"tool-input-delta","toolCallId":"call_b","inputTextDelta":"{\\"q\\""}\n\n'
    b'id: 10\ndata: {"type":"tool-input-delta","toolCallId":"call_a","inputTextDelta":"\\"Paris\\"}"}\n\n'
    b'id: 11\ndata: {"type":"tool-input-delta","toolCallId":"call_b","inputTextDelta":": \\"x\\"}"}\n\n'
    b'id: 12\ndata: {"type":"tool-input-available","toolCallId":"call_a","toolName":"get_weather","input":{"city":"Paris"}}\n\n'
    b'id: 13\ndata: {"type":"tool-input-available","toolCallId":"call_b","toolName":"search_docs","input":{"q":"x"}}\n\n'
    b'data: {"type":"text-start","id":"text-14"}\n\n'
    b'id: 14\ndata: {"type":"text-delta","id":"text-14","delta":"Both done."}\n\n'
    b'data: {"type":"text-end","id":"text-14"}\n\n'
    b'data: {"type":"finish-step"}\n\n'
    b'id: 15\ndata: {"type":"finish","finishReason":"tool-calls"}\n\n'
    b"data: [DONE]\n\n"
)


def entries(written: list[Event]) -> list[LogEntry]:
    return [
        LogEntry(seq=seq, type=events.event_type(event), data=events.encode(event), appended_ms=0)
        for seq, event in enumerate(written, start=1)
    ]


def framed(stream: UIMessageStream, written: list[LogEntry]) -> bytes:
    return b"".join(stream.frame(e.seq, events.decode(e.data)) for e in written)


def test_a_generation_is_one_message_of_one_step_to_the_byte() -> None:
    assert framed(UIMessageStream(GENERATION), entries(EVENTS)) == EXPECTED


def test_the_hub_frames_reframed_are_the_same_bytes() -> None:
    hub_frames = sse.event_frames((b"%d" % e.seq, e.type.encode(), e.data) for e in entries(EVENTS))
    stream = UIMessageStream(GENERATION)
    assert b"".join(
        stream.reframe(hub_frames[i : i + 7]) for i in range(0, len(hub_frames), 7)
    ) == (EXPECTED)


@pytest.mark.parametrize("position", range(len(EVENTS) + 1))
def test_resuming_after_any_event_continues_the_uninterrupted_stream(position: int) -> None:
    written = entries(EVENTS)
    before = framed(UIMessageStream(GENERATION), written[:position])
    resumed = UIMessageStream(GENERATION)
    if position:  # as a request with Last-Event-ID does
        resumed.prime(written[:position])
    after = framed(resumed, written[position:])
    assert before + after == EXPECTED
    assert (b'"type":"start"' in after) == (position == 0)


@pytest.mark.parametrize(
    ("terminal", "ending"),
    [
        (events.Done(reason="stop"), b'id: 3\ndata: {"type":"finish","finishReason":"stop"}\n\n'),
        (
            events.Done(reason="length"),
            b'id: 3\ndata: {"type":"finish","finishReason":"length"}\n\n',
        ),
        (
            events.Done(reason="content_filter"),
            b'id: 3\ndata: {"type":"finish","finishReason":"content-filter"}\n\n',
        ),
        (
            events.Done(reason="cancelled"),
            b'id: 3\ndata: {"type":"abort","reason":"cancelled"}\n\n',
        ),
        (
            events.Error(code="worker_lost", message="the worker was lost; retry", retryable=True),
            b'data: {"type":"error","errorText":"worker_lost: the worker was lost; retry"}\n\n'
            b'data: {"type":"finish-step"}\n\n'
            b'id: 3\ndata: {"type":"finish","finishReason":"error"}\n\n',
        ),
    ],
    ids=["stop", "length", "content-filter", "cancelled", "error"],
)
def test_each_ending_closes_the_text_and_the_step(terminal: Event, ending: bytes) -> None:
    stream = UIMessageStream(GENERATION)
    framed(stream, entries([events.Started(), events.Token(text="Hi")]))
    closing = b'data: {"type":"text-end","id":"text-2"}\n\n'
    if not isinstance(terminal, events.Error):
        closing += b'data: {"type":"finish-step"}\n\n'
    assert stream.frame(3, terminal) == closing + ending + b"data: [DONE]\n\n"


def test_a_gap_is_a_transient_data_part_without_id() -> None:
    stream = UIMessageStream(GENERATION)
    gap = events.Gap(requested=1, first_available=40)
    chunk = sse.unnumbered_frame("gap", events.encode(gap)) + sse.event_frame(
        40, "token", events.encode(events.Token(text="kept"))
    )
    assert stream.reframe(chunk) == (
        b'data: {"type":"data-gap","data":{"requested":1,"first_available":40},"transient":true}\n\n'
        b'data: {"type":"start","messageId":"5r1Yx0dQmYtJ1S4r9OZ2wA"}\n\n'
        b'data: {"type":"start-step"}\n\n'
        b'data: {"type":"text-start","id":"text-40"}\n\n'
        b'id: 40\ndata: {"type":"text-delta","id":"text-40","delta":"kept"}\n\n'
    )


def test_notices_of_the_default_format_are_left_out() -> None:
    stream = UIMessageStream(GENERATION)
    stream.prime([])
    assert stream.reframe(sse.unnumbered_frame("notice", b"{}") + sse.comment_frame("x")) == b""


def test_a_tool_call_that_never_streamed_its_arguments_is_available_at_once() -> None:
    stream = UIMessageStream(GENERATION)
    stream.prime([])
    call = events.ToolCall(index=0, id="call_0", name="lookup", arguments={"q": 1})
    assert stream.frame(7, call) == (
        b'id: 7\ndata: {"type":"tool-input-available","toolCallId":"call_0","toolName":"lookup",'
        b'"input":{"q":1}}\n\n'
    )


def test_a_reset_that_voids_what_was_sent_ends_the_response_with_an_error() -> None:
    stream = UIMessageStream(GENERATION)
    written = entries([events.Started(), events.Token(text="kept "), events.Token(text="lost")])
    framed(stream, written)
    reset = events.Reset(from_seq=3)
    assert stream.reframe(sse.event_frame(5, "reset", events.encode(reset))) == (
        b'data: {"type":"error","errorText":"log_reset: Redis lost this answer\'s events from '
        b'seq 3; read the message again from the start"}\n\n'
    )
    assert stream.voided


def test_a_reset_of_nothing_a_reader_holds_is_passed_over() -> None:
    stream = UIMessageStream(GENERATION)
    framed(stream, entries([events.Started(), events.Token(text="kept ")]))
    # Read from the start after the loss: the void seqs are not in the log.
    after = sse.event_frame(5, "reset", events.encode(events.Reset(from_seq=3)))
    after += sse.event_frame(6, "token", events.encode(events.Token(text="again")))
    assert (
        stream.reframe(after)
        == b'id: 6\ndata: {"type":"text-delta","id":"text-2","delta":"again"}\n\n'
    )
    assert not stream.voided
