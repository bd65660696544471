"""`tokentape worker`: runs a worker until stopped."""

from __future__ import annotations

import asyncio

import pytest

from app import work
from app.settings import Settings
from tests.cli import stubs
from tests.conftest import REDIS_URL


async def test_worker_command_runs_until_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    stop = asyncio.Event()
    running = asyncio.Event()

    class Announced(stubs.Worker):
        async def run(self, stop: asyncio.Event) -> None:
            running.set()
            await super().run(stop)

    stubs.Worker.instances.clear()
    task = asyncio.create_task(
        work.work(Settings(redis_url=REDIS_URL), stop=stop, worker_factory=Announced)
    )
    await asyncio.wait_for(running.wait(), 10)
    assert "tokentape worker consuming from" in capsys.readouterr().out
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    assert stubs.Worker.instances[0].stopped
