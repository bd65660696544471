"""The live message append.lua publishes (its header states the format), as entries.

The reader frames these messages straight from their bytes (`app.sse.live_frames`);
tests decode them here, independently of that, to check what was published.
"""

from __future__ import annotations

from app import sse
from app.events import TERMINAL_TYPES, LogEntry
from app.sse import Frame


def parse_live(payload: bytes) -> list[LogEntry]:
    """Decode a live message published by append.lua into entries."""
    parts = payload.split(b"\n")
    first, appended = int(parts[0]), int(parts[1])
    return [
        LogEntry(seq=first + i, type=kind.decode(), data=data, appended_ms=appended)
        for i, (kind, data) in enumerate(zip(parts[2::2], parts[3::2], strict=True))
    ]


def frame_of(entry: LogEntry) -> Frame:
    """The frame the hub would dispatch for `entry`, built with the general framer."""
    terminal = entry.type in TERMINAL_TYPES
    return Frame(
        entry.seq, terminal, entry.appended_ms, sse.event_frame(entry.seq, entry.type, entry.data)
    )
