"""ops/nginx/tokentape.conf for real: nginx in front of an SSE stub must not buffer the stream."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port

SITE = Path(__file__).resolve().parents[2] / "ops" / "nginx" / "tokentape.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
pytestmark = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed (apt-get install nginx; .ci/run installs it as root)",
)

FIRST = b'id: 1\nevent: token\ndata: {"type":"token","text":"Hello"}\n\n'
LAST = b'id: 2\nevent: done\ndata: {"type":"done","reason":"stop"}\n\n'


def main_config(directory: Path, listen: int, upstream: int) -> Path:
    """A minimal nginx.conf around the shipped site, only its addresses changed.

    gzip is on for text/event-stream at the http level, as a careless main config
    might have it, so the site's own `gzip off` is what is tested.
    """
    site = SITE.read_text()
    assert "server 127.0.0.1:8080;" in site
    assert "listen 80;" in site
    site = site.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream};")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    (directory / "tokentape.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""
    config = directory / "nginx.conf"
    config.write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    gzip on;
    gzip_min_length 1;
    gzip_proxied any;
    gzip_types text/event-stream application/json;
    include {directory}/tokentape.conf;
}}
"""
    )
    return config


def test_site_config_is_valid(tmp_path: Path) -> None:
    assert NGINX is not None
    config = main_config(tmp_path, free_port(), free_port())
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

    async def events(self, request: web.Request) -> web.StreamResponse:
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


@pytest.fixture
async def nginx(tmp_path: Path, upstream: tuple[SlowStream, int]) -> AsyncIterator[int]:
    assert NGINX is not None
    listen = free_port()
    config = main_config(tmp_path, listen, upstream[1])
    process = await asyncio.create_subprocess_exec(
        NGINX, "-c", str(config), "-p", str(tmp_path), stderr=asyncio.subprocess.DEVNULL
    )
    try:
        for _ in range(500):
            try:
                with socket.create_connection(("127.0.0.1", listen), timeout=0.1):
                    break
            except OSError:
                if process.returncode is not None:
                    log = (tmp_path / "error.log").read_text()
                    pytest.fail(f"nginx exited: {log}")
                await asyncio.sleep(0.01)
        yield listen
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def test_first_event_passes_through_before_the_stream_ends(
    upstream: tuple[SlowStream, int], nginx: int
) -> None:
    stream, _ = upstream
    url = f"http://127.0.0.1:{nginx}/v1/generations/g1/events"
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
