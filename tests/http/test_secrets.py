"""API keys, read tokens and the secret never reach a log line, a span or a metric: a run
of requests that use them, on a reader as `tokentape serve` runs it, then a search of
everything it recorded."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from app.access import Signer
from app.http import create_app
from app.http.server import ServiceRunner
from app.settings import Settings
from app.store import GenerationLog
from app.telemetry import Telemetry
from app.telemetry.logs import JsonFormatter, TraceContextFilter
from tests.http.conftest import Writer

KEY = "key-a-secret-0123456789"
WRONG_KEY = "key-x-guessed-0123456789"
SECRET = "the-secret-" + "z" * 32


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """Every record of every logger, DEBUG and up, as the JSON lines serve writes."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield text
    root.removeHandler(handler)
    root.setLevel(level)


async def test_keys_tokens_and_the_secret_are_in_no_log_span_or_metric(
    settings: Settings, redis: Redis, log: GenerationLog, log_text: io.StringIO
) -> None:
    spans = InMemorySpanExporter()
    telemetry = Telemetry(span_processors=[SimpleSpanProcessor(spans)])
    secured = settings.replace(api_keys=KEY, secret=SECRET, read_token_seconds=60)
    runner = ServiceRunner(create_app(secured, redis, telemetry), secured)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    key = {"Authorization": f"Bearer {KEY}"}
    secrets_used = [KEY, WRONG_KEY, SECRET]
    try:
        async with aiohttp.ClientSession(base) as session:
            body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post("/v1/generations", json=body, headers=key) as response:
                created = await response.json()
            generation_id, token = created["id"], created["read_token"]
            await (await Writer.start(log, generation_id)).tokens(3)
            expired = Signer(SECRET).mint(generation_id, expires_at=1)
            async with session.post(
                f"/v1/generations/{generation_id}/read-tokens", headers=key
            ) as response:
                fresh = (await response.json())["read_token"]
            secrets_used += [token, expired, fresh, token.rsplit(".", 1)[1]]
            status = f"/v1/generations/{generation_id}"
            for method, path, headers in [
                ("GET", status, key),
                ("GET", status, {"Authorization": f"Bearer {WRONG_KEY}"}),
                ("GET", status, {"Authorization": f"Bearer {token}"}),
                ("POST", f"{status}/cancel", {"Authorization": f"Basic {KEY}"}),
                ("GET", created["events_url"], {}),
                ("GET", f"{status}/events", {"Authorization": f"Bearer {fresh}"}),
                ("GET", f"{status}/events", key),
                ("GET", f"{status}/events?token={expired}", {}),
                ("GET", f"{status}/events?token={token[:-3]}abc", {}),
                ("GET", f"{status}/events?token={token}%0A", {}),
                ("GET", f"/v1/stream/generations/{generation_id}?token={token}", {}),
                ("GET", f"/healthz?token={token}", {}),
                ("GET", f"/nowhere?token={token}", key),
            ]:
                async with session.request(method, path, headers=headers) as response:
                    await response.read()
            # A request aiohttp itself refuses, with the token in its request line.
            reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
            writer.write(
                f"GET /?token={token}&x=\xff HTTP/1.1\r\nHost: t\r\n\r\n".encode("latin-1")
            )
            await reader.read()
            writer.close()
            async with session.get("/metrics") as response:
                metrics = await response.text()
    finally:
        await runner.cleanup()
        telemetry.shutdown()

    logged = log_text.getvalue()
    assert "GET /v1/generations/" in logged  # the access log was captured
    finished = spans.get_finished_spans()
    assert {span.name for span in finished} >= {"POST /v1/generations", "sse read"}
    recorded = {
        "log": logged,
        "spans": "\n".join(span.to_json() for span in finished),
        "metrics": metrics,
    }
    for where, text in recorded.items():
        for secret in secrets_used:
            assert secret not in text, f"{secret[:12]}… is in the {where}"
