"""`anthropic/<name>`: the Anthropic Messages API, streamed.

Configured by `ANTHROPIC_BASE_URL` and `ANTHROPIC_API_KEY`. Requests arrive in
the OpenAI chat shape (the one `GenerationRequest` speaks); this module
translates them: system messages to the top-level `system`, tool results to
`tool_result` blocks, function tools to `input_schema` tools.

Continuation after a takeover prefills the partial answer as a trailing
assistant message, which Claude continues.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import aiohttp
import msgspec

from app import sse
from app.events import Done, Error, Event, FinishReason, Token, Usage
from app.generations import Message
from app.settings import Settings
from workers.models._resume import resume_from
from workers.models._upstream import RetryPolicy, Session, Transient, Upstream, stream_events
from workers.models.base import GenerationContext, ProviderError
from workers.models.toolcalls import InvalidToolArguments, ToolCallAccumulator

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
# The Messages API requires max_tokens; this is used when the request has none.
DEFAULT_MAX_TOKENS = 4096

STOP_REASONS: Mapping[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# In-stream `error` events worth retrying (before the first event) or continuing.
TRANSIENT_ERROR_TYPES = frozenset({"overloaded_error", "api_error", "rate_limit_error"})
_TOOL_CHOICES: Mapping[str, dict[str, Any]] = {
    "auto": {"type": "auto"},
    "required": {"type": "any"},
    "none": {"type": "none"},
}


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _MessageStart(msgspec.Struct):
    usage: _Usage | None = None


class _ContentBlock(msgspec.Struct):
    type: str
    id: str | None = None
    name: str | None = None
    text: str | None = None


class _Delta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _ErrorBody(msgspec.Struct):
    type: str = "error"
    message: str = ""


class _StreamEvent(msgspec.Struct):
    """Every Messages stream event in one shape: unknown event and delta types are skipped."""

    type: str
    index: int | None = None
    message: _MessageStart | None = None
    content_block: _ContentBlock | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: _ErrorBody | None = None


_event_decoder = msgspec.json.Decoder(_StreamEvent)


class AnthropicAdapter:
    """Streams a generation from the Anthropic Messages API (`/v1/messages`)."""

    provider = "anthropic"

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        max_streams: int = Settings.provider_concurrency,
    ) -> None:
        self._session = Session(session, max_streams)
        self.max_streams = max_streams
        base = base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL
        key = api_key if api_key is not None else os.environ.get("ANTHROPIC_API_KEY", "")
        headers = {"anthropic-version": API_VERSION}
        if key:
            headers["x-api-key"] = key
        self._upstream = Upstream(
            provider=self.provider,
            url=base.rstrip("/") + "/v1/messages",
            headers=headers,
            retry=retry or RetryPolicy(),
        )

    async def close(self) -> None:
        """Close the HTTP session if this adapter created it."""
        await self._session.close()

    async def stream(self, context: GenerationContext) -> AsyncIterator[Event]:
        resume = resume_from(context.prior, self.provider)
        if resume.finished:
            return
        if resume.tool_calls:
            raise ProviderError(
                "worker_lost",
                "the worker running this generation was lost after a tool call, "
                "which a prefill cannot continue; retry the generation",
                retryable=True,
            )
        # Trap: the API rejects a prefill ending in whitespace. Send it stripped, and drop
        # that whitespace again from the start of the continuation: the log already has it.
        prefill = resume.text.rstrip()
        translate = _Translator(already_sent=resume.text[len(prefill) :])
        body = self.request_body(context, prefill=prefill)
        async for event in stream_events(self._session.get(), self._upstream, body, translate):
            yield event

    def request_body(self, context: GenerationContext, *, prefill: str = "") -> dict[str, Any]:
        """The Messages API request, translated from the chat-completions shape."""
        request = context.request
        system: list[str] = []
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            if message.role in ("system", "developer"):
                system.append(_text_of(message))
            else:
                messages.append(_message(message))
        if prefill:
            messages.append({"role": "assistant", "content": prefill})
        body: dict[str, Any] = {
            "model": request.model.split("/", 1)[1],
            "messages": messages,
            "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
            "stream": True,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if request.tools is not None:
            body["tools"] = [_tool(tool) for tool in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = _tool_choice(request.tool_choice)
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop is not None:
            stop = request.stop
            body["stop_sequences"] = [stop] if isinstance(stop, str) else stop
        body.update(request.provider_options or {})
        body["stream"] = True  # the one option a caller cannot turn off: this adapter reads SSE
        return body


class _Translator:
    """Messages stream events to generation events."""

    def __init__(self, already_sent: str = "") -> None:
        self._already_sent = already_sent

    async def __call__(
        self, messages: AsyncIterator[sse.ReceivedEvent]
    ) -> AsyncGenerator[Event, None]:
        # Called once per attempt: all state is local, a retry starts afresh.
        skip = self._already_sent
        calls = ToolCallAccumulator()
        tool_blocks: set[int] = set()
        usage = _Usage()
        reason: FinishReason = "stop"
        async for message in messages:
            event = _decode(message.data)
            if event.type == "message_start" and event.message is not None:
                usage = _merge_usage(usage, event.message.usage)
            elif event.type == "content_block_start" and event.content_block is not None:
                block = event.content_block
                index = event.index or 0
                if block.type == "tool_use":
                    tool_blocks.add(index)
                    delta = calls.add(index, id=block.id, name=block.name)
                    if delta is not None:
                        yield delta
                elif block.type == "text" and block.text:
                    text, skip = _without_repeat(block.text, skip)
                    if text:
                        yield Token(text=text)
            elif event.type == "content_block_delta" and event.delta is not None:
                index = event.index or 0
                if event.delta.type == "text_delta" and event.delta.text:
                    text, skip = _without_repeat(event.delta.text, skip)
                    if text:
                        yield Token(text=text)
                elif event.delta.type == "input_json_delta" and event.delta.partial_json:
                    delta = calls.add(index, arguments_delta=event.delta.partial_json)
                    if delta is not None:
                        yield delta
            elif event.type == "content_block_stop" and event.index in tool_blocks:
                tool_blocks.discard(event.index)
                try:
                    yield calls.finish(event.index)
                except InvalidToolArguments as exc:
                    yield Error(code=exc.code, message=exc.message)
                    return
            elif event.type == "message_delta":
                usage = _merge_usage(usage, event.usage)
                if event.delta is not None and event.delta.stop_reason is not None:
                    reason = STOP_REASONS.get(event.delta.stop_reason, "stop")
            elif event.type == "message_stop":
                if calls.pending:
                    raise Transient("anthropic ended the message inside a tool_use block")
                yield Done(reason=reason, usage=_usage(usage))
                return
            elif event.type == "error":
                raise _stream_error(event.error or _ErrorBody())
            # ping, and event or delta types added after this was written: skipped.
        raise Transient("anthropic stream ended without message_stop")


def _without_repeat(text: str, skip: str) -> tuple[str, str]:
    """`text` without the start of `skip` it repeats, and what is left of `skip`.

    The continuation after a prefill usually starts with the whitespace the
    prefill had to leave out; the log already has it.
    """
    if not skip:
        return text, skip
    matched = 0
    while matched < min(len(text), len(skip)) and text[matched] == skip[matched]:
        matched += 1
    return text[matched:], skip[matched:] if matched == len(text) else ""


def _decode(data: str) -> _StreamEvent:
    try:
        return _event_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise Transient(f"anthropic sent an event that is not a stream event: {exc}") from None


def _stream_error(error: _ErrorBody) -> Exception:
    message = f"anthropic stream error: {error.type}: {error.message}"
    if error.type in TRANSIENT_ERROR_TYPES:
        return Transient(message)
    return ProviderError("provider_error", message)


def _merge_usage(usage: _Usage, update: _Usage | None) -> _Usage:
    """message_start carries input tokens; message_delta the cumulative output tokens."""
    if update is None:
        return usage
    return _Usage(
        input_tokens=_first(update.input_tokens, usage.input_tokens),
        output_tokens=_first(update.output_tokens, usage.output_tokens),
        cache_creation_input_tokens=_first(
            update.cache_creation_input_tokens, usage.cache_creation_input_tokens
        ),
        cache_read_input_tokens=_first(
            update.cache_read_input_tokens, usage.cache_read_input_tokens
        ),
    )


def _first(*values: int | None) -> int | None:
    return next((value for value in values if value is not None), None)


def _usage(usage: _Usage) -> Usage:
    if usage.input_tokens is None and usage.output_tokens is None:
        return Usage()
    # Anthropic's input_tokens excludes cached prompt tokens; the prompt is all three.
    prompt = sum(
        n or 0
        for n in (
            usage.input_tokens,
            usage.cache_creation_input_tokens,
            usage.cache_read_input_tokens,
        )
    )
    completion = usage.output_tokens or 0
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _text_of(message: Message) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = message.content or []
    return "".join(str(part.get("text", "")) for part in parts if part.get("type") == "text")


def _message(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
        if message.content is not None:
            result["content"] = message.content
        return {"role": "user", "content": [result]}
    if message.role == "assistant" and message.tool_calls:
        blocks: list[dict[str, Any]] = []
        if isinstance(message.content, str) and message.content:
            blocks.append({"type": "text", "text": message.content})
        elif isinstance(message.content, list):
            blocks.extend(message.content)
        blocks.extend(_tool_use(call) for call in message.tool_calls)
        return {"role": "assistant", "content": blocks}
    return {"role": message.role, "content": message.content or ""}


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped assistant tool call as a `tool_use` block; others pass through."""
    function = call.get("function")
    if not isinstance(function, dict):
        return call
    arguments = function.get("arguments") or "{}"
    try:
        tool_input = msgspec.json.decode(arguments) if isinstance(arguments, str) else arguments
    except msgspec.DecodeError:
        raise ProviderError(
            "invalid_request",
            f"assistant tool call {function.get('name')!r} has arguments that are not JSON",
        ) from None
    name = function.get("name")
    return {"type": "tool_use", "id": call.get("id"), "name": name, "input": tool_input}


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI function tool as an Anthropic tool; Anthropic-shaped tools pass through."""
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict):
        return tool
    converted: dict[str, Any] = {
        "name": function.get("name"),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        converted["description"] = function["description"]
    return converted


def _tool_choice(choice: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(choice, str):
        return _TOOL_CHOICES.get(choice, {"type": choice})
    function = choice.get("function")
    if choice.get("type") == "function" and isinstance(function, dict):
        return {"type": "tool", "name": function.get("name")}
    return choice
