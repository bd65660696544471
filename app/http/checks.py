"""What every request must look like before a handler sees it, and reading its body.

Query parameters are refused (400, naming the parameter) when they hold control
characters, NUL, CR/LF or non-ASCII, or are oversized, before they can come near a
Redis key, a log line or an SSE field. Bodies are never compressed here: aiohttp's
decompression is off (`app.http.server`), so an encoded body is refused with 415 rather
than decoded, or failing to decode inside aiohttp.
"""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

from app.errors import InvalidRequest, RequestTimeout, UnsupportedEncoding
from app.http.errors import Handler, body_too_large
from app.http.state import SETTINGS

MAX_QUERY_PARAMETERS = 32
MAX_PARAMETER_NAME = 64
MAX_PARAMETER_VALUE = 1024
# Printable ASCII and the space: what any tokentape parameter can hold.
_PRINTABLE_RE = re.compile(r"^[\x20-\x7e]*$")


@web.middleware
async def checked_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    query = request.query
    if query:
        if len(query) > MAX_QUERY_PARAMETERS:
            raise InvalidRequest(
                "invalid_query", f"at most {MAX_QUERY_PARAMETERS} query parameters are accepted"
            )
        for name, value in query.items():
            if len(name) > MAX_PARAMETER_NAME or not _PRINTABLE_RE.match(name):
                raise InvalidRequest(
                    "invalid_query", "a query parameter's name is not printable ASCII, or too long"
                )
            if len(value) > MAX_PARAMETER_VALUE or not _PRINTABLE_RE.match(value):
                raise InvalidRequest(
                    "invalid_query",
                    f"the query parameter {name} holds control or non-ASCII characters, "
                    f"or more than {MAX_PARAMETER_VALUE}",
                    field=name,
                )
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        raise UnsupportedEncoding(
            message="request bodies are accepted uncompressed: drop the Content-Encoding header"
        )
    return await handler(request)


async def read_body(request: web.Request) -> bytes:
    """The whole body, within `TOKENTAPE_MAX_BODY_BYTES` and `TOKENTAPE_BODY_TIMEOUT_SECONDS`."""
    settings = request.config_dict[SETTINGS]
    try:
        if request.content.is_eof():
            # All of it arrived with the head (most bodies do): nothing to wait for, and
            # no timer to arm and cancel, a few percent of a create's CPU.
            return await request.read()
        async with asyncio.timeout(settings.body_timeout_seconds):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(
            message=f"the body did not arrive within {settings.body_timeout_seconds:g} s "
            "(TOKENTAPE_BODY_TIMEOUT_SECONDS)"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise body_too_large(settings.max_body_bytes) from None
