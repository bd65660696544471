"""What one idle event stream holds in the reader, by who allocated it.

    python scripts/bench_memory.py --connections 2000
    python scripts/bench_memory.py --connections 2000 --durable-streams

Starts a private redis-server and, in this process under `tracemalloc`, a reader
(`serve`, no worker, so the generations stay queued); a client process then creates
`--connections` generations and opens each one's event stream, as scenario (e) of
scripts/bench.py does (POST, then GET on the same kept-alive connection); with
`--durable-streams`, each one's Durable Streams SSE read instead
(`/v1/stream/generations/<id>?live=sse&offset=-1`). Once all are open, the Python
heap's growth since 50 others were open is divided by their number and split by the
package of the code that allocated it: aiohttp (with multidict and yarl), tokentape,
its telemetry (OpenTelemetry), and the event loop's own C code. `--top` lists the
largest allocation sites.

tracemalloc counts Python allocations only, not what the allocator keeps around them:
the reader's RSS per connection (scripts/bench.py, scenario (e)) is about 2.5 KiB more.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import collections
import gc
import secrets
import tempfile
import tracemalloc

import aiohttp
import uvloop
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import serve
from app.http import create_app
from app.http.state import HUB
from app.settings import Settings
from app.telemetry import Telemetry
from scripts.bench import private_redis
from scripts.bench_client import raise_fd_limit, sim_body
from scripts.bench_procs import HOST, free_port

_ROOT = f"{Path(__file__).resolve().parent.parent}/"
WARM_STREAMS = 50  # opened before the first snapshot: caches and pools are filled by then
_OWNERS = (
    ("/app/telemetry/", "telemetry"),
    ("/opentelemetry/", "telemetry"),
    ("/app/", "tokentape"),
    ("/aiohttp/", "aiohttp"),
    ("/multidict/", "aiohttp"),
    ("/yarl/", "aiohttp"),
)


def owner(traceback: tracemalloc.Traceback) -> tuple[str, str]:
    """Who allocated it (the package of the newest frame in one), and where."""
    for frame in reversed(traceback):
        for part, name in _OWNERS:
            if part in frame.filename:
                where = frame.filename.rsplit("site-packages/", 1)[-1].removeprefix(_ROOT)
                return name, f"{where}:{frame.lineno}"
    return "event loop (C)", "-"


async def hold_streams(base_url: str, connections: int, durable_streams: bool) -> None:
    """The client: create a generation and open its events, `connections` times; say so
    on stdout, and hold them."""
    limit = asyncio.Semaphore(64)
    held: list[aiohttp.ClientResponse] = []

    async def open_one(session: aiohttp.ClientSession, seed: int) -> None:
        async with limit:
            async with session.post(f"{base_url}/v1/generations", json=sim_body(1, 1, seed)) as r:
                created = await r.json()
            url = f"{base_url}{created['events_url']}"
            if durable_streams:
                url = f"{base_url}/v1/stream/generations/{created['id']}?live=sse&offset=-1"
            response = await session.get(url)
            # The first chunk (the retry frame; the first control event): the stream is open.
            await response.content.readany()
            held.append(response)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(open_one(session, seed) for seed in range(connections)))
        print("open", flush=True)
        await asyncio.Event().wait()


async def measure(settings: Settings, args: argparse.Namespace) -> None:
    apps: list[web.Application] = []
    started = asyncio.Event()

    async def on_startup(app: web.Application) -> None:
        started.set()

    def app_factory(
        settings: Settings, redis: Redis | RedisCluster, telemetry: Telemetry | None = None
    ) -> web.Application:
        apps.append(create_app(settings, redis, telemetry))
        apps[0].on_startup.append(on_startup)
        return apps[0]

    stop = asyncio.Event()
    reader = asyncio.create_task(
        serve.serve(settings, with_worker=False, stop=stop, app_factory=app_factory)
    )
    clients: list[asyncio.subprocess.Process] = []

    async def open_streams(count: int, opened: int) -> None:
        """Open `count` more, `opened` in all once they are."""
        base_url = f"http://{HOST}:{settings.port}"
        command = [sys.executable, __file__, "--client", base_url, str(count)]
        if args.durable_streams:
            command.append("--durable-streams")
        client = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        clients.append(client)
        assert client.stdout is not None
        if await client.stdout.readline() != b"open\n":
            raise RuntimeError("a client could not open its streams")
        if not args.durable_streams:
            # Open once subscribed: the stream's task subscribes after its first write.
            await apps[0][HUB].until_subscriptions(opened)

    try:
        async with asyncio.timeout(120):
            await started.wait()
            await open_streams(WARM_STREAMS, WARM_STREAMS)
            gc.collect()
            before = tracemalloc.take_snapshot()
            await open_streams(args.connections, WARM_STREAMS + args.connections)
        await asyncio.sleep(1.0)  # the last streams' first writes settle
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        for client in clients:
            client.kill()
            await client.wait()
        stop.set()
        await reader
    kind = "Durable Streams SSE reads" if args.durable_streams else "event streams"
    report(after.compare_to(before, "traceback"), args.connections, args.top, kind)


def report(
    diff: list[tracemalloc.StatisticDiff], streams: int, top: int, kind: str = "event streams"
) -> None:
    by_owner: collections.Counter[str] = collections.Counter()
    by_site: collections.Counter[tuple[str, str]] = collections.Counter()
    for stat in diff:
        name, where = owner(stat.traceback)
        by_owner[name] += stat.size_diff
        by_site[(name, where)] += stat.size_diff
    total = sum(by_owner.values())
    print(f"{streams} idle {kind}: {total / streams / 1024:.2f} KiB each (tracemalloc)\n")
    print("| allocated by | KiB per stream |\n| --- | --- |")
    for name, size in by_owner.most_common():
        print(f"| {name} | {size / streams / 1024:.2f} |")
    if top:
        print("\n| allocated by | where | bytes per stream |\n| --- | --- | --- |")
        for (name, where), size in by_site.most_common(top):
            print(f"| {name} | `{where}` | {size / streams:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--top", type=int, default=15, help="largest allocation sites listed")
    parser.add_argument("--frames", type=int, default=12, help="traceback depth kept")
    parser.add_argument(
        "--durable-streams",
        action="store_true",
        help="hold Durable Streams SSE reads of the generations instead of their event streams",
    )
    parser.add_argument("--client", nargs=2, metavar=("URL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_fd_limit()
    if args.client:
        uvloop.run(hold_streams(args.client[0], int(args.client[1]), args.durable_streams))
        return
    with tempfile.TemporaryDirectory(prefix="tokentape-memory-") as directory:
        redis_server = private_redis(Path(directory))
        try:
            settings = Settings.from_env(
                redis_url=redis_server.url,
                host=HOST,
                port=free_port(),
                key_prefix=f"ttmem-{secrets.token_hex(4)}",
            )
            tracemalloc.start(args.frames)
            uvloop.run(measure(settings, args))
        finally:
            redis_server.stop()


if __name__ == "__main__":
    main()
