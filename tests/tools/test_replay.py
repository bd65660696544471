"""Replay pacing against an injected clock: deterministic, no wall-clock assertions."""

from __future__ import annotations

import pytest

from app import events
from app.errors import InvalidRequest
from app.settings import Settings
from app.store import GenerationLog
from app.tools.replay import Replayer, batches
from tests.conftest import FakeClock
from tests.tools.builders import recording_of

# ms after creation: two events in one ms, a 4 s stall, a burst, the end.
TIMED: list[tuple[int, events.Event]] = [
    (10, events.Started(model="sim")),
    (10, events.Token(text="Hel")),
    (120, events.Token(text="lo")),
    (300, events.Token(text=", wor")),
    (4300, events.Token(text="ld")),
    (4301, events.Token(text="!")),
    (4350, events.Done(reason="stop")),
]


@pytest.mark.parametrize("speed", [1.0, 2.5, 0.5], ids=["original", "faster", "slower"])
async def test_replay_follows_the_recorded_timing(log: GenerationLog, speed: float) -> None:
    recorded = recording_of(TIMED)
    clock = FakeClock(oversleep=0.004)
    replayer = Replayer(log, recorded, speed=speed, clock=clock)
    result = await replayer.run(await replayer.create())

    # One append per distinct recorded millisecond, each at its scaled offset; the
    # oversleep of each wait does not accumulate because pacing is against the start.
    distinct = sorted({at for at, _ in TIMED})
    assert [seq for seq, _ in result.schedule] == [1, 3, 4, 5, 6, 7]
    for (_, offset), at in zip(result.schedule, distinct, strict=True):
        expected = (at - distinct[0]) / 1000 / speed
        assert expected <= offset <= expected + 0.005
    appended = await log.read(result.generation_id, 0, 100)
    assert [e.event() for e in appended] == [event for _, event in TIMED]


async def test_a_long_stall_is_waited_in_slices_that_keep_the_lease(
    log: GenerationLog, settings: Settings
) -> None:
    recorded = recording_of([(0, events.Token(text="a")), (120_000, events.Done(reason="stop"))])
    clock = FakeClock()
    replayer = Replayer(log, recorded, speed=1.0, clock=clock)
    generation_id = await replayer.create()
    result = await replayer.run(generation_id)
    assert result.schedule[-1][1] == pytest.approx(120.0)
    assert max(clock.sleeps) <= settings.lease_seconds / 3
    state = await log.state(generation_id)
    assert state is not None
    assert state.status == "done"


async def test_as_fast_as_possible_never_sleeps(log: GenerationLog) -> None:
    clock = FakeClock()
    replayer = Replayer(log, recording_of(TIMED), speed=None, clock=clock)
    result = await replayer.run(await replayer.create())
    assert clock.sleeps == []
    assert result.events == len(TIMED)


async def test_a_cancel_of_the_replay_ends_it_cancelled(log: GenerationLog) -> None:
    recorded = recording_of([(0, events.Token(text="a")), (60_000, events.Done(reason="stop"))])

    class CancellingClock(FakeClock):
        async def sleep(self, seconds: float) -> None:
            if not self.sleeps:
                await log.request_cancel(generation_id)
            await super().sleep(seconds)

    replayer = Replayer(log, recorded, speed=1.0, clock=CancellingClock())
    generation_id = await replayer.create()
    result = await replayer.run(generation_id)
    assert result.cancelled
    appended = [e.event() for e in await log.read(generation_id, 0, 100)]
    assert appended == [events.Token(text="a"), events.Done(reason="cancelled")]


def test_batches_group_one_millisecond_and_cap_their_size() -> None:
    same_ms = recording_of([(5, events.Token(text=str(i))) for i in range(600)]).events
    assert [len(b) for b in batches(same_ms, paced=True)] == [256, 256, 88]
    spread = recording_of([(i, events.Token(text=str(i))) for i in range(10)]).events
    assert [len(b) for b in batches(spread, paced=True)] == [1] * 10
    assert [len(b) for b in batches(spread, paced=False)] == [10]


@pytest.mark.parametrize("speed", [0.0, -1.0, float("nan")], ids=["zero", "negative", "nan"])
def test_speed_must_be_positive(log: GenerationLog, speed: float) -> None:
    with pytest.raises(InvalidRequest, match="speed"):
        Replayer(log, recording_of(TIMED), speed=speed)
