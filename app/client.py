"""A Python client for tokentape that resumes by itself.

    async with Client("http://127.0.0.1:8080") as client:
        generation = await client.create(model="sim", messages=[{"role": "user", "content": "hi"}])
        async for item in client.events(generation.id):
            if isinstance(item, Gap):
                ...  # retention removed events item.requested .. item.first_available - 1
            elif isinstance(item, Reset):
                ...  # Redis lost writes: drop what you hold from item.from_seq on
            else:
                ...  # item.seq, item.event (an app.events type)

`events()` hands out each event once, in order, across as many connections as it
takes: after any drop it reconnects with `Last-Event-ID`, backing off exponentially
with jitter from the server's `retry:`. It ends only after the terminal event or a
204, never because a connection closed, and raises `StreamLost` when its reconnects
run out. `SyncClient` has the same methods, blocking, for scripts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
import msgspec
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from app import events
from app.errors import (
    Conflict,
    Expired,
    GenerationFailed,
    InvalidRequest,
    NotFound,
    StreamLost,
    TokentapeError,
    Unavailable,
)
from app.events import Gap, Reset
from app.generations import GenerationStatus
from app.sse import Parser, ReceivedEvent

__all__ = ["Client", "Entry", "Gap", "Generation", "Item", "Reset", "SyncClient"]

logger = logging.getLogger(__name__)

_ERRORS_BY_STATUS: Mapping[int, type[TokentapeError]] = {
    400: InvalidRequest,
    404: NotFound,
    409: Conflict,
    410: Expired,
    503: Unavailable,
}
# Statuses of the events endpoint worth another try; any other 4xx never changes.
_RETRIED_STATUSES = frozenset({408, 429})

_gap_decoder = msgspec.json.Decoder(Gap)
_reset_decoder = msgspec.json.Decoder(Reset)


class Generation(msgspec.Struct, frozen=True):
    """What `create()` answers: the generation's id and where to read it."""

    id: str
    events_url: str
    status_url: str
    read_token: str | None = None  # from a server that issues read tokens


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One event of a generation and its position in the log."""

    seq: int
    event: events.Event


# A Reset says the log went back: drop every item held from its `from_seq` on.
Item = Entry | Gap | Reset


class _Retry(Exception):
    """A connection that ended, or was refused, before handing out anything new."""

    def __init__(self, reason: str, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


_RETRYABLE = (aiohttp.ClientError, TimeoutError, _Retry)


class Client:
    """tokentape over HTTP, with `events()` resuming after any drop.

    `api_key` is sent as `Authorization: Bearer`; `idle_timeout` is how long a
    connection may stay silent (heartbeats count) before it is taken for broken;
    `max_attempts` connections in a row that bring nothing new end `events()` with
    `StreamLost`. Reconnects back off exponentially with jitter from the server's
    `retry:` (`initial_backoff` until a server sent one) up to `max_backoff`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        idle_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_attempts: int = 8,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.max_attempts = max_attempts
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def create(
        self, model: str, messages: Sequence[Mapping[str, Any]], **fields: Any
    ) -> Generation:
        """Start a generation; `fields` are the request's other fields (`sim`, `tools`, ...)."""
        body = msgspec.json.encode({"model": model, "messages": list(messages), **fields})
        data = await self._call("POST", "/v1/generations", body)
        return msgspec.json.decode(data, type=Generation)

    async def status(self, generation_id: str) -> GenerationStatus:
        data = await self._call("GET", f"/v1/generations/{generation_id}")
        return msgspec.json.decode(data, type=GenerationStatus)

    async def cancel(self, generation_id: str) -> str:
        """Ask for the generation to stop; returns its status (`cancelled` once it has)."""
        data = await self._call("POST", f"/v1/generations/{generation_id}/cancel")
        status: str = msgspec.json.decode(data)["status"]
        return status

    async def events(
        self,
        generation: str | Generation,
        after: int = 0,
        *,
        token: str | None = None,
        token_in_query: bool = False,
    ) -> AsyncIterator[Item]:
        """Every event after seq `after`, once and in order, each gap retention left, and
        each reset (the log went back: drop what you hold from its `from_seq` on).

        A read `token` (default: the generation's own) replaces the API key for the
        stream, sent as `Authorization: Bearer`, or as the `token` query parameter.
        """
        async for batch in self.stream(
            generation, after, token=token, token_in_query=token_in_query
        ):
            for item in batch:
                yield item

    def stream(
        self,
        generation: str | Generation,
        after: int = 0,
        *,
        token: str | None = None,
        token_in_query: bool = False,
    ) -> EventStream:
        """`events()` a batch at a time (the events of one read): for callers that count
        the cost per event, such as `SyncClient`."""
        if isinstance(generation, Generation):
            generation_id, token = generation.id, token or generation.read_token
        else:
            generation_id = generation
        return EventStream(self, generation_id, after, token, token_in_query)

    async def text(self, generation: str | Generation, *, token: str | None = None) -> str:
        """The whole answer's text, resumed as needed.

        Raises `GenerationFailed` if it ended with an error and `Expired` if retention
        removed part of it (`events()` still reads what is left).
        """
        parts: list[tuple[int, str]] = []  # (seq, text)
        generation_id = generation.id if isinstance(generation, Generation) else generation
        async for item in self.events(generation, token=token):
            if isinstance(item, Reset):
                parts = [(seq, text) for seq, text in parts if seq < item.from_seq]
                continue
            if isinstance(item, Gap):
                raise Expired(
                    "history_lost",
                    f"retention removed events {item.requested} to {item.first_available - 1} "
                    f"of {generation_id}: its text is incomplete; events() reads what is left",
                    first_available=item.first_available,
                )
            event = item.event
            if isinstance(event, events.Token):
                parts.append((item.seq, event.text))
            elif isinstance(event, events.Error):
                text = "".join(text for _, text in parts)
                raise GenerationFailed(
                    event.code, event.message, retryable=event.retryable, text=text
                )
        return "".join(text for _, text in parts)

    def _headers(self, token: str | None = None) -> dict[str, str]:
        bearer = token or self.api_key
        return {"Authorization": f"Bearer {bearer}"} if bearer else {}

    async def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(
            sock_connect=self.connect_timeout, sock_read=self.idle_timeout
        )
        async with self.session().request(
            method, self.base_url + path, data=body, headers=headers, timeout=timeout
        ) as response:
            data = await response.read()
            if response.status >= 400:
                raise _error_from(response.status, data)
            return data


