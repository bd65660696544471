"""What `app.client` costs per event, beside httpx-sse reading the same bytes.

    .venv/bin/python scripts/bench_client_parse.py [--tokens N] [--repeats R] [--from FILE]

One recorded stream (by default a sim generation framed exactly as the reader frames
it; `--from` takes SSE bytes saved from a real reader, e.g. with `curl -N`) is served
by a separate process over loopback HTTP. Each client reads it to the end, decoding
every event into app.events types with the same decoder: `Client.events()` (aiohttp
and app.sse.Parser) and httpx with httpx-sse. The figure is events per second of the
client process's own CPU time (the server's is not counted), and of wall time; the
median of R runs, the two clients taking turns.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from aiohttp import web
from httpx_sse import aconnect_sse

from app import events, sse
from app.client import Client, Entry
from app.embedded import free_port
from app.generations import SimParams
from workers.models.sim import plan

GENERATION = "bench-generation-000001"


def recorded_stream(tokens: int) -> bytes:
    """A sim generation as the reader writes it: `retry:`, the events, a heartbeat now and then."""
    plan_events = [
        events.Started(model="sim", attempt=1),
        *plan(SimParams(tokens=tokens, tool_calls=2), 4),
    ]
    parts = [sse.retry_frame(1000)]
    for seq, event in enumerate(plan_events, start=1):
        parts.append(sse.event_frame(seq, events.event_type(event), events.encode(event)))
        if seq % 5000 == 0:
            parts.append(sse.comment_frame("keep-alive"))
    return b"".join(parts)


def serve(body: bytes, port: int) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for start in range(0, len(body), 64 * 1024):
                await response.write(body[start : start + 64 * 1024])
            await response.write_eof()
        except ConnectionError:
            pass  # app.client hangs up after the terminal event, before the response's end
        return response

    app = web.Application()
    app.router.add_get("/v1/generations/{id}/events", stream)
    web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=True)


async def read_with_client(base_url: str) -> int:
    async with Client(base_url) as client:
        count = 0
        async for item in client.events(GENERATION):
            if isinstance(item, Entry):
                count += 1
        return count


async def read_with_httpx_sse(base_url: str) -> int:
    url = f"{base_url}/v1/generations/{GENERATION}/events"
    async with (
        httpx.AsyncClient(timeout=None) as client,
        aconnect_sse(client, "GET", url) as source,
    ):
        count = 0
        async for message in source.aiter_sse():
            # httpx-sse also dispatches a blank line after `retry:` or a comment, as an
            # event with no data: a reader must skip those itself.
            if message.data:
                int(message.id)
                events.decode(message.data)
                count += 1
        return count


async def measure(read: Callable[[str], Awaitable[int]], base_url: str) -> tuple[int, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    count = await read(base_url)
    return count, time.process_time() - cpu, time.perf_counter() - wall


async def wait_until_listening(port: int) -> None:
    for _ in range(500):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)  # polling a port: no event to await across processes
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise SystemExit(f"the stream server did not start on port {port}")


async def main(body: bytes, repeats: int) -> None:
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(body, port))
    server.start()
    try:
        await wait_until_listening(port)
        base_url = f"http://127.0.0.1:{port}"
        readers = {"app.client": read_with_client, "httpx-sse": read_with_httpx_sse}
        results: dict[str, list[tuple[int, float, float]]] = {name: [] for name in readers}
        for read in readers.values():
            await measure(read, base_url)  # warm-up: imports, connection pools
        for _ in range(repeats):
            for name, read in readers.items():
                results[name].append(await measure(read, base_url))
        print(
            f"{len(body) / 1e6:.1f} MB, {results['app.client'][0][0]} events, {repeats} runs each"
        )
        print(
            f"{'client':<12} {'events/s (CPU)':>15} {'events/s (wall)':>16} {'µs/event (CPU)':>15}"
        )
        for name, runs in results.items():
            count = runs[0][0]
            assert all(run[0] == count for run in runs), f"{name} read different event counts"
            cpu = statistics.median(run[1] for run in runs)
            wall = statistics.median(run[2] for run in runs)
            rates = f"{count / cpu:>15,.0f} {count / wall:>16,.0f}"
            print(f"{name:<12} {rates} {cpu / count * 1e6:>15.2f}")
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=200_000, help="sim tokens in the stream")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--from", dest="source", type=Path, help="SSE bytes recorded from a reader")
    args = parser.parse_args()
    stream = args.source.read_bytes() if args.source else recorded_stream(args.tokens)
    asyncio.run(main(stream, args.repeats))
