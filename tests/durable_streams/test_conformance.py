"""The public Durable Streams conformance suite, run by scripts/conformance: no regression
below the count recorded in scripts/conformance_suite/recorded.json."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL

REPO = Path(__file__).resolve().parents[2]
RECORDED = REPO / "scripts" / "conformance_suite" / "recorded.json"


@pytest.mark.timeout(600)
def test_the_conformance_suite_passes_at_least_the_recorded_count() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("the Durable Streams conformance suite runs on Node.js: node and npm not found")
    run = subprocess.run(
        [str(REPO / "scripts" / "conformance"), "--redis", REDIS_URL],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-8000:]
    counts = re.search(r"(\d+) passed, (\d+) failed, (\d+) skipped", run.stdout)
    assert counts is not None, output[-8000:]
    recorded = json.loads(RECORDED.read_text())
    assert int(counts[1]) >= recorded["passed"]
    assert int(counts[2]) <= recorded["failed"]
