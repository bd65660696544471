"""What a client asks for (`GenerationRequest`) and what it is told (`GenerationStatus`)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from app.errors import InvalidRequest, LimitExceeded
from app.settings import Settings

Status = Literal["queued", "running", "done", "error", "cancelled"]
TERMINAL_STATUSES = frozenset({"done", "error", "cancelled"})

_MODEL_RE = re.compile(r"^(sim|(openai|anthropic)/[\w.:@/-]{1,200})$")
# msgspec names a missing or unknown field in its message, not in its path.
_NAMED_FIELD_RE = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]*)`")


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
    # The pattern is for the OpenAPI document; parse_request checks it with its own error.
    model: Annotated[
        str,
        msgspec.Meta(
            min_length=1, max_length=256, extra_json_schema={"pattern": _MODEL_RE.pattern}
        ),
    ]
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
        field = path.rstrip("`").removeprefix("$").lstrip(".")
        if named := _NAMED_FIELD_RE.match(message):
            field = f"{field}.{named[1]}" if field else named[1]
        raise InvalidRequest("invalid_request", message, field=field or None) from None
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


def check_limits(request: GenerationRequest, settings: Settings) -> None:
    """Refuse a request past the size limits of `settings`, naming the limit."""
    if len(request.messages) > settings.max_messages:
        raise LimitExceeded(
            "too_many_messages",
            f"{len(request.messages)} messages; at most {settings.max_messages} are accepted",
            setting="TOKENTAPE_MAX_MESSAGES",
            limit=settings.max_messages,
            field="messages",
        )
    if request.tools is not None and len(request.tools) > settings.max_tools:
        raise LimitExceeded(
            "too_many_tools",
            f"{len(request.tools)} tools; at most {settings.max_tools} are accepted",
            setting="TOKENTAPE_MAX_TOOLS",
            limit=settings.max_tools,
            field="tools",
        )
    chars = sum(_prompt_chars(message.content) for message in request.messages)
    if chars > settings.max_prompt_chars:
        raise LimitExceeded(
            "prompt_too_long",
            f"the messages hold {chars} characters of text; at most "
            f"{settings.max_prompt_chars} are accepted",
            setting="TOKENTAPE_MAX_PROMPT_CHARS",
            limit=settings.max_prompt_chars,
            field="messages",
        )
    sim = request.sim
    if sim is not None and sim.tokens > settings.max_sim_tokens:
        raise LimitExceeded(
            "sim_too_large",
            f"sim.tokens is {sim.tokens}; at most {settings.max_sim_tokens}",
            setting="TOKENTAPE_MAX_SIM_TOKENS",
            limit=settings.max_sim_tokens,
            field="sim.tokens",
        )
    if sim is not None and sim.tokens / sim.tokens_per_second > settings.max_sim_seconds:
        raise LimitExceeded(
            "sim_too_long",
            f"sim would stream for {sim.tokens / sim.tokens_per_second:.0f} s; at most "
            f"{settings.max_sim_seconds:g} s: raise tokens_per_second or lower tokens",
            setting="TOKENTAPE_MAX_SIM_SECONDS",
            limit=settings.max_sim_seconds,
            field="sim.tokens_per_second",
        )


def _prompt_chars(content: str | list[dict[str, Any]] | None) -> int:
    if isinstance(content, str):
        return len(content)
    if content is None:
        return 0
    return sum(len(text) for part in content if isinstance(text := part.get("text"), str))


class Created(msgspec.Struct, omit_defaults=True):
    """The answer to a create. With API keys, `events_url` carries the read token."""

    id: str
    events_url: str
    status_url: str
    read_token: str | None = None
    read_token_expires_at: str | None = None


class ReadTokenGrant(msgspec.Struct):
    """A fresh read token for one generation, and its events URL carrying it."""

    read_token: str
    read_token_expires_at: str
    events_url: str


class CancelAccepted(msgspec.Struct):
    id: str
    status: Status


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
