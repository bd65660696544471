"""Structured logs: JSON lines off a terminal, readable lines on one, with ids on every line.

Every record gets `trace_id` and `span_id` from the current span, and
`generation_id` from the generation being worked on (`generation_context`,
entered by the generation and reader spans); `extra=` can give any of them instead.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import IO, Any

import msgspec
from opentelemetry import trace

_generation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tokentape_generation_id", default=None
)

# What a LogRecord carries by itself; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_ID_FIELDS = ("generation_id", "trace_id", "span_id")
_NOT_EXTRAS = _RECORD_FIELDS | set(_ID_FIELDS)


class generation_context:
    """Log lines inside this block carry `generation_id`.

    A class, not a @contextmanager generator: a reader holds one per open stream,
    and a suspended generator and its manager cost ~0.3 KiB more.
    """

    __slots__ = ("_generation_id", "_token")

    def __init__(self, generation_id: str) -> None:
        self._generation_id = generation_id
        self._token: contextvars.Token[str | None] | None = None

    def __enter__(self) -> None:
        self._token = _generation_id.set(self._generation_id)

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _generation_id.reset(self._token)
            self._token = None


def generation_logger(
    generation_id: str, logger: logging.Logger | str = "tokentape"
) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose lines carry `generation_id` wherever it is used."""
    base = logging.getLogger(logger) if isinstance(logger, str) else logger
    return _MergingAdapter(base, {"generation_id": generation_id})


class _MergingAdapter(logging.LoggerAdapter[logging.Logger]):
    # The stock adapter replaces a call's `extra=` with its own (before 3.13's merge_extra).
    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


class TraceContextFilter(logging.Filter):
    """Adds `generation_id`, `trace_id` and `span_id` (None when unknown) to every record
    that does not carry them in its `extra=`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "generation_id", None) is None:
            record.generation_id = _generation_id.get()
        if getattr(record, "trace_id", None) is not None:
            return True
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = trace.format_trace_id(span_context.trace_id)
            record.span_id = trace.format_span_id(span_context.span_id)
        else:
            record.trace_id = record.span_id = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, extras, exception."""

    _encoder = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _ID_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        line.update(_extras(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return self._encoder.encode(line).decode()


class ConsoleFormatter(logging.Formatter):
    """`12:00:01.123 INFO tokentape.reader: message key=value … gen=… trace=…`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = " ".join(f"{key}={value}" for key, value in _extras(record).items())
        ids = " ".join(
            f"{label}={value}"
            for label, value in (
                ("gen", getattr(record, "generation_id", None)),
                ("trace", getattr(record, "trace_id", None)),
            )
            if value is not None
        )
        head, _, tail = text.partition("\n")  # keep a traceback below the line
        head = " ".join(part for part in (head, extras, ids) if part)
        return f"{head}\n{tail}" if tail else head


_handler: logging.Handler | None = None


def configure_logging(
    level: int | str = "INFO", *, stream: IO[str] | None = None, json: bool | None = None
) -> logging.Handler:
    """Send the root logger's records to `stream` (stderr): JSON unless it is a terminal.

    Calling it again replaces the handler it installed before, not others.
    """
    global _handler
    # What no formatter of ours prints, a record need not look up: the caller's file and
    # line (a frame walk), the thread's and the process's names (the logging HOWTO's
    # "Optimization"). A reader logs two lines per generation.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    stream = sys.stderr if stream is None else stream
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter() if json else ConsoleFormatter())
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    _handler = handler
    return handler


def _extras(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = vars(record)
    if not fields.keys() - _NOT_EXTRAS:
        return {}
    return {
        key: value
        for key, value in fields.items()
        if key not in _NOT_EXTRAS and not key.startswith("_")
    }


_second: tuple[int, str] = (0, "")


def _iso_time(created: float) -> str:
    global _second
    second = _second  # read once: a thread of the exporters may log and replace it
    whole = int(created)
    if second[0] != whole:
        second = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{second[1]}.{int(created % 1 * 1000):03d}Z"
