"""Every error a client sees is JSON, `{"error": {"code", "message", ...}}`, with a 4xx/5xx."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from app.errors import LimitExceeded, TokentapeError
from app.http.state import SETTINGS

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp's own HTTP errors (no route, wrong method, body too large) get codes too.
_HTTP_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "route_not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def json_error(status: int, code: str, message: str, **detail: Any) -> web.Response:
    body = {"error": {"code": code, "message": message, **detail}}
    return web.json_response(body, status=status)


def body_too_large(limit: int) -> LimitExceeded:
    return LimitExceeded(
        "body_too_large",
        f"the body is over {limit} bytes",
        setting="TOKENTAPE_MAX_BODY_BYTES",
        limit=limit,
        status=413,
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TokentapeError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.RequestPayloadError:
        # The body's framing is broken (chunked encoding, Content-Length): the client's.
        return json_error(400, "malformed_body", "the request body is not well framed")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            too_large = body_too_large(request.config_dict[SETTINGS].max_body_bytes)
            return web.json_response(too_large.body(), status=413)
        code = _HTTP_CODES.get(exc.status, "http_error")
        response = json_error(exc.status, code, exc.reason)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (RedisError, OSError) as exc:
        logger.warning(
            "%s %s: Redis unavailable: %s", request.method, request.rel_url.raw_path, exc
        )
        response = json_error(503, "unavailable", "the event store is not answering; retry")
        response.headers["Retry-After"] = "1"
        return response
