"""`tokentape tail`: follow a generation over SSE as a client would, and render its text.

It reconnects on its own after a drop with `Last-Event-ID`, so the text it
prints has no gap and no duplicate. Text goes to stdout; everything about the
stream (gaps, takeovers, reconnects, the end) goes to stderr, so `tail --raw`
piped to a file holds exactly the generated text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TextIO

import aiohttp
import msgspec
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from app import events
from app.errors import Expired, InvalidRequest, NotFound, TokentapeError, Unavailable
from app.sse import Parser, ReceivedEvent

_gap_decoder = msgspec.json.Decoder(events.Gap)
_reset_decoder = msgspec.json.Decoder(events.Reset)


class Renderer(Protocol):
    def text(self, chunk: str) -> None: ...

    def tool_call(self, name: str, arguments: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


def tool_call_line(name: str, arguments: dict[str, Any]) -> str:
    return f"⚙ {name}({json.dumps(arguments, ensure_ascii=False)})"


class RawRenderer:
    """The text exactly as generated, written as it arrives."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._at_line_start = True

    def text(self, chunk: str) -> None:
        if chunk:
            self.out.write(chunk)
            self.out.flush()
            self._at_line_start = chunk.endswith("\n")

    def tool_call(self, name: str, arguments: dict[str, Any]) -> None:
        self.text(("" if self._at_line_start else "\n") + tool_call_line(name, arguments) + "\n")

    def finish(self) -> None:
        self.out.flush()


_SPACED_BY_RICH = re.compile(r"^\s*([-*+]|\d+[.)]|>|\|)(\s|$)")


