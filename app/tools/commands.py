"""The `tokentape ls | export | inspect | replay | tail` subcommands.

`register(subparsers)` adds them to the `tokentape` parser; each sets
`run`, a function of the parsed arguments that returns the exit status.
Arguments are parsed into a `Settings` here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import embedded
from app.errors import InvalidRequest, TokentapeError, Unavailable
from app.settings import Settings
from app.store import GenerationLog
from app.tools import inspection, listing, recording
from app.tools.replay import Replayer
from app.tools.tail import Follower, MarkdownRenderer, RawRenderer, Renderer, describe_end
from app.tools.tail import events_url as sse_url

DEFAULT_URL = "http://127.0.0.1:8080"

Handler = Callable[[argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the incident tools to the `tokentape` CLI."""
    ls = subparsers.add_parser("ls", help="list recent generations")
    _redis_options(ls)
    ls.add_argument("--status", choices=("queued", "running", "done", "error", "cancelled"))
    ls.add_argument("--since", help="only generations created within this long, e.g. 30m, 1h, 2d")
    ls.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    ls.add_argument("--json", action="store_true", help="JSON lines (the default when piped)")
    ls.set_defaults(run=_command(_ls))

    export = subparsers.add_parser("export", help="write a generation as a recording file")
    _redis_options(export)
    export.add_argument("generation_id", metavar="ID")
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    export.set_defaults(run=_command(_export))

    inspect = subparsers.add_parser("inspect", help="a generation's timeline: TTFT, stalls, …")
    _redis_options(inspect)
    inspect.add_argument("source", metavar="ID|FILE", help="a generation id or a recording file")
    inspect.add_argument("--json", action="store_true", help="the timeline as JSON")
    inspect.set_defaults(run=_command(_inspect))

    replay = subparsers.add_parser("replay", help="re-append a recording as a new generation")
    _redis_options(replay)
    replay.add_argument("source", metavar="FILE|ID", help="a recording file or a generation id")
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0, help="pace factor (2 = twice as fast)")
    pace.add_argument("--as-fast-as-possible", action="store_true", help="ignore the timing")
    replay.add_argument("--url", default=DEFAULT_URL, help=f"service base URL ({DEFAULT_URL})")
    replay.set_defaults(run=_command(_replay))

    tail = subparsers.add_parser("tail", help="follow a generation's events over SSE")
    tail.add_argument("generation_id", metavar="ID")
    tail.add_argument("--url", default=DEFAULT_URL, help=f"service base URL ({DEFAULT_URL})")
    tail.add_argument("--raw", action="store_true", help="the text as is, no markdown rendering")
    tail.add_argument(
        "--after",
        type=int,
        default=0,
        metavar="SEQ",
        help="start after this event (a position given by an earlier tail); default: the start",
    )
    tail.set_defaults(run=_command(_tail))


def _redis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="Redis URL (or TOKENTAPE_REDIS_URL; default: the embedded Redis of a running "
        "`tokentape serve` in --data-dir)",
    )
    parser.add_argument("--prefix", help="key prefix (or TOKENTAPE_KEY_PREFIX; default tt)")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="data directory of the `tokentape serve` to read (default: .tokentape)",
    )


