"""Log lines: JSON off a terminal, ids on every line about a generation, disconnect in one line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import pytest

from app.telemetry import configure_logging, generation_logger
from tests.telemetry.conftest import GENERATION_ID, Recorded


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("root_logging")
def test_json_lines_inside_a_generation_span_carry_generation_trace_and_span_ids(
    recorded: Recorded,
) -> None:
    stream = io.StringIO()  # not a terminal: JSON
    configure_logging("DEBUG", stream=stream)

    with recorded.telemetry.generation_span(GENERATION_ID, model="m", provider="p") as generation:
        logging.getLogger("tokentape.worker").info("calling the model", extra={"attempt": 1})
    logging.getLogger("tokentape.worker").info("idle")

    inside, outside = lines(stream)
    context = generation.span.get_span_context()
    assert inside == {
        "time": inside["time"],
        "level": "info",
        "logger": "tokentape.worker",
        "message": "calling the model",
        "generation_id": GENERATION_ID,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "attempt": 1,
    }
    assert str(inside["time"]).endswith("Z")
    assert set(outside) == {"time", "level", "logger", "message"}


@pytest.mark.usefixtures("root_logging")
def test_generation_logger_tags_lines_outside_any_span() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)

    generation_logger(GENERATION_ID, "tokentape.api").warning("queue is long")

    (line,) = lines(stream)
    assert line["generation_id"] == GENERATION_ID
    assert line["logger"] == "tokentape.api"
    assert "trace_id" not in line


@pytest.mark.usefixtures("root_logging")
def test_a_client_disconnect_logs_nothing_and_its_fields_go_on_the_access_line(
    recorded: Recorded,
) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)

    reader = recorded.telemetry.reader_span(GENERATION_ID, position=4, resume=True, link_to=None)

    def handler() -> None:
        with reader:
            reader.first_event(5)
            reader.sent(2, 64)
            raise asyncio.CancelledError  # aiohttp cancels the handler of a vanished client

    with pytest.raises(asyncio.CancelledError):
        handler()

    assert lines(stream) == []  # no traceback, and no line of its own
    # The stream's access line, written after its span ended, names the span all the same.
    logging.getLogger("tokentape.access").info("GET / 200", extra=reader.log_fields())
    (line,) = lines(stream)
    (span,) = recorded.finished()
    assert span.context is not None
    assert line["generation_id"] == GENERATION_ID
    assert line["trace_id"] == f"{span.context.trace_id:032x}"
    assert line["span_id"] == f"{span.context.span_id:016x}"
    assert (line["end_reason"], line["position"], line["first_seq"], line["events_sent"]) == (
        "client_gone",
        4,
        5,
        2,
    )


@pytest.mark.usefixtures("root_logging")
def test_a_terminal_gets_readable_lines_and_reconfiguring_replaces_the_handler() -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    configure_logging("INFO", stream=io.StringIO())
    terminal = Terminal()
    configure_logging("INFO", stream=terminal)
    assert len(root.handlers) == before + 1

    generation_logger(GENERATION_ID).info("resumed", extra={"position": 3})
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("tokentape").exception("append failed")

    text = terminal.getvalue()
    first, second = text.split("\n", 1)
    assert first.endswith(f"INFO tokentape: resumed position=3 gen={GENERATION_ID}")
    assert "ERROR tokentape: append failed" in second
    assert "Traceback" in second
    assert "ValueError: boom" in second


@pytest.mark.usefixtures("root_logging")
def test_each_line_has_its_own_time_and_extras_across_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The formatter keeps the last second's text: a line in the next second, or in an
    earlier one (another thread's), still gets its own; extras are a line's own too."""
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    logger = logging.getLogger("tokentape.test")
    for created, extra in (
        (1_780_000_000.999, {"a": 1}),
        (1_780_000_001.0, {}),
        (1_779_999_999.5, {"b": "x", "c": None}),
    ):
        monkeypatch.setattr(time, "time_ns", lambda created=created: int(created * 1e9))
        monkeypatch.setattr(time, "time", lambda created=created: created)
        logger.info("line", extra=extra)
    times = [
        (line["time"], {k: v for k, v in line.items() if k in "abc"}) for line in lines(stream)
    ]
    assert times == [
        ("2026-05-28T20:26:40.999Z", {"a": 1}),
        ("2026-05-28T20:26:41.000Z", {}),
        ("2026-05-28T20:26:39.500Z", {"b": "x", "c": None}),
    ]
