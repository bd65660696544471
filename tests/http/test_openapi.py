"""`/openapi.json` describes every endpoint from the structs the code uses, and a
schemathesis fuzz run from it against a real `tokentape serve` (with a worker, on the
test Redis), with and without a valid API key, finds no 5xx, no hang and no response
that breaks its own schema. The Durable Streams routes are left out of the run: their
public conformance suite tests them (tests/durable_streams/test_conformance.py)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import schemathesis
from redis.asyncio import Redis

from app.embedded import free_port
from app.errors import LimitExceeded, NotFound, Unauthorized
from app.generations import GenerationRequest
from app.http import create_app
from app.http.openapi import ErrorBody, build
from app.settings import Settings
from tests.cli.test_serve import ROOT, SERVING
from tests.conftest import REDIS_URL
from tests.http.conftest import Client, ClientFactory

KEY = "key-a-0123456789abcdef"
SECRET = "s" * 32
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# Examples per operation and phase: enough to reach every branch of the routes'
# validation, few enough that both runs take well under a minute on two cores.
EXAMPLES = 15
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
)


async def test_every_route_is_described(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis
) -> None:
    app = create_app(settings.replace(api_keys=KEY, secret=SECRET), redis)
    client = await aiohttp_client(app)
    document = await (await client.get("/openapi.json")).json()
    assert document["openapi"] == "3.1.0"
    described = {
        (path.replace("{name}", "{name:.+}"), method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "head")
    }
    served = {
        (route.resource.canonical, route.method)
        for route in app.router.routes()
        if route.resource is not None and route.method not in ("HEAD", "OPTIONS")
    }
    served -= {("/", "GET"), ("/static", "GET")}  # the demo page and its scripts
    assert {(path, method) for path, method in served if "/v1/stream" not in path} <= described
    assert ("/v1/stream/{name:.+}", "GET") in described
    events = document["paths"]["/v1/generations/{id}/events"]["get"]["responses"]
    assert list(events["200"]["content"]) == ["text/event-stream"]
    schemathesis.openapi.from_dict(document)  # a valid OpenAPI document


def test_bodies_are_the_structs_schemas() -> None:
    document = build(Settings(max_messages=7), secured=True)
    schemas = document["components"]["schemas"]
    _, own = msgspec.json.schema_components(
        [GenerationRequest], ref_template="#/components/schemas/{name}"
    )
    request = dict(schemas["GenerationRequest"]["properties"])
    assert request.pop("messages")["maxItems"] == 7
    expected = dict(own["GenerationRequest"]["properties"])
    del expected["messages"]
    request["tools"]["anyOf"][0].pop("maxItems")
    assert request == expected
    for error in (
        NotFound("generation_not_found", "no generation x"),
        Unauthorized("token_expired", "expired", invalid_token=True),
        LimitExceeded("too_many_running", "m", setting="S", limit=1, retry_after=5),
    ):
        msgspec.convert(error.body(), ErrorBody)


def test_security_follows_the_settings() -> None:
    open_document = build(Settings(), secured=False)
    assert "securitySchemes" not in open_document["components"]
    secured = build(Settings(), secured=True)
    create = secured["paths"]["/v1/generations"]["post"]
    assert create["security"] == [{"apiKey": []}]


@pytest.fixture
async def fuzz_target(key_prefix: str, redis: Redis) -> AsyncIterator[str]:
    """`tokentape serve --with-worker` with API keys, its URL; generations end within a
    second (a sim is short, a provider model is refused at once by the server itself),
    so the events of every generation the fuzzer creates end too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENTAPE_")}
    port = _free_port()
    provider = f"http://127.0.0.1:{port}/no-provider"
    env.update(
        PYTHONPATH=str(ROOT),
        TOKENTAPE_KEY_PREFIX=key_prefix,
        TOKENTAPE_API_KEYS=KEY,
        TOKENTAPE_SECRET=SECRET,
        TOKENTAPE_MAX_SIM_SECONDS="1",
        TOKENTAPE_LOG_LEVEL="WARNING",
        OPENAI_BASE_URL=provider,
        ANTHROPIC_BASE_URL=provider,
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "serve", "--with-worker",
        "--redis", REDIS_URL, "--port", str(port),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        match = SERVING.match(line)
        assert match is not None, line
        yield match.group(1).decode()
    finally:
        process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        # Nothing the fuzzer sent may put an ERROR (or a traceback) in the log.
        assert b'"level":"error"' not in stderr, stderr.decode()[-4000:]
        assert b"Traceback" not in stderr, stderr.decode()[-4000:]


def _free_port() -> int:
    return free_port("127.0.0.1")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("credentials", ["none", "api-key"])
async def test_a_fuzz_run_finds_no_server_error_hang_or_schema_violation(
    fuzz_target: str, tmp_path: Path, credentials: str
) -> None:
    auth = ["-H", f"Authorization: Bearer {KEY}"] if credentials == "api-key" else []
    run = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS), "run", f"{fuzz_target}/openapi.json",
        "--max-examples", str(EXAMPLES),
        "--exclude-path-regex", "^/v1/stream/",
        "--checks", CHECKS,
        # A response (an event stream included) that takes longer is a hang.
        "--request-timeout", "10",
        "--workers", "2",
        "--generation-database", "none",
        "--no-color",
        *auth,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(run.communicate(), 150)
    report = output.decode()
    assert run.returncode == 0, report[-6000:]
    assert " passed" in report


async def test_the_served_document_is_the_built_one(client: Client) -> None:
    served: dict[str, Any] = await (await client.get("/openapi.json")).json()
    assert served == msgspec.json.decode(msgspec.json.encode(build(Settings(), secured=False)))
