"""The drills: one Redis fault each, while a generation streams to a client.

Every drill ends with the same checks (`verify`): the events endpoint answered
200 (or 204) only, no open connection went silent, the server sent each event
once, the client holds ids 1..n with the terminal event last (apart from ranges a
`reset` declared void), exactly what one uninterrupted replay of the log gives,
and every event the model produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from app import events
from app.client import Generation
from app.generations import GenerationRequest, Message, SimParams
from scripts.drills import Report, Say
from scripts.drills.stage import DURABLE, SETTINGS, EventSource, Received, Stage, staged
from workers.models.sim import plan, prompt_tokens

SIM = SimParams(tokens=240, tokens_per_second=60, seed=3, tool_calls=1)
# The fault comes once the client holds this many events: mid-generation.
FAULT_AFTER = 40
# A client that has not finished this long after the fault ended is stuck.
FINISH_SECONDS = 60.0

Drill = Callable[[Stage, Report], Awaitable[None]]


async def run(name: str, directory: Path, say: Say) -> Report:
    """Run drill `name` with its files under `directory`; the report says what passed."""
    report = Report(name, say)
    drill, redis_config = DRILLS[name]
    async with staged(directory, report.step, redis_config) as stage:
        try:
            await drill(stage, report)
        except Exception as exc:
            report.check("the drill ran to its end", False, f"{type(exc).__name__}: {exc}")
        if not report.passed:
            report.step(f"logs: {stage.logs()}, {stage.redis.log_file}")
    return report


# -- the drills ---------------------------------------------------------------


async def redis_killed(stage: Stage, report: Report) -> None:
    """Redis SIGKILLed mid-generation and restarted 2 s later on the same port and data."""
    generation = await stage.create(SIM)
    async with reading(stage, generation, report) as source:
        await source.until_received(FAULT_AFTER)
        report.step(f"the client holds {len(source.received)} events: SIGKILL redis-server")
        stage.redis.kill()
        await probe(stage, report, generation, source)
        await asyncio.sleep(2.0)  # the fault
        stage.redis.start()
        report.step("redis-server restarted on the same port and files")
    await verify(stage, report, generation, source)


async def redis_down(stage: Stage, report: Report) -> None:
    """Redis down for 10 s (longer than a lease), then back."""
    generation = await stage.create(SIM)
    async with reading(stage, generation, report) as source:
        await source.until_received(FAULT_AFTER)
        report.step(f"the client holds {len(source.received)} events: redis-server stopped")
        stage.redis.stop()
        await probe(stage, report, generation, source)
        await asyncio.sleep(10.0)  # the fault
        stage.redis.start()
        report.step("redis-server started again on the same port and files")
    replay = await verify(stage, report, generation, source)
    takeover(report, replay)


async def redis_frozen(stage: Stage, report: Report) -> None:
    """Redis frozen (SIGSTOP) for 8 s, then SIGCONT: its connections stay open and
    nothing answers, so timeouts decide."""
    generation = await stage.create(SIM)
    async with reading(stage, generation, report) as source:
        await source.until_received(FAULT_AFTER)
        report.step(f"the client holds {len(source.received)} events: SIGSTOP redis-server")
        stage.redis.freeze()
        await probe(stage, report, generation, source)
        await asyncio.sleep(8.0)  # the fault
        stage.redis.thaw()
        report.step("SIGCONT redis-server")
    replay = await verify(stage, report, generation, source)
    takeover(report, replay)


async def redis_restored_from_snapshot(stage: Stage, report: Report) -> None:
    """Redis comes back with an older copy of the data: `SAVE`, SIGKILL 2 s later, and a
    restart from that snapshot with no AOF. The client already holds events the log lost."""
    generation = await stage.create(SIM)
    async with reading(stage, generation, report) as source:
        await source.until_received(FAULT_AFTER)
        async with Redis.from_url(stage.redis.url) as redis:
            await redis.save()
        report.step(f"SAVE while the client holds {len(source.received)} events")
        await asyncio.sleep(2.0)  # the writes the snapshot will not have
        held = len(source.received)
        stage.redis.kill()
        stage.redis.config = ("--appendonly", "no")
        stage.redis.start()
        report.step(
            f"SIGKILL with the client holding {held} events; "
            "redis-server restarted from the snapshot, no AOF"
        )
    await verify(stage, report, generation, source)
    resets = [event for event in source.received if event.type == "reset"]
    report.check(
        "the client was told, in-band, that its history went back",
        any(json.loads(reset.data)["from_seq"] <= held for reset in resets),
        f"resets {[(r.id, json.loads(r.data)) for r in resets]} with {held} events held",
    )


DRILLS: dict[str, tuple[Drill, tuple[str, ...]]] = {
    "kill": (redis_killed, DURABLE),
    "down": (redis_down, DURABLE),
    "freeze": (redis_frozen, DURABLE),
    "snapshot": (redis_restored_from_snapshot, DURABLE),
}


# -- reading and checking -----------------------------------------------------


@contextlib.asynccontextmanager
async def reading(
    stage: Stage, generation: Generation, report: Report
) -> AsyncIterator[EventSource]:
    """An EventSource reading `generation` throughout the block and until it ends."""
    async with aiohttp.ClientSession() as session:
        source = EventSource(session, stage.url + generation.events_url)
        task = asyncio.create_task(source.run())
        try:
            yield source
            async with asyncio.timeout(FINISH_SECONDS):
                await task
        finally:
            task.cancel()
        report.step(
            f"the client stopped after {len(source.received)} events, "
            f"{len(source.statuses)} connections"
        )


async def probe(stage: Stage, report: Report, generation: Generation, source: EventSource) -> None:
    """A client that connects while Redis is out (a reloaded page) must get its answer at
    once: a 200 that tells it when to come back, not a hang."""
    bound = float(SETTINGS["TOKENTAPE_REDIS_TIMEOUT_SECONDS"]) + 1.5
    headers = {"Accept": "text/event-stream", "Last-Event-ID": source.last_event_id}
    loop = asyncio.get_running_loop()
    began = loop.time()
    answer = "no answer"
    try:
        async with (
            aiohttp.ClientSession() as session,
            asyncio.timeout(bound),
            session.get(stage.url + generation.events_url, headers=headers) as response,
        ):
            answer = f"HTTP {response.status} {response.headers.get('Content-Type', '')}"
            body = await response.read()
            answer += f" {body!r}"
            ok = response.status == 200 and b"retry:" in body
    except (TimeoutError, aiohttp.ClientError) as exc:
        ok = False
        answer += f" ({type(exc).__name__})"
    report.check(
        f"a client connecting during the fault was answered within {bound:g} s",
        ok,
        f"{answer} after {loop.time() - began:.2f} s",
    )


async def replay_of(stage: Stage, generation: Generation) -> list[Received]:
    """What a client reading the finished generation from the start receives."""
    async with aiohttp.ClientSession() as session:
        source = EventSource(session, stage.url + generation.events_url)
        async with asyncio.timeout(30):
            await source.run()
    return source.received


def held(received: list[Received]) -> list[Received]:
    """What a client holds after acting on every `reset` as the contract says: drop what
    it holds from `from_seq` on. Resets and gaps are notices, not events it holds."""
    holding: list[Received] = []
    for event in received:
        if event.type == "reset":
            from_seq = json.loads(event.data)["from_seq"]
            holding = [e for e in holding if e.id < from_seq]
        elif event.type != "gap":
            holding.append(event)
    return holding


def void_ranges(received: list[Received]) -> list[range]:
    """The seqs each reset declared void: from its `from_seq` up to its own id."""
    voids = []
    for event in received:
        if event.type == "reset":
            voids.append(range(json.loads(event.data)["from_seq"], event.id + 1))
    return voids


async def verify(
    stage: Stage, report: Report, generation: Generation, source: EventSource
) -> list[Received]:
    """The checks every drill ends with; returns the replay."""
    statuses = sorted(set(source.statuses))
    report.check(
        "the events endpoint answered 200 or 204, never an error a browser gives up on",
        set(statuses) <= {200, 204} and source.gave_up is None,
        f"statuses {statuses}" + (f", gave up on {source.gave_up}" if source.gave_up else ""),
    )
    report.check(
        "heartbeats held every open connection (none silent for long)",
        source.hangs == 0,
        f"{source.hangs} silent connections, {source.network_errors} network errors, "
        f"{len(source.statuses)} connections",
    )
    numbered = [e.id for e in source.received if e.type not in ("gap",)]
    report.check(
        "the server sent each event once: ids only grow",
        all(a < b for a, b in itertools.pairwise(numbered)),
        f"{len(numbered)} events received",
    )
    holding = held(source.received)
    ids = [e.id for e in holding]
    voids = void_ranges(source.received)
    expected_ids = [
        i for i in range(1, (ids[-1] if ids else 0) + 1) if not any(i in v for v in voids)
    ]
    report.check(
        "the client holds ids 1..n once each, the terminal event last",
        bool(holding) and ids == expected_ids and holding[-1].type in events.TERMINAL_TYPES,
        f"{len(ids)} events, ids {ids[:3]}..{ids[-3:]}, "
        f"last {holding[-1].type if holding else None}"
        + (f", void {[(v.start, v.stop - 1) for v in voids]}" if voids else ""),
    )
    replay = await replay_of(stage, generation)
    report.check(
        "it holds the same events as one uninterrupted replay afterwards",
        holding == held(replay),
        f"{len(held(replay))} events in the replay",
    )
    request = GenerationRequest(
        model="sim", messages=[Message(role="user", content="a drill")], sim=SIM
    )
    produced = [events.decode(e.data) for e in holding if e.type not in ("started", "reset", "gap")]
    expected = list(plan(SIM, prompt_tokens(request)))
    report.check(
        "the generation completed with every token the model produced",
        produced == expected,
        f"{len(produced)} of {len(expected)} events",
    )
    return replay


def takeover(report: Report, replay: list[Received]) -> None:
    """The worker could not renew its lease for a lease period, so it stopped appending
    and another run took the generation over from the log."""
    attempts = [json.loads(e.data).get("attempt") for e in held(replay) if e.type == "started"]
    report.check(
        "the worker gave up its lease and a takeover continued the generation",
        len(attempts) >= 2 and attempts == sorted(attempts),
        f"started events with attempts {attempts}",
    )
