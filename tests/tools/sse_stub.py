"""A minimal stand-in for the events endpoint of `app.http`, for the tail tests.

It serves a generation from the log honouring `Last-Event-ID`, sends a `gap`
when retention removed the start, answers 204 at/after the terminal event, and
can be stopped (connections cut, as when a reader process dies) and restarted
on the same port. Live events arrive when the test calls `notify()` after an
append: no polling.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from app import events, sse
from app.log import GenerationLog
from tests.conftest import free_port


class SSEStub:
    def __init__(self, log: GenerationLog) -> None:
        self.log = log
        self.port = free_port()
        self.last_event_ids: list[str | None] = []
        self._changed = asyncio.Event()
        self._stopping = False
        self._open: list[web.Request] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None and not self._stopping

    def notify(self) -> None:
        """Wake every open stream: the log has new events (or the stub is stopping)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/generations/{id}/events", self._events)
        self._stopping = False
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Cut every open stream mid-flight and stop listening."""
        self._stopping = True
        for request in list(self._open):
            if request.transport is not None:
                request.transport.abort()
        self.notify()
        assert self._runner is not None
        await self._runner.cleanup()

    async def _events(self, request: web.Request) -> web.StreamResponse:
        generation_id = request.match_info["id"]
        last_event_id = request.headers.get("Last-Event-ID")
        self.last_event_ids.append(last_event_id)
        position = int(last_event_id or 0)
        state = await self.log.state(generation_id)
        if state is None:
            body = {"error": {"code": "generation_not_found", "message": "no such generation"}}
            return web.json_response(body, status=404)
        if state.terminal and position >= state.last_seq:
            return web.Response(status=204)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse.retry_frame(self.log.settings.retry_milliseconds))
        first = await self.log.first_seq(generation_id)
        if first is not None and first > position + 1:
            gap = events.Gap(requested=position + 1, first_available=first)
            await response.write(sse.unnumbered_frame("gap", events.encode(gap)))
        self._open.append(request)
        try:
            while not self._stopping:
                changed = self._changed
                page = await self.log.read(generation_id, position, 100)
                for entry in page:
                    await response.write(sse.event_frame(entry.seq, entry.type, entry.data))
                    position = entry.seq
                    if entry.type in events.TERMINAL_TYPES:
                        return response
                if not page:
                    await changed.wait()
        finally:
            self._open.remove(request)
        return response
