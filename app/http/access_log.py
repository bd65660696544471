"""The access log: one `tokentape.access` info line per request, written when its
response ends. A stream's response ends long after its handler returns (an event
stream, a Durable Streams SSE read): its connection writes the line when the stream
ends (app/http/connection.py), with everything it sent and the whole time it lasted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

access_logger = logging.getLogger("tokentape.access")


def log_request(
    method: str,
    path: str,
    status: int,
    remote: str | None,
    bytes_sent: int,
    seconds: float,
    fields: Mapping[str, object] | None = None,
) -> None:
    """The line of one request: `path` percent-encoded as sent and without its query
    (where read tokens travel; a decoded path could carry a newline into the log),
    never a header. `fields` are what the response's own code adds."""
    extra: dict[str, object] = {
        "remote": remote,
        "bytes_sent": bytes_sent,
        "duration_ms": round(seconds * 1000, 1),
    }
    if fields:
        extra.update(fields)
    access_logger.info("%s %s %d", method, path, status, extra=extra)
