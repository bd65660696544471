"""The demo page in a real browser: exact text through drops, server restarts, the end and cancel.

The sim model is a pure function of its seed, so every test knows the exact text
the page must show and the exact number of events it must count. The answer must be
rendered exactly as markdown-it (the page's vendored copy) renders the whole text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, Request, Response, expect

from app.events import Event, Started, Token, ToolCall
from app.generations import SimParams
from tests.browser.conftest import (
    RETRY_MILLISECONDS,
    Service,
    TokentapeProcess,
    markdown,
    screenshot,
)
from tests.conftest import REDIS_URL, free_port
from workers.models.sim import plan


def sim_events(tokens: int, rate: float, tool_calls: int, seed: int) -> list[Event]:
    """Every event the worker appends: `started`, then the sim's plan."""
    params = SimParams(tokens=tokens, tokens_per_second=rate, seed=seed, tool_calls=tool_calls)
    return [Started(), *plan(params, 0)]


def answer_text(events: list[Event]) -> str:
    return "".join(event.text for event in events if isinstance(event, Token))


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


def shown_calls(page: Page) -> list[tuple[str, str, str]]:
    calls: list[list[str]] = page.evaluate(
        """() => Array.from(document.querySelectorAll("#calls .call"),
                            (n) => [n.className, n.querySelector(".label").textContent,
                                    n.querySelector(".arguments").textContent])"""
    )
    return [(cls, label, arguments) for cls, label, arguments in calls]


def assert_exact_stream(page: Page, events: list[Event], end: str, state: str) -> None:
    """Every event counted once, in order, the text exactly the sim's, rendered whole."""
    expect(page.locator("#end")).to_have_text(end)
    expect(page.locator("#state")).to_have_attribute("data-state", state)
    assert page.text_content("#dups") == "0"
    assert number(page, "count") == number(page, "lastid") == len(events)
    assert "unexpected jump" not in (page.text_content("#log") or "")
    text = answer_text(events)
    assert page.evaluate("text") == text
    assert page.inner_html("#rendered") == markdown(page, text)
    assert page.text_content("#pending") == ""
    assert shown_calls(page) == [
        (
            "call complete",
            f"⚙ {e.name} ({e.id})",
            json.dumps(e.arguments, indent=2, ensure_ascii=False),
        )
        for e in events
        if isinstance(e, ToolCall)
    ]


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
    # Seed 20's text has a heading, a list, a code block, bold and inline code.
    events = sim_events(tokens=300, rate=200, tool_calls=1, seed=20)

    generate(page, service.url, tokens=300, rate=200, tool_calls=1, seed=20)

    assert_exact_stream(page, events, "done: tool_calls", "finished")
    expect(page.locator("#state")).to_have_text("finished (tool_calls)")
    for selector in ("h2", "li", "pre code.language-python", "strong", "p code"):
        assert page.locator(f"#rendered {selector}").count() > 0, selector
    assert page.text_content("#connections") == "1"
    # The position lives in the URL hash without a history entry per event.
    assert page.evaluate("history.length") <= 2
    assert page.evaluate("location.hash").endswith(f":{len(events)}")
    screenshot(page, "finished", tmp_path)


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

    assert_exact_stream(page, events, "done: tool_calls", "finished")


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

    expect(page.locator("#end")).to_have_text("done: tool_calls")
    had = int(page.evaluate("sessionStorage.getItem('test:had')"))
    assert requests[-1].url.endswith(f"/events?last_event_id={had}")
    assert page.text_content("#dups") == "0"
    assert number(page, "lastid") == len(events)
    assert number(page, "count") == len(events) - had
    assert "unexpected jump" not in (page.text_content("#log") or "")
    assert "reloaded" in (page.text_content("#notices") or "")
    rest = answer_text(events[had:])
    assert page.evaluate("text") == rest
    assert page.inner_html("#rendered") == markdown(page, rest)


