"""The protocol's wire formats, to the byte: offsets, header values, JSON mode, SSE events."""

from __future__ import annotations

import time

import pytest

from app.durable_streams import protocol
from app.durable_streams.protocol import Position
from app.errors import InvalidRequest


def test_offsets_sort_as_strings_in_stream_order() -> None:
    offsets = [protocol.format_offset(seq) for seq in (0, 1, 9, 10, 99, 100, 10**12)]
    assert offsets == sorted(offsets)
    assert offsets[0] == "0000000000000000_0000000000000000"
    assert protocol.parse_offset(offsets[3]) == Position(seq=10)


@pytest.mark.parametrize(
    ("raw", "position"),
    [("-1", Position(start=True)), ("now", Position(now=True))],
    ids=["start", "tail"],
)
def test_sentinels(raw: str, position: Position) -> None:
    assert protocol.parse_offset(raw) == position


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "0,1",
        "0 1",
        "../x",
        "0000000000000001_0000000000000000\n",
        "0000000000000001_0000000000000001",  # never minted: sub-positions are not offsets
        "1_0",
        "9999999999999999_9999999999999999",
        "-2",
        "NOW",
    ],
    ids=repr,
)
def test_offsets_this_server_did_not_mint_are_refused(raw: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        protocol.parse_offset(raw)
    assert refused.value.code == "invalid_offset"


@pytest.mark.parametrize("raw", ["00060", "+60", "60.5", "1e3", "-1", "abc", "", " 60"], ids=repr)
def test_decimal_headers_are_strict(raw: str) -> None:
    with pytest.raises(InvalidRequest):
        protocol.parse_decimal(raw, protocol.TTL)


def test_decimal_headers_stay_exact_in_javascript() -> None:
    assert protocol.parse_decimal(str(2**53 - 1), protocol.PRODUCER_SEQ) == 2**53 - 1
    with pytest.raises(InvalidRequest):
        protocol.parse_decimal(str(2**53), protocol.PRODUCER_SEQ)


def test_expires_at_takes_rfc3339_with_z_or_an_offset() -> None:
    soon = time.time() + 3600
    z = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(soon))
    assert abs(protocol.parse_expires_at(z + ".250Z") - (int(soon) * 1000 + 250)) < 2
    assert protocol.parse_expires_at(z + "+00:00") == int(soon) * 1000
    with pytest.raises(InvalidRequest):
        protocol.parse_expires_at("not-a-timestamp")
    with pytest.raises(InvalidRequest):
        protocol.parse_expires_at("2001-01-01T00:00:00Z")  # in the past
    assert protocol.format_expires_at(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"


@pytest.mark.parametrize(
    ("raw", "closed"),
    [("true", True), ("TRUE", True), ("false", False), ("1", False), ("", False), (None, False)],
)
def test_stream_closed_is_present_only_when_true(raw: str | None, closed: bool) -> None:
    assert protocol.is_true(raw) is closed


def test_producer_headers_go_together() -> None:
    assert protocol.parse_producer(None, None, None) is None
    assert protocol.parse_producer("p", "1", "0") == protocol.Producer("p", 1, 0)
    for partial in [("p", None, None), (None, "0", None), ("p", "0", None), ("", "0", "0")]:
        with pytest.raises(InvalidRequest):
            protocol.parse_producer(*partial)


def test_content_types_match_on_their_media_type() -> None:
    assert protocol.normalize_content_type(None) == "application/octet-stream"
    assert protocol.normalize_content_type("Application/JSON;Charset=UTF-8") == (
        "application/json; charset=utf-8"
    )
    assert protocol.is_json("application/json; charset=utf-8")
    assert protocol.is_text("text/markdown")
    assert protocol.is_text("application/json")
    assert not protocol.is_text("application/x-protobuf")


@pytest.mark.parametrize(
    ("body", "messages"),
    [
        (b'{"a": 1}', [b'{"a": 1}']),
        (b' [{"a":1}, {"b":2}] ', [b'{"a":1}', b'{"b":2}']),
        (b"[[1,2],[3,4]]", [b"[1,2]", b"[3,4]"]),
        (b"[[[1,2,3]]]", [b"[[1,2,3]]"]),
        (b'"text"', [b'"text"']),
        (b"[]", []),
    ],
    ids=["object", "array flattened", "arrays of arrays", "nested once", "string", "empty"],
)
def test_json_mode_flattens_one_level_and_keeps_bytes(body: bytes, messages: list[bytes]) -> None:
    assert protocol.json_messages(body, allow_empty=True) == messages


def test_json_mode_refuses_invalid_json_and_empty_appends() -> None:
    with pytest.raises(InvalidRequest) as invalid:
        protocol.json_messages(b"{ invalid json }", allow_empty=True)
    assert invalid.value.code == "invalid_json"
    with pytest.raises(InvalidRequest) as empty:
        protocol.json_messages(b"[]", allow_empty=False)
    assert empty.value.code == "empty_json_array"


def test_json_entries_read_as_one_array_and_split_back() -> None:
    entries = [b'{"a":1},{"b":2}', b"3"]
    assert protocol.json_body(entries) == b'[{"a":1},{"b":2},3]'
    assert protocol.json_body([]) == b"[]"
    assert protocol.split_json_entry(entries[0]) == [b'{"a":1}', b'{"b":2}']


def test_cursors_count_intervals_and_never_go_back() -> None:
    now = protocol.CURSOR_EPOCH_SECONDS + 20 * 1000 + 5
    assert protocol.next_cursor(None, now) == "1000"
    assert protocol.next_cursor("999", now) == "1000"
    for _ in range(50):
        assert int(protocol.next_cursor("1000", now)) > 1000
        assert int(protocol.next_cursor("5000", now)) > 5000
    assert protocol.next_cursor("junk", now) == "1000"


@pytest.mark.parametrize(
    ("payload", "encoded", "frame"),
    [
        (b"hello", False, b"event: data\ndata:hello\n\n"),
        (b"a\nb\r\nc\rd", False, b"event: data\ndata:a\ndata:b\ndata:c\ndata:d\n\n"),
        (
            b"x\r\n\r\nevent: control\r\ndata: {}",
            False,
            b"event: data\ndata:x\ndata:\ndata:event: control\ndata:data: {}\n\n",
        ),
        (b" leading space", False, b"event: data\ndata:  leading space\n\n"),
        (b"\x00\n\xff", True, b"event: data\ndata:AAr/\n\n"),
        (b"", True, b"event: data\ndata:\n\n"),
    ],
    ids=[
        "text",
        "every line break",
        "forged event stays data",
        "leading space kept",
        "base64",
        "empty base64",
    ],
)
def test_sse_data_events(payload: bytes, encoded: bool, frame: bytes) -> None:
    assert protocol.sse_data_event(payload, base64_encoded=encoded) == frame


@pytest.mark.parametrize(
    ("cursor", "up_to_date", "closed", "frame"),
    [
        (
            "7",
            True,
            False,
            b"id: 0000000000000002_0000000000000000\nevent: control\n"
            b'data:{"streamNextOffset":"0000000000000002_0000000000000000","streamCursor":"7","upToDate":true}\n\n',
        ),
        (
            "7",
            False,
            False,
            b"id: 0000000000000002_0000000000000000\nevent: control\n"
            b'data:{"streamNextOffset":"0000000000000002_0000000000000000","streamCursor":"7"}\n\n',
        ),
        (
            "7",
            True,
            True,
            b"id: 0000000000000002_0000000000000000\nevent: control\n"
            b'data:{"streamNextOffset":"0000000000000002_0000000000000000","upToDate":true,"streamClosed":true}\n\n',
        ),
    ],
    ids=["caught up", "behind", "closed: no cursor"],
)
def test_sse_control_events(cursor: str, up_to_date: bool, closed: bool, frame: bytes) -> None:
    offset = protocol.format_offset(2)
    assert (
        protocol.sse_control_event(offset, cursor=cursor, up_to_date=up_to_date, closed=closed)
        == frame
    )