class MarkdownRenderer:
    """Markdown on a terminal, with rich: complete lines rendered, the unfinished last line
    shown as plain text below them until its newline arrives.

    Markdown needs the lines around a line (a code fence, a list), so complete lines
    gather into a block that ends at a blank line or a closing fence. The block is
    rendered in a live region as its lines complete and printed for good once it
    ends; the unfinished line is never parsed, so a `**` split across tokens
    cannot flash as bold.
    """

    def __init__(self, console: Console, notices: TextIO, max_block_lines: int = 0) -> None:
        self.console = console
        self.notices = notices
        # A block longer than this is printed in parts: the live region must fit the screen.
        self.max_block_lines = max_block_lines or max(4, console.height // 2)
        self._block: list[str] = []
        self._fence: str | None = None  # the opening line while inside a fenced code block
        self._rendered: Markdown | None = None
        self._line = ""
        self._blank_lines = 0  # seen since the last block, printed before the next one
        self._live: Live | None = None

    @property
    def in_progress(self) -> Group:
        """What the live region shows: the current block rendered, the unfinished line as is."""
        parts: list[RenderableType] = [] if self._rendered is None else [self._rendered]
        if self._line:
            parts.append(Text(self._line))
        return Group(*parts)

    def text(self, chunk: str) -> None:
        *complete, self._line = (self._line + chunk).split("\n")
        for line in complete:
            self._add(line)
        if complete:
            self._rendered = Markdown(self._source()) if self._block else None
        self._show()

    def tool_call(self, name: str, arguments: dict[str, Any]) -> None:
        self._end_line()
        self._print(Text(tool_call_line(name, arguments), style="dim"))
        self._show()

    def notice(self, message: str) -> None:
        """A line on `notices`, with the live region out of its way (same terminal)."""
        live, self._live = self._live, None
        if live is not None:
            live.stop()  # transient: erases the region
        self.notices.write(message + "\n")
        self.notices.flush()
        if live is not None:
            self._show()

    def finish(self) -> None:
        self._end_line()
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _add(self, line: str) -> None:
        fence = line.lstrip().startswith(("```", "~~~"))
        if self._fence is not None:
            self._block.append(line)
            if fence and line.strip().startswith(self._fence.strip()[:3]):
                self._flush()
                self._fence = None
        elif fence:
            self._flush()
            self._fence = line
        elif not line.strip():
            self._flush()
            self._blank_lines += 1
        else:
            self._block.append(line)
        if len(self._block) >= self.max_block_lines:
            self._flush()  # inside a fence, the next part opens with the same fence

    def _source(self) -> str:
        return "\n".join(([self._fence] if self._fence is not None else []) + self._block)

    def _end_line(self) -> None:
        if self._line:
            self._add(self._line)
            self._line = ""
        self._flush()
        self._rendered = None

    def _flush(self) -> None:
        if self._block:
            # rich opens a list, a quote or a table with a blank line of its own.
            spaced = _SPACED_BY_RICH.match(self._fence or self._block[0]) is not None
            self._print(Markdown(self._source()), blank_lines=self._blank_lines - spaced)
            self._block = []
        self._rendered = None

    def _print(self, renderable: RenderableType, blank_lines: int | None = None) -> None:
        """Print for good (above the live region while there is one), after the blank
        lines the text had before it."""
        for _ in range(self._blank_lines if blank_lines is None else blank_lines):
            self.console.print()
        self._blank_lines = 0
        self.console.print(renderable)

    def _show(self) -> None:
        if self._live is None:
            # Redrawn ten times a second, not per token: a fast generation must not cost
            # a render of the block per token.
            self._live = Live(
                console=self.console,
                refresh_per_second=10,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        self._live.update(self.in_progress)


@dataclasses.dataclass
class TailResult:
    last_seq: int
    terminal: events.TerminalEvent | None  # None: the server answered 204 (already over)
    connections: int


def events_url(base_url: str, generation_id: str) -> str:
    return f"{base_url.rstrip('/')}/v1/generations/{generation_id}/events"


class Follower:
    """One generation followed to its end over SSE, reconnecting with backoff."""

    def __init__(
        self,
        base_url: str,
        generation_id: str,
        renderer: Renderer,
        *,
        notice: Callable[[str], None],
        after_seq: int = 0,
        initial_backoff: float = 0.5,
        max_backoff: float = 15.0,
        max_failures: int = 12,
        idle_timeout: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.url = events_url(base_url, generation_id)
        self.generation_id = generation_id
        self.renderer = renderer
        self.notice = notice
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.max_failures = max_failures
        # Longer than the server's heartbeat interval: silence this long means a dead connection.
        self.idle_timeout = idle_timeout
        self.sleep = sleep
        self.last_seq = after_seq  # sent as Last-Event-ID: resume after it
        self._retry_ms: int | None = None

    async def run(self, session: aiohttp.ClientSession | None = None) -> TailResult:
        if session is None:
            async with aiohttp.ClientSession() as own:
                return await self.run(own)
        failures = connections = 0
        while True:
            connections += 1
            try:
                outcome = await self._connect(session)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(outcome, TailResult):
                self.renderer.finish()
                outcome.connections = connections
                return outcome
            if outcome == "progress":
                failures = 0
                outcome = "the stream ended before the terminal event"
            failures += 1
            if failures > self.max_failures:
                raise Unavailable(
                    "tail_gave_up",
                    f"{self.url}: {failures - 1} reconnects failed ({outcome}); resume with "
                    f"`tokentape tail {self.generation_id} --after {self.last_seq}`",
                )
            delay = self._backoff(failures)
            self.notice(f"↻ {outcome}; reconnecting after seq {self.last_seq} in {delay:.1f} s")
            await self.sleep(delay)

    def _backoff(self, failures: int) -> float:
        # The server's `retry:` sets the first delay, as it would for a browser.
        base = self._retry_ms / 1000 if self._retry_ms is not None else self.initial_backoff
        return float(min(self.max_backoff, base * 2 ** (failures - 1)))

    async def _connect(self, session: aiohttp.ClientSession) -> TailResult | str:
        """One connection: a finished TailResult, "progress", or why it ended without any."""
        headers = {"Accept": "text/event-stream"}
        if self.last_seq:
            headers["Last-Event-ID"] = str(self.last_seq)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.idle_timeout)
        async with session.get(self.url, headers=headers, timeout=timeout) as response:
            if response.status == 204:
                return TailResult(self.last_seq, None, 0)
            if response.status in (400, 404, 410):
                raise await _client_error(response)
            content_type = response.headers.get("Content-Type", "")
            if response.status != 200 or not content_type.startswith("text/event-stream"):
                return f"HTTP {response.status} {content_type or 'without a content type'}"
            parser = Parser()
            progressed = False
            async for chunk in response.content.iter_any():
                for message in parser.feed(chunk):
                    terminal = self._on_message(message)
                    progressed = True
                    if terminal is not None:
                        return TailResult(self.last_seq, terminal, 0)
                if parser.retry is not None:
                    self._retry_ms = parser.retry
            return "progress" if progressed else "the stream ended with no event"

    def _on_message(self, message: ReceivedEvent) -> events.TerminalEvent | None:
        if message.event == "reset":
            # Printed text cannot be taken back: say which of it is void, and go on from
            # the reset's id (0: everything is printed again).
            reset = _reset_decoder.decode(message.data)
            self.last_seq = int(message.id or 0)
            self.notice(
                f"⚠ Redis lost events: what was printed from seq {reset.from_seq} on is void; "
                f"continuing after seq {self.last_seq}"
            )
            return None
        if message.event == "gap":
            try:
                gap = _gap_decoder.decode(message.data)
            except msgspec.DecodeError:
                self.notice("⚠ gap: some events were removed by retention")
                return None
            self.notice(
                f"⚠ gap: events {gap.requested}..{gap.first_available - 1} were removed "
                f"by retention; continuing at {gap.first_available}"
            )
            return None
        seq = int(message.id) if message.id and message.id.isdigit() else None
        if seq is not None:
            if seq <= self.last_seq:
                return None  # already rendered: never print a token twice
            self.last_seq = seq
        try:
            event = events.decode(message.data)
        except msgspec.DecodeError:
            self.notice(f"? skipped an event this tail does not know: {message.event}")
            return None
        if isinstance(event, events.Token):
            self.renderer.text(event.text)
        elif isinstance(event, events.ToolCall):
            self.renderer.tool_call(event.name, event.arguments)
        elif isinstance(event, events.Started) and (event.attempt or 1) > 1:
            self.notice(f"↻ seq {seq}: a worker took over (attempt {event.attempt})")
        elif isinstance(event, events.Done | events.Error):
            return event
        return None


async def _client_error(response: aiohttp.ClientResponse) -> TokentapeError:
    try:
        body = await response.json(content_type=None)
        error = body["error"]
        code, message = str(error["code"]), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        code, message = f"http_{response.status}", await response.text()
    kind = {404: NotFound, 410: Expired}.get(response.status, InvalidRequest)
    return kind(code, message)


def describe_end(result: TailResult) -> str:
    terminal = result.terminal
    if isinstance(terminal, events.Done):
        return f"■ done ({terminal.reason}) at seq {result.last_seq}"
    if isinstance(terminal, events.Error):
        return f"■ error {terminal.code}: {terminal.message} at seq {result.last_seq}"
    return f"■ the generation had already ended (after seq {result.last_seq})"