class EventStream:
    """One generation's events, read to the end across as many connections as it takes."""

    def __init__(
        self,
        client: Client,
        generation_id: str,
        after: int,
        token: str | None,
        token_in_query: bool,
    ) -> None:
        self.client = client
        self.generation_id = generation_id
        self.url = f"{client.base_url}/v1/generations/{generation_id}/events"
        self.last_seq = after  # the last event handed out
        self._resume_after = after  # sent as Last-Event-ID: past a gap once one was reported
        self.finished = False
        self.connections = 0
        self._retry_seconds = client.initial_backoff
        self._headers = {"Accept": "text/event-stream"}
        self._params: dict[str, str] = {}
        if token and token_in_query:
            self._params["token"] = token
        else:
            self._headers.update(client._headers(token))

    def __aiter__(self) -> AsyncGenerator[list[Item], None]:
        return self._batches()

    async def _batches(self) -> AsyncGenerator[list[Item], None]:
        while not self.finished:
            opened = await self._connect()
            if opened is None:
                return  # 204: the generation ended at or before our position
            response, parser, first = opened
            try:
                yield first
                while not self.finished:
                    chunk = await response.content.readany()
                    if not chunk:
                        logger.info("%s: the stream ended before the terminal event", self.url)
                        break
                    items = self._items(parser.feed(chunk))
                    if parser.retry is not None:
                        self._retry_seconds = parser.retry / 1000
                    if items:
                        yield items
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.info(
                    "%s: connection lost after seq %d: %s", self.url, self.last_seq, _describe(exc)
                )
            finally:
                response.close()

    async def _connect(self) -> tuple[aiohttp.ClientResponse, Parser, list[Item]] | None:
        """A connection that brought something new; None if the server answered 204."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.client.max_attempts),
            wait=self._backoff,
            retry=retry_if_exception_type(_RETRYABLE),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._open()
        except _RETRYABLE as exc:
            raise StreamLost(
                f"{self.client.max_attempts} connections in a row to {self.url} brought nothing "
                f"new (last: {exc!r}); resume with after={self.last_seq}",
                last_seq=self.last_seq,
                generation_id=self.generation_id,
            ) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _open(self) -> tuple[aiohttp.ClientResponse, Parser, list[Item]] | None:
        self.connections += 1
        headers = self._headers
        if self._resume_after:
            headers = {**headers, "Last-Event-ID": str(self._resume_after)}
        client = self.client
        # sock_read bounds every wait for bytes, the response headers included: a
        # silent connection (a frozen reader, a dead route) counts as broken.
        timeout = aiohttp.ClientTimeout(
            sock_connect=client.connect_timeout, sock_read=client.idle_timeout
        )
        response = await client.session().get(
            self.url, headers=headers, params=self._params, timeout=timeout
        )
        try:
            if response.status == 204:
                self.finished = True
                response.close()
                return None
            if 400 <= response.status < 500 and response.status not in _RETRIED_STATUSES:
                raise _error_from(response.status, await response.read())
            content_type = response.headers.get("Content-Type", "")
            if response.status != 200 or not content_type.startswith("text/event-stream"):
                raise _Retry(
                    f"HTTP {response.status} {content_type}".strip(),
                    _retry_after(response.headers.get("Retry-After")),
                )
            parser = Parser()
            while True:
                chunk = await response.content.readany()
                if not chunk:
                    raise _Retry("the stream ended with nothing new")
                items = self._items(parser.feed(chunk))
                if parser.retry is not None:
                    self._retry_seconds = parser.retry / 1000
                if items or self.finished:
                    return response, parser, items
        except BaseException:
            response.close()
            raise

    def _items(self, messages: list[ReceivedEvent]) -> list[Item]:
        """What `messages` hold that was not handed out yet; sets `finished` at the terminal."""
        items: list[Item] = []
        for message in messages:
            if message.event == "reset":
                # Its id is where the stream goes on from: past the seqs it declares void,
                # or back before the first (0) when the client must read everything again.
                reset = _reset_decoder.decode(message.data)
                items.append(reset)
                self.last_seq = self._resume_after = int(message.id or 0)
                continue
            if message.event == "gap":
                gap = _gap_decoder.decode(message.data)
                if gap.first_available - 1 > self._resume_after:
                    items.append(gap)
                    self._resume_after = gap.first_available - 1
                continue
            seq = int(message.id or 0)
            if seq <= self._resume_after:
                continue  # handed out on an earlier connection
            if seq > self._resume_after + 1:
                # The server announces every hole with a gap; report one it did not.
                items.append(Gap(requested=self._resume_after + 1, first_available=seq))
            event = events.decode(message.data)
            items.append(Entry(seq, event))
            self.last_seq = self._resume_after = seq
            if message.event in events.TERMINAL_TYPES:
                self.finished = True
                break
        return items

    def _backoff(self, state: RetryCallState) -> float:
        # The server's `retry:` is the first wait, doubling from there, with as much jitter.
        base = self._retry_seconds
        wait = wait_exponential(multiplier=base, max=self.client.max_backoff) + wait_random(0, base)
        failure = state.outcome.exception() if state.outcome is not None else None
        retry_after = failure.retry_after if isinstance(failure, _Retry) else 0.0
        return max(wait(state), retry_after)

    def _log_retry(self, state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        logger.info(
            "%s: %s; reconnecting after seq %d in %.1f s (attempt %d of %d)",
            self.url,
            _describe(failure),
            self.last_seq,
            wait,
            state.attempt_number + 1,
            self.client.max_attempts,
        )


def _describe(failure: BaseException | None) -> str:
    """A failure as a reader of the log wants it: its kind and what it said."""
    text = str(failure)
    if isinstance(failure, _Retry) or not text:
        return text or type(failure).__name__
    return f"{type(failure).__name__}: {text}"


def _retry_after(value: str | None) -> float:
    """`Retry-After` in seconds; its HTTP-date form is not worth a parser here."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def _error_from(status: int, body: bytes) -> TokentapeError:
    """The server's `{"error": {"code", "message", ...}}` as the matching typed error."""
    try:
        error = msgspec.json.decode(body)["error"]
        code, message = str(error.pop("code")), str(error.pop("message", ""))
        detail = {str(key): value for key, value in error.items()}
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
        code, message, detail = f"http_{status}", body[:200].decode(errors="replace"), {}
    kind = _ERRORS_BY_STATUS.get(status, TokentapeError)
    exception = kind(code, message, **detail)
    exception.status = status
    return exception


