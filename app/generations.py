"""What a client asks for (`GenerationRequest`) and what it is told (`GenerationStatus`)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from app.errors import InvalidRequest

Status = Literal["queued", "running", "done", "error", "cancelled"]
TERMINAL_STATUSES = frozenset({"done", "error", "cancelled"})

_MODEL_RE = re.compile(r"^(sim|(openai|anthropic)/[\w.:@/-]{1,200})$")


class Message(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or content parts (text, images…) passed through to the provider.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class SimParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The built-in simulated model: deterministic from its seed."""

    tokens: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 64
    tokens_per_second: Annotated[float, msgspec.Meta(gt=0, le=1e9)] = 50.0
    seed: int = 0
    tool_calls: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0


class GenerationRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stop: str | list[str] | None = None
    sim: SimParams | None = None
    # Passed through verbatim to the provider's request body (e.g. `seed`, `response_format`).
    provider_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0]


_request_decoder = msgspec.json.Decoder(GenerationRequest)


def parse_request(body: bytes) -> GenerationRequest:
    """Decode and validate a request body; errors name the offending field."""
    try:
        request = _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, _, path = str(exc).partition(" - at `")
        field = path.rstrip("`").removeprefix("$").lstrip(".") or None
        raise InvalidRequest("invalid_request", message, field=field) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest("invalid_json", f"request body is not valid JSON: {exc}") from None
    if not _MODEL_RE.match(request.model):
        raise InvalidRequest(
            "unknown_model",
            f"model {request.model!r} is not one of: sim, openai/<name>, anthropic/<name>",
            field="model",
        )
    if request.sim is not None and request.model != "sim":
        raise InvalidRequest("invalid_request", "`sim` is only for model 'sim'", field="sim")
    return request


class ErrorInfo(msgspec.Struct, omit_defaults=True):
    code: str
    message: str | None = None


class GenerationStatus(msgspec.Struct, omit_defaults=True):
    id: str
    status: Status
    model: str
    last_seq: int
    attempts: int
    # True once retention removed the events; the status is kept a while longer.
    expired: bool
    created_at: str
    events_url: str
    started_at: str | None = None
    finished_at: str | None = None
    finish_reason: str | None = None
    error: ErrorInfo | None = None
