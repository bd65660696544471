"""Fault drills: real Redis, reader and worker processes, a generation read throughout.

Each drill (`scenarios.DRILLS`) starts its own redis-server, two workers and a
reader, starts a generation, reads it with an EventSource-like client, injects one
Redis fault while it streams, and checks what the client ended with. `scripts/drill
NAME` prints each step and check; tests/drills runs the same drills under pytest.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

Say = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Check:
    what: str
    passed: bool
    detail: str


@dataclasses.dataclass
class Report:
    """What a drill did (steps, with the time since it began) and what it verified."""

    name: str
    say: Say
    steps: list[str] = dataclasses.field(default_factory=list)
    checks: list[Check] = dataclasses.field(default_factory=list)
    began: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def step(self, text: str) -> None:
        line = f"{time.monotonic() - self.began:6.2f} s  {text}"
        self.steps.append(line)
        self.say(line)

    def check(self, what: str, passed: bool, detail: str = "") -> None:
        self.checks.append(Check(what, passed, detail))
        self.say(f"{'PASS' if passed else 'FAIL'}  {what}" + (f": {detail}" if detail else ""))

    def failures(self) -> str:
        return "\n".join(f"{c.what}: {c.detail}" for c in self.checks if not c.passed)
