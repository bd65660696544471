"""SSE framing to the byte, and the client parser's EventSource semantics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import events, sse
from tests.live import parse_live


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            sse.event_frame(7, "token", b'{"type":"token","text":"hi"}'),
            b'id: 7\nevent: token\ndata: {"type":"token","text":"hi"}\n\n',
        ),
        (sse.event_frame(1, "x", b"a\nb\r\nc"), b"id: 1\nevent: x\ndata: a\ndata: b\ndata: c\n\n"),
        (
            sse.unnumbered_frame("gap", b'{"requested":1,"first_available":9}'),
            b'event: gap\ndata: {"requested":1,"first_available":9}\n\n',
        ),
        (sse.message_frame(b'{"type":"start-step"}', 3), b'id: 3\ndata: {"type":"start-step"}\n\n'),
        (sse.message_frame(b"[DONE]"), b"data: [DONE]\n\n"),
        (sse.retry_frame(1500), b"retry: 1500\n\n"),
        (sse.comment_frame("keep-alive"), b": keep-alive\n\n"),
        (sse.comment_frame(), b":\n\n"),
    ],
    ids=[
        "event",
        "multi-line-data",
        "gap-without-id",
        "message",
        "message-without-id",
        "retry",
        "comment",
        "empty-comment",
    ],
)
def test_frames_are_exact(frame: bytes, expected: bytes) -> None:
    assert frame == expected


def parse(*chunks: bytes) -> tuple[list[sse.ReceivedEvent], sse.Parser]:
    parser = sse.Parser()
    messages = [m for chunk in chunks for m in parser.feed(chunk)]
    return messages, parser


def test_parser_reads_what_we_write_split_anywhere() -> None:
    stream = (
        sse.retry_frame(10)
        + sse.event_frame(1, "token", b'{"t":1}')
        + sse.comment_frame("keep-alive")
        + sse.unnumbered_frame("gap", b"{}")
        + sse.event_frame(2, "done", b"{}")
    )
    whole, _ = parse(stream)
    assert whole == [
        sse.ReceivedEvent(event="token", data='{"t":1}', id="1"),
        sse.ReceivedEvent(event="gap", data="{}", id="1"),
        sse.ReceivedEvent(event="done", data="{}", id="2"),
    ]
    for cut in range(len(stream) + 1):
        split, parser = parse(stream[:cut], stream[cut:])
        assert split == whole
        assert parser.retry == 10
        assert parser.comments == ["keep-alive"]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_parser_accepts_every_line_ending(ending: bytes) -> None:
    stream = ending.join([b"id: 3", b"event: token", b"data: a", b"data: b", b"", b""])
    messages, _ = parse(stream)
    assert messages == [sse.ReceivedEvent(event="token", data="a\nb", id="3")]


def test_unterminated_final_event_is_dropped() -> None:
    messages, parser = parse(b"id: 1\ndata: complete\n\nid: 2\ndata: cut off\n")
    assert [m.data for m in messages] == ["complete"]
    assert parser.last_event_id == "2"  # the id line itself was processed, as in a browser


def test_parser_ignores_invalid_retry_and_ids_with_nul() -> None:
    messages, parser = parse(b"retry: 10x\nid: a\0b\ndata: x\n\n")
    assert parser.retry is None
    assert messages == [sse.ReceivedEvent(event="message", data="x", id=None)]


def test_many_frames_at_once_equal_one_by_one() -> None:
    rows = [(b"7", b"token", b'{"type":"token","text":"a"}'), (b"8", b"done", b"{}")]
    assert sse.event_frames(rows) == b"".join(
        sse.event_frame(int(seq), kind.decode(), data) for seq, kind, data in rows
    )
    assert sse.event_frames([]) == b""


event_type = st.sampled_from([b"token", b"started", b"tool_call", b"done", b"error"])
event_data = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))


@given(
    first=st.integers(1, 10**12),
    appended_ms=st.integers(0, 2**48),
    batch=st.lists(st.tuples(event_type, event_data), min_size=1, max_size=8),
)
def test_live_frames_match_framing_each_parsed_entry(
    first: int, appended_ms: int, batch: list[tuple[bytes, bytes]]
) -> None:
    payload = b"\n".join([b"%d" % first, b"%d" % appended_ms, *(b for e in batch for b in e)])
    frames = sse.live_frames(payload)
    entries = parse_live(payload)
    assert [f.seq for f in frames] == [e.seq for e in entries]
    assert [f.data for f in frames] == [sse.event_frame(e.seq, e.type, e.data) for e in entries]
    assert [f.terminal for f in frames] == [e.type in events.TERMINAL_TYPES for e in entries]
    assert {f.appended_ms for f in frames} == {appended_ms}


@pytest.mark.parametrize(
    "payload",
    [b"", b"garbage", b"1\n0", b"1\n0\ntoken", b"x\n0\ntoken\n{}", b"1\n0\ntoken\n{}\ndone"],
    ids=["empty", "one-line", "no-event", "type-without-data", "bad-seq", "odd-fields"],
)
def test_live_frames_refuse_what_is_not_a_live_message(payload: bytes) -> None:
    with pytest.raises(ValueError, match=r"live message|invalid literal"):
        sse.live_frames(payload)
