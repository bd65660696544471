"""The system clock: monotonic seconds, and sleeps that last at least as asked."""

from __future__ import annotations

import time

from app.clock import MONOTONIC


def test_now_is_the_monotonic_clock_itself() -> None:
    # Called per event by the sim and the telemetry: no Python frame around the builtin.
    assert MONOTONIC.now is time.monotonic


async def test_sleep_lasts_at_least_as_asked() -> None:
    before = MONOTONIC.now()
    await MONOTONIC.sleep(0.002)
    assert MONOTONIC.now() - before >= 0.002
