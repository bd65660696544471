"""The optional policy: cancel a generation that no reader has watched for N seconds."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app import events, sse
from app.http import create_app
from app.settings import Settings
from app.store import GenerationLog
from tests.http.conftest import ClientFactory
from tests.workers.conftest import StartWorker, ended, sim_request, submit, until_log


def policy(settings: Settings) -> Settings:
    return settings.replace(
        cancel_unwatched_seconds=0.6, lease_seconds=0.3, reader_recheck_seconds=0.1
    )


async def test_a_generation_nobody_watches_is_cancelled(
    redis: Redis, settings: Settings, start_worker: StartWorker
) -> None:
    settings = policy(settings)
    log = GenerationLog(redis, settings)
    await start_worker(settings)
    generation_id = await submit(log, sim_request(tokens=1000, rate=20))
    entries = await until_log(log, generation_id, ended)
    assert entries[-1].event() == events.Done(reason="cancelled")
    assert len(entries) < 100  # stopped long before its 1000 tokens


async def test_a_watched_generation_runs_to_its_end(
    redis: Redis, settings: Settings, start_worker: StartWorker, aiohttp_client: ClientFactory
) -> None:
    settings = policy(settings)
    log = GenerationLog(redis, settings)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        create_app(settings, redis)
    )
    await start_worker(settings)
    # Runs 2 s, far past the 0.6 s policy, with a reader attached all along.
    generation_id = await submit(log, sim_request(tokens=60, rate=30))
    parser = sse.Parser()
    messages: list[sse.ReceivedEvent] = []
    async with client.get(f"/v1/generations/{generation_id}/events") as response:
        async for chunk in response.content.iter_any():
            messages.extend(parser.feed(chunk))
    done = events.decode(messages[-1].data)
    assert isinstance(done, events.Done)
    assert done.reason == "stop"