T = TypeVar("T")


class SyncClient:
    """`Client` for scripts: the same methods, blocking, on an event loop of its own.

    Not for use inside a running event loop (use `Client` there).
    """

    def __init__(self, base_url: str, **options: Any) -> None:
        self._runner = asyncio.Runner()
        self._client = Client(base_url, **options)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._runner.run(self._client.close())
        self._runner.close()

    def _run(self, awaitable: Awaitable[T]) -> T:
        async def run() -> T:
            return await awaitable

        return self._runner.run(run())

    def create(
        self, model: str, messages: Sequence[Mapping[str, Any]], **fields: Any
    ) -> Generation:
        return self._run(self._client.create(model, messages, **fields))

    def status(self, generation_id: str) -> GenerationStatus:
        return self._run(self._client.status(generation_id))

    def cancel(self, generation_id: str) -> str:
        return self._run(self._client.cancel(generation_id))

    def text(self, generation: str | Generation, *, token: str | None = None) -> str:
        return self._run(self._client.text(generation, token=token))

    def events(
        self,
        generation: str | Generation,
        after: int = 0,
        *,
        token: str | None = None,
        token_in_query: bool = False,
    ) -> Iterator[Item]:
        batches = aiter(
            self._client.stream(generation, after, token=token, token_in_query=token_in_query)
        )
        try:
            while True:
                try:
                    batch = self._run(anext(batches))
                except StopAsyncIteration:
                    return
                yield from batch
        finally:
            self._run(batches.aclose())
