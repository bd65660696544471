"""What the Durable Streams protocol puts on the wire: offsets, headers, JSON mode, SSE events.

Offsets are `<seq>_<sub>`, both 16 zero-padded digits, so they sort as strings in
stream order. `seq` is the number of entries (appends) up to the position; `sub` is
always 0 (a position inside an entry exists only as a fork's sub-offset, which is
never an offset). `0000000000000000_0000000000000000` is the start of every stream:
the conformance suite forks at it by that literal.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import random
import re
import time

import msgspec

from app.errors import InvalidRequest

# Request and response headers.
NEXT_OFFSET = "Stream-Next-Offset"
UP_TO_DATE = "Stream-Up-To-Date"
CLOSED = "Stream-Closed"
CURSOR = "Stream-Cursor"
TTL = "Stream-TTL"
EXPIRES_AT = "Stream-Expires-At"
SEQ = "Stream-Seq"
FORKED_FROM = "Stream-Forked-From"
FORK_OFFSET = "Stream-Fork-Offset"
FORK_SUB_OFFSET = "Stream-Fork-Sub-Offset"
SSE_DATA_ENCODING = "Stream-SSE-Data-Encoding"
PRODUCER_ID = "Producer-Id"
PRODUCER_EPOCH = "Producer-Epoch"
PRODUCER_SEQ = "Producer-Seq"
PRODUCER_EXPECTED_SEQ = "Producer-Expected-Seq"
PRODUCER_RECEIVED_SEQ = "Producer-Received-Seq"

DEFAULT_CONTENT_TYPE = "application/octet-stream"
JSON = "application/json"

# -- stream names --------------------------------------------------------------

# Path segments of URL-safe characters; no empty, `.` or `..` segment. Never a brace:
# a name is part of its keys' hash tag.
SEGMENT = r"(?!\.\.?(/|$))[A-Za-z0-9._~!$'()*+,;=:@-]+"
_NAME_RE = re.compile(rf"{SEGMENT}(/{SEGMENT})*")
MAX_NAME_LENGTH = 512
# The first segment of the protocol's control paths (subscriptions, the JWKS): no
# stream has it.
RESERVED = "__ds"


def is_stream_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _NAME_RE.fullmatch(name) is not None


def is_reserved(name: str) -> bool:
    return name == RESERVED or name.startswith(RESERVED + "/")


# -- offsets -------------------------------------------------------------------

_OFFSET_RE = re.compile(r"([0-9]{16})_0{16}")
START = "-1"
NOW = "now"


def format_offset(seq: int) -> str:
    return f"{seq:016d}_{0:016d}"


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a read starts: after entry `seq`, at the start (`-1`), or at the tail (`now`)."""

    seq: int = 0
    start: bool = False
    now: bool = False


def parse_offset(raw: str, source: str = "offset") -> Position:
    if raw == START:
        return Position(start=True)
    if raw == NOW:
        return Position(now=True)
    match = _OFFSET_RE.fullmatch(raw)
    if match is None:
        raise InvalidRequest(
            "invalid_offset",
            f"{source} must be -1, now, or a Stream-Next-Offset this server returned",
            field=source,
        )
    return Position(seq=int(match.group(1)))


# -- header values -------------------------------------------------------------

_DECIMAL_RE = re.compile(r"0|[1-9][0-9]*")
# RFC 3339: date, `T`, time with optional fraction, `Z` or an offset.
_RFC3339_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
MAX_SAFE_INTEGER = 2**53 - 1  # producer epochs and seqs stay exact in JavaScript


def parse_decimal(raw: str, header: str, maximum: int = MAX_SAFE_INTEGER) -> int:
    """A non-negative integer without sign, leading zeros, fraction or exponent."""
    if _DECIMAL_RE.fullmatch(raw) is None or int(raw) > maximum:
        raise InvalidRequest(
            "invalid_header", f"{header} must be a non-negative integer like 3600", field=header
        )
    return int(raw)


def parse_expires_at(raw: str) -> int:
    """An RFC 3339 timestamp in the future, as epoch milliseconds."""
    if _RFC3339_RE.fullmatch(raw) is None:
        raise InvalidRequest(
            "invalid_header",
            f"{EXPIRES_AT} must be an RFC 3339 timestamp like 2030-01-01T00:00:00Z",
            field=EXPIRES_AT,
        )
    moment = datetime.datetime.fromisoformat(raw.upper().replace("Z", "+00:00"))
    expires_ms = int(moment.timestamp() * 1000)
    if expires_ms <= time.time() * 1000:
        raise InvalidRequest("invalid_header", f"{EXPIRES_AT} is in the past", field=EXPIRES_AT)
    return expires_ms


