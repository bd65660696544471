"""Where a burst's time to first token goes, stage by stage.

    python scripts/bench_ttft.py --generations 1000 --rate 20 --tokens 60
    python scripts/bench_ttft.py --generations 1 --repeat 100      # one alone, 100 in a row

Starts a private redis-server, one `tokentape serve` and `--workers` `tokentape worker`
processes (default settings), creates `--generations` sim generations at once from one
client process, reads each to its end, and then splits each generation's first token
into the stages the log's own timestamps separate (all wall-clock ms on this machine):

  created      POST sent by the client -> `created_ms` (the reader took the request)
  picked up    `created_ms` -> `started_ms` (job queued, read by a worker, lease taken)
  started      `started_ms` -> the `started` event's `appended_ms`
  first token  `started` appended -> the first token's `appended_ms` (the adapter, an append)
  delivered    first token appended -> its arrival at the client (hub, SSE, the socket)

The log's timestamps are milliseconds, so stages shorter than a few ms read as 0 or 1.

A second table splits the streams' drift (scripts/bench_client.py's definition) between
the worker and what follows it: each token's `appended_ms` in the log against the
generation's pace, and its arrival at the client (live tokens only, as in bench.py).

    python scripts/bench_ttft.py --generations 1 --repeat 200 --rate 200 --tokens 20 --beside-naive

`--beside-naive` starts the naive reader of scripts/bench.py (scripts/naive_server.py)
on the same Redis, fed by the same workers, and sends the bursts to the two readers in
turn, so that both see the same moments of a machine whose speed swings from one run
to the next; a table for each.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import Sequence

import aiohttp

from app.store import GenerationLog
from scripts.bench import NAIVE_SERVER, percentile, start_service
from scripts.bench_client import (
    TERMINAL_TYPES,
    EventReader,
    live_drift,
    raise_fd_limit,
    sim_body,
)

STAGES = ("created", "picked up", "started", "first token", "delivered", "total")
DRIFTS = ("in the log", "at the client")


@dataclasses.dataclass
class Timing:
    generation_id: str
    posted_ms: float
    first_token_ms: float = 0.0
    connected_ms: float = 0.0
    # (seq, ms) of each token as it reached the client.
    tokens: list[tuple[int, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Measured:
    """One reader's figures: the first tokens' stages, and the tokens' drift."""

    stages: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {stage: [] for stage in STAGES}
    )
    drift: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {where: [] for where in DRIFTS}
    )


async def one(session: aiohttp.ClientSession, base_url: str, body: dict[str, object]) -> Timing:
    posted = time.time() * 1000
    async with session.post(f"{base_url}/v1/generations", json=body) as resp:
        if resp.status != 201:
            raise RuntimeError(f"POST answered {resp.status}: {await resp.text()}")
        created = await resp.json()
    timing = Timing(str(created["id"]), posted)
    reader = EventReader()
    async with session.get(base_url + created["events_url"]) as resp:
        timing.connected_ms = time.time() * 1000
        async for chunk in resp.content.iter_any():
            now = time.time() * 1000
            for seq, kind in reader.feed(chunk):
                if kind == b"token":
                    timing.tokens.append((int(seq), now))
                    timing.first_token_ms = timing.first_token_ms or now
                if kind in TERMINAL_TYPES:
                    return timing
    raise RuntimeError(f"{timing.generation_id} ended without a terminal event")


async def stages(log: GenerationLog, timing: Timing) -> list[float]:
    state = await log.state(timing.generation_id)
    started, first_token = await log.read(timing.generation_id, 0, 2)
    if state is None or state.started_ms is None:
        raise RuntimeError(f"{timing.generation_id} has no start in its log")
    marks = [
        timing.posted_ms,
        state.created_ms,
        state.started_ms,
        started.appended_ms,
        first_token.appended_ms,
        timing.first_token_ms,
    ]
    return [b - a for a, b in itertools.pairwise(marks)] + [marks[-1] - marks[0]]


async def drifts(log: GenerationLog, timing: Timing, rate: float) -> list[list[float]]:
    """The drift of the generation's tokens (ms): appended to the log, and at the client."""
    if len(timing.tokens) < 2:
        return [[] for _ in DRIFTS]
    appended = {
        entry.seq: entry.appended_ms
        for entry in await log.read(timing.generation_id, 0, timing.tokens[-1][0])
    }
    # Each token's offset from its place in the pace, in seconds as live_drift takes them.
    in_log = [appended[seq] / 1000 - k / rate for k, (seq, _) in enumerate(timing.tokens)]
    at_client = [ms / 1000 - k / rate for k, (_, ms) in enumerate(timing.tokens)]
    return [
        [s * 1000 for s in live_drift(in_log, rate, connected_at=0.0)],
        [s * 1000 for s in live_drift(at_client, rate, timing.connected_ms / 1000)],
    ]


async def run(args: argparse.Namespace) -> dict[str, Measured]:
    """Each reader's figures, by its name."""
    body = sim_body(args.tokens, args.rate, seed=0)
    async with contextlib.AsyncExitStack() as stack:
        connector = aiohttp.TCPConnector(limit=0)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        service = await start_service(stack, "ttft", session, workers=args.workers)
        readers = {"tokentape": service.base_url}
        if args.beside_naive:
            argv = (sys.executable, str(NAIVE_SERVER), "--redis", "{redis}", "--port", "{port}")
            readers["naive"], _ = await service.start_beside(stack, session, "naive", argv)
        by_reader = {name: Measured() for name in readers}
        for base_url in readers.values():
            await one(session, base_url, sim_body(3, 1e9, seed=0))  # warm-up
        for burst in range(args.repeat):
            names = list(readers)
            for name in names if burst % 2 == 0 else reversed(names):
                timings = await asyncio.gather(
                    *(one(session, readers[name], body) for _ in range(args.generations))
                )
                measured = by_reader[name]
                for timing in timings:
                    split = await stages(service.log, timing)
                    for stage, ms in zip(STAGES, split, strict=True):
                        measured.stages[stage].append(ms)
                    found = await drifts(service.log, timing, args.rate)
                    for where, values in zip(DRIFTS, found, strict=True):
                        measured.drift[where].extend(values)
    return by_reader


def report(name: str, rows: dict[str, list[float]], ranks: Sequence[int]) -> str:
    cells = " | ".join(f"p{p} ms" if p < 100 else "max ms" for p in ranks)
    lines = [f"| {name} | {cells} |", "| --- " * (len(ranks) + 1) + "|"]
    for row, values in rows.items():
        if values:
            found = (percentile(values, p) or 0.0 for p in ranks)
            lines.append(f"| {row} | " + " | ".join(f"{v:.1f}" for v in found) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=1000, help="created at once")
    parser.add_argument("--repeat", type=int, default=1, help="bursts one after another")
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s of each")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--beside-naive", action="store_true", help="the naive reader too, bursts in turn"
    )
    args = parser.parse_args(argv)
    raise_fd_limit()
    by_reader = asyncio.run(run(args))
    for name, measured in by_reader.items():
        if len(by_reader) > 1:
            print(f"\n{name}:")
        print(report("stage", measured.stages, (50, 90, 99)))
        if any(measured.drift.values()):
            print()
            print(report("drift", measured.drift, (50, 90, 99, 100)))


if __name__ == "__main__":
    main()
