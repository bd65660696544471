"""The benchmark's fast SSE reader sees the same numbered events as `app.sse.Parser`."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from app.sse import Parser, comment_frame, event_frame, retry_frame, unnumbered_frame
from scripts.bench_client import EventReader, live_drift

FRAMES = [
    retry_frame(1000),
    comment_frame(),
    event_frame(1, "started", b'{"type":"started","model":"sim"}'),
    event_frame(2, "token", b'{"type":"token","text":"Hi\\n"}'),
    comment_frame("heartbeat"),
    unnumbered_frame("gap", b'{"requested":3,"first_available":4}'),
    event_frame(4, "tool_call_delta", b'{"type":"tool_call_delta","index":0}'),
    event_frame(5, "done", b'{"type":"done","reason":"stop"}'),
]
STREAM = b"".join(FRAMES)


def numbered_events(stream: bytes) -> list[tuple[bytes, bytes]]:
    """What the browser-semantics parser dispatches, restricted to events with an id line."""
    parser = Parser()
    messages = list(parser.feed(stream))
    return [
        (m.id.encode(), m.event.encode()) for m in messages if m.id is not None and m.event != "gap"
    ]


def read_in_chunks(stream: bytes, cuts: list[int]) -> list[tuple[bytes, bytes]]:
    reader = EventReader()
    heads: list[tuple[bytes, bytes]] = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        heads.extend(reader.feed(stream[start:cut]))
        start = cut
    return heads


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_chunking_gives_the_parsers_numbered_events(cuts: list[int]) -> None:
    assert read_in_chunks(STREAM, cuts) == numbered_events(STREAM)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_crlf_framing_of_aiohttp_sse_reads_the_same(cuts: list[int]) -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    assert read_in_chunks(crlf, cuts) == numbered_events(STREAM)


def test_an_unterminated_final_event_is_not_seen() -> None:
    assert EventReader().feed(event_frame(1, "token", b"{}")[:-1]) == []


def test_drift_is_lateness_behind_the_earliest_schedule_for_live_tokens() -> None:
    rate = 10.0
    # Tokens 0-2 on time from t=100, token 3 arrives 0.25 s late.
    arrivals = [100.0, 100.1, 100.2, 100.55]
    offsets = [arrived - index / rate for index, arrived in enumerate(arrivals)]
    drift = list(live_drift(offsets, rate, connected_at=99.0))
    assert [round(d, 6) for d in drift] == [0.0, 0.0, 0.0, 0.25]
    # Tokens scheduled before the client connected are catch-up, not drift.
    assert len(list(live_drift(offsets, rate, connected_at=100.15))) == 2
