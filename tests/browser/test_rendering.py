"""What the demo page shows while an answer streams: markdown, hostile HTML, and its states.

Text and timing a test needs are put in a recording and played with `tokentape
replay`; the page opens it through its `#<id>:0` link, or gets it as the answer to
its own POST (intercepted), so that its retry button has a request to send again.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from playwright.sync_api import Page, Route, expect

from app import events
from app.events import Event
from app.tools import recording
from tests.browser.conftest import Service, markdown, screenshot
from tests.tools.builders import recording_of, tokens

Timed = list[tuple[int, Event]]


def replay(service: Service, tmp_path: Path, timed: Timed) -> str:
    """Play `timed` (ms after the first event, event) into a new generation; its id."""
    path = tmp_path / f"recording-{len(list(tmp_path.iterdir()))}.jsonl"
    path.write_bytes(b"".join(recording.recording_lines(recording_of(timed))))
    return service.replay(path)


def at(start_ms: int, step_ms: int, batch: list[events.Token]) -> Timed:
    return [(start_ms + i * step_ms, event) for i, event in enumerate(batch)]


def open_generation(page: Page, service: Service, generation_id: str) -> None:
    page.goto(f"{service.url}/#{generation_id}:0")


# -- markdown while it streams ------------------------------------------------------------

LINK = '<a href="https://example.com/x" target="_blank" rel="noopener noreferrer">a link</a>'


@pytest.mark.parametrize(
    ("text", "rendered", "pending"),
    [
        (
            "Some **bold**, `code` and [a link](https://example.com/x).\nHalf a **bo",
            f"<p>Some <strong>bold</strong>, <code>code</code> and {LINK}.</p>\n",
            "Half a **bo",
        ),
        (
            "Intro\n```python\ndef f():\n    return 1\nprint(f",
            '<p>Intro</p>\n<pre><code class="language-python">def f():\n    return 1\nprint(f</code></pre>\n',
            "",
        ),
        ("```\n", "<pre><code></code></pre>\n", ""),
        ("```\ncode\n```\nafter", "<pre><code>code\n</code></pre>\n", "after"),
        ("~~~~\ncode\n~~~\nmore\n", "<pre><code>code\n~~~\nmore\n</code></pre>\n", ""),
        (
            "# Title\n- item one\n- item t",
            "<h1>Title</h1>\n<ul>\n<li>item one</li>\n</ul>\n",
            "- item t",
        ),
        ("See [the docs](https://exa", "", "See [the docs](https://exa"),
    ],
    ids=[
        "inline",
        "open-fence",
        "fence-opened",
        "fence-closed",
        "fence-longer-marker",
        "list",
        "half-link",
    ],
)
def test_complete_lines_render_as_markdown_and_the_last_stays_plain_text(
    page: Page, service: Service, text: str, rendered: str, pending: str
) -> None:
    page.goto(service.url)

    page.evaluate("(t) => { text = t; render(); }", text)

    assert page.inner_html("#rendered") == rendered
    assert page.text_content("#pending") == pending


# -- hostile HTML -------------------------------------------------------------------------

HOSTILE = (
    "Look: <img src=x onerror=\"window.pwned = 'img'\"> and <script>window.pwned = 'script'</script>\n"
    "[click](javascript:window.pwned='link') and **<b>bold?</b>** ![pixel](https://example.com/p.png)\n\n"
    "```html\n<script>window.pwned = 'fence'</script>\n```\n"
    "<iframe src=\"javascript:window.pwned='iframe'\"></iframe>\n"
    "<img src=x onerror=\"window.pwned = 'pending'\">"
)


def test_html_in_the_answer_is_shown_as_text_and_never_runs(
    page: Page, service: Service, tmp_path: Path
) -> None:
    # A pause before the last line: it is shown, as plain text, while it is pending.
    head, last = HOSTILE.rsplit("\n", 1)
    timed: Timed = [(0, events.Started(model="sim", attempt=1))]
    timed += at(10, 1, tokens(head + "\n", size=4))
    timed += at(20, 1, tokens(last, size=4))
    timed += [(3000, events.Done(reason="stop"))]
    generation_id = replay(service, tmp_path, timed)
    pwned = "() => window.pwned === undefined"

    open_generation(page, service, generation_id)

    expect(page.locator("#pending")).to_have_text(last)
    assert page.evaluate(pwned)
    expect(page.locator("#end")).to_have_text("done: stop")
    assert page.evaluate(pwned)
    assert page.inner_html("#rendered") == markdown(page, HOSTILE)
    output = page.locator("#output")
    for tag in ("img", "script", "iframe", "b"):
        assert output.locator(tag).count() == 0, tag
    # The javascript: link is refused by markdown-it: shown as text, not as a link. The
    # image is a plain link: the page never fetches what an answer points at by itself.
    links = page.eval_on_selector_all("#output a", "(links) => links.map((a) => a.href)")
    assert links == ["https://example.com/p.png"]
    shown = page.text_content("#rendered") or ""
    assert "<img src=x onerror=\"window.pwned = 'img'\">" in shown
    assert "<script>window.pwned = 'fence'</script>" in shown
    assert page.evaluate(pwned)


# -- the states a user sees ---------------------------------------------------------------

WEATHER = '{"city": "Paris", "unit": "celsius"}'


def failing_answer() -> Timed:
    """Thinking for a while, a sentence, a tool call whose arguments pause, then an error."""
    timed: Timed = [(0, events.Started(model="sim", attempt=1))]
    timed += at(2500, 20, tokens("Let me check the **weather** in `Paris`.\n", size=5))
    timed += [
        (3000, events.ToolCallDelta(index=0, id="call_1", name="get_weather")),
        (3050, events.ToolCallDelta(index=0, arguments_delta=WEATHER[:14])),
        (5500, events.ToolCallDelta(index=0, arguments_delta=WEATHER[14:])),
        (
            5550,
            events.ToolCall(
                index=0, id="call_1", name="get_weather", arguments=json.loads(WEATHER)
            ),
        ),
        (
            5600,
            events.Error(
                code="provider_error", message="the provider closed the stream", retryable=True
            ),
        ),
    ]
    return timed


def good_answer() -> Timed:
    timed: Timed = [(0, events.Started(model="sim", attempt=1))]
    timed += at(10, 5, tokens("It is **18 °C** in Paris.\n\n- dry\n- light wind\n", size=6))
    return [*timed, (300, events.Done(reason="stop"))]


@pytest.fixture
def answers(page: Page, service: Service, tmp_path: Path) -> list[str]:
    """The page's POST /v1/generations answered with replays: a failing one, then a good one."""
    scripted = iter([failing_answer(), good_answer()])
    created: list[str] = []

    def create(route: Route) -> None:
        generation_id = replay(service, tmp_path, next(scripted))
        created.append(generation_id)
        body = {
            "id": generation_id,
            "events_url": f"/v1/generations/{generation_id}/events",
            "status_url": f"/v1/generations/{generation_id}",
        }
        route.fulfill(status=201, content_type="application/json", body=json.dumps(body))

    page.route("**/v1/generations", create)
    return created


