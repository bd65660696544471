"""`?format=ai-sdk` on a real Redis, read by the `ai` package's own parser (pinned in
ai_sdk_parser/): the message it assembles is the generation, from the start and resumed
after any cut."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from app import events
from app.embedded import RedisProcess
from app.http import create_app
from app.settings import Settings
from app.store import GenerationLog
from tests.http.conftest import Client, ClientFactory, Stream, Writer, until_subscriptions

WriterFactory = Callable[..., Awaitable[Writer]]

PARSER_DIR = Path(__file__).resolve().parent / "ai_sdk_parser"
PARSER_FILES = ("package.json", "package-lock.json")


def ui_url(writer: Writer) -> str:
    return writer.events_url + "?format=ai-sdk"


async def read_chunks(client: Client, url: str, **kwargs: Any) -> tuple[list[Any], bytes]:
    async with client.get(url, **kwargs) as response:
        assert response.status == 200
        stream = Stream(response)
        messages = await stream.rest()
    return [m.data if m.data == "[DONE]" else json.loads(m.data) for m in messages], stream.raw


async def test_headers_say_the_protocol_and_the_answer_ends_with_done(
    client: Client, writer_factory: WriterFactory, settings: Settings
) -> None:
    writer = await writer_factory()
    await writer.append(events.Started(model="sim"), events.Token(text="Hi"))
    await writer.append(events.Done(reason="stop"))
    async with client.get(ui_url(writer)) as response:
        assert response.status == 200
        assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["X-Accel-Buffering"] == "no"
        body = await response.read()
    assert body == (
        b"retry: %d\n\n" % settings.retry_milliseconds
        + b'data: {"type":"start","messageId":"%s"}\n\n' % writer.generation_id.encode()
        + b'id: 1\ndata: {"type":"start-step"}\n\n'
        b'data: {"type":"text-start","id":"text-2"}\n\n'
        b'id: 2\ndata: {"type":"text-delta","id":"text-2","delta":"Hi"}\n\n'
        b'data: {"type":"text-end","id":"text-2"}\n\n'
        b'data: {"type":"finish-step"}\n\n'
        b'id: 3\ndata: {"type":"finish","finishReason":"stop"}\n\n'
        b"data: [DONE]\n\n"
    )


async def test_live_events_reach_a_connected_client_in_this_format(
    client: Client, writer_factory: WriterFactory, app: web.Application
) -> None:
    writer = await writer_factory()
    async with client.get(ui_url(writer)) as response:
        stream = Stream(response)
        await stream.next_chunk()  # retry frame
        await until_subscriptions(app, 1)
        await writer.append(events.Token(text="a"))
        start, step, text_start, delta = await stream.take(4)
        assert [json.loads(m.data)["type"] for m in (start, step, text_start)] == [
            "start",
            "start-step",
            "text-start",
        ]
        assert (delta.id, json.loads(delta.data)["delta"]) == ("1", "a")
        await writer.append(events.Token(text="b"))
        [delta] = await stream.take(1)
        assert (delta.id, json.loads(delta.data)["delta"]) == ("2", "b")
        await writer.append(events.Done(reason="stop"))
        assert [m.data for m in await stream.rest()][-1] == "[DONE]"


async def test_resuming_in_an_open_text_part_continues_it(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis, log: GenerationLog
) -> None:
    # Pages of 2: the state before the position is read from the log in several pages.
    client = await aiohttp_client(create_app(settings.replace(catch_up_page_size=2), redis))
    writer = await Writer.start(log)
    await writer.append(events.Started(), *[events.Token(text=f"{i} ") for i in range(5)])
    await writer.append(events.Done(reason="stop"))
    resumed, _ = await read_chunks(client, ui_url(writer), headers={"Last-Event-ID": "4"})
    assert resumed == [
        {"type": "text-delta", "id": "text-2", "delta": "3 "},
        {"type": "text-delta", "id": "text-2", "delta": "4 "},
        {"type": "text-end", "id": "text-2"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
        "[DONE]",
    ]
    from_query, _ = await read_chunks(client, ui_url(writer) + "&last_event_id=4")
    assert from_query == resumed


async def test_format_is_checked_and_the_end_is_204(
    client: Client, writer_factory: WriterFactory
) -> None:
    writer = await writer_factory()
    await writer.tokens(1)  # a token, then done at 2
    async with client.get(writer.events_url + "?format=vercel") as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert (error["code"], error["field"]) == ("invalid_format", "format")
    async with client.get(ui_url(writer), headers={"Last-Event-ID": "2"}) as response:
        assert (
            response.status == 204
        )  # what the SDK's reconnectToStream reads as "nothing to resume"


async def test_a_retention_gap_is_a_transient_data_part(
    client: Client, writer_factory: WriterFactory, redis: Redis, log: GenerationLog
) -> None:
    writer = await writer_factory()
    await writer.tokens(3)
    await redis.xdel(log.keys.log(writer.generation_id), "1-0", "2-0")
    received, raw = await read_chunks(client, ui_url(writer))
    assert received[0] == {
        "type": "data-gap",
        "data": {"requested": 1, "first_available": 3},
        "transient": True,
    }
    assert [c["type"] for c in received[1:-1]] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    assert b'"data-gap"' in raw.split(b"\nid: ")[0]  # before any id: the position does not move


async def test_redis_down_before_the_stream_is_a_503_the_sdk_reports(
    aiohttp_client: ClientFactory,
    settings: Settings,
    redis_server_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_server_factory()
    redis = Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
    client = await aiohttp_client(create_app(settings, redis))
    writer = await Writer.start(GenerationLog(redis, settings))
    server.kill()
    async with client.get(ui_url(writer)) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["error"]["code"] == "unavailable"
    await redis.aclose()


# -- the `ai` package's own parser ------------------------------------------------------


def parser_dir() -> Path:
    """The pinned `ai` package, installed once per lockfile into a cache folder."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("the AI SDK's parser runs on Node.js: node and npm not found")
    digest = hashlib.sha256(b"".join((PARSER_DIR / f).read_bytes() for f in PARSER_FILES))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokentape"
    installed = cache / f"ai-sdk-parser-{digest.hexdigest()[:16]}"
    if not (installed / "node_modules").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=cache, prefix=f"{installed.name}."))
        for name in PARSER_FILES:
            shutil.copy(PARSER_DIR / name, scratch / name)
        npm = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert npm.returncode == 0, npm.stdout + npm.stderr
        try:
            scratch.rename(installed)
        except OSError:  # installed meanwhile by another run
            shutil.rmtree(scratch)
    return installed


