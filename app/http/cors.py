"""Cross-origin calls from browsers to tokentape's own routes, with aiohttp-cors.

Off unless TOKENTAPE_CORS_ORIGINS lists origins (credentials allowed for those) or is
`*` (any origin, no credentials). Preflights allow `Authorization` and `Last-Event-ID`.
The Durable Streams routes answer any origin, as that protocol asks (their own headers).
"""

from __future__ import annotations

import aiohttp_cors
from aiohttp import web

from app.settings import Settings

ALLOWED_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID", "traceparent", "tracestate")
EXPOSED_HEADERS = ("Location", "Retry-After", "WWW-Authenticate")
# Where the routes that take cross-origin calls start.
_API_PREFIXES = ("/v1/generations", "/openapi.json")


def allow_origins(app: web.Application, settings: Settings) -> None:
    """Answer preflights and mark responses for `settings.cors_origin_list`; call after
    the routes are added."""
    origins = settings.cors_origin_list
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=origins != ["*"],
        allow_headers=ALLOWED_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        allow_methods=["GET", "POST"],
        max_age=86400,
    )
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(origins, options))
    for route in list(app.router.routes()):
        if route.resource is not None and route.resource.canonical.startswith(_API_PREFIXES):
            cors.add(route)
    app.on_response_prepare.append(_vary_on_origin)


async def _vary_on_origin(request: web.Request, response: web.StreamResponse) -> None:
    # The answer depends on Origin (aiohttp-cors echoes it): caches must keep them apart.
    if request.path.startswith(_API_PREFIXES):
        response.headers.add("Vary", "Origin")
