"""Hostile query parameters and bodies are refused before they reach a Redis key, a log
line or an SSE field: 400 naming the parameter."""

from __future__ import annotations

import pytest

from tests.http.conftest import Client

GENERATION = "AAAAAAAAAAAAAAAAAAAAAA"
ROUTES = [
    f"/v1/generations/{GENERATION}",
    f"/v1/generations/{GENERATION}/events",
    f"/v1/stream/generations/{GENERATION}",
    "/v1/stream/chat",
    "/healthz",
]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("last_event_id", "1\r\nevent: injected"),
        ("token", "abc\ndef"),
        ("token", "nul\x00byte"),
        ("offset", "\x1b[31m"),
        ("last_event_id", "\u0661"),
        ("token", "x" * 1025),
        ("cursor", "\x7f"),
    ],
    ids=["crlf", "lf", "nul", "escape", "non-ascii", "oversized", "del"],
)
async def test_a_hostile_query_parameter_is_400_naming_it(
    client: Client, path: str, name: str, value: str
) -> None:
    response = await client.get(path, params={name: value})
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["code"], error["field"]) == ("invalid_query", name)
    assert value not in await response.text()


async def test_too_many_query_parameters_are_400(client: Client) -> None:
    response = await client.get("/healthz", params={f"p{i}": "1" for i in range(33)})
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_query"
