"""`GET /openapi.json`: OpenAPI 3.1 for this service as configured.

Request and response bodies are the msgspec structs the routes encode and decode,
turned into JSON Schema by msgspec, so the description cannot drift from the code.
Limits and credentials follow the settings: `maxItems` is TOKENTAPE_MAX_MESSAGES, and
the security requirements appear only when API keys are configured. The Durable
Streams routes (/v1/stream/) are described in brief; their conformance suite tests them.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from app import events
from app.generations import (
    CancelAccepted,
    Created,
    GenerationRequest,
    GenerationStatus,
    ReadTokenGrant,
)
from app.http.health import Health
from app.keys import GENERATION_ID_PATTERN
from app.settings import Settings

routes = web.RouteTableDef()

DOCUMENT = web.AppKey("openapi_document", bytes)
_REF = "#/components/schemas/{name}"
# Surrounding blanks are dropped and an empty position is no position.
_POSITION = {"type": "string", "pattern": "^ *([0-9]{1,18})? *$"}


class ErrorDetail(msgspec.Struct):
    """What went wrong, by a stable code, and what to do; a refusal past a limit also
    names its `setting` and `limit`, one about a body field names the `field`."""

    code: str
    message: str


class ErrorBody(msgspec.Struct):
    """Every error a client sees, with a 4xx (or 503 for a passing fault)."""

    error: ErrorDetail


def _schema(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(name: str, description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _schema(name)}},
    }
    if headers:
        response["headers"] = headers
    return response


# One event of the stream (OpenAPI 3.1 has a text/event-stream `schema` describe each
# event): `data` is the event's JSON, which repeats its type; a `gap` notice has no id.
_SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"enum": sorted([*events.EVENT_TYPES, "gap"])},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [_schema("Event"), _schema("Gap")]},
        },
        "retry": {"type": "integer"},
    },
}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "a malformed id, position, parameter or body field (the error names it)",
        401: "no API key or read token, or one that is not valid here",
        404: "no such generation, or another key's",
        408: "the body did not arrive in time",
        409: "the generation's state does not allow it",
        410: "the generation's events are past retention",
        413: "the body is over TOKENTAPE_MAX_BODY_BYTES",
        415: "a compressed body",
        429: "a per-key quota is spent: retry after Retry-After seconds",
        503: "Redis is not answering: retry",
    }
    responses = {str(status): _json("ErrorBody", meaning[status]) for status in statuses}
    if 401 in statuses:
        responses["401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    if 429 in statuses:
        responses["429"]["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    return responses


def build(settings: Settings, *, secured: bool) -> dict[str, Any]:
    """The OpenAPI document of a service with `settings`; `secured`: API keys are on."""
    (event, *_), components = msgspec.json.schema_components(
        [
            events.Event,
            events.Gap,
            GenerationRequest,
            Created,
            GenerationStatus,
            CancelAccepted,
            ReadTokenGrant,
            ErrorBody,
            Health,
        ],
        ref_template=_REF,
    )
    components["Event"] = {"title": "Event", **event}  # a union: no component of its own
    request = components["GenerationRequest"]["properties"]
    request["messages"]["maxItems"] = settings.max_messages
    request["tools"]["anyOf"][0]["maxItems"] = settings.max_tools
    key: list[dict[str, list[str]]] = [{"apiKey": []}] if secured else []
    reader: list[dict[str, list[str]]] = (
        [{"apiKey": []}, {"readToken": []}, {"readTokenHeader": []}] if secured else []
    )
    generation_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": GENERATION_ID_PATTERN},
    }
    json_body = {"content": {"application/json": {"schema": _schema("GenerationRequest")}}}
    paths: dict[str, Any] = {
        "/v1/generations": {
            "post": {
                "summary": "Start a generation",
                "operationId": "createGeneration",
                "security": key,
                "requestBody": {"required": True, **json_body},
                "responses": {
                    "201": _json(
                        "Created",
                        "created and queued; with API keys, the read token for its events",
                        Location={"schema": {"type": "string"}},
                    ),
                    **_errors(400, 401, 408, 413, 415, 429, 503),
                },
            }
        },
        "/v1/generations/{id}": {
            "get": {
                "summary": "A generation's status",
                "operationId": "getGeneration",
                "security": key,
                "parameters": [generation_id],
                "responses": {
                    "200": _json("GenerationStatus", "its status"),
                    **_errors(400, 401, 404, 503),
                },
            }
        },
        "/v1/generations/{id}/cancel": {
            "post": {
                "summary": "Cancel a generation",
                "operationId": "cancelGeneration",
                "security": key,
                "parameters": [generation_id],
                "responses": {
                    "202": _json("CancelAccepted", "the worker stops it; it ends cancelled"),
                    **_errors(400, 401, 404, 409, 503),
                },
            }
        },
        "/v1/generations/{id}/read-tokens": {
            "post": {
                "summary": "A fresh read token for a generation's events",
                "operationId": "mintReadToken",
                "security": key,
                "parameters": [generation_id],
                "responses": {
                    "200": _json("ReadTokenGrant", "a token, and the events URL carrying it"),
                    **_errors(400, 401, 404, 409, 503),
                },
            }
        },
        "/v1/generations/{id}/events": {
            "get": {
                "summary": "A generation's events as Server-Sent Events, resumable",
                "description": "The stream starts after the position given by Last-Event-ID "
                "(or last_event_id). A passing fault, or a reader at TOKENTAPE_MAX_STREAMS, "
                "answers 200 with `retry:` and a comment, then ends: the client comes back.",
                "operationId": "streamEvents",
                "security": reader,
                "parameters": [
                    generation_id,
                    {"name": "Last-Event-ID", "in": "header", "schema": _POSITION},
                    {"name": "last_event_id", "in": "query", "schema": _POSITION},
                    {
                        "name": "token",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^([!-~]{1,512})?$"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "`id: <seq>`, `event: <type>`, `data: <JSON>` per event; "
                        "ends after the terminal event",
                        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                    },
                    "204": {"description": "the position is at or after the terminal event"},
                    **_errors(400, 401, 404, 410),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process answers (no Redis call)",
                "operationId": "healthz",
                "responses": {"200": _json("Health", "alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Redis answers and the reader is not draining",
                "operationId": "readyz",
                "responses": {
                    "200": _json("Health", "ready"),
                    "503": _json("Health", "draining, or Redis does not answer"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "the metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/v1/stream/{name}": {
            "description": "The Durable Streams protocol (docs/durable-streams.md): create "
            "(PUT), append (POST), read (GET: catch-up, ?live=long-poll, ?live=sse), HEAD, "
            "DELETE. generations/{id} reads a generation's events as a JSON stream, with "
            "its read token or owning API key; other names need an API key. Under "
            "__ds/ are the protocol's subscriptions (__ds/subscriptions/{id}, with "
            "/streams, /callback, /claim, /ack, /release) and the JWKS of their webhooks "
            "(__ds/jwks.json).",
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": {
                "summary": "Read a stream",
                "operationId": "readStream",
                "security": reader,
                "responses": {"200": {"description": "the stream's data after the offset"}},
            },
        },
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "tokentape",
            "version": "1",
            "description": "LLM generations as durable event logs, served as Server-Sent "
            "Events that resume after Last-Event-ID. Security model: docs/security.md.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    if secured:
        document["components"]["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key"},
            "readTokenHeader": {
                "type": "http",
                "scheme": "bearer",
                "description": "a read token (events only)",
            },
            "readToken": {
                "type": "apiKey",
                "in": "query",
                "name": "token",
                "description": "a read token (events only), as events_url carries it",
            },
        }
    return document


def encoded(settings: Settings, *, secured: bool) -> bytes:
    return msgspec.json.encode(build(settings, secured=secured))


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCUMENT], content_type="application/json")
