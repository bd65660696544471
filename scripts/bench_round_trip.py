"""CPU of one Redis round trip through the store's transport, layer by layer, beside
redis-py's own command path.

    python scripts/bench_round_trip.py [--calls 10000] [--repeats 3]

Starts a private redis-server and sends `--calls` PINGs one after another, nothing
else in flight: what a reader pays for each round trip of a POST or a GET when it is
not busy (in a burst, one round trip carries a tick's calls). Each layer adds one
thing to the one above it:

- `exchange`: packed by hiredis, written and read on a connection held throughout;
- `within`: the round trip's bound (one `asyncio.timeout`);
- `round_trip`: a connection taken from redis-py's pool and given back;
- `Pipeline.run`: the store's path, the call queued and sent by the pipeline's task;
- `Redis.ping`: redis-py's own path (its pool, packer and reply callbacks).

Prints the best of `--repeats` in µs of this process's CPU (user + system) per call.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import BlockingConnectionPool, Redis

from app.store.transport import Pipeline, exchange, pack, round_trip, within
from scripts.bench import private_redis

TIMEOUT_SECONDS = 5.0


async def per_call(call: Callable[[], Awaitable[object]], calls: int, repeats: int) -> float:
    """Best of `repeats` runs of `calls` calls, in µs of CPU per call."""
    for _ in range(calls // 10):
        await call()
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(calls):
            await call()
        best = min(best, (time.process_time() - started) / calls * 1e6)
    return best


async def run(url: str, calls: int, repeats: int) -> list[tuple[str, float]]:
    pool = BlockingConnectionPool.from_url(url, max_connections=4, timeout=None)
    redis = Redis.from_pool(pool)
    pipeline = Pipeline(redis, timeout=TIMEOUT_SECONDS)
    ping = [pack("PING")]
    try:
        held = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            layers = [
                ("exchange", await per_call(lambda: exchange(held, ping), calls, repeats)),
                (
                    "within",
                    await per_call(
                        lambda: within(TIMEOUT_SECONDS, exchange(held, ping)), calls, repeats
                    ),
                ),
            ]
        finally:
            await pool.release(held)
        layers += [
            (
                "round_trip",
                await per_call(lambda: round_trip(redis, ping, TIMEOUT_SECONDS), calls, repeats),
            ),
            ("Pipeline.run", await per_call(lambda: pipeline.run("PING"), calls, repeats)),
            ("Redis.ping (redis-py)", await per_call(redis.ping, calls, repeats)),
        ]
    finally:
        await redis.aclose()
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server = private_redis(Path(directory))
        try:
            layers = asyncio.run(run(server.url, args.calls, args.repeats))
        finally:
            server.stop()
    for name, micros in layers:
        print(f"{name:24s} {micros:6.1f} µs per call")


if __name__ == "__main__":
    main()
