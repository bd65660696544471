"""ops/nginx/tokentape.conf for real: streaming unbuffered, moving past refused readers, and
never answering an EventSource with anything but 200 while no reader can."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from app import sse
from app.events import TERMINAL_TYPES
from app.settings import Settings
from tests.browser.conftest import TokentapeProcess
from tests.conftest import REDIS_URL, free_port
from tests.ops.conftest import NGINX, NO_NGINX, Nginx, main_config

pytestmark = pytest.mark.skipif(NGINX is None, reason=NO_NGINX)

StartNginx = Callable[[Sequence[int]], Nginx]

FIRST = b'id: 1\nevent: token\ndata: {"type":"token","text":"Hello"}\n\n'
LAST = b'id: 2\nevent: done\ndata: {"type":"done","reason":"stop"}\n\n'


def test_site_config_is_valid(tmp_path: Path) -> None:
    assert NGINX is not None
    config = main_config(tmp_path, free_port(), [free_port(), free_port()])
    result = subprocess.run(
        [NGINX, "-t", "-q", "-c", str(config), "-p", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


class SlowStream:
    """An SSE upstream that sends one event, then waits for `release` before the last."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.requests = 0

    async def events(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        # Deliberately no X-Accel-Buffering header: the site config alone must stream.
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(FIRST)
        await self.release.wait()
        await response.write(LAST)
        await response.write_eof()
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[SlowStream, int]]:
    stream = SlowStream()
    app = web.Application()
    app.router.add_get("/v1/generations/{id}/events", stream.events)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    yield stream, port
    stream.release.set()
    await runner.cleanup()


async def test_first_event_passes_through_before_the_stream_ends(
    upstream: tuple[SlowStream, int], start_nginx: StartNginx
) -> None:
    stream, port = upstream
    nginx = start_nginx([port])
    url = f"{nginx.url}/v1/generations/g1/events"
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(url, headers={"Accept-Encoding": "gzip"}) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert "Content-Encoding" not in response.headers
        received = b""
        async with asyncio.timeout(5):
            while not received.endswith(b"\n\n"):
                received += await response.content.readany()
        # The upstream is still holding its last event back: nothing was buffered.
        assert not stream.release.is_set()
        assert received == FIRST
        stream.release.set()
        async with asyncio.timeout(5):
            rest = await response.content.read()
        assert rest == LAST


async def test_a_reader_that_refuses_connections_is_passed_over(
    upstream: tuple[SlowStream, int], start_nginx: StartNginx
) -> None:
    stream, port = upstream
    stream.release.set()
    # Round robin hands nginx the refusing reader for one of the first two requests.
    nginx = start_nginx([free_port(), port])
    async with aiohttp.ClientSession() as session:
        for attempt in range(4):
            async with session.get(f"{nginx.url}/v1/generations/g{attempt}/events") as response:
                assert response.status == 200
                assert await response.read() == FIRST + LAST
    assert stream.requests == 4


async def test_with_no_reader_up_the_events_answer_is_a_200_stream_that_says_retry(
    start_nginx: StartNginx,
) -> None:
    nginx = start_nginx([free_port(), free_port()])
    url = f"{nginx.url}/v1/generations/g1/events"
    # Twice: first every reader refuses, then nginx has left them all out ("no live upstreams").
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for _ in range(2):
            async with session.get(
                url, headers={"Accept-Encoding": "gzip", "Last-Event-ID": "7"}
            ) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "text/event-stream"
                assert response.headers["Cache-Control"] == "no-cache"
                assert "Content-Encoding" not in response.headers
                parser = sse.Parser()
                assert parser.feed(await response.read()) == []
        # No event and no id: the browser keeps its Last-Event-ID and comes back after
        # the delay tokentape's readers would have told it.
        assert parser.last_event_id is None
        assert parser.retry == Settings().retry_milliseconds
        assert parser.comments


class EventSourceClient:
    """Reads a generation as a browser EventSource does.

    After a stream ends or breaks it reconnects with `Last-Event-ID` once the
    server's `retry:` delay has passed; on any status but 200 or a content type but
    text/event-stream it gives up for good. It stops at the terminal event.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str, midway: int) -> None:
        self.session = session
        self.url = url
        self.ids: list[int] = []
        self.types: list[str] = []
        self.statuses: list[int] = []
        self.midway = asyncio.Event()  # set once `midway` events have arrived
        self._midway = midway

    async def run(self) -> None:
        retry_seconds = 1.0
        while True:
            headers = {"Last-Event-ID": str(self.ids[-1])} if self.ids else {}
            parser = sse.Parser()  # an event cut off with its connection is dropped
            try:
                async with self.session.get(self.url, headers=headers) as response:
                    self.statuses.append(response.status)
                    if response.status != 200 or response.content_type != "text/event-stream":
                        return
                    async for chunk in response.content.iter_any():
                        for message in parser.feed(chunk):
                            assert message.id is not None, message
                            self.ids.append(int(message.id))
                            self.types.append(message.event)
                            if len(self.ids) >= self._midway:
                                self.midway.set()
                            if message.event in TERMINAL_TYPES:
                                return
            except aiohttp.ClientError:
                pass  # the connection broke mid-stream: reconnect, as a browser does
            if parser.retry is not None:
                retry_seconds = parser.retry / 1000
            # The protocol's reconnection delay, not a stand-in for an event.
            await asyncio.sleep(retry_seconds)


async def create_generation(session: aiohttp.ClientSession, base_url: str, tokens: int) -> str:
    body = {
        "model": "sim",
        "messages": [{"role": "user", "content": "hi"}],
        "sim": {"tokens": tokens, "tokens_per_second": 25},
    }
    async with session.post(f"{base_url}/v1/generations", json=body) as response:
        assert response.status == 201, await response.text()
        generation_id: str = (await response.json())["id"]
        return generation_id


async def test_every_client_ends_with_each_event_once_when_a_reader_is_killed_mid_stream(
    start_process: Callable[..., TokentapeProcess], start_nginx: StartNginx
) -> None:
    ports = [free_port(), free_port()]
    for _ in range(2):
        start_process("worker", "--redis", REDIS_URL)
    readers = [start_process("serve", "--redis", REDIS_URL, "--port", str(p)) for p in ports]
    nginx = start_nginx(ports)
    async with aiohttp.ClientSession() as session:
        generations = [await create_generation(session, nginx.url, tokens=100) for _ in range(3)]
        clients = [
            EventSourceClient(session, f"{nginx.url}/v1/generations/{g}/events", midway=5)
            for g in generations
            for _ in range(2)
        ]
        reading = [asyncio.create_task(client.run()) for client in clients]
        async with asyncio.timeout(20):
            await asyncio.gather(*(client.midway.wait() for client in clients))
        readers[0].kill()
        async with asyncio.timeout(30):
            await asyncio.gather(*reading)
        last_seqs = {}
        for generation_id in generations:
            async with session.get(f"{nginx.url}/v1/generations/{generation_id}") as response:
                status = await response.json()
            assert status["status"] == "done"
            last_seqs[generation_id] = status["last_seq"]

    # Round robin put some of the six streams on the killed reader.
    assert any(len(client.statuses) > 1 for client in clients)
    for generation_id, client in zip(
        [g for g in generations for _ in range(2)], clients, strict=True
    ):
        assert set(client.statuses) == {200}
        assert client.ids == list(range(1, last_seqs[generation_id] + 1))
        assert client.types[-1] == "done"
