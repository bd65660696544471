"""`tokentape tail`: follow a generation with the Python client (`app.client`) and render its text.

The client resumes after any drop with `Last-Event-ID`, so the text it prints has
no gap and no duplicate. Text goes to stdout; everything about the stream (gaps,
takeovers, reconnects, the end) goes to stderr, so `tail --raw` piped to a file
holds exactly the generated text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from app import events
from app.client import Client, Entry, Gap, Reset
from app.errors import StreamLost, Unavailable


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


async def follow(
    client: Client,
    generation_id: str,
    renderer: Renderer,
    *,
    notice: Callable[[str], None],
    after_seq: int = 0,
) -> TailResult:
    """Render one generation's events after `after_seq` to its end, as `client` reads them
    (it resumes after every drop); raises `Unavailable` when its reconnects run out."""
    stream = client.stream(generation_id, after_seq)
    terminal: events.TerminalEvent | None = None
    with _client_reports_as(notice):
        try:
            async for batch in stream:
                for item in batch:
                    if isinstance(item, Reset):
                        # Printed text cannot be taken back: say which of it is void.
                        notice(
                            f"⚠ Redis lost events: what was printed from seq {item.from_seq} "
                            "on is void; reading on"
                        )
                    elif isinstance(item, Gap):
                        notice(
                            f"⚠ gap: events {item.requested}..{item.first_available - 1} were "
                            f"removed by retention; continuing at {item.first_available}"
                        )
                    else:
                        terminal = _render(item, renderer, notice)
        except StreamLost as exc:
            raise Unavailable(
                "tail_gave_up",
                f"{client.max_attempts} connections in a row brought nothing new after seq "
                f"{exc.last_seq}; resume with "
                f"`tokentape tail {generation_id} --after {exc.last_seq}`",
            ) from exc
    renderer.finish()
    return TailResult(stream.last_seq, terminal, stream.connections)


def _render(
    entry: Entry, renderer: Renderer, notice: Callable[[str], None]
) -> events.TerminalEvent | None:
    event = entry.event
    if isinstance(event, events.Token):
        renderer.text(event.text)
    elif isinstance(event, events.ToolCall):
        renderer.tool_call(event.name, event.arguments)
    elif isinstance(event, events.Started) and (event.attempt or 1) > 1:
        notice(f"↻ seq {entry.seq}: a worker took over (attempt {event.attempt})")
    elif events.is_terminal(event):
        return event
    return None


class _Notices(logging.Handler):
    def __init__(self, notice: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.notice = notice

    def emit(self, record: logging.LogRecord) -> None:
        self.notice(f"↻ {record.getMessage()}")


@contextlib.contextmanager
def _client_reports_as(notice: Callable[[str], None]) -> Iterator[None]:
    """The client's reports (a lost connection, the wait before the next try) as notices,
    with the rendered text and instead of log lines, which would cut through it."""
    client_logger = logging.getLogger(Client.__module__)
    handler = _Notices(notice)
    saved = client_logger.level, client_logger.propagate
    client_logger.addHandler(handler)
    client_logger.setLevel(logging.INFO)
    client_logger.propagate = False
    try:
        yield
    finally:
        client_logger.removeHandler(handler)
        client_logger.level, client_logger.propagate = saved


def describe_end(result: TailResult) -> str:
    terminal = result.terminal
    if isinstance(terminal, events.Done):
        return f"■ done ({terminal.reason}) at seq {result.last_seq}"
    if isinstance(terminal, events.Error):
        return f"■ error {terminal.code}: {terminal.message} at seq {result.last_seq}"
    return f"■ the generation had already ended (after seq {result.last_seq})"
