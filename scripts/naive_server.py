"""The naive reference reader of the benchmark: what a user writes first.

aiohttp + aiohttp-sse, one blocking `XREAD BLOCK` per SSE connection on the
generation's log stream. It serves the same API shape as tokentape
(`POST /v1/generations`, `GET /v1/generations/{id}`, `GET …/events`) over the same
log: a POST creates the generation and enqueues its job through `app.store`,
exactly as tokentape does, so the same tokentape worker processes
produce the events for both sides at the same sim pacing. Only the read path
differs, which is what the benchmark compares.

`--producer inprocess` instead appends the sim's events from a task in this
process (a paced `started`, N tokens, `done`): for developing the harness without
a worker, not for comparisons, since the producer then shares this process's CPU.

Run by `scripts/bench.py`; standalone:
`python scripts/naive_server.py --redis redis://127.0.0.1:6379/0 --port 8200`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import time
from typing import cast

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from redis.asyncio import BlockingConnectionPool, Redis

from app import events
from app.errors import TokentapeError
from app.generations import SimParams, parse_request
from app.keys import check_generation_id, new_generation_id
from app.settings import Settings
from app.store import GenerationLog

LOG_KEY = web.AppKey("log", GenerationLog)
# A second client on its own pool, used only for the blocking XREADs.
BLOCKING_REDIS_KEY = web.AppKey("blocking_redis", Redis)
PRODUCER_KEY = web.AppKey("producer", str)
PRODUCER_TASKS = web.AppKey("producer_tasks", set[asyncio.Task[None]])
XREAD_COUNT = 500

# XREAD's reply: [(stream, [(entry id, {field: value})])].
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


async def create_generation(request: web.Request) -> web.Response:
    log = request.app[LOG_KEY]
    try:
        generation = parse_request(await request.read())
    except TokentapeError as exc:
        return web.json_response(exc.body(), status=exc.status)
    generation_id = new_generation_id()
    inprocess = request.app[PRODUCER_KEY] == "inprocess"
    await log.create(generation_id, generation, enqueue=not inprocess)
    if inprocess:
        task = asyncio.create_task(produce_sim(log, generation_id, generation.sim))
        request.app[PRODUCER_TASKS].add(task)
        task.add_done_callback(request.app[PRODUCER_TASKS].discard)
    base = f"/v1/generations/{generation_id}"
    return web.json_response(
        {"id": generation_id, "events_url": f"{base}/events", "status_url": base}, status=201
    )


async def generation_status(request: web.Request) -> web.Response:
    log = request.app[LOG_KEY]
    state = await log.state(check_generation_id(request.match_info["id"]))
    if state is None:
        return web.json_response({"error": {"code": "generation_not_found"}}, status=404)
    return web.json_response({"id": state.id, "status": state.status, "last_seq": state.last_seq})


async def generation_events(request: web.Request) -> EventSourceResponse:
    """The naive reader: one XREAD BLOCK at a time, on its own Redis connection."""
    log = request.app[LOG_KEY]
    blocking_redis = request.app[BLOCKING_REDIS_KEY]
    stream = log.keys.log(check_generation_id(request.match_info["id"]))
    position = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or "0"
    last_id = f"{int(position)}-0"
    # Same framing as tokentape: LF line endings (aiohttp-sse defaults to CRLF).
    response = EventSourceResponse(sep="\n")
    await response.prepare(request)
    async with response:
        while True:
            # BLOCK 0 waits forever: this connection is held for the whole stream.
            reply = cast(
                StreamReply,
                await blocking_redis.xread({stream: last_id}, count=XREAD_COUNT, block=0),
            )
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    last_id = entry_id.decode()
                    kind = fields[b"type"].decode()
                    await response.send(
                        fields[b"data"].decode(), id=last_id.split("-", 1)[0], event=kind
                    )
                    if kind in events.TERMINAL_TYPES:
                        return response
    return response


async def produce_sim(log: GenerationLog, generation_id: str, sim: SimParams | None) -> None:
    """A paced sim producer in this process (`--producer inprocess` only)."""
    sim = sim or SimParams()
    tokens, rate = sim.tokens, sim.tokens_per_second
    lease = await log.acquire(generation_id, "naive-inprocess")
    if lease is None:
        return
    seq = await log.append(lease, lease.last_seq + 1, [events.Started(model="sim")])
    started = time.monotonic()
    sent = 0
    while sent < tokens:
        due = min(tokens, int((time.monotonic() - started) * rate) + 1)
        if due > sent:
            batch = [events.Token(text=f"t{i} ") for i in range(sent, due)]
            seq = await log.append(lease, seq + 1, batch)
            sent = due
        if sent < tokens:
            await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
    await log.append(lease, seq + 1, [events.Done(reason="stop")])


def build_app(log: GenerationLog, blocking_redis: Redis, producer: str) -> web.Application:
    app = web.Application()
    app[LOG_KEY] = log
    app[BLOCKING_REDIS_KEY] = blocking_redis
    app[PRODUCER_KEY] = producer
    app[PRODUCER_TASKS] = set()
    app.router.add_post("/v1/generations", create_generation)
    app.router.add_get("/v1/generations/{id}", generation_status)
    app.router.add_get("/v1/generations/{id}/events", generation_events)
    return app


async def serve(args: argparse.Namespace) -> None:
    settings = Settings.from_env(redis_url=args.redis)
    # Creates (and `--producer inprocess` appends) share a small pool and wait their
    # turn for a connection: redis-py's default pool raises past 100 instead.
    redis = Redis(connection_pool=BlockingConnectionPool.from_url(args.redis, max_connections=64))
    # redis-py's 5 s default socket timeout would cut every XREAD BLOCK short, and its
    # default pool caps at 100 connections: with one blocking read per stream, the
    # 101st stream would wait forever. A pool sized by the caller (below Redis's
    # maxclients and our fd limit) is what this design costs; streams beyond it wait
    # for a connection. Creates use their own pool so they never wait behind readers.
    blocking_pool = BlockingConnectionPool.from_url(
        args.redis, max_connections=args.max_redis_connections, timeout=None, socket_timeout=None
    )
    blocking_redis = Redis(connection_pool=blocking_pool)
    log = GenerationLog(redis, settings)
    if args.producer == "worker":
        await log.jobs.ensure_group()
    app = build_app(log, blocking_redis, args.producer)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096)
    await site.start()
    print(f"naive server on http://127.0.0.1:{args.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await blocking_redis.aclose()
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", required=True)
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--max-redis-connections", type=int, default=8000)
    parser.add_argument("--producer", choices=("worker", "inprocess"), default="worker")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
