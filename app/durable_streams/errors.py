"""Refusals of the Durable Streams protocol that carry headers a client acts on."""

from __future__ import annotations

from typing import Any

from app.durable_streams import protocol
from app.errors import Conflict, Expired, TokentapeError


class StreamError(TokentapeError):
    """A refusal with protocol headers (the body is the usual JSON error)."""

    def __init__(
        self, code: str | None = None, message: str = "", *, headers: dict[str, str], **detail: Any
    ) -> None:
        super().__init__(code, message, **detail)
        self.headers = headers


class StreamClosed(StreamError, Conflict):
    """The stream is closed: nothing can be appended (409, `Stream-Closed: true`)."""

    code = "stream_closed"

    def __init__(self, name: str, tail_seq: int) -> None:
        super().__init__(
            message=f"stream {name} is closed: nothing can be appended",
            headers={
                protocol.CLOSED: "true",
                protocol.NEXT_OFFSET: protocol.format_offset(tail_seq),
            },
        )


class StaleProducerEpoch(StreamError):
    """A newer epoch of this producer has written: this one is fenced (403)."""

    status = 403
    code = "stale_producer_epoch"

    def __init__(self, current_epoch: str) -> None:
        super().__init__(
            message=f"producer epoch {current_epoch} has written: this producer is fenced",
            headers={protocol.PRODUCER_EPOCH: current_epoch},
        )


class ProducerSeqGap(StreamError, Conflict):
    """The producer skipped a sequence number (409 with the expected one)."""

    code = "producer_seq_gap"

    def __init__(self, expected_seq: str, received_seq: int) -> None:
        super().__init__(
            message=f"{protocol.PRODUCER_SEQ} {expected_seq} comes next",
            headers={
                protocol.PRODUCER_EXPECTED_SEQ: expected_seq,
                protocol.PRODUCER_RECEIVED_SEQ: str(received_seq),
            },
        )


class StreamDeleted(Expired):
    """The stream was deleted but forks still hold it (410); its name cannot be reused yet."""

    code = "stream_deleted"
