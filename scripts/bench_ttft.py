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
from scripts.bench_client import TERMINAL_TYPES, EventReader, raise_fd_limit, sim_body

STAGES = ("created", "picked up", "started", "first token", "delivered", "total")


@dataclasses.dataclass
class Timing:
    generation_id: str
    posted_ms: float
    first_token_ms: float = 0.0


async def one(session: aiohttp.ClientSession, base_url: str, body: dict[str, object]) -> Timing:
    posted = time.time() * 1000
    async with session.post(f"{base_url}/v1/generations", json=body) as resp:
        if resp.status != 201:
            raise RuntimeError(f"POST answered {resp.status}: {await resp.text()}")
        created = await resp.json()
    timing = Timing(str(created["id"]), posted)
    reader = EventReader()
    async with session.get(base_url + created["events_url"]) as resp:
        async for chunk in resp.content.iter_any():
            for _seq, kind in reader.feed(chunk):
                if kind == b"token" and not timing.first_token_ms:
                    timing.first_token_ms = time.time() * 1000
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


async def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Each reader's stages, by its name."""
    body = sim_body(args.tokens, args.rate, seed=0)
    async with contextlib.AsyncExitStack() as stack:
        connector = aiohttp.TCPConnector(limit=0)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        service = await start_service(stack, "ttft", session, workers=args.workers)
        readers = {"tokentape": service.base_url}
        if args.beside_naive:
            argv = (sys.executable, str(NAIVE_SERVER), "--redis", "{redis}", "--port", "{port}")
            readers["naive"], _ = await service.start_beside(stack, session, "naive", argv)
        by_reader: dict[str, dict[str, list[float]]] = {
            name: {stage: [] for stage in STAGES} for name in readers
        }
        for base_url in readers.values():
            await one(session, base_url, sim_body(3, 1e9, seed=0))  # warm-up
        for burst in range(args.repeat):
            names = list(readers)
            for name in names if burst % 2 == 0 else reversed(names):
                timings = await asyncio.gather(
                    *(one(session, readers[name], body) for _ in range(args.generations))
                )
                for timing in timings:
                    measured = await stages(service.log, timing)
                    for stage, ms in zip(STAGES, measured, strict=True):
                        by_reader[name][stage].append(ms)
    return by_reader


def report(by_stage: dict[str, list[float]]) -> str:
    lines = ["| stage | p50 ms | p90 ms | p99 ms |", "| --- | --- | --- | --- |"]
    for stage, values in by_stage.items():
        cells = [percentile(values, p) for p in (50, 90, 99)]
        lines.append(
            f"| {stage} | " + " | ".join(f"{v:.1f}" for v in cells if v is not None) + " |"
        )
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
    for name, by_stage in by_reader.items():
        if len(by_reader) > 1:
            print(f"\n{name}:")
        print(report(by_stage))


if __name__ == "__main__":
    main()
