"""What both provider adapters share: the HTTP request, its faults, retries and SSE reading.

The rule for faults: until the first event of a generation is emitted, a
transient failure (connection error, timeout, 429, 5xx, a stream that ends
before anything happened) is retried with tenacity; after it, retrying would
duplicate what the client has already seen, so the failure ends the attempt
with `ProviderError("provider_disconnected", retryable=True)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import msgspec
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from app import sse
from app.events import Event
from workers.models.base import ProviderError

RETRYABLE_STATUSES = frozenset({429}) | frozenset(range(500, 600))
_ERROR_BODY_LIMIT = 4096
# sock_read: a provider silent for this long (not even a keep-alive comment) is gone.
PROVIDER_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)


class Transient(Exception):
    """A failure worth retrying if nothing was emitted yet; `retry_after` from the provider."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


_TRANSIENT_ERRORS = (Transient, aiohttp.ClientError, TimeoutError)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries before the first event: exponential backoff with jitter, or Retry-After."""

    attempts: int = 5
    # No attempt starts after this long, counting the wait before it.
    max_seconds: float = 60.0
    initial_wait: float = 0.5
    max_wait: float = 20.0
    # Injected by tests to observe the waits instead of spending them.
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


_Opened = tuple[contextlib.AsyncExitStack, AsyncGenerator[Event, None], Event]
Translate = Callable[[AsyncIterator[sse.ReceivedEvent]], AsyncGenerator[Event, None]]


@dataclasses.dataclass(frozen=True)
class Upstream:
    """Where one provider lives and how to talk to it."""

    provider: str
    url: str
    headers: Mapping[str, str]
    retry: RetryPolicy
    timeout: aiohttp.ClientTimeout = PROVIDER_TIMEOUT


class Session:
    """The caller's aiohttp session, or one made on first use and closed by `close()`.

    The one it makes keeps at most `max_streams` connections to the provider open;
    a request past that waits for one (with no timeout: a long answer ends when it
    ends). aiohttp's default of 100 would cap a worker's generations of one provider
    at 100 without saying so.
    """

    def __init__(self, given: aiohttp.ClientSession | None, max_streams: int) -> None:
        self._session = given
        self._owned = given is None
        self._max_streams = max_streams

    def get(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_streams, limit_per_host=0)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._owned and self._session is not None:
            await self._session.close()
            self._session = None


async def stream_events(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    body: Mapping[str, Any],
    translate: Translate,
) -> AsyncIterator[Event]:
    """POST `body`, read the SSE response through `translate`, retrying until the first event.

    `translate` raises `Transient` for a stream that ends without its end marker
    and `ProviderError` for what must not be retried. The response is closed
    when this generator is closed or its task cancelled, so the provider stops.
    """
    policy = upstream.retry
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts) | stop_before_delay(policy.max_seconds),
        wait=_Wait(policy),
        retry=retry_if_exception_type(_TRANSIENT_ERRORS),
        sleep=policy.sleep,
        reraise=True,
    )
    try:
        opened: _Opened = await retrying(_open, session, upstream, body, translate)
    except _TRANSIENT_ERRORS as exc:
        raise ProviderError(
            "provider_unavailable",
            f"{upstream.provider} is unavailable, retries given up: {_describe(exc)}",
            retryable=True,
        ) from exc

    stack, events, first = opened
    async with stack:
        yield first
        try:
            async for event in events:
                yield event
        except _TRANSIENT_ERRORS as exc:
            raise ProviderError(
                "provider_disconnected",
                f"{upstream.provider} stream broke after output was sent: {_describe(exc)}",
                retryable=True,
            ) from exc


async def _open(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    body: Mapping[str, Any],
    translate: Translate,
) -> _Opened:
    """One attempt: the open response, its events and the first of them (the retried unit)."""
    stack = contextlib.AsyncExitStack()
    try:
        response = await stack.enter_async_context(_post(session, upstream, body))
        events = await stack.enter_async_context(
            contextlib.aclosing(translate(_messages(response)))
        )
        first = await anext(events, None)
        if first is None:
            raise Transient(f"{upstream.provider} ended the stream before any event")
    except BaseException:
        await stack.aclose()
        raise
    return stack, events, first


@contextlib.asynccontextmanager
async def _post(
    session: aiohttp.ClientSession, upstream: Upstream, body: Mapping[str, Any]
) -> AsyncIterator[aiohttp.ClientResponse]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    headers.update(upstream.headers)
    async with session.post(
        upstream.url, data=msgspec.json.encode(body), headers=headers, timeout=upstream.timeout
    ) as response:
        try:
            await _check_status(upstream.provider, response)
            yield response
        finally:
            # Closing (not releasing) an unfinished response drops the connection: the
            # provider sees the client leave and stops generating (and billing).
            if not response.content.at_eof():
                response.close()


async def _check_status(provider: str, response: aiohttp.ClientResponse) -> None:
    if response.status == 200:
        if response.content_type != "text/event-stream":
            detail = await _error_detail(response)
            raise ProviderError(
                "provider_bad_response",
                f"{provider} answered {response.content_type!r}, not an event stream: {detail}",
            )
        return
    detail = await _error_detail(response)
    message = f"{provider} returned HTTP {response.status}: {detail}"
    if response.status in RETRYABLE_STATUSES:
        raise Transient(message, retry_after=_retry_after(response.headers))
    if response.status in (401, 403):
        raise ProviderError("provider_unauthorized", f"{message} (check the API key)")
    raise ProviderError("provider_rejected", message)


async def _error_detail(response: aiohttp.ClientResponse) -> str:
    raw = await response.content.read(_ERROR_BODY_LIMIT)
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw.decode("utf-8", errors="replace").strip() or response.reason or ""
    # OpenAI: {"error": {"message", "type", "code"}}; Anthropic: {"type": "error", "error": {...}}.
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        kind = error.get("type") or error.get("code")
        return f"{kind}: {error['message']}" if kind else str(error["message"])
    return raw.decode("utf-8", errors="replace").strip()


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the provider asks us to wait.

    OpenAI's `retry-after-ms` first, else `Retry-After` as delta-seconds or an HTTP date.
    """
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        with contextlib.suppress(ValueError):
            return max(0.0, float(milliseconds) / 1000)
    value = headers.get("Retry-After")
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Wait:
    """tenacity wait: the provider's Retry-After when it gave one, else jittered backoff."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._backoff = wait_exponential(
            multiplier=policy.initial_wait, max=policy.max_wait
        ) + wait_random(0, policy.initial_wait)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, Transient) and exc.retry_after is not None:
            # Honoured as asked; one that does not fit in max_seconds stops the retries.
            return exc.retry_after
        return self._backoff(state)


async def _messages(response: aiohttp.ClientResponse) -> AsyncIterator[sse.ReceivedEvent]:
    parser = sse.Parser()
    async for chunk in response.content.iter_any():
        for message in parser.feed(chunk):
            yield message


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Transient):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the provider"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
