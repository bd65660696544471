"""The built-in simulated model: deterministic from its seed, paced against its own clock.

`plan(...)` is the whole generation as a pure function of the request, so a
worker that takes a generation over after a crash skips exactly what the log
already holds and streams the rest: no duplicated or missing text.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import msgspec

from app.clock import Clock, MonotonicClock
from app.events import Done, Event, Started, Token, ToolCall, ToolCallDelta, Usage
from app.generations import GenerationRequest, SimParams
from workers.models.base import GenerationContext, ProviderError

# Without sleeping (a very high rate), hand the loop back every this many events.
_YIELD_EVERY = 64
# Shorter waits are not worth a timer: such events go out together, still on the clock.
_MIN_SLEEP = 0.001
# The system clock's wake-ups fall on multiples of this (seconds); see GridClock.
WAKE_GRID = 0.005

_WORDS = (  # noqa: SIM905 - a paragraph reads better than a list of 80 strings
    "the stream event log token reader worker lease replay append seq generation "
    "client network resume offset cursor redis cluster slot proxy buffer heartbeat "
    "retention expiry retry backoff jitter cancel upstream provider model prompt "
    "answer latency throughput budget window batch commit fence epoch takeover "
    "durable exactly once ordered idempotent consistent browser terminal signal "
    "we it keeps every so that when a an of to in on with from after before and or "
    "never always only each one two three because while until"
).split()
_IDENTIFIERS = ("seq", "lease", "batch", "event", "reader", "offset", "entry", "epoch")
_CODE_LINES = (
    "async def {a}({b}):",
    "    for {a} in {b}:",
    "        await {a}.append({b})",
    "    return {a} + 1",
    "{a} = {b}[-1].seq",
    "if {a} is None:",
    "    raise {A}Error({b})",
)
_TOOLS = ("get_weather", "search_docs", "run_query", "create_ticket")
_CITIES = ("Zürich", "São Paulo", "東京", "Reykjavík", "Lagos", 'New "York"')


class GridClock(MonotonicClock):
    """The event loop's clock; sleeps end on a shared grid of `WAKE_GRID` seconds.

    A worker paces hundreds of generations: woken one by one, each token costs
    a loop iteration, a pipeline and two syscalls of its own. Woken together on
    the grid, every token due in the same few milliseconds goes out in one
    pipeline (see `app.store.transport`). A token is never early and at most one grid step late.
    The sleepers of one grid point share one loop timer, not one each.
    """

    def __init__(self) -> None:
        self._due: dict[int, list[asyncio.Future[None]]] = {}

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        point = grid_point(loop.time(), seconds)
        sleepers = self._due.get(point)
        # A list left by a loop that closed before its point came is not this loop's.
        if sleepers is None or sleepers[0].get_loop() is not loop:
            sleepers = self._due[point] = []
            loop.call_at(point * WAKE_GRID, self._wake, point)
        future = loop.create_future()
        sleepers.append(future)
        await future

    def _wake(self, point: int) -> None:
        for future in self._due.pop(point, ()):
            if not future.done():  # a cancelled sleep
                future.set_result(None)


def grid_point(now: float, seconds: float) -> int:
    """The first grid point at least `seconds` from `now`, counted in `WAKE_GRID` steps."""
    return math.ceil((now + seconds) / WAKE_GRID)


def prompt_tokens(request: GenerationRequest) -> int:
    """A stable stand-in for a tokenizer: whitespace-separated words of the messages."""
    count = 0
    for message in request.messages:
        if isinstance(message.content, str):
            count += len(message.content.split())
        elif message.content is not None:
            count += len(msgspec.json.encode(message.content).split())
    return count


def _token_texts(rng: random.Random) -> Iterator[str]:
    """Markdown-ish text as a model streams it: prose, headings, lists and code blocks."""
    while True:
        kind = rng.random()
        if kind < 0.12:
            yield "## "
            for i in range(rng.randint(2, 4)):
                word = rng.choice(_WORDS)
                yield word.capitalize() if i == 0 else f" {word}"
            yield "\n\n"
        elif kind < 0.27:
            for _ in range(rng.randint(2, 4)):
                yield "- "
                for i in range(rng.randint(3, 7)):
                    yield rng.choice(_WORDS) if i == 0 else f" {rng.choice(_WORDS)}"
                yield "\n"
            yield "\n"
        elif kind < 0.39:
            yield "```python\n"
            for _ in range(rng.randint(2, 5)):
                a, b = rng.choice(_IDENTIFIERS), rng.choice(_IDENTIFIERS)
                line = rng.choice(_CODE_LINES).format(a=a, b=b, A=a.capitalize())
                indent = len(line) - len(line.lstrip())
                words = line.split()
                yield " " * indent + words[0]
                for word in words[1:]:
                    yield f" {word}"
                yield "\n"
            yield "```\n\n"
        else:
            for i in range(rng.randint(12, 40)):
                word = rng.choice(_WORDS)
                style = rng.random()
                if style < 0.05:
                    word = f"**{word}**"
                elif style < 0.1:
                    word = f"`{rng.choice(_IDENTIFIERS)}`"
                if i == 0:
                    word = word[:1].upper() + word[1:]
                    yield word
                else:
                    yield f" {word}"
                if rng.random() < 0.08:
                    yield ","
            yield ".\n\n"


def _tool_arguments(rng: random.Random, name: str) -> dict[str, Any]:
    if name == "get_weather":
        return {"city": rng.choice(_CITIES), "unit": rng.choice(("celsius", "fahrenheit"))}
    if name == "search_docs":
        query = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 5)))
        return {"query": query, "limit": rng.randint(1, 20), "filters": {"lang": "en"}}
    if name == "run_query":
        return {"sql": "SELECT seq, data FROM log WHERE seq > ?", "params": [rng.randint(0, 999)]}
    return {"title": f"{rng.choice(_WORDS)} is slow", "priority": rng.randint(1, 4), "tags": []}


def _tool_call_events(rng: random.Random, index: int) -> Iterator[Event]:
    name = rng.choice(_TOOLS)
    call_id = f"call_{rng.getrandbits(64):016x}"
    arguments = _tool_arguments(rng, name)
    text = msgspec.json.encode(arguments).decode()
    # Split where a provider might: anywhere, even inside a string or an escape.
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    # The id and name come first on their own, as both providers send them.
    yield ToolCallDelta(index=index, id=call_id, name=name)
    for piece in pieces:
        yield ToolCallDelta(index=index, arguments_delta=piece)
    yield ToolCall(index=index, id=call_id, name=name, arguments=arguments)


def plan(params: SimParams, prompt: int) -> Iterator[Event]:
    """Every event of the generation, in order, ending with its Done."""
    rng = random.Random(params.seed)
    texts = _token_texts(rng)
    for _ in range(params.tokens):
        yield Token(text=next(texts))
    for index in range(params.tool_calls):
        yield from _tool_call_events(rng, index)
    yield Done(
        reason="tool_calls" if params.tool_calls else "stop",
        usage=Usage(
            prompt_tokens=prompt,
            completion_tokens=params.tokens,
            total_tokens=prompt + params.tokens,
        ),
    )


_PACED_TYPES = frozenset((Token, ToolCallDelta))


def _paced(event: Event) -> bool:
    """Tokens and argument fragments take time to generate; a complete call or Done does not."""
    return type(event) in _PACED_TYPES


class SimModel:
    """`"model": "sim"`: streams `plan(...)`, continuing after whatever `prior` holds."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or GridClock()

    async def stream(self, context: GenerationContext) -> AsyncIterator[Event]:
        params = context.request.sim or SimParams()
        events = plan(params, prompt_tokens(context.request))
        prior = [e for e in context.prior if not isinstance(e, Started)]
        units = _skip(events, prior)
        rate = params.tokens_per_second
        # The generation's own clock: paced event u is due at t0 + u/rate. A
        # continuation resumes the pace where the log left off.
        t0 = self.clock.now() - units / rate
        emitted = 0
        for event in events:
            if _paced(event):
                delay = t0 + units / rate - self.clock.now()
                units += 1
                if delay >= _MIN_SLEEP:
                    await self.clock.sleep(delay)
                    emitted = 0
            emitted += 1
            if emitted % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            yield event


def _skip(events: Iterator[Event], prior: Sequence[Event]) -> int:
    """Advance `events` past `prior` (checking they match); returns the paced units skipped."""
    units = 0
    for i, seen in enumerate(prior):
        expected = next(events, None)
        if expected != seen:
            raise ProviderError(
                "worker_lost",
                f"the log's event {i + 1} is not what seed continuation would produce",
                retryable=True,
            )
        units += _paced(seen)
    return units
