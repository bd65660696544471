"""`tokentape inspect`: a recording read as a timeline a person can follow.

All times are the log's append times (Redis TIME at append), relative to the
generation's creation; they are what a reader saw, not what the model did.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime

import msgspec
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from app import events
from app.tools.recording import Recording

TOP_STALLS = 5
CONTEXT_CHARS = 40


class Stall(msgspec.Struct, frozen=True):
    """Silence between two consecutive events: `seq` is the event that ended it."""

    seq: int
    type: str
    ms: int
    at_ms: int  # when the silence began, relative to creation
    before: str  # the text just before the silence
    after: str  # the text that ended it


class ToolCallSeen(msgspec.Struct, frozen=True):
    seq: int
    at_ms: int
    index: int
    id: str
    name: str
    arguments: dict[str, object]


class Takeover(msgspec.Struct, frozen=True):
    """A `started` event with attempt > 1: another worker took the generation over."""

    seq: int
    at_ms: int
    attempt: int


class Terminal(msgspec.Struct, frozen=True):
    seq: int
    at_ms: int
    type: str
    event: msgspec.Raw


class Timeline(msgspec.Struct, frozen=True):
    generation_id: str
    model: str
    status: str
    created_ms: int
    events: int
    first_seq: int | None
    last_seq: int | None
    # Events 1..first_seq-1 were removed by retention before the export.
    removed_by_retention: int
    # Seqs missing inside the retained range (never expected: a corrupt recording).
    holes: list[tuple[int, int]]
    tokens: int
    time_to_first_token_ms: int | None
    tokens_per_second: float | None
    duration_ms: int | None
    stalls: list[Stall]
    tool_calls: list[ToolCallSeen]
    takeovers: list[Takeover]
    terminal: Terminal | None
    replay_of: str | None = None


def timeline(recording: Recording) -> Timeline:
    info = recording.generation
    created = info.created_ms
    recorded = recording.events
    first_seq = recording.first_seq

    # Token text and, per event, where it starts in that text: the context of a stall.
    text_parts: list[str] = []
    offsets: list[int] = []
    length = 0
    token_times: list[int] = []
    tool_calls: list[ToolCallSeen] = []
    takeovers: list[Takeover] = []
    for entry in recorded:
        offsets.append(length)
        event = entry.event()
        at = entry.appended_ms - created
        if isinstance(event, events.Token):
            text_parts.append(event.text)
            length += len(event.text)
            token_times.append(entry.appended_ms)
        elif isinstance(event, events.ToolCall):
            tool_calls.append(
                ToolCallSeen(entry.seq, at, event.index, event.id, event.name, event.arguments)
            )
        elif isinstance(event, events.Started) and (event.attempt or 1) > 1:
            takeovers.append(Takeover(entry.seq, at, event.attempt or 1))
    text = "".join(text_parts)

    stalls = [
        Stall(
            seq=entry.seq,
            type=entry.type,
            ms=entry.appended_ms - previous.appended_ms,
            at_ms=previous.appended_ms - created,
            before=text[max(0, offsets[i] - CONTEXT_CHARS) : offsets[i]],
            after=text[offsets[i] : offsets[i] + CONTEXT_CHARS],
        )
        for i, (previous, entry) in enumerate(itertools.pairwise(recorded), start=1)
        if entry.appended_ms > previous.appended_ms
    ]
    stalls.sort(key=lambda s: (-s.ms, s.seq))

    holes = [
        (previous.seq + 1, entry.seq - 1)
        for previous, entry in itertools.pairwise(recorded)
        if entry.seq != previous.seq + 1
    ]

    # Only a log that still starts at seq 1 can say when the first token came.
    ttft = token_times[0] - created if token_times and first_seq == 1 else None
    rate = None
    if len(token_times) >= 2 and token_times[-1] > token_times[0]:
        rate = (len(token_times) - 1) / ((token_times[-1] - token_times[0]) / 1000)

    end = recording.terminal
    terminal = (
        Terminal(end.seq, end.appended_ms - created, end.type, end.data)
        if end is not None
        else None
    )
    return Timeline(
        generation_id=info.id,
        model=info.model,
        status=info.status,
        created_ms=created,
        events=len(recorded),
        first_seq=first_seq,
        last_seq=recorded[-1].seq if recorded else None,
        removed_by_retention=(first_seq - 1) if first_seq is not None else info.last_seq,
        holes=holes,
        tokens=len(token_times),
        time_to_first_token_ms=ttft,
        tokens_per_second=rate,
        duration_ms=recorded[-1].appended_ms - created if recorded else None,
        stalls=stalls[:TOP_STALLS],
        tool_calls=tool_calls,
        takeovers=takeovers,
        terminal=terminal,
        replay_of=(info.metadata or {}).get("replay_of"),
    )


# -- rendering ---------------------------------------------------------------


def seconds(ms: int | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    minutes, rest = divmod(ms, 60_000)
    return f"{minutes}m{rest / 1000:04.1f}s"


def _at(ms: int) -> str:
    return f"+{ms / 1000:.3f}s"


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def render(t: Timeline) -> Group:
    """The timeline for a person: its facts, the longest stalls, the tool calls."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")  # wrapped, never cut short

    def fact(label: str, value: str, style: str = "") -> None:
        # Text, not str: rich would read brackets in generated text as markup.
        facts.add_row(label, Text(value, style=style))

    created = datetime.fromtimestamp(t.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    seqs = f"{t.first_seq}..{t.last_seq}" if t.first_seq is not None else "none"
    fact("generation", t.generation_id)
    fact("model", t.model)
    fact("status", t.status)
    fact("created", f"{created[:-3]} UTC")
    fact("events", f"{seqs} ({t.events})")
    if t.replay_of:
        fact("replay of", t.replay_of)
    fact(
        "first token",
        f"{seconds(t.time_to_first_token_ms)} after creation"
        if t.time_to_first_token_ms is not None
        else "unknown (no token, or the start was removed by retention)",
    )
    rate = f" at {t.tokens_per_second:.1f} tokens/s" if t.tokens_per_second is not None else ""
    fact("tokens", f"{t.tokens}{rate} over {seconds(t.duration_ms)}")
    if t.removed_by_retention:
        fact(
            "retention",
            f"gap: events 1..{t.removed_by_retention} were removed before export; "
            f"the timeline starts at seq {t.first_seq}",
            "yellow",
        )
    for start, end in t.holes:
        fact("hole", f"seqs {start}..{end} are missing from the recording", "red")
    for takeover in t.takeovers:
        fact(
            "takeover",
            f"seq {takeover.seq} {_at(takeover.at_ms)}: "
            f"another worker started attempt {takeover.attempt}",
            "yellow",
        )
    if t.terminal is not None:
        end_event = bytes(t.terminal.event).decode()
        fact("end", f"seq {t.terminal.seq} {_at(t.terminal.at_ms)}  {end_event}")
    else:
        fact("end", "none: recorded mid-flight, no terminal event", "yellow")
    parts: list[RenderableType] = [facts]

    if t.stalls:
        stalls = _section("longest stalls", ("silence", True), ("before", False), ("at", True))
        stalls.add_column("text before ⏸ after")
        for stall in t.stalls:
            stalls.add_row(
                Text(seconds(stall.ms)),
                Text(f"seq {stall.seq} ({stall.type})"),
                Text(_at(stall.at_ms)),
                Text(f"{_quote(stall.before)} ⏸ {_quote(stall.after)}"),
            )
        parts += [Text(), stalls]
    if t.tool_calls:
        calls = _section("tool calls", ("seq", True), ("at", True), ("call", False))
        for call in t.tool_calls:
            arguments = json.dumps(call.arguments, ensure_ascii=False)
            calls.add_row(
                Text(str(call.seq)), Text(_at(call.at_ms)), Text(f"⚙ {call.name}({arguments})")
            )
        parts += [Text(), calls]
    return Group(*parts)


def _section(title: str, *columns: tuple[str, bool]) -> Table:
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=None,
        pad_edge=False,
        header_style="dim",
    )
    for name, numeric in columns:
        table.add_column(name, justify="right" if numeric else "left")
    return table


def render_json(t: Timeline) -> bytes:
    return msgspec.json.encode(t) + b"\n"
