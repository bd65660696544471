"""Errors a caller can see. Each carries a stable `code` and a message that says what to do."""

from __future__ import annotations

import math
from typing import Any


class TokentapeError(Exception):
    status = 500
    code = "internal"

    def __init__(self, code: str | None = None, message: str = "", **detail: Any) -> None:
        if code is not None:
            self.code = code
        self.message = message or self.code.replace("_", " ")
        self.detail = detail
        # HTTP headers the response carries besides the body.
        self.headers: dict[str, str] = {}
        super().__init__(f"{self.code}: {self.message}")

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.detail}}


class ConfigError(TokentapeError):
    """A setting (a `TOKENTAPE_*` variable or a flag) is invalid or missing; the message names it.

    Raised before anything runs: the CLI prints it and exits 2.
    """

    code = "invalid_setting"


class InvalidRequest(TokentapeError):
    status = 400
    code = "invalid_request"


class Unauthorized(TokentapeError):
    """No credential, or one that is not valid here; answered 401 with `WWW-Authenticate`."""

    status = 401
    code = "unauthorized"

    def __init__(self, code: str, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(code, message)
        # RFC 6750: a request with no credential gets the bare challenge.
        challenge = 'Bearer realm="tokentape"'
        if invalid_token:
            challenge += ', error="invalid_token"'
        self.headers["WWW-Authenticate"] = challenge


class LimitExceeded(TokentapeError):
    """A request goes past a configured limit; `setting` names the variable that sets it.

    With `retry_after` (seconds) it is a rate or a quota: 429 (or `status`) with
    `Retry-After`.
    """

    status = 400
    code = "limit_exceeded"

    def __init__(
        self,
        code: str,
        message: str,
        *,
        setting: str,
        limit: int | float,
        status: int | None = None,
        retry_after: float | None = None,
        **detail: Any,
    ) -> None:
        super().__init__(code, message, setting=setting, limit=limit, **detail)
        self.status = status or (429 if retry_after is not None else 400)
        if retry_after is not None:
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))


class RequestTimeout(TokentapeError):
    """The request body did not arrive in time."""

    status = 408
    code = "body_timeout"


class UnsupportedEncoding(TokentapeError):
    """A compressed request body: bodies are accepted as sent, uncompressed."""

    status = 415
    code = "unsupported_content_encoding"


class NotFound(TokentapeError):
    status = 404
    code = "not_found"


class Conflict(TokentapeError):
    status = 409
    code = "conflict"


class Expired(TokentapeError):
    status = 410
    code = "expired"


class Unavailable(TokentapeError):
    """Redis (or another dependency) is not answering; retrying later may succeed."""

    status = 503
    code = "unavailable"


# Refusals of the append script. A worker that sees one of these must stop writing.


class AppendRefused(TokentapeError):
    status = 409


class Fenced(AppendRefused):
    """The writer's lease epoch is no longer current: another worker took the generation over."""

    code = "fenced"


class AlreadyFinished(AppendRefused):
    """The generation already has its terminal event; nothing can follow it."""

    code = "already_finished"


class SeqConflict(AppendRefused):
    """The writer's next seq disagrees with the log, and it is not a retry of an applied batch."""

    code = "seq_conflict"


# Raised by the client (app.client).


class StreamLost(Unavailable):
    """An events stream could not be resumed: its reconnects ran out. `last_seq` is the
    last event received; reading again after it continues the stream."""

    code = "stream_lost"

    def __init__(self, message: str, *, last_seq: int, generation_id: str) -> None:
        super().__init__(message=message, last_seq=last_seq, generation_id=generation_id)
        self.last_seq = last_seq


class GenerationFailed(TokentapeError):
    """The generation ended with an `error` event; `code` and `message` are that event's."""

    status = 502
