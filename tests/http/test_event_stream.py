"""The SSE endpoint on a real Redis: framing, positions, resume, gap, 204, heartbeat, cleanup.

The contract's core (`ON_EVERY_BACKEND`) runs on a Redis Cluster too."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import events
from app.http import HUB
from app.http.connection import StreamConnection
from app.hub import Hub, Page
from app.hub.pubsub import PubSubConnection
from app.settings import Settings
from app.store import GenerationLog
from tests.conftest import ON_EVERY_BACKEND
from tests.http.conftest import (
    Client,
    ClientFactory,
    Stream,
    Writer,
    as_events,
    read_all,
    until_subscriptions,
)
from tests.telemetry.conftest import samples_by_name

WriterFactory = Callable[..., Awaitable[Writer]]


async def test_headers_and_first_chunk_come_before_any_event(
    client: Client, writer_factory: WriterFactory, settings: Settings
) -> None:
    writer = await writer_factory()
    async with client.get(writer.events_url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        assert "Content-Encoding" not in response.headers
        assert "Content-Length" not in response.headers
        first = await response.content.readany()
        assert first == b"retry: %d\n\n" % settings.retry_milliseconds


async def test_compression_is_never_applied(client: Client, writer_factory: WriterFactory) -> None:
    writer = await writer_factory()
    await writer.tokens(3)
    async with client.get(writer.events_url, headers={"Accept-Encoding": "gzip"}) as response:
        assert "Content-Encoding" not in response.headers
        assert b"event: done" in await response.read()


@ON_EVERY_BACKEND
async def test_a_finished_generation_is_served_whole_and_the_response_ends(
    client: Client, writer_factory: WriterFactory
) -> None:
    writer = await writer_factory()
    await writer.append(events.Started(model="sim"))
    written = [events.Started(model="sim"), *await writer.tokens(3)]
    async with client.get(writer.events_url) as response:
        stream = Stream(response)
        messages = await stream.rest()
    assert as_events(messages) == list(enumerate(written, start=1))
    assert [m.event for m in messages] == ["started", "token", "token", "token", "done"]
    assert stream.raw.endswith(
        b'id: 5\nevent: done\ndata: {"type":"done","reason":"stop","usage":{}}\n\n'
    )


async def test_a_finished_generation_is_read_without_its_live_channel(
    client: Client, writer_factory: WriterFactory, app: web.Application, log: GenerationLog
) -> None:
    pubsub = app[HUB].pubsub
    assert isinstance(pubsub, PubSubConnection)
    running = await writer_factory()
    async with client.get(running.events_url) as response:
        await response.content.readany()
        await until_subscriptions(app, 1)
        assert log.keys.live_channel(running.generation_id).encode() in pubsub.channels
    finished = await writer_factory()
    written = await finished.tokens(3)
    status, messages = await read_all(client, finished.events_url)
    assert (status, as_events(messages)) == (200, list(enumerate(written, start=1)))
    # Nothing follows its terminal event: its stream did not wait for a SUBSCRIBE.
    assert log.keys.live_channel(finished.generation_id).encode() not in pubsub.channels


async def test_an_open_stream_keeps_no_page_it_has_handed_out(
    client: Client, writer_factory: WriterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thousands of idle streams each holding the pages they were sent would be
    # thousands of pages.
    pages: list[weakref.ref[asyncio.Future[Page]]] = []
    read_page = Hub.read_page

    def recorded(hub: Hub, *args: Any) -> asyncio.Future[Page]:
        page = read_page(hub, *args)
        pages.append(weakref.ref(page))
        return page

    monkeypatch.setattr(Hub, "read_page", recorded)
    writer = await writer_factory()
    await writer.append(events.Token(text="early"))  # in the page read beside the state
    async with client.get(writer.events_url) as response:
        stream = Stream(response)
        assert [m.id for m in await stream.take(1)] == ["1"]
        await writer.append(events.Token(text="later"))
        assert [m.id for m in await stream.take(1)] == ["2"]
        gc.collect()
        assert pages
        assert [page() for page in pages] == [None] * len(pages)


@ON_EVERY_BACKEND
async def test_live_events_reach_a_connected_client(
    client: Client, writer_factory: WriterFactory, app: web.Application
) -> None:
    writer = await writer_factory()
    async with client.get(writer.events_url) as response:
        stream = Stream(response)
        await stream.next_chunk()  # retry frame
        await until_subscriptions(app, 1)
        for i in range(5):
            await writer.append(events.Token(text=str(i)))
            [message] = await stream.take(1)
            assert (message.id, message.data) == (str(i + 1), f'{{"type":"token","text":"{i}"}}')
        await writer.append(events.Done(reason="stop"))
        assert [m.event for m in await stream.rest()] == ["done"]


async def test_position_from_header_query_and_header_wins(
    client: Client, writer_factory: WriterFactory
) -> None:
    writer = await writer_factory()
    await writer.tokens(5)
    _, from_header = await read_all(client, writer.events_url, headers={"Last-Event-ID": "3"})
    _, from_query = await read_all(client, writer.events_url + "?last_event_id=3")
    _, both = await read_all(
        client, writer.events_url + "?last_event_id=1", headers={"Last-Event-ID": "3"}
    )
    assert [m.id for m in from_header] == ["4", "5", "6"]
    assert from_query == from_header == both


@pytest.mark.parametrize("position", ["-1", "abc", "1.5", "9" * 19, "0x10", "\uff11"])
async def test_malformed_position_is_400(
    client: Client, writer_factory: WriterFactory, position: str
) -> None:
    writer = await writer_factory()
    for field, kwargs in (
        ("Last-Event-ID", {"headers": {"Last-Event-ID": position}}),
        ("last_event_id", {"params": {"last_event_id": position}}),
    ):
        async with client.get(writer.events_url, **kwargs) as response:  # type: ignore[arg-type]
            assert response.status == 400
            error = (await response.json())["error"]
            assert error["field"] == field
            # Non-ASCII in any query parameter is refused before the route reads it.
            printable = position.isascii() or field == "Last-Event-ID"
            assert error["code"] == ("invalid_position" if printable else "invalid_query")


@ON_EVERY_BACKEND
async def test_204_at_the_terminal_event_and_a_reset_past_it(
    client: Client, writer_factory: WriterFactory
) -> None:
    writer = await writer_factory()
    await writer.tokens(2)  # seqs 1, 2 and done at 3
    status, _ = await read_all(client, writer.events_url, headers={"Last-Event-ID": "3"})
    assert status == 204
    status, messages = await read_all(client, writer.events_url, headers={"Last-Event-ID": "2"})
    assert (status, [m.event for m in messages]) == (200, ["done"])
    # Past the end of a finished log, a client holds events the log never had (it went
    # back): it must drop them all and read the log again, never stop holding them.
    for position in ("4", "1000"):
        status, messages = await read_all(
            client, writer.events_url, headers={"Last-Event-ID": position}
        )
        assert status == 200
        assert [(m.event, m.id) for m in messages] == [
            ("reset", "0"),
            ("token", "1"),
            ("token", "2"),
            ("done", "3"),
        ]
        assert json.loads(messages[0].data) == {"type": "reset", "from_seq": 1}


@ON_EVERY_BACKEND
async def test_unknown_is_404_expired_is_410(
    client: Client,
    writer_factory: WriterFactory,
    store_redis: Redis | RedisCluster,
    log: GenerationLog,
) -> None:
    async with client.get("/v1/generations/AAAAAAAAAAAAAAAAAAAAAA/events") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "generation_not_found"
    writer = await writer_factory()
    await writer.tokens(2)
    await store_redis.delete(log.keys.log(writer.generation_id))  # retention expired the log
    async with client.get(writer.events_url) as response:
        assert response.status == 410
        assert (await response.json())["error"]["code"] == "generation_expired"
    status = await (await client.get(f"/v1/generations/{writer.generation_id}")).json()
    assert status["expired"] is True


async def test_gap_when_retention_trimmed_what_was_asked_for(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis
) -> None:
    settings = settings.replace(max_events_per_generation=100)
    log = GenerationLog(redis, settings)
    from app.http import create_app

    client = await aiohttp_client(create_app(settings, redis))
    writer = await Writer.start(log)
    for _ in range(10):
        await writer.tokens(100, done=False)
    await writer.append(events.Done(reason="stop"))
    first = await log.first_seq(writer.generation_id)
    assert first is not None
    assert first > 2

    async with client.get(writer.events_url, headers={"Last-Event-ID": "1"}) as response:
        stream = Stream(response)
        messages = await stream.rest()
    gap, *rest = messages
    assert gap.event == "gap"
    assert gap.data == f'{{"requested":2,"first_available":{first}}}'
    assert b"event: gap\ndata: " in stream.raw
    assert not stream.raw.split(b"event: gap")[0].endswith(b"\nid: ")  # the gap has no id
    assert [int(m.id or 0) for m in rest] == list(range(first, 1002))
    # After the gap the client's position is unchanged until the next real event.
    assert gap.id is None


async def test_resume_from_every_position_of_a_finished_generation(
    client: Client, writer_factory: WriterFactory
) -> None:
    writer = await writer_factory()
    written = await writer.tokens(30)
    whole = list(enumerate(written, start=1))
    for position in range(len(written)):
        _, messages = await read_all(
            client, writer.events_url, headers={"Last-Event-ID": str(position)}
        )
        assert as_events(messages) == whole[position:]


async def read_interrupted(
    client: Client, url: str, cuts: list[int]
) -> list[tuple[int, events.Event]]:
    """Read in several connections, each dropped after `cut` events; resume like a browser."""
    received: list[tuple[int, events.Event]] = []
    last_id = ""
    for cut in [*cuts, 10**9]:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        async with client.get(url, headers=headers) as response:
            if response.status == 204:
                break
            stream = Stream(response)
            taken = await stream.take(cut)
        received.extend(as_events(taken))
        if taken:
            last_id = taken[-1].id or last_id
        if received and isinstance(received[-1][1], events.Done):
            break
    return received


async def test_interrupted_reads_of_a_finished_generation_equal_one_read(
    client: Client, writer_factory: WriterFactory
) -> None:
    writer = await writer_factory()
    await writer.tokens(40)
    _, whole = await read_all(client, writer.events_url)
    rng = random.Random(7)
    for _ in range(10):
        cuts = [rng.randint(1, 8) for _ in range(rng.randint(1, 8))]
        assert await read_interrupted(client, writer.events_url, cuts) == as_events(whole)


@ON_EVERY_BACKEND
async def test_interrupted_reads_of_a_live_generation_equal_one_read(
    client: Client, writer_factory: WriterFactory, app: web.Application
) -> None:
    writer = await writer_factory()

    async def produce() -> None:
        for i in range(60):
            await writer.append(events.Token(text=f"{i} "))
            if i % 7 == 0:
                await asyncio.sleep(0.005)  # let readers interleave with the producer
        await writer.append(events.Done(reason="stop"))

    producer = asyncio.create_task(produce())
    rng = random.Random(11)
    readers = [
        read_interrupted(client, writer.events_url, [rng.randint(1, 9) for _ in range(12)])
        for _ in range(4)
    ]
    whole_read = asyncio.create_task(read_all(client, writer.events_url))
    interrupted = await asyncio.gather(*readers)
    _, whole = await whole_read
    await producer
    assert [seq for seq, _ in as_events(whole)] == list(range(1, 62))
    for received in interrupted:
        assert received == as_events(whole)


async def test_heartbeat_while_idle(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis, log: GenerationLog
) -> None:
    from app.http import create_app

    client = await aiohttp_client(create_app(settings.replace(heartbeat_seconds=0.05), redis))
    writer = await Writer.start(log)
    async with client.get(writer.events_url) as response:
        stream = Stream(response)
        while stream.raw.count(b": keep-alive\n\n") < 3:
            await stream.next_chunk()
        await writer.append(events.Token(text="after"), events.Done(reason="stop"))
        assert [m.event for m in await stream.rest()] == ["token", "done"]


@ON_EVERY_BACKEND
async def test_client_disconnect_releases_everything(
    client: Client, writer_factory: WriterFactory, app: web.Application
) -> None:
    writer = await writer_factory()
    streams = []
    for _ in range(3):
        response = await client.get(writer.events_url)
        await response.content.readany()
        streams.append(response)
    await until_subscriptions(app, 3)
    for response in streams:
        response.close()
    await until_subscriptions(app, 0)
    # The feed lingers briefly for reconnects, then the channel is dropped.
    assert app[HUB].subscription_count == 0


@ON_EVERY_BACKEND
async def test_slow_client_falls_back_to_the_log_and_gets_everything(
    aiohttp_client: ClientFactory,
    settings: Settings,
    store_redis: Redis | RedisCluster,
    log: GenerationLog,
) -> None:
    from app.http import create_app

    app = create_app(settings.replace(client_buffer_events=4), store_redis)
    client = await aiohttp_client(app)
    writer = await Writer.start(log)
    async with client.get(writer.events_url) as response:
        stream = Stream(response)
        await stream.next_chunk()
        await until_subscriptions(app, 1)
        # Far more than the buffer arrives while the client reads nothing.
        for i in range(50):
            await writer.append(*[events.Token(text=f"{i}.{j}") for j in range(10)])
        await writer.append(events.Done(reason="stop"))
        messages = await stream.rest()
    assert [int(m.id or 0) for m in messages] == list(range(1, 502))


async def test_a_stuck_client_is_disconnected_and_counted(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis, log: GenerationLog
) -> None:
    from app.http import create_app

    app = create_app(settings.replace(write_timeout_seconds=0.3), redis)
    client = await aiohttp_client(app)
    writer = await Writer.start(log)
    big = "x" * 65536
    async with client.get(writer.events_url) as response:
        await response.content.readany()  # the stream is open; from now on it reads nothing
        await until_subscriptions(app, 1)
        samples = samples_by_name(await (await client.get("/metrics")).read())
        assert samples["tokentape_active_streams"][0].value == 1
        # Far more than the socket buffers hold on both ends.
        for _ in range(40):
            await writer.append(*[events.Token(text=big)] * 10)
        await until_subscriptions(app, 0)  # the server let go of it
    samples = samples_by_name(await (await client.get("/metrics")).read())
    assert samples["tokentape_slow_client_disconnects_total"][0].value == 1
    assert samples["tokentape_active_streams"][0].value == 0


async def test_every_reader_gets_the_last_events_before_any_stream_ends(
    client: Client,
    writer_factory: WriterFactory,
    app: web.Application,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ending a stream costs log lines, a span and a close: done for one reader before the
    # others wrote the last batch, it would hold their last events back.
    order: list[str] = []
    write, end = StreamConnection.write, StreamConnection.end

    def recording_write(self: StreamConnection, data: bytes, *, last: bool = False) -> None:
        if b"event: done" in data:
            order.append("last batch")
        write(self, data, last=last)

    def recording_end(self: StreamConnection, *, keep_alive: bool) -> None:
        order.append("end")
        end(self, keep_alive=keep_alive)

    monkeypatch.setattr(StreamConnection, "write", recording_write)
    monkeypatch.setattr(StreamConnection, "end", recording_end)
    writer = await writer_factory()
    readers = 5
    responses = [await client.get(writer.events_url) for _ in range(readers)]
    try:
        # A stream that got the first token reads live: the last batch reaches all at once.
        await writer.append(events.Token(text="first"))
        streams = [Stream(response) for response in responses]
        for stream in streams:
            assert [m.event for m in await stream.take(1)] == ["token"]
        await writer.tokens(2)
        for stream in streams:
            assert [m.event for m in await stream.rest()][-1] == "done"
    finally:
        for response in responses:
            response.release()
    assert order == ["last batch"] * readers + ["end"] * readers
