"""A real browser (Debian's chromium driven by Playwright) against real tokentape processes.

Playwright's own browser download is not used: `playwright install` needs the
network and a CDN, while a distribution chromium is one `apt-get install` away.
The tests skip, saying so, only when no chromium binary exists.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright
from redis import Redis

from tests.conftest import REDIS_URL, free_port

ROOT = Path(__file__).resolve().parents[2]

_CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
# Headless, and nothing that talks to the network on its own or needs a GPU or a
# setuid sandbox (CI runs as root in a container).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The browser reconnects this long after a dropped stream (the server's `retry:`);
# the default second would only make the tests slower.
RETRY_MILLISECONDS = 100


def chromium_path() -> str | None:
    configured = os.environ.get("TOKENTAPE_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for name in _CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if chromium_path() is None:
        pytest.skip(
            "no chromium binary: install one (Debian/Ubuntu: apt-get install chromium; "
            ".ci/run does it when run as root) or set TOKENTAPE_CHROMIUM=/path/to/chromium"
        )
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    # One browser per module: launching takes seconds, a new context milliseconds. Not
    # per session: sync Playwright runs its own event loop, which must be gone before
    # the asyncio tests of later modules run.
    browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"the page threw: {errors}"


class TokentapeProcess:
    """`python -m app <command>` under a key prefix, started once its ready line is printed."""

    def __init__(self, command: list[str], prefix: str, ready: bytes) -> None:
        env = {
            **os.environ,
            "TOKENTAPE_KEY_PREFIX": prefix,
            "TOKENTAPE_RETRY_MILLISECONDS": str(RETRY_MILLISECONDS),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", *command], cwd=ROOT, env=env, stdout=subprocess.PIPE
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith(ready), f"{command[0]} did not start: {line!r}"
        self.first_line = line.decode().strip()

    def kill(self) -> None:
        """SIGKILL: open connections are cut at once, as when a machine dies."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _delete_keys(prefix: str) -> None:
    client = Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _process_factory(prefix: str) -> Iterator[Callable[..., TokentapeProcess]]:
    started: list[TokentapeProcess] = []

    def start(*command: str, ready: bytes = b"tokentape ") -> TokentapeProcess:
        process = TokentapeProcess(list(command), prefix, ready)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
    _delete_keys(prefix)


@pytest.fixture
def start_process(key_prefix: str) -> Iterator[Callable[..., TokentapeProcess]]:
    """Start tokentape processes under this test's key prefix; stopped and cleaned up after."""
    yield from _process_factory(key_prefix)


class Service:
    def __init__(self, url: str, start: Callable[..., TokentapeProcess]) -> None:
        self.url = url
        self._start = start

    def replay(self, recording: Path, speed: float = 1.0) -> str:
        """Play a recording into a new generation at `speed`; returns its id at once.

        The way to put chosen text (markdown, HTML) and timing before the page.
        """
        replay = self._start(
            "replay", str(recording), "--redis", REDIS_URL, "--speed", str(speed), ready=b""
        )
        return replay.first_line


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    """`tokentape serve --with-worker` shared by a module's tests (each makes its own generations)."""
    factory = _process_factory(f"tttest:{uuid.uuid4().hex[:12]}")
    start = next(factory)
    port = free_port()
    start("serve", "--redis", REDIS_URL, "--port", str(port), "--with-worker")
    yield Service(f"http://127.0.0.1:{port}", start)
    next(factory, None)


# TOKENTAPE_SCREENSHOTS=docs/images makes the tests save the page in its states there.
SCREENSHOTS = os.environ.get("TOKENTAPE_SCREENSHOTS")


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    directory = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    page.screenshot(path=directory / f"{name}.png", full_page=True)


def markdown(page: Page, text: str) -> str:
    """`text` rendered by the page's own markdown-it, configured as the page uses it, as
    the DOM serializes it back (`innerHTML` writes `&quot;` in text as `"`)."""
    html: str = page.evaluate(
        """(text) => {
             const element = document.createElement("div");
             element.innerHTML = md.render(text);
             return element.innerHTML;
           }""",
        text,
    )
    return html
