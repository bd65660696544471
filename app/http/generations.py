"""Create a generation, read its status, cancel it."""

from __future__ import annotations

import datetime

import msgspec
from aiohttp import web

from app import events
from app.errors import Conflict, NotFound
from app.generations import ErrorInfo, GenerationStatus, parse_request
from app.http.state import LOG, SETTINGS, TELEMETRY
from app.keys import check_generation_id, new_generation_id
from app.store import GenerationState

routes = web.RouteTableDef()


def _urls(request: web.Request, generation_id: str) -> tuple[str, str]:
    base = f"{request.app[SETTINGS].public_url.rstrip('/')}/v1/generations/{generation_id}"
    return f"{base}/events", base


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
    generation_request = parse_request(await request.read())
    generation_id = new_generation_id()
    log = request.app[LOG]
    with request.app[TELEMETRY].request_span(request.headers, generation_id) as traceparent:
        await log.create(generation_id, generation_request, enqueue=True, traceparent=traceparent)
    events_url, status_url = _urls(request, generation_id)
    response = _json(
        {"id": generation_id, "events_url": events_url, "status_url": status_url}, status=201
    )
    response.headers["Location"] = status_url
    return response


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


@routes.get("/v1/generations/{id}")
async def get_generation(request: web.Request) -> web.Response:
    generation_id = check_generation_id(request.match_info["id"])
    state, log_exists = await request.app[LOG].snapshot(generation_id)
    if state is None:
        raise NotFound("generation_not_found", f"no generation {generation_id}")
    return _json(await _status(request, state, log_exists))


@routes.post("/v1/generations/{id}/cancel")
async def cancel_generation(request: web.Request) -> web.Response:
    generation_id = check_generation_id(request.match_info["id"])
    state = await request.app[LOG].request_cancel(generation_id)
    if state.terminal and state.status != "cancelled":
        raise Conflict(
            "already_finished",
            f"generation {generation_id} already ended ({state.status})",
            status=state.status,
        )
    return _json({"id": generation_id, "status": state.status}, status=202)
