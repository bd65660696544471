"""When each waiting subscription's wait runs out: one loop timer for all of them.

A loop timer per subscription costs an idle connection about 0.55 KiB (the handle, its
libuv timer, the bound callback); a place in a set costs tens of bytes. Deadlines are
rounded up to a step of a quarter of the wait, at most `MAX_STEP`: a heartbeat due
every 15 s comes up to a second late, and thousands of them share one set per second.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import Protocol

MAX_STEP = 1.0
# A loop may run a timer this early (libuv counts in milliseconds).
_EARLY = 0.001


class Sleeper(Protocol):
    def alarm_rang(self) -> None: ...


class Alarms:
    __slots__ = ("_order", "_rings", "_timer")

    def __init__(self) -> None:
        self._rings: dict[float, set[Sleeper]] = {}
        self._order: list[float] = []  # a heap of `_rings`' keys
        self._timer: asyncio.TimerHandle | None = None

    @staticmethod
    def lateness(wait_seconds: float) -> float:
        """How long after its deadline the alarm of a wait may ring."""
        return min(MAX_STEP, wait_seconds / 4)

    @staticmethod
    def rounded(deadline: float, wait_seconds: float) -> float:
        """When an alarm for `deadline` rings: at it, or up to `lateness` after."""
        step = Alarms.lateness(wait_seconds)
        return math.ceil(deadline / step) * step if step > 0 else deadline

    def set(self, sleeper: Sleeper, when: float) -> None:
        """Call `sleeper.alarm_rang()` at `when` (a value of `rounded`), or just after."""
        ring = self._rings.get(when)
        if ring is None:
            ring = self._rings[when] = set()
            heapq.heappush(self._order, when)
            if self._timer is None or when < self._timer.when():
                self._arm(when)
        ring.add(sleeper)

    def __len__(self) -> int:
        """Alarms set and not rung or cancelled."""
        return sum(len(ring) for ring in self._rings.values())

    def cancel(self, sleeper: Sleeper, when: float) -> None:
        ring = self._rings.get(when)
        if ring is not None:
            ring.discard(sleeper)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._rings.clear()
        self._order.clear()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time() + _EARLY
        due: list[Callable[[], None]] = []
        while self._order and self._order[0] <= now:
            when = heapq.heappop(self._order)
            due.extend(sleeper.alarm_rang for sleeper in self._rings.pop(when, ()))
        if self._order:
            self._arm(self._order[0])
        for ring in due:
            ring()
