from __future__ import annotations

import asyncio

import pytest

from app.hub.alarms import MAX_STEP, Alarms


class Sleeper:
    def __init__(self) -> None:
        self.rang: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def alarm_rang(self) -> None:
        self.rang.set_result(asyncio.get_running_loop().time())


@pytest.mark.parametrize(
    ("deadline", "wait", "expected"),
    [
        (100.2, 15.0, 101.0),  # long waits: whole seconds, shared by every sleeper
        (100.0, 15.0, 100.0),
        (100.01, 0.4, 100.1),  # short waits: a quarter of the wait
        (100.0, 0.0, 100.0),
    ],
)
def test_a_deadline_is_rounded_up_by_at_most_a_quarter_of_its_wait(
    deadline: float, wait: float, expected: float
) -> None:
    when = Alarms.rounded(deadline, wait)
    assert when == pytest.approx(expected)
    assert deadline <= when <= deadline + min(MAX_STEP, wait / 4) + 1e-9


async def test_alarms_ring_at_or_after_their_time_in_order() -> None:
    alarms = Alarms()
    loop = asyncio.get_running_loop()
    now = loop.time()
    sleepers = {offset: Sleeper() for offset in (0.15, 0.05, 0.1)}
    for offset, sleeper in sleepers.items():
        alarms.set(sleeper, Alarms.rounded(now + offset, offset))
    async with asyncio.timeout(5):
        rang = {offset: await sleeper.rang for offset, sleeper in sleepers.items()}
    for offset, at in rang.items():
        assert at >= now + offset - 0.001
    assert rang[0.05] <= rang[0.1] <= rang[0.15]
    assert len(alarms) == 0


async def test_a_cancelled_alarm_does_not_ring_and_the_others_do() -> None:
    alarms = Alarms()
    loop = asyncio.get_running_loop()
    when = Alarms.rounded(loop.time() + 0.05, 0.05)
    kept, cancelled = Sleeper(), Sleeper()
    alarms.set(kept, when)
    alarms.set(cancelled, when)
    assert len(alarms) == 2
    alarms.cancel(cancelled, when)
    async with asyncio.timeout(5):
        await kept.rang
    assert not cancelled.rang.done()


async def test_an_earlier_alarm_set_later_still_rings_first() -> None:
    alarms = Alarms()
    loop = asyncio.get_running_loop()
    late, early = Sleeper(), Sleeper()
    alarms.set(late, loop.time() + 30)
    alarms.set(early, loop.time() + 0.02)
    async with asyncio.timeout(5):
        await early.rang
    assert not late.rang.done()
    alarms.close()
    assert len(alarms) == 0
