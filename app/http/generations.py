"""Create a generation, read its status, cancel it, mint a read token for its events.

With API keys (`app.http.auth`) each route needs one, and sees only its own generations.
"""

from __future__ import annotations

import datetime

import msgspec
from aiohttp import web

from app import events
from app.access import Caller
from app.errors import Conflict, LimitExceeded
from app.generations import (
    CancelAccepted,
    Created,
    ErrorInfo,
    GenerationStatus,
    ReadTokenGrant,
    check_limits,
    parse_request,
)
from app.http import auth
from app.http.checks import read_body
from app.http.state import ACCESS, HUB, LOG, SETTINGS, TELEMETRY
from app.keys import check_generation_id, new_generation_id
from app.store import Admission, GenerationState

routes = web.RouteTableDef()


def _urls(request: web.Request, generation_id: str) -> tuple[str, str]:
    base = f"{request.app[SETTINGS].public_url.rstrip('/')}/v1/generations/{generation_id}"
    return f"{base}/events", base


def _iso_seconds(seconds: int) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(body: msgspec.Struct | dict[str, object], status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )


@routes.post("/v1/generations")
async def create_generation(request: web.Request) -> web.Response:
    caller = auth.require_key(request)
    settings = request.app[SETTINGS]
    generation_request = parse_request(await read_body(request))
    check_limits(generation_request, settings)
    generation_id = new_generation_id()
    log = request.app[LOG]
    if caller is not None:
        _admitted(await log.quotas.admit(caller.owner, generation_id), request)
    # Its reader usually comes at once, here: its live channel is subscribed while the
    # generation is created, so that the reader's GET finds it confirmed.
    request.app[HUB].listen_ahead(generation_id)
    with request.app[TELEMETRY].request_span(request.headers, generation_id) as traceparent:
        await log.create(
            generation_id,
            generation_request,
            enqueue=True,
            traceparent=traceparent,
            owner=caller.owner if caller is not None else None,
        )
    events_url, status_url = _urls(request, generation_id)
    created = Created(id=generation_id, events_url=events_url, status_url=status_url)
    if caller is not None:
        grant = _read_token(request, generation_id)
        created.read_token = grant.read_token
        created.read_token_expires_at = grant.read_token_expires_at
        created.events_url = grant.events_url
    response = _json(created, status=201)
    response.headers["Location"] = status_url
    return response


def _admitted(admission: Admission, request: web.Request) -> None:
    settings = request.app[SETTINGS]
    if admission.refused_by is not None:
        limit = (
            "max_creations_per_minute" if admission.refused_by == "rate" else "max_running_per_key"
        )
        request.app[TELEMETRY].metrics.limit_refusals.add(1, {"limit": limit})
    if admission.refused_by == "rate":
        raise LimitExceeded(
            "too_many_creations",
            f"this API key created {settings.max_creations_per_minute} generations in the "
            "last minute; retry after the Retry-After seconds",
            setting="TOKENTAPE_MAX_CREATIONS_PER_MINUTE",
            limit=settings.max_creations_per_minute,
            retry_after=admission.retry_after_seconds,
        )
    if admission.refused_by == "running":
        raise LimitExceeded(
            "too_many_running",
            f"this API key has {settings.max_running_per_key} generations that have not "
            "ended; retry once one has ended (or cancel one)",
            setting="TOKENTAPE_MAX_RUNNING_PER_KEY",
            limit=settings.max_running_per_key,
            retry_after=admission.retry_after_seconds,
        )


def _read_token(request: web.Request, generation_id: str) -> ReadTokenGrant:
    minted = request.app[ACCESS].mint(generation_id)
    events_url, _ = _urls(request, generation_id)
    # Tokens are base64url, digits and dots: nothing to escape in a URL.
    return ReadTokenGrant(
        read_token=minted.token,
        read_token_expires_at=_iso_seconds(minted.expires_at),
        events_url=f"{events_url}?token={minted.token}",
    )


async def _status(
    request: web.Request, state: GenerationState, log_exists: bool
) -> GenerationStatus:
    error = None
    if state.status == "error":
        error = ErrorInfo(code=state.finish_reason or "error")
        last = await request.app[LOG].last_entry(state.id)
        if last is not None and isinstance(event := last.event(), events.Error):
            error = ErrorInfo(code=event.code, message=event.message)
    events_url, _ = _urls(request, state.id)
    return GenerationStatus(
        id=state.id,
        status=state.status,  # type: ignore[arg-type]
        model=state.model,
        last_seq=state.last_seq,
        created_at=_iso(state.created_ms) or "",
        started_at=_iso(state.started_ms),
        finished_at=_iso(state.finished_ms),
        finish_reason=state.finish_reason if state.status != "error" else None,
        error=error,
        attempts=state.attempts,
        expired=state.terminal and not log_exists,
        events_url=events_url,
    )


async def _owned(request: web.Request, caller: Caller | None) -> tuple[GenerationState, bool]:
    generation_id = check_generation_id(request.match_info["id"])
    state, log_exists = await request.app[LOG].snapshot(generation_id)
    return auth.owned(caller, state, generation_id), log_exists


@routes.get("/v1/generations/{id}")
async def get_generation(request: web.Request) -> web.Response:
    caller = auth.require_key(request)
    state, log_exists = await _owned(request, caller)
    return _json(await _status(request, state, log_exists))


@routes.post("/v1/generations/{id}/cancel")
async def cancel_generation(request: web.Request) -> web.Response:
    caller = auth.require_key(request)
    generation_id = check_generation_id(request.match_info["id"])
    if caller is not None:
        await _owned(request, caller)  # another key's generation is not cancelled
    state = await request.app[LOG].request_cancel(generation_id)
    if state.terminal and state.status != "cancelled":
        raise Conflict(
            "already_finished",
            f"generation {generation_id} already ended ({state.status})",
            status=state.status,
        )
    return _json(CancelAccepted(id=generation_id, status=state.status), status=202)  # type: ignore[arg-type]


@routes.post("/v1/generations/{id}/read-tokens")
async def mint_read_token(request: web.Request) -> web.Response:
    """A fresh read token, for a client whose token expired while it was away."""
    caller = auth.require_key(request)
    state, _ = await _owned(request, caller)
    if caller is None:
        raise Conflict(
            "access_control_off",
            "this service has no API keys, so its events need no read token",
        )
    return _json(_read_token(request, state.id))
