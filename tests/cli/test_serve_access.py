"""`tokentape serve` as a real process: what it says or refuses at start-up about access,
and API keys rotated by SIGHUP without a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.cli.test_serve import ROOT, SERVING
from tests.conftest import REDIS_URL

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
SECRET = "s" * 32


class Serve:
    """One `python -m app serve` process, its stderr kept as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr: list[str] = []
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode()
            self.stderr.append(line)
            self._lines.put_nowait(line)

    async def until_logged(self, text: str, times: int = 1) -> None:
        async with asyncio.timeout(20):
            while sum(text in line for line in self.stderr) < times:
                await self._lines.get()

    async def url(self, ready_lines: int = 1) -> str:
        """Its URL, once `ready_lines` processes said they serve (`--processes N`: N + 1)."""
        assert self.process.stdout is not None
        urls = []
        for _ in range(ready_lines):
            line = await asyncio.wait_for(self.process.stdout.readline(), 30)
            match = SERVING.match(line)
            assert match is not None, f"{line!r}; stderr: {''.join(self.stderr)}"
            urls.append(match.group(1).decode())
        return urls[0]

    async def exited(self) -> int:
        code = await asyncio.wait_for(self.process.wait(), 20)
        await self._reading
        return code

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.exited()


@pytest.fixture
async def started(key_prefix: str, redis: Redis) -> AsyncIterator[list[Serve]]:
    running: list[Serve] = []
    yield running
    for serve in running:
        if serve.process.returncode is None:
            serve.process.kill()
        await serve.stop()


async def serve(running: list[Serve], key_prefix: str, *argv: str, **environ: str) -> Serve:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENTAPE_")}
    env.update(PYTHONPATH=str(ROOT), TOKENTAPE_KEY_PREFIX=key_prefix, **environ)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "serve", "--redis", REDIS_URL, "--port", "0", *argv,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    running.append(Serve(process))
    return running[-1]


async def test_an_open_service_on_loopback_says_so_in_one_warning_line(
    started: list[Serve], key_prefix: str
) -> None:
    reader = await serve(started, key_prefix)
    await reader.url()
    assert await reader.stop() == 0
    warnings = [line for line in reader.stderr if "open service" in line]
    assert len(warnings) == 1
    assert '"level":"warning"' in warnings[0]


async def test_an_open_service_beyond_loopback_is_refused_unless_insecure(
    started: list[Serve], key_prefix: str
) -> None:
    refused = await serve(started, key_prefix, "--host", "0.0.0.0")
    assert await refused.exited() == 2
    said = "".join(refused.stderr)
    assert "TOKENTAPE_API_KEYS" in said
    assert "--insecure" in said
    meant = await serve(started, key_prefix, "--host", "0.0.0.0", TOKENTAPE_INSECURE="true")
    await meant.url()
    assert await meant.stop() == 0
    assert sum("open service" in line for line in meant.stderr) == 1


async def test_keys_without_a_secret_are_refused_saying_how_to_make_one(
    started: list[Serve], key_prefix: str
) -> None:
    refused = await serve(started, key_prefix, TOKENTAPE_API_KEYS=KEY_A)
    assert await refused.exited() == 2
    said = "".join(refused.stderr)
    assert "TOKENTAPE_SECRET" in said
    assert "secrets.token_urlsafe(32)" in said
    assert KEY_A not in said


async def test_sighup_rotates_the_keys_of_every_reader_process(
    started: list[Serve], key_prefix: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_A}\n")
    supervisor = await serve(
        started,
        key_prefix,
        "--processes",
        "2",
        TOKENTAPE_API_KEYS=f"@{keys}",
        TOKENTAPE_SECRET=SECRET,
    )
    url = await supervisor.url(ready_lines=3)
    status_url = f"{url}/v1/generations/{'A' * 22}"

    async def statuses(key: str) -> set[int]:
        # A new connection each time, so the kernel spreads them over both readers.
        found = set()
        for _ in range(8):
            async with (
                aiohttp.ClientSession() as session,
                session.get(status_url, headers={"Authorization": f"Bearer {key}"}) as response,
            ):
                found.add(response.status)
        return found

    assert await statuses(KEY_A) == {404}  # a known key: an unknown generation
    assert await statuses(KEY_B) == {401}
    keys.write_text(f"{KEY_B}\n")
    supervisor.process.send_signal(signal.SIGHUP)
    await supervisor.until_logged("API keys reloaded", times=2)
    assert await statuses(KEY_B) == {404}
    assert await statuses(KEY_A) == {401}
    keys.write_text("")  # half-written: refused, the keys stay
    supervisor.process.send_signal(signal.SIGHUP)
    await supervisor.until_logged("API keys not reloaded", times=2)
    assert await statuses(KEY_B) == {404}
    assert await supervisor.stop() == 0
    assert KEY_A not in "".join(supervisor.stderr)
    assert KEY_B not in "".join(supervisor.stderr)
