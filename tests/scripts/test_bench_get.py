"""The per-request benchmark reads finished streams and says what each cost, for this
tree's reader alone or in turn with another checkout's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_get.py"
READER_LINE = re.compile(r"^(.+): reader CPU per GET: ([0-9]+) µs; one GET, median: ([0-9]+) µs$")


def bench_get(*args: str) -> tuple[dict[str, tuple[int, int]], int]:
    """Each reader's CPU and median µs per GET, and the wall µs per GET."""
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--requests", "20", "--events", "5", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    readers = {
        found[1]: (int(found[2]), int(found[3]))
        for line in run.stdout.splitlines()
        if (found := READER_LINE.match(line))
    }
    wall = re.search(r"^wall per GET: ([0-9]+) µs$", run.stdout, re.M)
    assert wall is not None, run.stdout + run.stderr
    return readers, int(wall[1])


def test_reads_are_measured_per_request() -> None:
    readers, wall = bench_get()
    assert list(readers) == ["this tree"]
    assert readers["this tree"][1] > 0  # a read takes time, and the script says how much
    assert wall > 0


def test_another_checkouts_reader_is_read_in_turn() -> None:
    readers, _ = bench_get("--generations", "30", "--against", str(ROOT))
    assert list(readers) == ["this tree", str(ROOT)]
    # Each reader's reads were timed (CPU is read in clock ticks: 20 reads may show none).
    assert all(median > 0 for _, median in readers.values())
