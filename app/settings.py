"""Configuration: one dataclass with defaults; `from_env` reads `TOKENTAPE_*` variables.

The CLI only parses its arguments into a `Settings`; nothing else reads the
environment for these values.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from app.errors import ConfigError
from app.keys import DEFAULT_PREFIX

HOUR = 3600.0
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclasses.dataclass(frozen=True)
class Settings:
    # None: `tokentape serve` starts an embedded Redis-protocol server.
    redis_url: str | None = None
    # The longest any Redis call may go unanswered (connecting included) before it
    # counts as failed: its connection is dropped and the call retried where that is
    # safe. A Redis that stops answering with its connections open (frozen, a stalled
    # host) is then a fault like any other, not a hang. Blocking reads wait this long
    # beyond their block time; the hub's pub/sub connection is pinged after this long
    # silent and reconnected when the ping goes unanswered as long.
    redis_timeout_seconds: float = 5.0
    # Where that embedded server keeps its data (and where the tools look for it).
    data_dir: str = ".tokentape"
    key_prefix: str = DEFAULT_PREFIX
    host: str = "127.0.0.1"
    port: int = 8080
    # Public base URL used in `events_url`/`status_url`; empty: relative URLs.
    public_url: str = ""

    # SSE
    heartbeat_seconds: float = 15.0
    retry_milliseconds: int = 1000
    catch_up_page_size: int = 500
    # Events a client may have queued before it drops back to reading the log.
    client_buffer_events: int = 1024
    # How often a reader looks at the log of a silent live stream (the safety net under
    # pub/sub) and marks the generations it streams as watched.
    reader_recheck_seconds: float = 5.0
    # A client whose socket accepts nothing for this long is disconnected.
    write_timeout_seconds: float = 30.0
    # Redis connections of one reader process, whatever the number of open streams:
    # one for pub/sub, the rest for log reads.
    reader_redis_connections: int = 4
    # On SIGTERM: how long open streams may take to end before their handlers are
    # cancelled; a browser EventSource reconnects (to another reader) on its own.
    stream_drain_seconds: float = 5.0

    # Retention
    max_events_per_generation: int = 100_000
    retention_seconds: float = 24 * HOUR  # the log after the terminal event
    metadata_retention_seconds: float = 7 * 24 * HOUR  # status kept to answer 410, not 404
    abandon_after_seconds: float = 1 * HOUR  # no append for this long: closed as abandoned
    sweep_interval_seconds: float = 30.0

    # Durable Streams (/v1/stream/): how long a long-poll read waits for an append,
    # how long one SSE response lasts (the client reconnects from its offset), and the
    # retention of streams created without a TTL or an expiry (after their last write).
    stream_long_poll_seconds: float = 20.0
    stream_sse_seconds: float = 60.0
    stream_retention_seconds: float = 7 * 24 * HOUR
    max_entries_per_stream: int = 100_000

    # Workers
    lease_seconds: float = 10.0
    # On SIGTERM: how long in-flight generations may finish before they are handed off.
    shutdown_grace_seconds: float = 10.0
    worker_concurrency: int = 256
    # Cancel a generation no reader has watched for this long (0: off). Readers mark
    # what they stream every reader_recheck_seconds, so keep this well above that.
    cancel_unwatched_seconds: float = 0.0
    worker_id: str = ""
    # A worker's command connections (its blocking reads have two more of their own).
    worker_redis_connections: int = 16

    # The event loop of `serve` and `worker`: "uvloop" (libuv; the standard loop where
    # uvloop is not installed, as on Windows) or "asyncio" (the standard loop).
    event_loop: str = "uvloop"
    # Logs are JSON lines when stderr is not a terminal.
    log_level: str = "INFO"

    # HTTP input limits
    max_request_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ConfigError(
                message=f"TOKENTAPE_EVENT_LOOP must be uvloop or asyncio, got {self.event_loop!r}"
            )
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigError(
                message=f"TOKENTAPE_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, "
                f"got {self.log_level!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then `TOKENTAPE_<FIELD>` variables, then explicit overrides (not None)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(f"TOKENTAPE_{field.name.upper()}")
            if raw is not None and raw != "":
                values[field.name] = _parse(field, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _parse(field: dataclasses.Field[Any], raw: str) -> Any:
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    parse: type[int | float] | None = (
        int if kind.startswith("int") else float if kind.startswith("float") else None
    )
    if parse is None:
        return raw
    try:
        return parse(raw)
    except ValueError:
        a = "an integer" if parse is int else "a number"
        raise ConfigError(
            message=f"TOKENTAPE_{field.name.upper()} must be {a}, got {raw!r}"
        ) from None