def test_thinking_tool_calls_forming_and_complete_error_and_retry(
    page: Page, service: Service, answers: list[str], tmp_path: Path
) -> None:
    page.goto(service.url)
    page.click("#go")

    state = page.locator("#state")
    expect(state).to_have_attribute("data-state", "thinking")
    expect(page.locator("#output")).to_have_class("panel thinking")
    screenshot(page, "thinking", tmp_path)

    expect(state).to_have_text("tool call forming")
    call = page.locator("#calls .call")
    expect(call).to_have_class("call forming")
    expect(call.locator(".label")).to_have_text("calling get_weather…")
    expect(call.locator(".arguments")).to_have_text(WEATHER[:14])  # a fragment, shown as is
    screenshot(page, "tool-call-forming", tmp_path)

    expect(state).to_have_attribute("data-state", "error")
    expect(call).to_have_class("call complete")
    expect(call.locator(".label")).to_have_text("⚙ get_weather (call_1)")
    assert json.loads(call.locator(".arguments").text_content() or "") == json.loads(WEATHER)
    expect(page.locator("#end")).to_have_text(
        "error provider_error: the provider closed the stream"
    )
    expect(page.locator("#retry")).to_be_visible()
    # The server's error event is the end, not a dropped connection.
    assert "connection lost" not in (page.text_content("#log") or "")
    assert page.inner_html("#rendered") == markdown(
        page, "Let me check the **weather** in `Paris`.\n"
    )
    screenshot(page, "error", tmp_path)

    page.click("#retry")

    expect(state).to_have_text("finished (stop)")
    expect(page.locator("#retry")).to_be_hidden()
    assert page.text_content("#gid") == answers[1]
    assert len(answers) == 2
    assert page.locator("#calls .call").count() == 0
    assert page.inner_html("#rendered") == markdown(
        page, "It is **18 °C** in Paris.\n\n- dry\n- light wind\n"
    )


def test_a_stream_the_server_refuses_for_good_offers_a_retry(page: Page, service: Service) -> None:
    # An id nobody created: 404, after which an EventSource never tries again by itself.
    unknown = "".join(itertools.repeat("Q", 22))

    page.goto(f"{service.url}/#{unknown}:0")

    expect(page.locator("#state")).to_have_text("connection refused")
    expect(page.locator("#retry")).to_be_visible()
    assert page.locator("#problem").text_content()
