"""`openai/<name>`: any OpenAI-compatible chat-completions endpoint, streamed.

Works with OpenAI, vLLM, llama.cpp server, Ollama and LiteLLM, configured by
`OPENAI_BASE_URL` and `OPENAI_API_KEY`.

Continuation after a takeover appends the partial answer as a trailing
assistant message. llama.cpp server continues such a message as is; vLLM needs
`continuation_options={"continue_final_message": True, "add_generation_prompt": False}`;
OpenAI itself answers it with a new message rather than a continuation, so
the text may restart or repeat there.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import aiohttp
import msgspec

from app import sse
from app.events import Done, Error, Event, FinishReason, Token, ToolCall, Usage
from app.settings import Settings
from workers.models._resume import resume_from
from workers.models._upstream import RetryPolicy, Session, Transient, Upstream, stream_events
from workers.models.base import GenerationContext
from workers.models.toolcalls import InvalidToolArguments, ToolCallAccumulator

DEFAULT_BASE_URL = "https://api.openai.com/v1"

FINISH_REASONS: Mapping[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # the deprecated single-function form
    "content_filter": "content_filter",
}


class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallChunk(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCallChunk] | None = None
    function_call: _FunctionDelta | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class _ErrorBody(msgspec.Struct):
    message: str = ""
    type: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _ErrorBody | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


class OpenAIAdapter:
    """Streams a generation from an OpenAI-compatible `/chat/completions` endpoint."""

    provider = "openai"

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        max_streams: int = Settings.provider_concurrency,
        continuation_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._session = Session(session, max_streams)
        self.max_streams = max_streams
        base = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self._upstream = Upstream(
            provider=self.provider,
            url=base.rstrip("/") + "/chat/completions",
            headers={"Authorization": f"Bearer {key}"} if key else {},
            retry=retry or RetryPolicy(),
        )
        self._continuation_options = dict(continuation_options or {})

    async def close(self) -> None:
        """Close the HTTP session if this adapter created it."""
        await self._session.close()

    async def stream(self, context: GenerationContext) -> AsyncIterator[Event]:
        resume = resume_from(context.prior, self.provider)
        if resume.finished:
            return
        if resume.tool_calls:
            # Tool calls are only emitted at finish_reason: the answer was complete.
            yield Done(reason="tool_calls")
            return
        body = self.request_body(context, continue_text=resume.text)
        async for event in stream_events(self._session.get(), self._upstream, body, _translate):
            yield event

    def request_body(
        self, context: GenerationContext, *, continue_text: str = ""
    ) -> dict[str, Any]:
        """The chat-completions request: the generation's parameters, passed through."""
        request = context.request
        messages: list[Any] = [msgspec.to_builtins(message) for message in request.messages]
        body: dict[str, Any] = {
            "model": request.model.split("/", 1)[1],
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        optional = {
            "tools": request.tools,
            "tool_choice": request.tool_choice,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": request.max_tokens,
            "stop": request.stop,
        }
        body.update({name: value for name, value in optional.items() if value is not None})
        body.update(request.provider_options or {})
        body["stream"] = True  # the one option a caller cannot turn off: this adapter reads SSE
        if continue_text:
            messages.append({"role": "assistant", "content": continue_text})
            body.update(self._continuation_options)
        return body


async def _translate(messages: AsyncIterator[sse.ReceivedEvent]) -> AsyncGenerator[Event, None]:
    calls = ToolCallAccumulator()
    finish: FinishReason | None = None
    usage = Usage()
    async for message in messages:
        if message.data == "[DONE]":
            if finish is None:
                # Lenient with servers that end with [DONE] alone: it is still an explicit end.
                try:
                    finish, completed = _finish_calls(calls, "stop")
                except InvalidToolArguments as exc:
                    yield Error(code=exc.code, message=exc.message)
                    return
                for call in completed:
                    yield call
            yield Done(reason=finish, usage=usage)
            return
        chunk = _decode(message.data)
        if chunk.error is not None:
            raise Transient(f"openai stream error: {chunk.error.type}: {chunk.error.message}")
        if chunk.usage is not None:
            usage = Usage(
                prompt_tokens=chunk.usage.prompt_tokens,
                completion_tokens=chunk.usage.completion_tokens,
                total_tokens=chunk.usage.total_tokens,
            )
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # n > 1 is not a generation we can log as one stream
            delta = choice.delta
            if delta is not None:
                for text in (delta.content, delta.refusal):
                    if text:
                        yield Token(text=text)
                for fragment in delta.tool_calls or ():
                    function = fragment.function or _FunctionDelta()
                    event = calls.add(
                        fragment.index,
                        id=fragment.id,
                        name=function.name,
                        arguments_delta=function.arguments or "",
                    )
                    if event is not None:
                        yield event
                if delta.function_call is not None:
                    event = calls.add(
                        0,
                        name=delta.function_call.name,
                        arguments_delta=delta.function_call.arguments or "",
                    )
                    if event is not None:
                        yield event
            if choice.finish_reason is not None and finish is None:
                try:
                    finish, completed = _finish_calls(calls, choice.finish_reason)
                except InvalidToolArguments as exc:
                    yield Error(code=exc.code, message=exc.message)
                    return
                for call in completed:
                    yield call
    raise Transient("openai stream ended without [DONE]")


def _finish_calls(
    calls: ToolCallAccumulator, finish_reason: str
) -> tuple[FinishReason, list[ToolCall]]:
    """Complete every tool call at the end of the choice; raises `InvalidToolArguments`."""
    reason = FINISH_REASONS.get(finish_reason, "stop")
    completed = calls.finish_all()
    # Some servers (older llama.cpp, Ollama) answer tool calls with finish_reason "stop".
    if completed and reason == "stop":
        reason = "tool_calls"
    return reason, completed


def _decode(data: str) -> _Chunk:
    try:
        return _chunk_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise Transient(f"openai sent a chunk that is not a completion chunk: {exc}") from None
