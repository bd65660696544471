"""The demo page in a real browser: exact text through drops, server restarts, the end and cancel.

The sim model is a pure function of its seed, so every test knows the exact text
the page must show and the exact number of events it must count.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, Request, Response, expect

from app.events import Event, Started, Token, ToolCall, ToolCallDelta
from app.generations import SimParams
from tests.browser.conftest import Service, TokentapeProcess
from tests.conftest import REDIS_URL, free_port
from workers.models.sim import plan

# (tag, class, text) of one child of #output.
Block = tuple[str, str, str]

_HEADING = re.compile(r"^(#{1,3})\s+(.*)$")
_LIST_ITEM = re.compile(r"^\s*[-*]\s+")


def sim_events(tokens: int, rate: float, tool_calls: int, seed: int) -> list[Event]:
    """Every event the worker appends: `started`, then the sim's plan."""
    params = SimParams(tokens=tokens, tokens_per_second=rate, seed=seed, tool_calls=tool_calls)
    return [Started(), *plan(params, 0)]


def rendered(events: list[Event], end: Block | None) -> list[Block]:
    """What #output must hold for these events: markdown rendered one complete line at a time.

    The page's rules, restated: a ``` line opens or closes a <pre>; `# ` to `### `
    become h3 to h5; `- ` / `* ` items become <li>; any other line a <div> (an
    empty one a no-break space). A line still open when a tool call or the end
    arrives is complete there. The pending-line <span> stays last.
    """
    blocks: list[Block] = []
    fence: int | None = None  # index of the open <pre>
    partial = ""

    def render(line: str) -> None:
        nonlocal fence
        if line.startswith("```"):
            if fence is None:
                blocks.append(("pre", "", ""))
                fence = len(blocks) - 1
            else:
                fence = None
        elif fence is not None:
            tag, cls, text = blocks[fence]
            blocks[fence] = (tag, cls, text + line + "\n")
        elif heading := _HEADING.match(line):
            blocks.append((f"h{len(heading[1]) + 2}", "", heading[2]))
        elif _LIST_ITEM.match(line):
            blocks.append(("li", "", _LIST_ITEM.sub("", line, count=1)))
        else:
            blocks.append(("div", "", line or "\u00a0"))

    def block(cls: str, text: str) -> None:
        nonlocal partial
        if partial:
            render(partial)
            partial = ""
        blocks.append(("div", cls, text))

    for event in events:
        if isinstance(event, Token):
            *lines, partial = (partial + event.text).split("\n")
            for line in lines:
                render(line)
        elif isinstance(event, ToolCallDelta) and event.name:
            block("tool", f"calling {event.name}…")
        elif isinstance(event, ToolCall):
            arguments = json.dumps(event.arguments, ensure_ascii=False, separators=(",", ":"))
            block("tool", f"⚙ {event.name}({arguments})")
    if end is not None:
        block(end[1], end[2])
    return [*blocks, ("span", "pending", partial)]


def shown(page: Page) -> list[Block]:
    children: list[list[str]] = page.evaluate(
        """() => Array.from(document.getElementById("output").children,
                            (n) => [n.tagName.toLowerCase(), n.className, n.textContent])"""
    )
    return [(tag, cls, text) for tag, cls, text in children]


def number(page: Page, element_id: str) -> int:
    return int(page.text_content(f"#{element_id}") or "")


def wait_for_count(page: Page, at_least: int) -> None:
    page.wait_for_function(
        "(n) => Number(document.getElementById('count').textContent) >= n", arg=at_least
    )


def generate(page: Page, url: str, *, tokens: int, rate: int, tool_calls: int, seed: int) -> str:
    """Fill in the form, start the generation, return its id once the page shows it."""
    page.goto(url)
    page.fill("#tokens", str(tokens))
    page.fill("#rate", str(rate))
    page.fill("#tools", str(tool_calls))
    page.fill("#seed", str(seed))
    page.click("#go")
    expect(page.locator("#gid")).not_to_have_text("\u2013")  # the placeholder dash
    return page.text_content("#gid") or ""


