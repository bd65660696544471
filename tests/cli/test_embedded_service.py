"""`tokentape serve` with nothing configured, as a new user runs it: real processes, a real
redis-server keeping its data in `.tokentape/`, restarts in between."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import pytest

from app import events, sse
from tests.workers.conftest import expected_events, sim_request

ROOT = Path(__file__).resolve().parents[2]
SERVING = re.compile(
    rb"^tokentape serving on (http://\S+) \(embedded Redis at \S+ via (\S+); (.*)\)"
)

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None and shutil.which("valkey-server") is None,
    reason="no redis-server or valkey-server on PATH: the embedded default keeps nothing",
)


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENTAPE_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


class Service:
    """`python -m app serve` in a working directory of the test's own (so `.tokentape/` there)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self.note = ""

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", "serve", "--port", "0",
            cwd=self.cwd,
            env=environment(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        match = SERVING.match(line)
        assert match is not None, line
        self.url, self.note = match.group(1).decode(), match.group(3).decode()

    async def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit code and what the process logged."""
        assert self.process is not None
        assert self.process.stderr is not None
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 30)
        return code, (await self.process.stderr.read()).decode()

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    service = Service(tmp_path)
    yield service
    service.kill()
    if service.process is not None:
        await service.process.wait()


async def create(session: aiohttp.ClientSession, url: str, sim: Mapping[str, float]) -> str:
    body = {
        "model": "sim",
        "messages": [{"role": "user", "content": "write about durable streams"}],
    }
    async with session.post(f"{url}/v1/generations", json={**body, "sim": sim}) as response:
        assert response.status == 201, await response.text()
        generation_id: str = (await response.json())["id"]
        return generation_id


async def read_events(
    session: aiohttp.ClientSession, url: str, generation_id: str, *, after: int, until: int | None
) -> list[sse.ReceivedEvent]:
    """The events after `after`, until seq `until` (then the connection is dropped) or the end."""
    headers = {"Last-Event-ID": str(after)} if after else {}
    parser = sse.Parser()
    received: list[sse.ReceivedEvent] = []
    async with session.get(
        f"{url}/v1/generations/{generation_id}/events", headers=headers
    ) as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            received += parser.feed(chunk)
            if until is not None and received and int(received[-1].id or 0) >= until:
                break
    return received


async def test_a_reader_resumes_after_last_event_id_across_a_restart_of_the_service(
    service: Service,
) -> None:
    sim = {"tokens": 120, "tokens_per_second": 40, "seed": 3}
    await service.start()
    assert "kept across restarts" in service.note
    assert str(service.cwd / ".tokentape") in service.note
    async with aiohttp.ClientSession() as session:
        generation_id = await create(session, service.url, sim)
        first = await read_events(session, service.url, generation_id, after=0, until=20)

        # Stopped with the generation running: interrupted at once (the worker in this
        # process is the only one), not after a grace period for it to finish.
        code, logged = await asyncio.wait_for(service.stop(), 5)
        assert code == 0
        assert "interrupting 1 generations" in logged

        await service.start()
        last_id = int(first[-1].id or 0)
        rest = await read_events(session, service.url, generation_id, after=last_id, until=None)

    received = first + rest
    assert [int(m.id or 0) for m in received] == list(range(1, len(received) + 1))
    decoded = [events.decode(m.data) for m in received]
    # The second start took the generation over from its log: a second `started`, then on.
    assert [e for e in decoded if isinstance(e, events.Started)] == [
        events.Started(model="sim", attempt=1),
        events.Started(model="sim", attempt=2),
    ]
    request = sim_request(tokens=120, rate=40, seed=3)
    assert [e for e in decoded if not isinstance(e, events.Started)] == expected_events(request)


async def test_incident_tools_find_the_embedded_redis_of_a_running_serve(
    service: Service,
) -> None:
    await service.start()
    async with aiohttp.ClientSession() as session:
        generation_id = await create(session, service.url, {"tokens": 3, "tokens_per_second": 1e9})

    async def ls() -> tuple[int, bytes, bytes]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", "ls", "--json",
            cwd=service.cwd,
            env=environment(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode is not None
        return process.returncode, out, err

    code, out, err = await ls()
    assert code == 0, err
    assert generation_id in [json.loads(line)["id"] for line in out.splitlines()]

    assert (await service.stop())[0] == 0
    code, out, err = await ls()
    assert code == 2
    assert b"no `tokentape serve` with an embedded Redis is running" in err
