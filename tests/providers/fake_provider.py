"""A local fake of the OpenAI and Anthropic streaming endpoints, scripted reply by reply.

The frames are byte-for-byte the shapes the providers document: OpenAI's
`data: {chunk}` lines ending in `data: [DONE]`, Anthropic's named events from
`message_start` to `message_stop`, both with compact JSON.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from aiohttp import web

Ending = Literal["end", "abort", "hold"]


@dataclasses.dataclass(frozen=True)
class Reply:
    """One scripted answer: an error status, or SSE frames and how the stream ends.

    `abort` closes the connection mid-body (no terminating chunk); `hold` keeps the
    stream open until the client leaves.
    """

    status: int = 200
    frames: Sequence[bytes] = ()
    ending: Ending = "end"
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    content_type: str = "text/event-stream"
    # Write the body one byte at a time: splits UTF-8 sequences and lines across reads.
    bytewise: bool = False


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: Mapping[str, str]
    body: dict[str, Any]


class FakeProvider:
    """Serves `/v1/chat/completions` and `/v1/messages` from a queue of replies."""

    def __init__(self) -> None:
        self.replies: collections.deque[Reply] = collections.deque()
        self.requests: list[RecordedRequest] = []
        # Set when a `hold` reply starts holding, and when its client goes away.
        self.holding = asyncio.Event()
        self.client_left = asyncio.Event()

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/messages", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(RecordedRequest(request.path, dict(request.headers), body))
        reply = self.replies.popleft()
        if reply.status != 200 or reply.content_type != "text/event-stream":
            return web.Response(
                status=reply.status,
                body=reply.body,
                headers=reply.headers,
                content_type=reply.content_type,
            )
        response = web.StreamResponse(headers={"Cache-Control": "no-cache", **reply.headers})
        response.content_type = "text/event-stream"
        await response.prepare(request)
        body = b"".join(reply.frames)
        pieces = [body[i : i + 1] for i in range(len(body))] if reply.bytewise else reply.frames
        for piece in pieces:
            await response.write(piece)
        if reply.ending == "abort":
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # the connection is gone; aiohttp drops the handler
        if reply.ending == "hold":
            self.holding.set()
            try:
                await asyncio.Event().wait()  # until aiohttp cancels us: the client left
            finally:
                self.client_left.set()
        await response.write_eof()
        return response


def _json(value: Any, *, ascii_only: bool = False) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=ascii_only).encode()


# --- OpenAI chat.completion.chunk -------------------------------------------------------


class OpenAIStream:
    """Frames of one OpenAI streamed completion; `ascii_only` escapes non-ASCII as \\uXXXX."""

    def __init__(self, *, ascii_only: bool = False) -> None:
        self.ascii_only = ascii_only

    def chunk(
        self,
        delta: Mapping[str, Any] | None = None,
        *,
        finish_reason: str | None = None,
        choices: bool = True,
        usage: Mapping[str, int] | None = None,
    ) -> bytes:
        body: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini",
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "delta": dict(delta or {}),
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ]
            if choices
            else [],
        }
        if usage is not None or not choices:
            body["usage"] = dict(usage) if usage is not None else None
        return b"data: " + _json(body, ascii_only=self.ascii_only) + b"\n\n"

    def role(self) -> bytes:
        return self.chunk({"role": "assistant", "content": "", "refusal": None})

    def text(self, text: str) -> bytes:
        return self.chunk({"content": text})

    def tool_start(self, index: int, call_id: str, name: str) -> bytes:
        return self.chunk(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ]
            }
        )

    def tool_arguments(self, index: int, fragment: str) -> bytes:
        return self.chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})

    def finish(self, reason: str) -> bytes:
        return self.chunk({}, finish_reason=reason)

    def usage(self, prompt: int = 9, completion: int = 12) -> bytes:
        usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        return self.chunk(choices=False, usage={**usage, "total_tokens": prompt + completion})

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"

    @staticmethod
    def keep_alive() -> bytes:
        return b": keep-alive\n\n"

    def text_reply(self, tokens: Sequence[str], reason: str = "stop") -> list[bytes]:
        return [
            self.role(),
            *(self.text(t) for t in tokens),
            self.finish(reason),
            self.usage(),
            self.done(),
        ]

    def text_start(self, tokens: Sequence[str]) -> list[bytes]:
        """The start of a text reply, without its end (for disconnects and holds)."""
        return [self.role(), *(self.text(t) for t in tokens)]


# --- Anthropic Messages stream ----------------------------------------------------------


class AnthropicStream:
    """Frames of one Anthropic Messages stream."""

    def __init__(self, *, ascii_only: bool = False) -> None:
        self.ascii_only = ascii_only

    def event(self, name: str, data: Mapping[str, Any]) -> bytes:
        payload = _json({"type": name, **data}, ascii_only=self.ascii_only)
        return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"

    def message_start(self, input_tokens: int = 25) -> bytes:
        message: dict[str, Any] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-sonnet-4-5",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }
        return self.event("message_start", {"message": message})

    def text_block_start(self, index: int) -> bytes:
        return self.event(
            "content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}}
        )

    def text(self, index: int, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text}
        return self.event("content_block_delta", {"index": index, "delta": delta})

    def tool_block_start(self, index: int, tool_id: str, name: str) -> bytes:
        block = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
        return self.event("content_block_start", {"index": index, "content_block": block})

    def tool_arguments(self, index: int, fragment: str) -> bytes:
        delta = {"type": "input_json_delta", "partial_json": fragment}
        return self.event("content_block_delta", {"index": index, "delta": delta})

    def block_stop(self, index: int) -> bytes:
        return self.event("content_block_stop", {"index": index})

    def message_delta(self, stop_reason: str, output_tokens: int = 15) -> bytes:
        return self.event(
            "message_delta",
            {
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )

    def message_stop(self) -> bytes:
        return self.event("message_stop", {})

    def ping(self) -> bytes:
        return self.event("ping", {})

    def keep_alive(self) -> bytes:
        return self.ping()

    def error(self, kind: str, message: str) -> bytes:
        return self.event("error", {"error": {"type": kind, "message": message}})

    def text_reply(self, tokens: Sequence[str], reason: str = "end_turn") -> list[bytes]:
        return [
            *self.text_start(tokens),
            self.block_stop(0),
            self.message_delta(reason),
            self.message_stop(),
        ]

    def text_start(self, tokens: Sequence[str]) -> list[bytes]:
        return [
            self.message_start(),
            self.text_block_start(0),
            self.ping(),
            *(self.text(0, t) for t in tokens),
        ]
