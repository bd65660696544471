"""Supervised background loops: a failure is logged with its traceback and restarted, or
handed to `on_failure`; cancellation always ends them."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from app import loops

backoff = loops.backoff  # the real one: the fixture below replaces it for the other tests


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loops, "backoff", lambda failures: 0.0)


async def test_a_failing_loop_is_logged_with_its_traceback_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = 0

    async def body() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"broken run {runs}")

    with caplog.at_level(logging.ERROR, logger="tokentape.loops"):
        await asyncio.wait_for(loops.supervise("lease keeper", body), 5)
    assert runs == 3
    failures = [r for r in caplog.records if r.name == "tokentape.loops"]
    assert [r.getMessage() for r in failures] == [
        "lease keeper failed (1 in a row); restarting in 0.00 s",
        "lease keeper failed (2 in a row); restarting in 0.00 s",
    ]
    assert all(r.exc_info is not None for r in failures)


async def test_a_loop_that_must_not_restart_hands_its_failure_on() -> None:
    failed: list[BaseException] = []
    runs = 0

    async def body() -> None:
        nonlocal runs
        runs += 1
        raise ValueError("fatal")

    await asyncio.wait_for(loops.supervise("claimer", body, on_failure=failed.append), 5)
    assert runs == 1
    assert [str(e) for e in failed] == ["fatal"]


async def test_cancellation_ends_a_supervised_loop_at_once() -> None:
    started = asyncio.Event()

    async def body() -> None:
        started.set()
        await asyncio.Event().wait()

    task = loops.start("listen", body)
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.get_name() == "listen"


async def test_a_failed_periodic_step_is_logged_and_the_next_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    steps = 0
    third = asyncio.Event()

    async def step() -> None:
        nonlocal steps
        steps += 1
        if steps == 3:
            third.set()
        if steps == 1:
            raise ConnectionError("redis went away")

    with caplog.at_level(logging.ERROR, logger="tokentape.loops"):
        task = asyncio.create_task(loops.periodic("sweeper", 0.0, step))
        await asyncio.wait_for(third.wait(), 5)
        task.cancel()
    assert [r.getMessage() for r in caplog.records] == ["sweeper failed; trying again in 0 s"]
    assert caplog.records[0].exc_info is not None


def test_backoff_grows_then_caps() -> None:
    delays = [backoff(n) for n in range(1, 30)]
    assert loops.FIRST_DELAY_SECONDS / 2 <= delays[0] <= loops.FIRST_DELAY_SECONDS
    assert max(delays) <= loops.MAX_DELAY_SECONDS
    assert delays[-1] >= loops.MAX_DELAY_SECONDS / 2


async def test_loop_lag_is_busy_above_its_limit_and_calm_again_below() -> None:
    lag = loops.LoopLag(limit=0.1)
    lag.note(0.25)
    assert lag.busy
    calm = asyncio.create_task(lag.calm())
    await asyncio.sleep(0)
    assert not calm.done()
    lag.note(0.02)
    await asyncio.wait_for(calm, 1.0)
    assert not lag.busy


async def test_loop_lag_tells_each_time_it_turns_busy() -> None:
    turned: list[float] = []
    lag = loops.LoopLag(limit=0.1, on_busy=turned.append)
    for reading in (0.05, 0.2, 0.3, 0.01, 0.15):
        lag.note(reading)
    assert turned == [0.2, 0.15]


async def test_loop_lag_with_no_limit_is_never_busy() -> None:
    lag = loops.LoopLag(limit=0.0)
    lag.note(10.0)
    assert not lag.busy


class RecordedLag(loops.LoopLag):
    """Every reading the probe takes, in order."""

    def __init__(self, limit: float, interval: float) -> None:
        super().__init__(limit, interval)
        self.readings: asyncio.Queue[float] = asyncio.Queue()

    def note(self, seconds: float) -> None:
        super().note(seconds)
        self.readings.put_nowait(seconds)


async def test_the_loop_lag_probe_sees_a_blocked_loop() -> None:
    lag = RecordedLag(limit=0.05, interval=0.01)
    probe = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0)  # the probe's timer is set
        time.sleep(0.2)  # noqa: ASYNC251 -- the loop blocked, as by a saturated CPU
        assert await asyncio.wait_for(lag.readings.get(), 5.0) >= 0.15
        assert lag.busy
        assert await asyncio.wait_for(lag.readings.get(), 5.0) < 0.05
        assert not lag.busy
    finally:
        probe.cancel()
