"""What the store hands out: a generation's state, a lease, and log entries as Redis holds them,
and the shapes of replies that differ between RESP2 and RESP3."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from app.events import LogEntry
from app.generations import TERMINAL_STATUSES

# One XRANGE/XREVRANGE row: `(b"<seq>-0", [b"type", type, b"data", data, b"t",
# appended_ms])` (append.lua writes the fields in that order).
RawEntry = tuple[bytes, list[bytes]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def map_reply(reply: Any) -> dict[bytes, Any]:
    """A map reply (HGETALL, XINFO) in either protocol's shape: RESP3 map, RESP2 flat list."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def scored_reply(reply: list[Any]) -> list[tuple[float, str]]:
    """(score, member) pairs of a WITHSCORES reply: RESP3 pairs or a RESP2 flat list."""
    if reply and isinstance(reply[0], list):
        return [(float(score), member.decode()) for member, score in reply]
    return [(float(reply[i + 1]), reply[i].decode()) for i in range(0, len(reply), 2)]


@dataclasses.dataclass(frozen=True)
class GenerationState:
    """A generation's metadata as the log's hash holds it."""

    id: str
    status: str
    model: str
    last_seq: int
    created_ms: int
    started_ms: int | None
    finished_ms: int | None
    last_append_ms: int | None
    finish_reason: str | None
    epoch: int
    attempts: int
    cancel_requested: bool
    # The generation span's W3C traceparent (reader spans link to it).
    traceparent: str | None = None
    # The owner hash of the API key that created it (app.access); None when created open.
    owner: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclasses.dataclass(frozen=True)
class Lease:
    """The right to append to one generation, fenced by `epoch`."""

    generation_id: str
    worker_id: str
    epoch: int
    last_seq: int  # what the log held when the lease was taken
    attempt: int
    cancel_requested: bool


# The metadata fields a GenerationState is read from, in the order HMGET asks for them.
STATE_FIELDS = (
    "status",
    "model",
    "last_seq",
    "created_ms",
    "started_ms",
    "finished_ms",
    "last_append_ms",
    "finish_reason",
    "epoch",
    "attempts",
    "cancel_requested",
    "traceparent",
    "owner",
)


def _int(raw: bytes | None) -> int | None:
    return None if raw is None else int(raw)


def parse_state(generation_id: str, values: Sequence[bytes | None]) -> GenerationState | None:
    """The state from HMGET of `STATE_FIELDS`; None when the generation is unknown."""
    m = dict(zip(STATE_FIELDS, values, strict=True))
    if m["status"] is None:
        return None

    def text(name: str) -> str | None:
        raw = m[name]
        return None if raw is None else raw.decode()

    return GenerationState(
        id=generation_id,
        status=text("status") or "queued",
        model=text("model") or "",
        last_seq=_int(m["last_seq"]) or 0,
        created_ms=_int(m["created_ms"]) or 0,
        started_ms=_int(m["started_ms"]),
        finished_ms=_int(m["finished_ms"]),
        last_append_ms=_int(m["last_append_ms"]),
        finish_reason=text("finish_reason") or None,
        epoch=_int(m["epoch"]) or 0,
        attempts=_int(m["attempts"]) or 0,
        cancel_requested=m["cancel_requested"] == b"1",
        traceparent=text("traceparent"),
        owner=text("owner"),
    )


def parse_entry(row: RawEntry) -> LogEntry:
    """One raw XRANGE/XREVRANGE row as an entry."""
    entry_id, fields = row
    return LogEntry(
        seq=int(entry_id[:-2]),  # "<seq>-0"
        type=fields[1].decode(),
        data=fields[3],
        appended_ms=int(fields[5]),
    )