def _command(run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> Handler:
    name = run.__name__.lstrip("_")

    def handler(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(run(args))
        except TokentapeError as exc:
            print(f"tokentape {name}: {exc.code}: {exc.message}", file=sys.stderr)
            return 2 if isinstance(exc, InvalidRequest) else 1
        except KeyboardInterrupt:
            return 130

    return handler


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env(
        redis_url=args.redis, key_prefix=args.prefix, data_dir=args.data_dir
    )
    if settings.redis_url:
        return settings
    data_dir = Path(settings.data_dir).resolve()
    url = embedded.running_url(data_dir)
    if url is None:
        raise InvalidRequest(
            "no_redis_url",
            f"no `tokentape serve` with an embedded Redis is running in {data_dir}: "
            "start one (scripts/serve), or pass --redis URL or set TOKENTAPE_REDIS_URL",
        )
    return settings.replace(redis_url=url)


@contextlib.asynccontextmanager
async def _open_log(args: argparse.Namespace) -> AsyncIterator[GenerationLog]:
    settings = _settings(args)
    assert settings.redis_url is not None
    redis = Redis.from_url(settings.redis_url)
    try:
        yield GenerationLog(redis, settings)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise Unavailable("redis_unavailable", f"{settings.redis_url}: {exc}") from None
    finally:
        await redis.aclose()


def _is_file_source(source: str) -> bool:
    return Path(source).is_file() or os.sep in source or source.endswith(".jsonl")


async def _load(args: argparse.Namespace) -> recording.Recording:
    """A recording from a file, or from the log when the source is not a file."""
    if await asyncio.to_thread(_is_file_source, args.source):
        return await asyncio.to_thread(recording.read_file, Path(args.source))
    async with _open_log(args) as log:
        return await recording.fetch(log, args.source)


# -- handlers ----------------------------------------------------------------


async def _ls(args: argparse.Namespace) -> int:
    since = listing.parse_since(args.since) if args.since else None
    if args.limit < 1:
        raise InvalidRequest("invalid_limit", "--limit must be at least 1")
    async with _open_log(args) as log:
        found = await listing.recent_generations(
            log, status=args.status, since_ms=since, limit=args.limit
        )
    if args.json or not sys.stdout.isatty():
        sys.stdout.buffer.write(listing.render_json_lines(found))
    else:
        sys.stdout.write(listing.render_table(found))
    return 0


async def _export(args: argparse.Namespace) -> int:
    progress = ProgressBar(sys.stderr, f"export {args.generation_id}")
    report = progress if sys.stderr.isatty() else None
    async with _open_log(args) as log:
        if args.output is None:
            count = await recording.export(log, args.generation_id, sys.stdout.buffer.write, report)
            sys.stdout.flush()
        else:
            count = await _export_to_file(log, args.generation_id, args.output, report)
    if report is not None:
        progress.close()
    if args.output is not None:
        print(f"{count} events written to {args.output}", file=sys.stderr)
    return 0


async def _export_to_file(
    log: GenerationLog, generation_id: str, path: Path, progress: recording.Progress | None
) -> int:
    # Written beside the target and renamed: a failed export never leaves half a recording.
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, suffix=".part") as file:
        try:
            count = await recording.export(log, generation_id, file.write, progress)
        except BaseException:
            file.close()
            os.unlink(file.name)
            raise
    os.replace(file.name, path)
    return count


async def _inspect(args: argparse.Namespace) -> int:
    timeline = inspection.timeline(await _load(args))
    if args.json:
        sys.stdout.buffer.write(inspection.render_json(timeline))
    else:
        sys.stdout.write(inspection.render(timeline))
    return 0


async def _replay(args: argparse.Namespace) -> int:
    source = await _load(args)
    speed = None if args.as_fast_as_possible else args.speed
    async with _open_log(args) as log:
        replayer = Replayer(log, source, speed=speed)
        generation_id = await replayer.create()
        # Printed before the first event, so a client can be pointed at it while it plays.
        print(generation_id)
        print(sse_url(args.url, generation_id), flush=True)
        pace = "as fast as possible" if speed is None else f"at {speed:g}x"
        print(
            f"replaying {len(source.events)} events of {source.generation.id} {pace}",
            file=sys.stderr,
        )
        result = await replayer.run(generation_id)
    ending = "cancelled" if result.cancelled else "truncated" if result.truncated else "complete"
    print(f"replay {ending}: {result.events} events", file=sys.stderr)
    return 0


async def _tail(args: argparse.Namespace) -> int:
    renderer: Renderer = (
        RawRenderer(sys.stdout)
        if args.raw or not sys.stdout.isatty()
        else MarkdownRenderer(sys.stdout)
    )
    if args.after < 0:
        raise InvalidRequest("invalid_position", "--after must be a seq, 0 or more")
    follower = Follower(
        args.url, args.generation_id, renderer, notice=_notice, after_seq=args.after
    )
    result = await follower.run()
    _notice(describe_end(result))
    return 0


def _notice(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class ProgressBar:
    """A one-line progress bar for stderr on a terminal."""

    def __init__(self, stream: TextIO, label: str, width: int = 30) -> None:
        self.stream = stream
        self.label = label
        self.width = width

    def __call__(self, done: int, total: int) -> None:
        filled = self.width * done // total if total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} events")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
