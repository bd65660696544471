"""What one event stream costs the reader from request to end: CPU per GET.

    python scripts/bench_get.py --requests 3000
    python scripts/bench_get.py --requests 6000 --concurrency 64    # 64 at a time, as in a burst

Starts a private redis-server and one `tokentape serve`, writes one finished
generation of `--events` events (as a worker would: leased, appended, done), and
reads its whole event stream `--requests` times, one after another on one kept-alive
connection (or on `--concurrency` connections at once), after 200 reads to warm up.
Prints the reader's CPU time (user + system, from /proc) and the wall time per read.
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
import time
from collections.abc import Sequence

import aiohttp

from app import events
from app.generations import parse_request
from app.keys import new_generation_id
from app.store import GenerationLog
from scripts.bench import start_service
from scripts.bench_client import cpu_seconds

WARM_UP_READS = 200


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


async def run(args: argparse.Namespace) -> tuple[float, float]:
    """CPU and wall seconds per read."""
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))
        )
        service = await start_service(stack, "get", session)
        generation_id = await finished_generation(service.log, args.events)
        url = f"{service.base_url}/v1/generations/{generation_id}/events"

        async def read() -> None:
            async with session.get(url) as response:
                if b"event: done" not in await response.read():
                    raise RuntimeError(f"{url} answered {response.status} without its events")

        async def reads(count: int) -> None:
            for _ in range(count):
                await read()

        async def spread(count: int) -> None:
            await asyncio.gather(
                *(reads(count // args.concurrency) for _ in range(args.concurrency))
            )

        await spread(WARM_UP_READS)
        cpu, wall = cpu_seconds(service.serve.pid), time.perf_counter()
        await spread(args.requests)
        cpu, wall = cpu_seconds(service.serve.pid) - cpu, time.perf_counter() - wall
    return cpu / args.requests, wall / args.requests


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="reads measured")
    parser.add_argument("--events", type=int, default=3, help="events of the generation")
    parser.add_argument("--concurrency", type=int, default=1, help="reads in flight")
    args = parser.parse_args(argv)
    args.requests -= args.requests % args.concurrency
    cpu, wall = asyncio.run(run(args))
    print(f"reader CPU per GET: {cpu * 1e6:.0f} µs; wall per GET: {wall * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