def test_the_reader_killed_mid_answer_ends_with_the_whole_answer_once(
    page: Page, start_process: Callable[..., TokentapeProcess], tmp_path: Path
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
    # The browser keeps trying while the reader is down, and the page counts the attempts.
    # A second attempt or later: the first refused one was not the last.
    expect(page.locator("#state")).to_have_text(
        re.compile(r"^reconnecting \(attempt ([2-9]|\d\d+)\)$")
    )
    expect(page.locator("#state")).to_have_attribute("data-state", "reconnecting")
    screenshot(page, "reconnecting", tmp_path)
    seen_at_drop = number(page, "lastid")
    start_process(*serve)

    assert_exact_stream(page, events, "done: tool_calls", "finished")
    assert seen_at_drop < len(events), "the reader must die mid-stream"
    # The page never reconnected itself: the browser's EventSource did, with the header.
    assert page.text_content("#connections") == "2"
    first, *reconnects = requests
    assert "last-event-id" not in first.all_headers()
    answered = [r for r in reconnects if r.response() is not None]
    assert len(reconnects) > len(answered)
    assert [r.all_headers().get("last-event-id") for r in answered] == [str(seen_at_drop)]


def test_a_finished_answer_does_not_reconnect_and_a_late_request_is_told_204(
    page: Page, service: Service
) -> None:
    events = sim_events(tokens=300, rate=100_000, tool_calls=1, seed=14)
    requests, responses = events_traffic(page)
    generation_id = generate(page, service.url, tokens=300, rate=100_000, tool_calls=1, seed=14)
    assert_exact_stream(page, events, "done: tool_calls", "finished")
    # The page opened one stream and closed it at `done`. Nothing happening cannot be
    # awaited: give the browser several of its reconnect intervals to do it.
    page.wait_for_timeout(5 * RETRY_MILLISECONDS)
    assert [r.status for r in responses] == [200]
    assert page.evaluate("source") is None
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
    assert page.text_content("#connections") == "1"


def test_cancel_ends_the_generation_with_cancelled(
    page: Page, service: Service, tmp_path: Path
) -> None:
    everything = sim_events(tokens=300, rate=50, tool_calls=1, seed=15)
    generate(page, service.url, tokens=300, rate=50, tool_calls=1, seed=15)
    wait_for_count(page, 10)
    expect(page.locator("#state")).to_have_attribute("data-state", "streaming")
    screenshot(page, "streaming", tmp_path)

    page.click("#cancel")

    expect(page.locator("#end")).to_have_text("done: cancelled")
    received = number(page, "count")
    # `started`, a prefix of the tokens, then `done: cancelled`.
    prefix = everything[: received - 1]
    assert all(isinstance(e, Token) for e in prefix[1:])
    assert_exact_stream(page, [*prefix, everything[-1]], "done: cancelled", "cancelled")
    expect(page.locator("#cancel")).to_be_disabled()
    screenshot(page, "cancelled", tmp_path)


def test_a_reset_drops_what_it_voids_and_the_page_reads_on(page: Page, service: Service) -> None:
    """Redis lost writes: the log's reset voids seqs 4-8, the answer goes on at 10; then a
    reader's own reset from 1 (`id: 0`) makes the page drop everything and read again."""
    generation_id = "ResetResetResetReset22"

    def frame(seq: int, kind: str, data: dict[str, Any]) -> str:
        return f"id: {seq}\nevent: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    bodies = iter(
        [
            "retry: 50\n\n"
            + "".join(frame(i, "token", {"text": t}) for i, t in enumerate("abcde", 1)),
            frame(9, "reset", {"from_seq": 4}) + frame(10, "token", {"text": "X"}),
            frame(0, "reset", {"from_seq": 1})
            + frame(1, "token", {"text": "p"})
            + frame(2, "token", {"text": "q"})
            + frame(3, "done", {"reason": "stop", "usage": {}}),
        ]
    )
    positions: list[int] = []
    texts: list[str] = []

    def serve(route: Any) -> None:
        # The page's position (Chromium adds Last-Event-ID past where a route sees it).
        positions.append(page.evaluate("lastId"))
        if len(positions) == 3:  # what the page showed after the first reset
            texts.append(page.evaluate("text"))
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=next(bodies))

    page.route(f"**/v1/generations/{generation_id}/events*", serve)
    page.goto(f"{service.url}/#{generation_id}:0")

    expect(page.locator("#end")).to_have_text("done: stop")
    assert positions == [0, 5, 10]
    assert texts == ["abcX"]
    assert page.evaluate("text") == "pq"
    assert (number(page, "lastid"), number(page, "count"), number(page, "dups")) == (3, 3, 0)
    assert "reset from 1" in (page.text_content("#log") or "")
