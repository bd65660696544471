"""Monotonic time and waiting, injectable so tests of pacing and timing control time."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds (`now`) and a way to wait (`sleep`)."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """`time.monotonic`, the clock of asyncio's event loops, and `asyncio.sleep`."""

    # The builtin itself, not a method around it: `clock.now()` is called per event.
    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


MONOTONIC = MonotonicClock()
