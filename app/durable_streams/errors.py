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


# -- subscriptions (app.durable_streams.subscriptions) ---------------------------------
# Their codes are the protocol's own (upper case), which its clients match on.


class SubscriptionRefused(TokentapeError):
    """A refusal of the subscription API, with the protocol's code."""


class InvalidSubscriptionRequest(SubscriptionRefused):
    status = 400
    code = "INVALID_REQUEST"


class SubscriptionNotFound(SubscriptionRefused):
    status = 404
    code = "SUBSCRIPTION_NOT_FOUND"


class SubscriptionExists(SubscriptionRefused):
    """The id is taken by a subscription of another configuration."""

    status = 409
    code = "SUBSCRIPTION_ALREADY_EXISTS"


class WebhookUrlRejected(SubscriptionRefused):
    """A webhook URL the server will not call (`app.durable_streams.webhooks.WebhookPolicy`)."""

    status = 400
    code = "WEBHOOK_URL_REJECTED"


class CallbackTokenInvalid(SubscriptionRefused):
    status = 401
    code = "TOKEN_INVALID"


class CallbackTokenExpired(SubscriptionRefused):
    status = 401
    code = "TOKEN_EXPIRED"


class WakeFenced(SubscriptionRefused):
    """The request is for a wake that is no longer the subscription's current one."""

    status = 409
    code = "FENCED"


class AlreadyClaimed(SubscriptionRefused):
    """Another worker holds the subscription's lease (`current_holder`)."""

    status = 409
    code = "ALREADY_CLAIMED"

    def __init__(self, holder: str, generation: int) -> None:
        super().__init__(
            message=f"worker {holder} holds the lease of generation {generation}",
            current_holder=holder,
            generation=generation,
        )


class NoPendingWork(SubscriptionRefused):
    status = 409
    code = "NO_PENDING_WORK"


class InvalidAckOffset(SubscriptionRefused):
    """An ack for a stream the subscription does not link, before its acked offset, or
    past its tail."""

    status = 409
    code = "INVALID_OFFSET"