def assert_exact_stream(page: Page, events: list[Event], end: str) -> None:
    """Every event counted once, in order, and the text exactly the sim's."""
    expect(page.locator("#output .end-ok, #output .end-bad")).to_have_text(end)
    assert page.text_content("#dups") == "0"
    assert number(page, "count") == number(page, "lastid") == len(events)
    assert "unexpected jump" not in (page.text_content("#log") or "")
    assert shown(page) == rendered(events, ("div", "end-ok", end))


def events_traffic(page: Page) -> tuple[list[Request], list[Response]]:
    """Record the page's requests to and responses from the events endpoint."""
    requests: list[Request] = []
    responses: list[Response] = []

    def on_request(request: Request) -> None:
        if "/events" in request.url:
            requests.append(request)

    def on_response(response: Response) -> None:
        if "/events" in response.url:
            responses.append(response)

    page.on("request", on_request)
    page.on("response", on_response)
    return requests, responses


def test_generation_renders_the_exact_text_and_tool_call(
    page: Page, service: Service, tmp_path: Path
) -> None:
    events = sim_events(tokens=300, rate=200, tool_calls=1, seed=11)

    generate(page, service.url, tokens=300, rate=200, tool_calls=1, seed=11)

    assert_exact_stream(page, events, "done: tool_calls")
    call = next(e for e in events if isinstance(e, ToolCall))
    expect(page.locator("#output .tool").last).to_contain_text(f"⚙ {call.name}(")
    assert page.text_content("#connections") == "1"
    assert page.text_content("#state") == "done"
    # The position lives in the URL hash without a history entry per event.
    assert page.evaluate("history.length") <= 2
    assert page.evaluate("location.hash").endswith(f":{len(events)}")
    page.screenshot(path=tmp_path / "finished.png", full_page=True)


def test_dropping_the_connection_resumes_without_a_gap_or_duplicate(
    page: Page, service: Service
) -> None:
    events = sim_events(tokens=300, rate=100, tool_calls=1, seed=12)
    generate(page, service.url, tokens=300, rate=100, tool_calls=1, seed=12)

    for drop in (1, 2):
        wait_for_count(page, number(page, "count") + 30)
        page.click("#drop")
        # Reconnected: a new EventSource opened from `?last_event_id=<last seen>`.
        expect(page.locator("#connections")).to_have_text(str(drop + 1))
        assert number(page, "count") < len(events), "the drop must come mid-stream"

    assert_exact_stream(page, events, "done: tool_calls")


def test_a_reloaded_page_resumes_after_the_last_event_it_had(page: Page, service: Service) -> None:
    events = sim_events(tokens=300, rate=200, tool_calls=1, seed=16)
    requests, _ = events_traffic(page)
    generate(page, service.url, tokens=300, rate=200, tool_calls=1, seed=16)
    wait_for_count(page, 50)
    # What the old page had when it went away, recorded as it goes.
    page.evaluate(
        """() => addEventListener("pagehide", () => sessionStorage.setItem("test:had", lastId))"""
    )

    page.reload()

    expect(page.locator("#output .end-ok")).to_have_text("done: tool_calls")
    had = int(page.evaluate("sessionStorage.getItem('test:had')"))
    assert requests[-1].url.endswith(f"/events?last_event_id={had}")
    assert page.text_content("#dups") == "0"
    assert number(page, "lastid") == len(events)
    assert number(page, "count") == len(events) - had
    assert "unexpected jump" not in (page.text_content("#log") or "")
    notice = page.text_content("#output .notice") or ""
    assert shown(page) == [
        ("div", "notice", notice),
        *rendered(events[had:], ("div", "end-ok", "done: tool_calls")),
    ]


