"""The Durable Streams Python client (`durable-streams` on PyPI) against tokentape."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from durable_streams import AsyncDurableStream, astream

from app import events
from app.keys import Keys
from app.settings import Settings
from app.store import GenerationLog
from tests.conftest import ON_EVERY_BACKEND
from tests.durable_streams.conftest import until_waiting
from tests.http.conftest import Writer

ServerFactory = Callable[..., Awaitable[TestServer]]


@ON_EVERY_BACKEND
async def test_the_client_creates_appends_and_reads_live(
    aiohttp_server: ServerFactory, app: web.Application, settings: Settings
) -> None:
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}/v1/stream/chat/42"
    handle = await AsyncDurableStream.create(url, content_type="application/json")
    try:
        await handle.append({"role": "user", "text": "hi"})
        await handle.append({"role": "assistant", "text": "hello"})
        async with handle.stream(live=False) as response:
            assert await response.read_json() == [
                {"role": "user", "text": "hi"},
                {"role": "assistant", "text": "hello"},
            ]
        tail = (await handle.head()).offset
        for live in ("long-poll", "sse"):

            async def append_once_waited_on(live: str = live) -> None:
                await until_waiting(app, Keys(settings.key_prefix).stream_channel("chat/42"))
                await handle.append({"live": live})

            appending = asyncio.create_task(append_once_waited_on())
            async with handle.stream(offset=tail, live=live) as response:
                items: list[Any] = []
                async for item in response.iter_json():
                    items.append(item)
                    break
            await appending
            assert items == [{"live": live}]
            tail = (await handle.head()).offset
    finally:
        await handle.delete()
        await handle.aclose()


@ON_EVERY_BACKEND
async def test_the_client_reads_a_generation_as_it_is_written(
    aiohttp_server: ServerFactory, app: web.Application, log: GenerationLog
) -> None:
    server = await aiohttp_server(app)
    writer = await Writer.start(log)
    await writer.append(events.Started(model="sim"))
    url = f"http://127.0.0.1:{server.port}/v1/stream/generations/{writer.generation_id}"

    async def finish() -> None:
        await writer.tokens(2)

    received: list[Any] = []
    async with astream(url, offset="-1", live="long-poll") as response:
        finishing = asyncio.create_task(finish())
        async for item in response.iter_json():
            received.append(item)
            if item["type"] == "done":
                break
        await finishing
    assert [item["type"] for item in received] == ["started", "token", "token", "done"]
    assert received[1] == {"type": "token", "text": "t0 "}
