"""The per-request benchmark reads a finished stream again and again and says what each cost."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_get.py"


def test_reads_are_measured_per_request() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--requests", "20", "--events", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = re.search(
        r"^reader CPU per GET: ([0-9]+) µs; wall per GET: ([0-9]+) µs$", run.stdout, re.M
    )
    assert figures is not None, run.stdout + run.stderr
    assert int(figures[2]) > 0  # a read takes time, and the script says how much