def format_expires_at(expires_ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(expires_ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_true(raw: str | None) -> bool:
    """`Stream-Closed`: present only when exactly `true`, any case; other values are absent."""
    return raw is not None and raw.lower() == "true"


@dataclasses.dataclass(frozen=True)
class Producer:
    id: str
    epoch: int
    seq: int


def parse_producer(producer_id: str | None, epoch: str | None, seq: str | None) -> Producer | None:
    """The idempotent producer headers: all three or none."""
    if producer_id is None and epoch is None and seq is None:
        return None
    if producer_id is None or epoch is None or seq is None:
        raise InvalidRequest(
            "invalid_producer",
            f"{PRODUCER_ID}, {PRODUCER_EPOCH} and {PRODUCER_SEQ} go together: send all or none",
        )
    if producer_id == "":
        raise InvalidRequest("invalid_producer", f"{PRODUCER_ID} must not be empty")
    return Producer(
        producer_id, parse_decimal(epoch, PRODUCER_EPOCH), parse_decimal(seq, PRODUCER_SEQ)
    )


# -- content types -------------------------------------------------------------


def normalize_content_type(raw: str | None) -> str:
    """Lower case, parameters kept, spacing canonical: `application/json; charset=utf-8`."""
    if raw is None or not raw.strip():
        return DEFAULT_CONTENT_TYPE
    parts = [part.strip() for part in raw.lower().split(";") if part.strip()]
    return "; ".join(parts)


def media_type(content_type: str) -> str:
    """The type without parameters: a stream's appends match on it."""
    return content_type.split(";", 1)[0].strip()


def is_json(content_type: str) -> bool:
    return media_type(content_type) == JSON


def is_text(content_type: str) -> bool:
    """SSE carries text and JSON as they are; every other type as base64."""
    kind = media_type(content_type)
    return kind.startswith("text/") or kind == JSON


# -- JSON mode -----------------------------------------------------------------


def json_messages(body: bytes, *, allow_empty: bool) -> list[bytes]:
    """The messages of a JSON-mode body: an array is flattened one level, any other
    value is one message. Each message keeps its bytes as sent."""
    try:
        value = msgspec.json.decode(body, type=msgspec.Raw)
        if body.lstrip()[:1] == b"[":
            messages = [bytes(item) for item in msgspec.json.decode(value, type=list[msgspec.Raw])]
        else:
            messages = [bytes(value)]
    except msgspec.DecodeError as exc:
        raise InvalidRequest("invalid_json", f"the body is not valid JSON: {exc}") from None
    if not messages and not allow_empty:
        raise InvalidRequest(
            "empty_json_array", "an empty JSON array appends nothing: send at least one value"
        )
    return messages


def json_body(entries: list[bytes]) -> bytes:
    """A JSON-mode read: every message of the entries in one array. An entry holds
    the messages of one append, comma-separated."""
    return b"[" + b",".join(entries) + b"]"


def split_json_entry(entry: bytes) -> list[bytes]:
    """The messages of one stored JSON-mode entry."""
    return [
        bytes(item) for item in msgspec.json.decode(b"[" + entry + b"]", type=list[msgspec.Raw])
    ]


# -- cursors -------------------------------------------------------------------

CURSOR_EPOCH_SECONDS = datetime.datetime(2024, 10, 9, tzinfo=datetime.UTC).timestamp()
CURSOR_INTERVAL_SECONDS = 20


def next_cursor(client_cursor: str | None, now: float | None = None) -> str:
    """The interval number since the protocol's epoch; strictly past the client's own
    cursor when that is not behind (random jitter of up to an hour), so a CDN that
    keys on the cursor never serves the same cached response in a loop."""
    interval = int(((now or time.time()) - CURSOR_EPOCH_SECONDS) // CURSOR_INTERVAL_SECONDS)
    if client_cursor is not None and client_cursor.isdigit():
        echoed = int(client_cursor)
        if echoed >= interval:
            jitter_seconds = random.randint(1, 3600)
            interval = echoed + max(1, jitter_seconds // CURSOR_INTERVAL_SECONDS)
    return str(interval)


# -- SSE -----------------------------------------------------------------------

_LINE_BREAK_RE = re.compile(rb"\r\n|\r|\n")


def sse_data_event(payload: bytes, *, base64_encoded: bool) -> bytes:
    """`event: data` with the payload's lines, each its own `data:` line.

    A line break in the payload can never end the event or start a forged one: every
    line gets its own `data:` prefix. No space follows `data:` (clients strip one),
    except before a line that starts with a space, which would lose it.
    """
    lines = [base64.b64encode(payload)] if base64_encoded else _LINE_BREAK_RE.split(payload)
    framed = b"".join(
        (b"data: " if line[:1] == b" " else b"data:") + line + b"\n" for line in lines
    )
    return b"event: data\n" + framed + b"\n"


def sse_control_event(
    next_offset: str, *, cursor: str | None, up_to_date: bool, closed: bool
) -> bytes:
    """`event: control` after every data event. Its `id:` is the offset, so a browser
    EventSource that reconnects sends it back as `Last-Event-ID`."""
    control: dict[str, object] = {"streamNextOffset": next_offset}
    if cursor is not None and not closed:
        control["streamCursor"] = cursor
    if up_to_date:
        control["upToDate"] = True
    if closed:
        control["streamClosed"] = True
    return b"id: %s\nevent: control\ndata:%s\n\n" % (
        next_offset.encode(),
        msgspec.json.encode(control),
    )
