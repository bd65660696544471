"""inspect: a planted stall, tool calls, takeovers and retention gaps found in a recording file."""

from __future__ import annotations

from pathlib import Path

import msgspec

from app import events
from app.tools import inspection, recording
from tests.tools.builders import recording_of
from tests.tools.screen import as_text

ANSWER = "The capital of France is Paris. It lies on the Seine."


def planted() -> list[tuple[int, events.Event]]:
    """Tokens every 20 ms, a 7 s stall before "Paris", a 1.5 s one, a tool call, a takeover."""
    timed: list[tuple[int, events.Event]] = [(5, events.Started(model="sim", attempt=1))]
    at = 400  # first token 400 ms after creation
    for word in ANSWER.split(" "):
        if word == "Paris.":
            at += 7000
        if word == "Seine.":
            at += 1500
        timed.append((at, events.Token(text=word + " ")))
        at += 20
    timed += [
        (at, events.ToolCallDelta(index=0, id="c1", name="weather", arguments_delta='{"city"')),
        (at + 5, events.ToolCallDelta(index=0, arguments_delta=': "Paris"}')),
        (at + 6, events.ToolCall(index=0, id="c1", name="weather", arguments={"city": "Paris"})),
        (at + 3000, events.Started(model="sim", attempt=2)),
        (at + 3100, events.Done(reason="tool_calls")),
    ]
    return timed


def write_file(path: Path, timed: list[tuple[int, events.Event]], first_seq: int = 1) -> Path:
    path.write_bytes(b"".join(recording.recording_lines(recording_of(timed, first_seq=first_seq))))
    return path


def test_inspect_finds_the_planted_stall(tmp_path: Path) -> None:
    loaded = recording.read_file(write_file(tmp_path / "froze.jsonl", planted()))
    timeline = inspection.timeline(loaded)

    worst = timeline.stalls[0]
    paris_seq = next(e.seq for e in loaded.events if bytes(e.data).find(b"Paris.") != -1)
    assert (worst.seq, worst.type, worst.ms) == (paris_seq, "token", 7020)
    assert worst.before.endswith("France is ")
    assert worst.after.startswith("Paris. It lies")
    assert [s.ms for s in timeline.stalls][:3] == [7020, 2994, 1520]
    assert len(timeline.stalls) == inspection.TOP_STALLS


def test_inspect_reports_ttft_rate_tools_takeovers_and_the_end(tmp_path: Path) -> None:
    timed = planted()
    timeline = inspection.timeline(recording.read_file(write_file(tmp_path / "r.jsonl", timed)))

    assert timeline.time_to_first_token_ms == 400
    words = len(ANSWER.split(" "))
    assert timeline.tokens == words
    token_times = [at for at, e in timed if isinstance(e, events.Token)]
    span_s = (token_times[-1] - token_times[0]) / 1000
    assert timeline.tokens_per_second == (words - 1) / span_s
    assert [(c.name, c.arguments) for c in timeline.tool_calls] == [("weather", {"city": "Paris"})]
    assert [t.attempt for t in timeline.takeovers] == [2]
    assert timeline.terminal is not None
    assert timeline.terminal.type == "done"
    assert timeline.removed_by_retention == 0

    text = as_text(inspection.render(timeline))
    assert "first token  400 ms after creation" in text
    assert "takeover     seq 16 +12.120s: another worker started attempt 2" in text
    assert 'end          seq 17 +12.220s  {"type":"done","reason":"tool_calls","usage":{}}' in text
    stalls = text[text.index("longest stalls") :].splitlines()
    assert stalls[2] == (
        ' 7.02 s  seq 7 (token)      +0.480s  "The capital of France is " ⏸ "Paris. It lies on the Seine. "'
    )
    calls = text[text.index("tool calls") :].splitlines()
    assert calls[2] == ' 15  +9.126s  ⚙ weather({"city": "Paris"})'

    as_json = msgspec.json.decode(inspection.render_json(timeline))
    assert as_json["stalls"][0]["ms"] == 7020
    assert as_json["terminal"]["event"] == {"type": "done", "reason": "tool_calls", "usage": {}}


def test_inspect_reports_a_retention_gap_and_a_missing_end(tmp_path: Path) -> None:
    trimmed = planted()[10:-1]  # the start removed by retention, exported mid-flight
    path = write_file(tmp_path / "trimmed.jsonl", trimmed, first_seq=11)
    timeline = inspection.timeline(recording.read_file(path))

    assert timeline.removed_by_retention == 10
    assert timeline.time_to_first_token_ms is None  # unknowable without seq 1
    assert timeline.terminal is None
    text = as_text(inspection.render(timeline))
    assert "events 1..10 were removed" in text
    assert "no terminal event" in text


def test_a_narrow_terminal_wraps_the_facts_but_cuts_nothing(tmp_path: Path) -> None:
    timeline = inspection.timeline(recording.read_file(write_file(tmp_path / "r.jsonl", planted())))
    text = as_text(inspection.render(timeline), width=40)
    assert "…" not in text
    end = text[text.index("end ") : text.index("longest stalls")]
    assert (
        "".join(end.split()) == 'endseq17+12.220s{"type":"done","reason":"tool_calls","usage":{}}'
    )


def test_generated_text_is_shown_as_is_not_read_as_markup(tmp_path: Path) -> None:
    timed: list[tuple[int, events.Event]] = [
        (0, events.Token(text="[bold]not markup[/bold] ")),
        (900, events.Done(reason="stop")),
    ]
    loaded = recording.read_file(write_file(tmp_path / "r.jsonl", timed))
    text = as_text(inspection.render(inspection.timeline(loaded)))
    assert '"[bold]not markup[/bold] " ⏸ ""' in text
