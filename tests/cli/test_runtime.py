"""The process runtime: the event loop `serve` and `worker` run on."""

from __future__ import annotations

import asyncio

from app.runtime import run_loop
from app.settings import Settings


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_serve_and_worker_run_on_uvloop_unless_told_otherwise() -> None:
    import uvloop

    assert isinstance(run_loop(Settings(), _running_loop()), uvloop.Loop)
    standard = run_loop(Settings(event_loop="asyncio"), _running_loop())
    assert not isinstance(standard, uvloop.Loop)
    assert isinstance(standard, asyncio.BaseEventLoop)
