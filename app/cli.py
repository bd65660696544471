"""The `tokentape` command line (also `python -m app`).

Every subcommand is a `Command` in `COMMANDS`: a name, a function that adds its
arguments, and a function that runs it with the parsed arguments and the
`Settings`. An argument whose `dest` is a `Settings` field overrides that field
(flags win over `TOKENTAPE_*` variables). What runs lives elsewhere: `app.serve`,
`app.work`, `app.tools.commands`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from app import embedded, serve, work
from app.errors import ConfigError, InvalidRequest, TokentapeError
from app.settings import Settings
from app.telemetry import configure_logging
from app.tools import commands as tools

DEFAULT_URL = "http://127.0.0.1:8080"
STATUSES = ("queued", "running", "done", "error", "cancelled")


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Settings], int]


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer, `low` or more."""

    def integer(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return integer


def _redis_argument(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--redis", dest="redis_url", metavar="URL", help=f"Redis URL (default: {default})"
    )
    parser.add_argument(
        "--cluster",
        dest="redis_cluster",
        action="store_const",
        const=True,
        help="the URL names a node of a Redis Cluster (or TOKENTAPE_REDIS_CLUSTER=true)",
    )


def _data_dir_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--data-dir", metavar="DIR", help=help)


# -- serve and worker -------------------------------------------------------------


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    _redis_argument(parser, "$TOKENTAPE_REDIS_URL, else an embedded one")
    _data_dir_argument(
        parser,
        "where the embedded Redis keeps its data (default: .tokentape; only without --redis)",
    )
    parser.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: 8080; 0: any)")
    parser.add_argument(
        "--with-worker",
        action="store_true",
        help="also run a worker in this process (always on with the embedded Redis)",
    )
    parser.add_argument(
        "--processes",
        type=_at_least(1),
        default=1,
        metavar="N",
        help="run N reader processes on the same port (Linux SO_REUSEPORT; default 1)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,  # unset: TOKENTAPE_INSECURE decides
        help="serve beyond loopback without API keys: anyone who reaches it may use it",
    )
    # Set by `--processes` on the readers it starts.
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    return serve.main(
        settings,
        processes=args.processes,
        with_worker=args.with_worker,
        reuse_port=args.reuse_port,
    )


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    _redis_argument(parser, "$TOKENTAPE_REDIS_URL")
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve Prometheus metrics at http://127.0.0.1:P/metrics (default: none)",
    )


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    return work.main(settings, metrics_port=args.metrics_port)


# -- the incident tools -------------------------------------------------------------


def _log_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the tools that read the log find it."""
    _redis_argument(
        parser, "$TOKENTAPE_REDIS_URL, else the embedded Redis of a `tokentape serve` in --data-dir"
    )
    parser.add_argument(
        "--prefix", dest="key_prefix", help="key prefix (or TOKENTAPE_KEY_PREFIX; default tt)"
    )
    _data_dir_argument(
        parser, "data directory of the `tokentape serve` to read (default: .tokentape)"
    )


def _ls_arguments(parser: argparse.ArgumentParser) -> None:
    _log_arguments(parser)
    parser.add_argument("--status", choices=STATUSES)
    parser.add_argument(
        "--since", help="only generations created within this long, e.g. 30m, 1h, 2d"
    )
    parser.add_argument(
        "--limit", type=_at_least(1), default=20, help="at most this many (default 20)"
    )
    parser.add_argument("--json", action="store_true", help="JSON lines (the default when piped)")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    _log_arguments(parser)
    parser.add_argument("generation_id", metavar="ID")
    parser.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    _log_arguments(parser)
    parser.add_argument("source", metavar="ID|FILE", help="a generation id or a recording file")
    parser.add_argument("--json", action="store_true", help="the timeline as JSON")


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    _log_arguments(parser)
    parser.add_argument("source", metavar="FILE|ID", help="a recording file or a generation id")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0, help="pace factor (2 = twice as fast)")
    pace.add_argument("--as-fast-as-possible", action="store_true", help="ignore the timing")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service base URL ({DEFAULT_URL})")


def _tail_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("generation_id", metavar="ID")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service base URL ({DEFAULT_URL})")
    parser.add_argument("--raw", action="store_true", help="the text as is, no markdown rendering")
    parser.add_argument(
        "--after",
        type=_at_least(0),
        default=0,
        metavar="SEQ",
        help="start after this event (a position given by an earlier tail); default: the start",
    )


COMMANDS: list[Command] = [
    Command(
        "serve",
        "run the HTTP service (with no Redis configured: an embedded one and a worker)",
        _serve_arguments,
        _serve,
    ),
    Command("worker", "consume generation jobs and run the models", _worker_arguments, _worker),
    Command("ls", "list recent generations", _ls_arguments, tools.ls),
    Command("export", "write a generation as a recording file", _export_arguments, tools.export),
    Command(
        "inspect", "a generation's timeline: TTFT, stalls, …", _inspect_arguments, tools.inspect
    ),
    Command("replay", "re-append a recording as a new generation", _replay_arguments, tools.replay),
    Command("tail", "follow a generation's events over SSE", _tail_arguments, tools.tail),
]


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokentape",
        description="LLM generations as durable event logs on Redis, served as resumable SSE.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """`Settings` from the environment, overridden by the arguments named after its fields."""
    flags = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(Settings)}
    return Settings.from_env(**flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace, Settings], int] = args.run
    try:
        settings = settings_from(args)
        configure_logging(settings.log_level)
        return run(args, settings)
    except (ConfigError, InvalidRequest, embedded.EmbeddedUnavailable) as exc:
        _print_error(args.command, exc)
        return 2
    except TokentapeError as exc:
        _print_error(args.command, exc)
        return 1
    except KeyboardInterrupt:
        return 130


def _print_error(command: str, exc: Exception) -> None:
    print(f"tokentape {command}: {exc}", file=sys.stderr)
