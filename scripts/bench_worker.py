"""Worker CPU per event: one in-process `Worker` running many paced `sim` generations.

    python scripts/bench_worker.py --generations 1000 --tokens 60 --rate 20

Creates the generations and enqueues their jobs first (not measured), then runs
one `workers.runner.Worker` with room for all of them, on the loop `tokentape worker`
runs on (`app.runtime.run_loop`: uvloop unless `--event-loop asyncio`), until every generation
has ended, and prints the events appended, events/s, and this process's CPU
(getrusage) and Redis's (`INFO cpu`) per 10k events, and the growth of its resident
memory per generation running at once. Keys live under a private
prefix and are deleted at the end; nothing is flushed. Run it against two source
trees (`PYTHONPATH=<tree>`) back to back for an A/B comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as `python scripts/bench_worker.py`: import app and workers from this tree
    # (for an A/B run, from the tree the script was copied into).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import resource
import secrets
import time

from redis.asyncio import Redis

from app.generations import GenerationRequest, Message, SimParams
from app.keys import new_generation_id
from app.runtime import connect, run_loop
from app.settings import Settings
from app.store import GenerationLog
from app.telemetry import Telemetry
from workers.runner import Worker


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss() -> int:
    """This process's resident memory in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _redis_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def bench_settings(args: argparse.Namespace) -> Settings:
    return Settings(
        redis_url=args.redis,
        key_prefix=f"ttbenchw-{secrets.token_hex(4)}",
        worker_concurrency=args.generations + 16,
        event_loop=args.event_loop,
    )


async def run(args: argparse.Namespace, settings: Settings) -> dict[str, float]:
    prefix = settings.key_prefix
    redis = connect(settings, "worker", settings.worker_redis_connections)
    assert isinstance(redis, Redis), "one Redis: the worker's cost is measured there"
    log = GenerationLog(redis, settings)
    request = GenerationRequest(
        model="sim",
        messages=[Message(role="user", content="write about durable streams")],
        sim=SimParams(tokens=args.tokens, tokens_per_second=args.rate, seed=7),
    )
    try:
        for _ in range(args.generations):
            generation_id = new_generation_id()
            await log.create(generation_id, request)
            await log.jobs.enqueue(generation_id, None)
        # Telemetry as `tokentape worker` configures it (no exporter: no tracing).
        worker = Worker(redis, settings, telemetry=Telemetry.from_env("tokentape-worker"))
        stop = asyncio.Event()
        cpu0, redis0, wall0 = _cpu(), await _redis_cpu(redis), time.perf_counter()
        rss_before = rss_peak = _rss()
        task = asyncio.create_task(worker.run(stop))
        # Every generation ends by leaving the open set; polling it is cheap.
        while await redis.zcard(log.keys.open_generations):
            rss_peak = max(rss_peak, _rss())
            await asyncio.sleep(0.2)
        wall, cpu = time.perf_counter() - wall0, _cpu() - cpu0
        redis_cpu = await _redis_cpu(redis) - redis0
        stop.set()
        await task
        # started + tokens + done per generation
        events = args.generations * (args.tokens + 2)
        return {
            "events": events,
            "wall_s": round(wall, 2),
            "events_per_s": round(events / wall),
            "worker_cpu_s_per_10k": round(cpu / events * 10_000, 3),
            "redis_cpu_s_per_10k": round(redis_cpu / events * 10_000, 3),
            "rss_kib_per_generation": round((rss_peak - rss_before) / 1024 / args.generations, 1),
        }
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 1000):
            await redis.unlink(*keys[i : i + 1000])
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the loop to run on, as `tokentape worker` picks it (default uvloop)",
    )
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats here")
    args = parser.parse_args()
    settings = bench_settings(args)
    # The CLI's loop (uvloop unless asked otherwise): measure what production runs.
    if args.profile:
        import cProfile

        with cProfile.Profile() as profile:
            figures = run_loop(settings, run(args, settings))
        profile.dump_stats(args.profile)
    else:
        figures = run_loop(settings, run(args, settings))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
