"""The simulated model: deterministic text and tool calls, exact continuation, clock pacing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest
from msgspec import UNSET

from app.events import Done, Event, Started, Token, ToolCall, ToolCallDelta, Usage
from tests.conftest import FakeClock
from tests.workers.conftest import expected_events, sim_request
from workers.models.base import GenerationContext, ProviderError
from workers.models.sim import WAKE_GRID, GridClock, SimModel, grid_point, prompt_tokens


async def stream(model: SimModel, context: GenerationContext) -> list[Event]:
    return [event async for event in model.stream(context)]


def context(
    tokens: int, tool_calls: int = 0, prior: Sequence[Event] = (), **kw: float
) -> GenerationContext:
    request = sim_request(tokens=tokens, tool_calls=tool_calls, **kw)  # type: ignore[arg-type]
    return GenerationContext(generation_id="g" * 22, request=request, prior=prior)


def test_the_plan_is_deterministic_from_the_seed() -> None:
    a = expected_events(sim_request(tokens=300, seed=1, tool_calls=3))
    assert a == expected_events(sim_request(tokens=300, seed=1, tool_calls=3))
    assert a != expected_events(sim_request(tokens=300, seed=2, tool_calls=3))


def test_the_plan_has_n_tokens_then_k_tool_calls_then_done() -> None:
    request = sim_request(tokens=50, seed=3, tool_calls=2)
    events = expected_events(request)
    assert all(isinstance(e, Token) for e in events[:50])
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [c.index for c in calls] == [0, 1]
    for call in calls:
        deltas = [e for e in events if isinstance(e, ToolCallDelta) and e.index == call.index]
        # The id and name first, on their own, as the providers send them.
        assert deltas[0] == ToolCallDelta(index=call.index, id=call.id, name=call.name)
        assert all(d.id is UNSET and d.name is UNSET for d in deltas[1:])
        assert json.loads("".join(d.arguments_delta for d in deltas)) == call.arguments
    prompt = prompt_tokens(request)
    assert events[-1] == Done(
        reason="tool_calls",
        usage=Usage(prompt_tokens=prompt, completion_tokens=50, total_tokens=prompt + 50),
    )
    assert expected_events(sim_request(tokens=5))[-1].reason == "stop"  # type: ignore[union-attr]


def test_the_text_looks_like_a_model_answer() -> None:
    text = "".join(
        e.text for e in expected_events(sim_request(tokens=2000, seed=4)) if isinstance(e, Token)
    )
    assert " " in text
    assert "\n\n" in text
    assert "```python\n" in text
    assert "- " in text


async def test_continuation_from_every_split_point_repeats_nothing_and_misses_nothing() -> None:
    model = SimModel(FakeClock())
    full = await stream(model, context(tokens=30, tool_calls=2))
    assert full == expected_events(sim_request(tokens=30, tool_calls=2))
    for split in range(len(full)):
        # A log after two crashes: each attempt appended its own `started`.
        prior = [Started(attempt=1), *full[:split], Started(attempt=2)]
        assert await stream(model, context(tokens=30, tool_calls=2, prior=prior)) == full[split:]


async def test_a_log_the_seed_would_not_produce_cannot_be_continued() -> None:
    model = SimModel(FakeClock())
    prior = [Token(text="something else")]
    with pytest.raises(ProviderError) as caught:
        await stream(model, context(tokens=10, prior=prior))
    assert caught.value.code == "worker_lost"
    assert caught.value.retryable


async def test_tokens_are_due_on_the_generations_clock_not_after_fixed_sleeps() -> None:
    clock = FakeClock()
    model = SimModel(clock)
    t0 = clock.now()
    emitted: list[float] = []
    async for _ in model.stream(context(tokens=5, rate=10.0)):
        emitted.append(round(clock.now() - t0, 6))
        if len(emitted) == 2:
            clock.advance(0.25)  # the consumer stalled: the sim catches up instead of drifting
    # Token i is due at i/10 s; after the stall tokens 2 and 3 are already due.
    assert emitted == [0.0, 0.1, 0.35, 0.35, 0.4, 0.4]
    assert [round(s, 6) for s in clock.sleeps] == [0.1, 0.05]


async def test_a_continuation_resumes_the_pace_where_the_log_left_off() -> None:
    clock = FakeClock()
    full = await stream(SimModel(FakeClock()), context(tokens=6, rate=10.0))
    t0 = clock.now()
    emitted: list[float] = []
    async for _ in SimModel(clock).stream(context(tokens=6, rate=10.0, prior=full[:3])):
        emitted.append(round(clock.now() - t0, 6))
    assert emitted == [0.0, 0.1, 0.2, 0.2]  # tokens 3, 4, 5 and the done


async def test_a_rate_of_1e9_never_sleeps() -> None:
    clock = FakeClock()
    events = await stream(SimModel(clock), context(tokens=5000, tool_calls=1, rate=1e9))
    assert len(events) > 5000
    assert clock.sleeps == []


@pytest.mark.parametrize("now", [0.0, 12.3456789, 1162801.0011818])
@pytest.mark.parametrize("seconds", [0.0001, 0.0012, 0.0049, 0.005, 0.05, 0.0501])
def test_the_grid_clock_wakes_on_the_shared_grid_and_never_early(
    now: float, seconds: float
) -> None:
    """Generations due within one grid step wake in one loop iteration (one pipeline)."""
    wake = grid_point(now, seconds) * WAKE_GRID
    assert wake >= now + seconds - 1e-9
    assert wake - (now + seconds) < WAKE_GRID


async def test_the_grid_clock_sleeps_at_least_as_asked() -> None:
    clock = GridClock()
    before = clock.now()
    await clock.sleep(0.002)
    assert clock.now() - before >= 0.002


async def test_sleepers_due_at_one_grid_point_wake_together_and_a_cancelled_one_alone() -> None:
    clock = GridClock()
    woken = 0
    seen_by_the_first: list[int] = []

    async def sleeper(seconds: float) -> None:
        nonlocal woken
        await clock.sleep(seconds)
        woken += 1
        if woken == 1:
            await asyncio.sleep(0)  # one turn of the loop: the others woke with it
            seen_by_the_first.append(woken)

    await clock.sleep(0)  # on a grid point: the sleeps below all end at the next but one
    sleepers = [asyncio.create_task(sleeper(WAKE_GRID * 1.5 + i * 1e-4)) for i in range(5)]
    cancelled = asyncio.create_task(clock.sleep(WAKE_GRID * 1.5))
    await asyncio.sleep(0)
    cancelled.cancel()
    async with asyncio.timeout(5):
        await asyncio.gather(*sleepers)
    assert cancelled.cancelled()
    assert seen_by_the_first == [5]


def test_a_grid_clock_outlives_its_event_loop() -> None:
    clock = GridClock()
    for _ in range(2):
        # The first loop closes with a sleep pending; the second's sleep still ends.
        runner = asyncio.Runner()
        with runner:
            pending = runner.get_loop().create_task(clock.sleep(WAKE_GRID * 3))
            runner.run(asyncio.sleep(0))
            assert not pending.done()
            runner.run(asyncio.wait_for(clock.sleep(WAKE_GRID), 5))
        pending.cancel()
