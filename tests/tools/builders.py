"""Generations and recordings built by hand, with the timing a test needs."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from app import events
from app.events import Event
from app.generations import parse_request
from app.keys import new_generation_id
from app.store import GenerationLog
from app.tools.recording import (
    FORMAT,
    VERSION,
    GenerationInfo,
    RecordedEvent,
    Recording,
    RecordingHeader,
)

REQUEST = parse_request(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')
CREATED_MS = 1_700_000_000_000


async def write_generation(log: GenerationLog, batches: Sequence[Sequence[Event]]) -> str:
    """A generation whose worker appended `batches`, in order, one append each."""
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST)
    lease = await log.acquire(generation_id, "worker-test")
    assert lease is not None
    next_seq = 1
    for batch in batches:
        next_seq = await log.append(lease, next_seq, batch) + 1
    return generation_id


def recording_of(
    timed: Sequence[tuple[int, Event]],
    *,
    first_seq: int = 1,
    generation_id: str = "recorded-generation-0001",
) -> Recording:
    """A recording whose event i was appended `timed[i][0]` ms after creation."""
    recorded = [
        RecordedEvent(
            seq=first_seq + i,
            type=events.event_type(event),
            data=msgspec.Raw(events.encode(event)),
            appended_ms=CREATED_MS + at,
        )
        for i, (at, event) in enumerate(timed)
    ]
    last = recorded[-1] if recorded else None
    info = GenerationInfo(
        id=generation_id,
        model="sim",
        status="done" if last is not None and last.type in events.TERMINAL_TYPES else "running",
        created_ms=CREATED_MS,
        last_seq=last.seq if last is not None else 0,
    )
    return Recording(RecordingHeader(FORMAT, VERSION, info, CREATED_MS + 60_000), recorded)


def tokens(text: str, size: int = 3) -> list[events.Token]:
    return [events.Token(text=text[i : i + size]) for i in range(0, len(text), size)]
