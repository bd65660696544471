"""The Redis fault drills of scripts/drills, each a test: real redis-server, reader and
worker processes, a generation read throughout by an EventSource-like client.

`scripts/drill NAME` runs the same scenario and prints each step and check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.drills import scenarios


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(scenarios.DRILLS))
async def test_drill(name: str, tmp_path: Path) -> None:
    report = await scenarios.run(name, tmp_path, lambda line: None)
    assert report.passed, f"drill {name}:\n" + "\n".join(report.steps) + "\n" + report.failures()
