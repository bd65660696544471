"""Errors a caller can see. Each carries a stable `code` and a message that says what to do."""

from __future__ import annotations

from typing import Any


class TokentapeError(Exception):
    status = 500
    code = "internal"

    def __init__(self, code: str | None = None, message: str = "", **detail: Any) -> None:
        if code is not None:
            self.code = code
        self.message = message or self.code.replace("_", " ")
        self.detail = detail
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
