"""Configuration: one dataclass with defaults; `from_env` reads `TOKENTAPE_*` variables.

The CLI only parses its arguments into a `Settings`; nothing else reads the
environment for these values.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from app.errors import ConfigError
from app.keys import DEFAULT_PREFIX

HOUR = 3600.0
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ORIGIN_RE = re.compile(r"^https?://([A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])(:[0-9]{1,5})?$")
# Shards of the job queue, the indexes and the cancel channel on a Redis Cluster, when
# not set: more than a cluster has primaries, so hashing spreads them over every one.
CLUSTER_SHARDS = 8


@dataclasses.dataclass(frozen=True)
class Settings:
    # None: `tokentape serve` starts an embedded Redis-protocol server.
    redis_url: str | None = None
    # A Redis Cluster: redis_url names any node, and every client follows the slot map.
    redis_cluster: bool = False
    # What is not per generation (the job queue, the indexes of `ls` and the sweeper,
    # the cancel channel) is split in this many shards, each in a slot of its own, and
    # workers consume every shard. 0: one of each, named as ever, on one Redis;
    # CLUSTER_SHARDS on a cluster. Every reader and worker must use the same number.
    shards: int = 0
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
    # Durable Streams' subscriptions (docs/durable-streams.md#subscriptions). A webhook
    # goes over https to public addresses only, except to these hosts (comma-separated
    # names or IP addresses, matched as the URL writes them), which it may reach over
    # http at any address: `127.0.0.1,localhost` for development, or a trusted internal
    # receiver. One delivery attempt may take this long; one reader makes at most this
    # many at once.
    webhook_allowed_hosts: str = ""
    webhook_timeout_seconds: float = 10.0
    webhook_concurrency: int = 32
    # How often one reader (whichever takes the turn) looks at every subscription: the
    # tails of its streams, a lease run out, a delivery whose reader went away.
    subscription_sweep_seconds: float = 30.0

    # Workers
    lease_seconds: float = 10.0
    # On SIGTERM: how long in-flight generations may finish before they are handed off.
    shutdown_grace_seconds: float = 10.0
    # The most generations one worker runs at once: a bound on its memory (about 30 KiB
    # each with the sim model), not a throughput knob. A generation mostly waits on its
    # provider, so a worker takes every job it can until one of the two limits below
    # says otherwise (docs/operations.md#capacity-planning).
    worker_concurrency: int = 4096
    # Streams one worker keeps open to one provider (openai, anthropic) at once; a
    # generation past it waits for a stream to end before its request is sent. Size it
    # to the provider account's concurrency divided by the number of workers.
    provider_concurrency: int = 512
    # A worker whose event loop runs this late (its CPU is saturated) takes no new job
    # until it catches up, leaving them to other workers; 0: off.
    worker_max_loop_lag_seconds: float = 0.1
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

    # Access (docs/security.md). API keys: comma-separated, or @FILE with one key a line
    # (re-read on SIGHUP); empty: the service is open to anyone who can reach it.
    api_keys: str = ""
    # Signs read tokens and keys the owner hash of each generation; required with api_keys.
    secret: str = ""
    # Also accepted while the secret rotates (tokens and owners made with it stay valid).
    previous_secret: str = ""
    read_token_seconds: float = 86400.0
    # Comma-separated origins a browser may call from, or "*" (without credentials); empty: off.
    cors_origins: str = ""
    # `serve` on an address other than loopback with no API keys: refused unless true.
    insecure: bool = False

    # Limits (docs/security.md says what happens past each)
    max_body_bytes: int = 1 << 20
    max_messages: int = 2048
    max_tools: int = 128
    max_prompt_chars: int = 1_000_000
    max_sim_tokens: int = 100_000
    max_sim_seconds: float = 3600.0
    # Per API key, across every reader (0: no limit); the service without keys has neither.
    max_running_per_key: int = 100
    max_creations_per_minute: int = 600
    # Open event streams and Durable Streams SSE reads of one reader process, together;
    # past it a client is told to come back.
    max_streams: int = 20_000
    # A connection that has not sent a complete request head this long after it opened
    # (or after its last response) is closed; above nginx's 60 s upstream keep-alive, so
    # the proxy closes an idle connection first.
    header_timeout_seconds: float = 75.0
    # A request body that has not fully arrived this long after its head is refused.
    body_timeout_seconds: float = 30.0

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
        for origin in self.cors_origin_list:
            if origin != "*" and not _ORIGIN_RE.match(origin):
                raise ConfigError(
                    message=f"TOKENTAPE_CORS_ORIGINS: {origin!r} is not an origin "
                    "(scheme://host[:port], as https://app.example.com)"
                )
        if "*" in self.cors_origin_list and len(self.cors_origin_list) > 1:
            raise ConfigError(message="TOKENTAPE_CORS_ORIGINS is * or a list of origins, not both")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ConfigError(
                    message=f"TOKENTAPE_{field.name.upper()} must not be negative, got {value!r}"
                )
        if self.redis_cluster and not self.redis_url:
            raise ConfigError(
                message="TOKENTAPE_REDIS_CLUSTER (--cluster) needs TOKENTAPE_REDIS_URL "
                "(--redis URL) naming a node of the cluster"
            )

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def webhook_allowed_host_list(self) -> list[str]:
        return [
            host.strip().lower() for host in self.webhook_allowed_hosts.split(",") if host.strip()
        ]

    @property
    def key_shards(self) -> int:
        """`shards`, or its default for the deployment: what `app.keys.Keys` is built with."""
        if self.shards:
            return self.shards
        return CLUSTER_SHARDS if self.redis_cluster else 0

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


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse(field: dataclasses.Field[Any], raw: str) -> Any:
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind.startswith("bool"):
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(
            message=f"TOKENTAPE_{field.name.upper()} must be true or false, got {raw!r}"
        )
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
