"""What one event stream costs the reader from request to end: CPU per GET.

    python scripts/bench_get.py --requests 3000
    python scripts/bench_get.py --requests 6000 --concurrency 64    # 64 at a time, as in a burst

Starts a private redis-server and one `tokentape serve`, writes one finished
generation of `--events` events (as a worker would: leased, appended, done), and
reads its whole event stream `--requests` times, one after another on one kept-alive
connection (or on `--concurrency` connections at once), after 200 reads to warm up.
With `--generations N` the reads take N such generations in turn: with N at least
the reads made, each read is its generation's first (no hub state of an earlier
read of it is left).
Prints the reader's CPU time (user + system, from /proc), the wall time per read and
the median read's time.

    python scripts/bench_get.py --requests 2000 --generations 2400 --against /tmp/before

`--against TREE` compares with another checkout of tokentape (`git worktree add
/tmp/before <commit>`): its `serve` runs beside this tree's on the same Redis, and
the reads go to the two in turn, one at a time, so that both see the same moments of
a machine whose speed swings from one run to the next.
Each read is what any stream pays once whatever its length: the request, the checks,
the log's snapshot, a subscription, the catch-up read, the response's head and end,
the access log line and the span.
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
import statistics
import time
from collections.abc import Sequence

import aiohttp

from app import events
from app.generations import parse_request
from app.keys import new_generation_id
from app.store import GenerationLog
from scripts.bench import SERVE_ARGV, start_service
from scripts.bench_client import cpu_seconds

WARM_UP_READS = 200


@dataclasses.dataclass(frozen=True)
class Measured:
    """One reader's figures: its CPU seconds per read and the median read's seconds."""

    cpu: float
    median: float


async def finished_generation(log: GenerationLog, count: int) -> str:
    generation_id = new_generation_id()
    await log.create(
        generation_id, parse_request(b'{"model":"sim","messages":[{"role":"user","content":"x"}]}')
    )
    lease = await log.acquire(generation_id, "bench-get")
    assert lease is not None
    tokens: list[events.Event] = [events.Token(text=f"t{i} ") for i in range(count - 1)]
    await log.append(lease, 1, [*tokens, events.Done(reason="stop")])
    return generation_id


async def run(args: argparse.Namespace) -> tuple[dict[str, Measured], float]:
    """Each reader's figures, by the tree it runs, and the wall seconds per read."""
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))
        )
        service = await start_service(stack, "get", session)
        readers = {"this tree": (service.base_url, service.serve)}
        if args.against is not None:
            readers[str(args.against)] = await service.start_beside(
                stack, session, "against", SERVE_ARGV, cwd=args.against
            )
        generation_ids = [
            await finished_generation(service.log, args.events)
            for _ in range(args.generations * len(readers))
        ]
        next_id = itertools.cycle(generation_ids).__next__
        durations: dict[str, list[float]] = {name: [] for name in readers}

        async def read(name: str) -> None:
            url = f"{readers[name][0]}/v1/generations/{next_id()}/events"
            started = time.perf_counter()
            async with session.get(url) as response:
                if b"event: done" not in await response.read():
                    raise RuntimeError(f"{url} answered {response.status} without its events")
            durations[name].append(time.perf_counter() - started)

        async def reads(count: int) -> None:
            names = list(readers)
            for i in range(count):
                for name in names if i % 2 == 0 else reversed(names):
                    await read(name)

        async def spread(count: int) -> None:
            await asyncio.gather(
                *(reads(count // args.concurrency) for _ in range(args.concurrency))
            )

        await spread(WARM_UP_READS)
        for measured in durations.values():
            measured.clear()
        cpu = {name: cpu_seconds(process.pid) for name, (_, process) in readers.items()}
        wall = time.perf_counter()
        await spread(args.requests)
        wall = time.perf_counter() - wall
        figures = {
            name: Measured(
                cpu=(cpu_seconds(process.pid) - cpu[name]) / args.requests,
                median=statistics.median(durations[name]),
            )
            for name, (_, process) in readers.items()
        }
        return figures, wall / args.requests / len(readers)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="reads measured")
    parser.add_argument("--events", type=int, default=3, help="events of the generation")
    parser.add_argument("--concurrency", type=int, default=1, help="reads in flight")
    parser.add_argument("--generations", type=int, default=1, help="generations read in turn")
    parser.add_argument(
        "--against", type=Path, help="another checkout whose reader is read in turn with this one"
    )
    args = parser.parse_args(argv)
    args.requests -= args.requests % args.concurrency
    figures, wall = asyncio.run(run(args))
    for name, measured in figures.items():
        print(
            f"{name}: reader CPU per GET: {measured.cpu * 1e6:.0f} µs; "
            f"one GET, median: {measured.median * 1e6:.0f} µs"
        )
    print(f"wall per GET: {wall * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
