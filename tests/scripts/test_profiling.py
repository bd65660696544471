"""The profiling helpers: py-spy's collapsed stacks summed, and a first token split in stages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from app import events
from app.store import GenerationLog
from scripts.bench_ttft import STAGES, Timing, drifts, stages
from scripts.pyspy_top import summarize
from tests.conftest import leased_generation

ROOT = Path(__file__).resolve().parents[2]


def test_samples_count_once_per_function_however_deep_it_recurses() -> None:
    lines = [
        "run (app/a.py:1);step (app/b.py:2);step (app/b.py:9) 3",
        "run (app/a.py:1);write (aiohttp/w.py:5) 1",
        "",
    ]
    total, own, anywhere = summarize(lines)
    assert total == 4
    assert own == {"step (app/b.py:9)": 3, "write (aiohttp/w.py:5)": 1}
    assert anywhere == {"run (a.py)": 4, "step (b.py)": 3, "write (w.py)": 1}


async def test_the_stages_of_a_first_token_add_up_to_its_time(log: GenerationLog) -> None:
    generation_id, lease = await leased_generation(log, "w")
    await log.append(lease, 1, [events.Started(model="sim"), events.Token(text="hi")])
    state = await log.state(generation_id)
    assert state is not None
    first_token = (await log.read(generation_id, 1, 1))[0]
    timing = Timing(generation_id, posted_ms=state.created_ms - 3.0)
    timing.first_token_ms = first_token.appended_ms + 2.0
    measured = dict(zip(STAGES, await stages(log, timing), strict=True))
    assert measured["created"] == 3.0
    assert measured["delivered"] == 2.0
    assert all(ms >= 0 for ms in measured.values())
    assert measured["total"] == sum(ms for stage, ms in measured.items() if stage != "total")


async def test_drift_is_split_between_the_log_and_the_client(log: GenerationLog) -> None:
    generation_id, lease = await leased_generation(log, "w")
    tokens = [events.Token(text=word) for word in ("a", "b", "c")]
    await log.append(lease, 1, [events.Started(model="sim"), *tokens])
    appended = (await log.read(generation_id, 1, 1))[0].appended_ms  # one batch, one time
    # At 10 tokens/s the log holds all three 200, 100 and 0 ms behind the pace; the
    # client gets them at the pace, the first before its headers (so not live).
    timing = Timing(generation_id, posted_ms=appended - 50.0, connected_ms=appended + 50.0)
    timing.tokens = [(seq, appended + 100.0 * k) for k, seq in enumerate((2, 3, 4))]
    in_log, at_client = await drifts(log, timing, rate=10.0)
    assert in_log == pytest.approx([200.0, 100.0, 0.0], abs=0.01)
    assert at_client == pytest.approx([0.0, 0.0], abs=0.01)


def test_first_tokens_are_split_for_both_readers_read_in_turn() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_ttft.py"), "--generations", "1",
         "--repeat", "2", "--tokens", "5", "--rate", "1000", "--beside-naive"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )  # fmt: skip
    tables = re.findall(r"^(tokentape|naive):\n((?:\|.*\n)+)", run.stdout, re.M)
    assert [name for name, _ in tables] == ["tokentape", "naive"], run.stdout + run.stderr
    for _, table in tables:
        stages_read = [row.split("|")[1].strip() for row in table.splitlines()[2:]]
        assert stages_read == list(STAGES)
    drift_rows = re.findall(r"^\| (in the log|at the client) \|", run.stdout, re.M)
    assert drift_rows == ["in the log", "at the client"] * 2, run.stdout