def test_browser_reconnects_by_itself_when_the_reader_dies(
    page: Page, start_process: Callable[..., TokentapeProcess]
) -> None:
    # The worker runs in its own process and keeps appending while no reader is up.
    start_process("worker", "--redis", REDIS_URL)
    port = free_port()
    serve = ("serve", "--redis", REDIS_URL, "--port", str(port))
    reader = start_process(*serve)
    events = sim_events(tokens=500, rate=200, tool_calls=1, seed=13)
    requests, _ = events_traffic(page)

    generate(page, f"http://127.0.0.1:{port}", tokens=500, rate=200, tool_calls=1, seed=13)
    wait_for_count(page, 100)
    reader.kill()
    expect(page.locator("#state")).to_have_text("reconnecting")
    seen_at_drop = number(page, "lastid")
    start_process(*serve)

    assert_exact_stream(page, events, "done: tool_calls")
    assert seen_at_drop < len(events), "the reader must die mid-stream"
    # The page never reconnected itself: the browser's EventSource did, with the header.
    assert page.text_content("#connections") == "2"
    first, *reconnects = requests
    assert "last-event-id" not in first.all_headers()
    # While the reader was down the browser kept trying (refused, not given up); the
    # attempt that got through asked for what follows the last event it had.
    answered = [r for r in reconnects if r.response() is not None]
    assert len(reconnects) > len(answered)
    assert [r.all_headers().get("last-event-id") for r in answered] == [str(seen_at_drop)]


def test_a_finished_generation_is_answered_204_and_the_event_source_stops(
    page: Page, service: Service
) -> None:
    events = sim_events(tokens=300, rate=100_000, tool_calls=1, seed=14)
    requests, responses = events_traffic(page)
    generation_id = generate(page, service.url, tokens=300, rate=100_000, tool_calls=1, seed=14)
    assert_exact_stream(page, events, "done: tool_calls")
    # The page itself opened one stream and closed it at `done`.
    assert [r.status for r in responses] == [200]
    terminal = str(len(events))

    # A client that never closes: it reads everything once, is told 204 on its
    # reconnect after the terminal event, and stops for good.
    naive: dict[str, Any] = page.evaluate(
        """(url) => new Promise((resolve) => {
             const source = new EventSource(url), ids = [];
             for (const type of ["started", "token", "tool_call_delta", "tool_call", "done"])
               source.addEventListener(type, (e) => ids.push(Number(e.lastEventId)));
             source.onerror = () => {
               if (source.readyState === EventSource.CLOSED) resolve({ ids });
             };
           })""",
        f"/v1/generations/{generation_id}/events",
    )
    assert naive["ids"] == list(range(1, len(events) + 1))
    assert [r.status for r in responses[1:]] == [200, 204]
    assert requests[2].all_headers().get("last-event-id") == terminal

    # A reloaded page asking from the terminal position: 204 at once, never opened.
    opened: int = page.evaluate(
        """(url) => new Promise((resolve) => {
             const source = new EventSource(url);
             let opened = 0;
             source.onopen = () => { opened += 1; };
             source.onerror = () => {
               if (source.readyState === EventSource.CLOSED) resolve(opened);
             };
           })""",
        f"/v1/generations/{generation_id}/events?last_event_id={terminal}",
    )
    assert opened == 0
    assert [r.status for r in responses[3:]] == [204]
    assert page.text_content("#connections") == "1"


def test_cancel_ends_the_generation_with_cancelled(page: Page, service: Service) -> None:
    everything = sim_events(tokens=300, rate=50, tool_calls=1, seed=15)
    generate(page, service.url, tokens=300, rate=50, tool_calls=1, seed=15)
    wait_for_count(page, 10)

    page.click("#cancel")

    expect(page.locator("#output .end-ok")).to_have_text("done: cancelled")
    received = number(page, "count")
    # `started`, a prefix of the tokens, then `done: cancelled`.
    prefix = everything[: received - 1]
    assert all(isinstance(e, Token) for e in prefix[1:])
    assert_exact_stream(page, [*prefix, everything[-1]], "done: cancelled")
    expect(page.locator("#cancel")).to_be_disabled()
