"""The incident tools as subcommands: `ls`, `export`, `inspect`, `replay`, `tail`.

Each is a function of the parsed arguments and the `Settings` that returns the
exit status; `app.cli` declares their arguments and registers them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from app import embedded
from app.client import Client
from app.errors import ConfigError, Unavailable
from app.runtime import connect
from app.settings import Settings
from app.store import GenerationLog
from app.tools import inspection, listing, recording
from app.tools.replay import Replayer
from app.tools.tail import MarkdownRenderer, RawRenderer, Renderer, describe_end, follow
from app.tools.tail import events_url as sse_url

Run = Callable[[argparse.Namespace, Settings], int]


def _blocking(run: Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]) -> Run:
    """The subcommand `run` on an event loop of its own."""

    @functools.wraps(run)
    def command(args: argparse.Namespace, settings: Settings) -> int:
        return asyncio.run(run(args, settings))

    return command


def _with_redis(settings: Settings) -> Settings:
    if settings.redis_url:
        return settings
    data_dir = Path(settings.data_dir).resolve()
    url = embedded.running_url(data_dir)
    if url is None:
        raise ConfigError(
            "no_redis_url",
            f"no `tokentape serve` with an embedded Redis is running in {data_dir}: "
            "start one (scripts/serve), or pass --redis URL or set TOKENTAPE_REDIS_URL",
        )
    return settings.replace(redis_url=url)


@contextlib.asynccontextmanager
async def _open_log(settings: Settings) -> AsyncIterator[GenerationLog]:
    settings = _with_redis(settings)
    redis = connect(settings, "tools")
    try:
        yield GenerationLog(redis, settings)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise Unavailable("redis_unavailable", f"{settings.redis_url}: {exc}") from None
    finally:
        await redis.aclose()


def _is_file_source(source: str) -> bool:
    return Path(source).is_file() or os.sep in source or source.endswith(".jsonl")


async def _load(source: str, settings: Settings) -> recording.Recording:
    """A recording from a file, or from the log when the source is not a file."""
    if await asyncio.to_thread(_is_file_source, source):
        return await asyncio.to_thread(recording.read_file, Path(source))
    async with _open_log(settings) as log:
        return await recording.fetch(log, source)


# -- handlers ----------------------------------------------------------------


@_blocking
async def ls(args: argparse.Namespace, settings: Settings) -> int:
    since = listing.parse_since(args.since) if args.since else None
    async with _open_log(settings) as log:
        found = await listing.recent_generations(
            log, status=args.status, since_ms=since, limit=args.limit
        )
    if args.json or not sys.stdout.isatty():
        sys.stdout.buffer.write(listing.render_json_lines(found))
    else:
        _console().print(listing.render_table(found))
    return 0


@_blocking
async def export(args: argparse.Namespace, settings: Settings) -> int:
    async with _open_log(settings) as log:
        with _progress(f"export {args.generation_id}") as progress:
            if args.output is None:
                write = sys.stdout.buffer.write
                count = await recording.export(log, args.generation_id, write, progress)
                sys.stdout.flush()
            else:
                count = await _export_to_file(log, args.generation_id, args.output, progress)
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


@_blocking
async def inspect(args: argparse.Namespace, settings: Settings) -> int:
    timeline = inspection.timeline(await _load(args.source, settings))
    if args.json:
        sys.stdout.buffer.write(inspection.render_json(timeline))
    else:
        _console().print(inspection.render(timeline))
    return 0


@_blocking
async def replay(args: argparse.Namespace, settings: Settings) -> int:
    source = await _load(args.source, settings)
    speed = None if args.as_fast_as_possible else args.speed
    async with _open_log(settings) as log:
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


@_blocking
async def tail(args: argparse.Namespace, _settings: Settings) -> int:
    notice = _notice
    renderer: Renderer
    if args.raw or not sys.stdout.isatty():
        renderer = RawRenderer(sys.stdout)
    else:
        renderer = markdown = MarkdownRenderer(_console(), sys.stderr)
        notice = markdown.notice
    try:
        async with Client(args.url) as client:
            result = await follow(
                client, args.generation_id, renderer, notice=notice, after_seq=args.after
            )
    finally:
        # follow() finishes a tail that ends; this also gives the terminal back
        # (cursor, live region) after an error or Ctrl-C.
        renderer.finish()
    _notice(describe_end(result))
    return 0


def _notice(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _console(*, stderr: bool = False) -> Console:
    # No highlighting: rich would colour numbers and quotes of the generated text.
    return Console(stderr=stderr, highlight=False)


@contextlib.contextmanager
def _progress(label: str) -> Iterator[recording.Progress | None]:
    """A progress bar on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    # No redirection: the recording itself may be going to stdout.
    columns = (
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("events"),
    )
    with Progress(
        *columns, console=_console(stderr=True), redirect_stdout=False, redirect_stderr=False
    ) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
