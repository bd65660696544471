"""The memory benchmark splits what idle event streams, or Durable Streams SSE reads,
hold by who allocated it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_memory.py"


@pytest.mark.parametrize(
    ("flags", "kind"),
    [([], "event streams"), (["--durable-streams"], "Durable Streams SSE reads")],
    ids=["events", "durable-streams"],
)
def test_idle_streams_are_measured_and_split_by_owner(flags: list[str], kind: str) -> None:
    command = [sys.executable, str(SCRIPT), "--connections", "100", "--top", "3", "--frames", "6"]
    run = subprocess.run(
        [*command, *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    total = re.search(rf"^100 idle {kind}: ([0-9.]+) KiB each", run.stdout, re.M)
    assert total is not None, run.stdout + run.stderr
    owners = dict(
        re.findall(
            r"^\| (aiohttp|tokentape|telemetry|event loop \(C\)) \| ([-0-9.]+) \|$",
            run.stdout,
            re.M,
        )
    )
    assert {"aiohttp", "tokentape"} <= owners.keys()
    # Every byte counted goes to one owner: the split adds up to the total.
    assert abs(sum(float(kib) for kib in owners.values()) - float(total[1])) < 0.05
    assert 2 < float(total[1]) < 100  # a stream holds something, and not a leak's worth
    sites = re.findall(r"^\| [^|]+ \| `[^`]+` \| [0-9]+ \|$", run.stdout, re.M)
    assert len(sites) == 3
