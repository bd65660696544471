"""Chromium's own EventSource behind ops/nginx/tokentape.conf, through its only reader's restart."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

from app.events import EVENT_TYPES
from tests.browser.conftest import CHROMIUM_ARGS, TokentapeProcess, chromium_path
from tests.conftest import REDIS_URL, free_port
from tests.ops.conftest import NGINX, NO_NGINX, Nginx

pytestmark = pytest.mark.skipif(NGINX is None, reason=NO_NGINX)

# Reads one generation into window.seen with the browser's EventSource, closing it
# at the terminal event as a page does; window.opens counts connections answered 200.
FOLLOW = """([url, types]) => {
  window.seen = [];
  window.opens = 0;
  window.finished = false;
  const source = new EventSource(url);
  window.source = source;
  source.onopen = () => { window.opens += 1; };
  for (const type of types) {
    source.addEventListener(type, (e) => {
      if (!(e instanceof MessageEvent)) return;  // a connection error, not the event
      window.seen.push([Number(e.lastEventId), type]);
      if (type === "done" || type === "error") { source.close(); window.finished = true; }
    });
  }
}"""

CREATE = """async () => {
  const response = await fetch("/v1/generations", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({model: "sim", messages: [{role: "user", content: "hi"}],
                          sim: {tokens: 150, tokens_per_second: 25}}),
  });
  return (await response.json()).id;
}"""

CLOSED = "window.source.readyState === EventSource.CLOSED"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    if executable is None:
        pytest.skip(
            "no chromium binary: install one (Debian/Ubuntu: apt-get install chromium) "
            "or set TOKENTAPE_CHROMIUM=/path/to/chromium"
        )
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"the page threw: {errors}"


def test_eventsource_survives_its_only_reader_being_down(
    page: Page,
    start_process: Callable[..., TokentapeProcess],
    start_nginx: Callable[[Sequence[int]], Nginx],
) -> None:
    port = free_port()
    start_process("worker", "--redis", REDIS_URL)
    reader = start_process("serve", "--redis", REDIS_URL, "--port", str(port))
    nginx = start_nginx([port])

    # A blank page of the site's origin: the EventSource is the only thing under test.
    def blank(route: Route) -> None:
        route.fulfill(status=200, content_type="text/html", body="<!doctype html>")

    page.route(f"{nginx.url}/blank", blank)
    page.goto(f"{nginx.url}/blank")
    generation_id = page.evaluate(CREATE)
    page.evaluate(FOLLOW, [f"/v1/generations/{generation_id}/events", list(EVENT_TYPES)])
    page.wait_for_function("window.seen.length >= 10")
    opens = page.evaluate("window.opens")

    reader.kill()
    # Down for three reconnections: each one nginx must answer 200 with `retry:`; a
    # non-200 would close the EventSource for good.
    page.wait_for_function(f"window.opens >= {opens + 3} || {CLOSED}")
    assert not page.evaluate(CLOSED), "the EventSource gave up while its reader was down"
    start_process("serve", "--redis", REDIS_URL, "--port", str(port))

    page.wait_for_function(f"window.finished || {CLOSED}")
    seen: list[list[object]] = page.evaluate("window.seen")
    status = page.evaluate(f"fetch('/v1/generations/{generation_id}').then(r => r.json())")
    assert status["status"] == "done"
    assert [seq for seq, _ in seen] == list(range(1, status["last_seq"] + 1))
    assert seen[-1][1] == "done"
