"""The real events endpoint (`app.http.create_app`) on a port of its own, stoppable mid-stream.

`stop()` cuts every open stream as a dying reader process would; `start()`
brings a new reader up on the same port. It records the `Last-Event-ID` of
every request, so a test can check how a client resumed.
"""

from __future__ import annotations

from aiohttp import web

from app.http import create_app
from app.http.errors import Handler
from app.store import GenerationLog
from tests.conftest import free_port


class ReaderServer:
    def __init__(self, log: GenerationLog) -> None:
        self.log = log
        self.port = free_port()
        self.last_event_ids: list[str | None] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    def notify(self) -> None:
        """Nothing to do: the real reader sees appends live."""

    async def start(self) -> None:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.last_event_ids.append(request.headers.get("Last-Event-ID"))
            return await handler(request)

        app = create_app(self.log.settings, self.log._redis)
        app.middlewares.append(record)
        self._runner = web.AppRunner(
            app, handle_signals=False, handler_cancellation=True, shutdown_timeout=0.1
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Cut every open stream mid-flight and stop listening."""
        runner, self._runner = self._runner, None
        assert runner is not None
        assert runner.server is not None
        for connection in list(runner.server.connections):
            connection.force_close()
            if connection.transport is not None:
                connection.transport.abort()
        await runner.cleanup()