async def read_with_the_sdk(base_url: str, writer: Writer) -> dict[str, Any]:
    """Run read_generation.mjs, beside the installed packages (node resolves them upwards)."""
    installed = parser_dir()
    with tempfile.TemporaryDirectory(dir=installed) as run:
        script = Path(run) / "read_generation.mjs"
        shutil.copy(PARSER_DIR / script.name, script)
        node = await asyncio.create_subprocess_exec(
            "node",
            str(script),
            base_url + ui_url(writer),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await node.communicate()
    assert node.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


def text_of(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


def tool_calls_of(message: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    return [
        (p["type"], p["toolCallId"], p["state"], p["input"])
        for p in message["parts"]
        if p["type"].startswith("tool-")
    ]


TEXT = ["## Plan\n", "Look", "ing up **bo", "th**", " cities.\n"]


async def test_the_sdk_assembles_the_generation_from_the_start_and_after_any_cut(
    client: Client, writer_factory: WriterFactory
) -> None:
    writer = await writer_factory()
    await writer.append(events.Started(model="sim"), *[events.Token(text=t) for t in TEXT[:3]])
    await writer.append(events.Started(model="sim", attempt=2))  # a takeover mid-text
    await writer.append(
        *[events.Token(text=t) for t in TEXT[3:]],
        events.ToolCallDelta(index=0, id="call_a", name="get_weather"),
        events.ToolCallDelta(index=0, arguments_delta='{"city": "Pa'),
        events.ToolCallDelta(index=1, id="call_b", name="get_weather"),
        events.ToolCallDelta(index=0, arguments_delta='ris"}'),
        events.ToolCallDelta(index=1, arguments_delta='{"city": "Oslo", "unit": "celsius"}'),
        events.ToolCall(index=0, id="call_a", name="get_weather", arguments={"city": "Paris"}),
        events.ToolCall(
            index=1,
            id="call_b",
            name="get_weather",
            arguments={"city": "Oslo", "unit": "celsius"},
        ),
        events.Done(reason="tool_calls"),
    )
    result = await read_with_the_sdk(str(client.make_url("")).rstrip("/"), writer)

    replay = result["replay"]
    assert replay["errors"] == []
    message = replay["message"]
    assert (message["id"], message["role"]) == (writer.generation_id, "assistant")
    assert text_of(message) == "".join(TEXT)
    assert [p["type"] for p in message["parts"]] == [
        "step-start",
        "text",
        "tool-get_weather",
        "tool-get_weather",
    ]
    assert message["parts"][1]["state"] == "done"
    assert tool_calls_of(message) == [
        ("tool-get_weather", "call_a", "input-available", {"city": "Paris"}),
        ("tool-get_weather", "call_b", "input-available", {"city": "Oslo", "unit": "celsius"}),
    ]
    assert replay["finishReason"] == "tool-calls"

    # A cut after every SSE message, in the text, in each tool call's arguments, before
    # and after the finish: each resumed reader ends with the very same message.
    assert len(result["resumed"]) == result["messages"] - 1 > 15
    for resumed in result["resumed"]:
        assert (resumed["cut"], resumed["errors"]) == (resumed["cut"], [])
        assert (resumed["cut"], resumed["message"]) == (resumed["cut"], message)
        assert resumed["finishReason"] == "tool-calls"
    assert {r["resumedAfter"] for r in result["resumed"]} >= {None, "1", "2", "6", "9", "13"}


@pytest.mark.parametrize(
    ("terminal", "errors", "finish_reason", "abort_reason"),
    [
        (
            events.Error(code="worker_lost", message="the worker was lost; retry"),
            ["worker_lost: the worker was lost; retry"],
            "error",
            None,
        ),
        (events.Done(reason="cancelled"), [], None, "cancelled"),
    ],
    ids=["error", "cancelled"],
)
async def test_the_sdk_reads_an_error_and_a_cancel(
    client: Client,
    writer_factory: WriterFactory,
    terminal: events.Event,
    errors: list[str],
    finish_reason: str | None,
    abort_reason: str | None,
) -> None:
    writer = await writer_factory()
    await writer.append(events.Started(), events.Token(text="Half an ans"), terminal)
    result = await read_with_the_sdk(str(client.make_url("")).rstrip("/"), writer)
    for reader in [result["replay"], *result["resumed"]]:
        assert reader["errors"] == errors
        assert (reader["finishReason"], reader["abortReason"]) == (finish_reason, abort_reason)
        assert reader["message"]["parts"] == [
            {"type": "step-start"},
            {"type": "text", "text": "Half an ans", "state": "done"},
        ]
