"""How a reader's connections are served: what aiohttp refuses before any handler runs
comes back as the JSON error, the access log never holds a query string, and a client
that never finishes its request head or body is let go.

aiohttp answers a request it cannot parse (a bad request line, raw non-ASCII bytes, a
duplicated Content-Type, oversized or too many headers) from its connection protocol,
in plain text, logging an ERROR traceback: a client could fill the log at ERROR level.
It has no public hook for that answer, so `ServiceRunner` makes its connections
`_Connection`s, whose `handle_error` answers JSON and logs one line. This is the one
place that relies on aiohttp's private parts (`AppRunner._make_server`, `Server._loop`,
`Server._kwargs`, `RequestHandler.handle_error`); tests/http/test_server.py fails when
they change. pyproject.toml bounds aiohttp from above.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from app.http.access_log import access_logger, log_request
from app.http.connection import TakenOverResponse
from app.settings import Settings

logger = logging.getLogger("tokentape.http")

# aiohttp's limits on a request head (its defaults, named here because they are refused
# with 431 below): the request line and each header, and the number of headers.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 128
_DUPLICATE_RE = re.compile(r"^Duplicate '([A-Za-z-]{1,40})' header found\.$")


def runner_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of an `AppRunner` (or a test server) for a reader."""
    return {
        # The handler of a disconnected client is cancelled at once, releasing what it held.
        "handler_cancellation": True,
        "shutdown_timeout": settings.stream_drain_seconds,
        # aiohttp closes a connection whose next request head has not arrived this long
        # after it opened or after its last response (its "keep-alive" timer).
        "keepalive_timeout": settings.header_timeout_seconds,
        # Bodies are taken as sent; app.http.checks refuses a Content-Encoding (415).
        "auto_decompress": False,
        "max_line_size": MAX_LINE_BYTES,
        "max_field_size": MAX_LINE_BYTES,
        "max_headers": MAX_HEADERS,
        "access_log_class": AccessLog,
    }


class AccessLog(AbstractAccessLogger):
    """One line per request (app/http/access_log.py); a stream's when the stream ends."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = request.rel_url.raw_path
        if isinstance(response, TakenOverResponse) and response.connection is not None:
            started = asyncio.get_running_loop().time() - time
            response.connection.request_line(
                request.method, path, response.status, request.remote, started
            )
            return
        log_request(
            request.method, path, response.status, request.remote, response.body_length, time
        )

    @property
    def enabled(self) -> bool:
        return access_logger.isEnabledFor(logging.INFO)


def _refusal(exc: BaseException | None) -> tuple[int, str, str]:
    """Status, code and message for what aiohttp refused; never the request's own text,
    which can hold a read token."""
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers")
    ):
        return (
            431,
            "header_too_large",
            f"the request line or a header is over {MAX_LINE_BYTES} bytes, "
            f"or there are more than {MAX_HEADERS} headers",
        )
    if isinstance(exc, BadHttpMessage) and (duplicate := _DUPLICATE_RE.match(exc.message)):
        # aiohttp names only headers of its own fixed list here, never free client text.
        return 400, "duplicate_header", f"the {duplicate[1]} header must appear once"
    return 400, "malformed_request", "the request is not valid HTTP/1.1"


class _Connection(web.RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of a response is out: no error can follow it (as aiohttp does).
            raise ConnectionError("an error after the response started")
        if status >= 500:
            # A fault of ours, not the client's: the traceback belongs in the log.
            logger.error("unhandled error in a request", exc_info=exc)
            code, text = "internal", "the server failed; retry, and report it if it persists"
        else:
            status, code, text = _refusal(exc)
            logger.info(
                "refused a malformed request: %s",
                code,
                extra={"remote": request.remote, "refusal": type(exc).__name__},
            )
        body = msgspec.json.encode({"error": {"code": code, "message": text}})
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


class ServiceRunner(web.AppRunner):
    """An `AppRunner` whose connections answer aiohttp's own refusals as JSON errors."""

    def __init__(self, app: web.Application, settings: Settings) -> None:
        super().__init__(app, **runner_options(settings))

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server
