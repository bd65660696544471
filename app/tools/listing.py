"""`tokentape ls`: recent generations, newest first, from the `recent_generations` index."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from datetime import UTC, datetime

import msgspec
from rich.table import Table
from rich.text import Text

from app.errors import InvalidRequest
from app.events import LogEntry
from app.store import GenerationLog, GenerationState, now_ms
from app.tools.inspection import seconds

# Time to first token comes from this many leading events only: `ls` stays one
# cheap round trip per page, and a generation whose first token comes later
# (after a long tool-call preamble) shows "-".
FIRST_PAGE = 8
_INDEX_PAGE = 100

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


class GenerationSummary(msgspec.Struct, frozen=True):
    id: str
    status: str
    model: str
    events: int  # last seq
    created_ms: int
    duration_ms: int  # creation to the terminal event, or to now while open
    time_to_first_token_ms: int | None


def parse_since(text: str) -> int:
    """`90s`, `15m`, `1h`, `2d`, `1w` (a bare number is seconds) as milliseconds."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise InvalidRequest(
            "invalid_since", f"--since takes a duration like 30m, 1h or 2d, got {text!r}"
        )
    return int(float(match.group(1)) * _UNIT_MS[match.group(2) or "s"])


def summarize(
    state: GenerationState, first_page: Sequence[LogEntry], now: int
) -> GenerationSummary:
    ttft = None
    if first_page and first_page[0].seq == 1:
        first_token = next((e for e in first_page if e.type == "token"), None)
        if first_token is not None:
            ttft = first_token.appended_ms - state.created_ms
    end = state.finished_ms if state.finished_ms is not None else now
    return GenerationSummary(
        id=state.id,
        status=state.status,
        model=state.model,
        events=state.last_seq,
        created_ms=state.created_ms,
        duration_ms=max(end - state.created_ms, 0),
        time_to_first_token_ms=ttft,
    )


async def recent_generations(
    log: GenerationLog,
    *,
    status: str | None = None,
    since_ms: int | None = None,
    limit: int = 20,
) -> list[GenerationSummary]:
    """Newest first; generations whose metadata expired are skipped."""
    now = now_ms()
    low = None if since_ms is None else now - since_ms
    found: list[GenerationSummary] = []
    offset = 0
    while len(found) < limit:
        ids = await log.recent(since_ms=low, offset=offset, count=_INDEX_PAGE)
        if not ids:
            break
        offset += len(ids)
        states, first_pages = await asyncio.gather(
            asyncio.gather(*(log.state(generation_id) for generation_id in ids)),
            asyncio.gather(*(log.read(generation_id, 0, FIRST_PAGE) for generation_id in ids)),
        )
        for state, first_page in zip(states, first_pages, strict=True):
            if state is None or (status is not None and state.status != status):
                continue
            found.append(summarize(state, first_page, now))
            if len(found) == limit:
                break
    return found


# -- rendering ---------------------------------------------------------------

# Name, and whether the column is right-aligned (numbers).
_COLUMNS = (
    ("ID", False),
    ("STATUS", False),
    ("MODEL", False),
    ("EVENTS", True),
    ("CREATED (UTC)", False),
    ("DURATION", True),
    ("TTFT", True),
)
_STATUS_STYLES = {
    "queued": "dim",
    "running": "cyan",
    "done": "green",
    "error": "red",
    "cancelled": "yellow",
}


def render_table(summaries: Sequence[GenerationSummary]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, numeric in _COLUMNS:
        # A narrow terminal wraps cells rather than cutting them short, except the id, which
        # is copied from here: whole, on one line.
        table.add_column(
            name, justify="right" if numeric else "left", overflow="fold", no_wrap=name == "ID"
        )
    for s in summaries:
        created = datetime.fromtimestamp(s.created_ms / 1000, UTC)
        table.add_row(
            # Text, not str: rich would read brackets in a model name as markup.
            Text(s.id),
            Text(s.status, style=_STATUS_STYLES.get(s.status, "")),
            Text(s.model),
            Text(str(s.events)),
            Text(created.strftime("%Y-%m-%d %H:%M:%S")),
            Text(seconds(s.duration_ms)),
            Text(seconds(s.time_to_first_token_ms)),
        )
    return table


def render_json_lines(summaries: Sequence[GenerationSummary]) -> bytes:
    return b"".join(msgspec.json.encode(s) + b"\n" for s in summaries)
