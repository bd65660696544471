"""The Redis key schema: every key tokentape touches is named here and nowhere else.

All keys of one generation share the hash tag `{<generation id>}`, so a
generation lives in one Redis Cluster slot and one Lua script can touch all of
its keys atomically. What is not per generation (the job queue, the indexes, the
cancel channel) is a `Shard`: one of them on one Redis, named as ever, or N, each
under a hash tag of its own (`{shard:<i>}`), so a cluster spreads them over its
nodes; a generation belongs to the shard its id hashes to.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import zlib

from app.errors import InvalidRequest

DEFAULT_PREFIX = "tt"

# 16 random bytes = 128 bits, base64url without padding: 22 characters.
_ID_BYTES = 16
GENERATION_ID_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
_ID_RE = re.compile(GENERATION_ID_PATTERN)


def new_generation_id() -> str:
    return secrets.token_urlsafe(_ID_BYTES)


def _glob_escape(text: str) -> str:
    """`text` matched literally in a SCAN MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def check_generation_id(generation_id: str) -> str:
    if not _ID_RE.match(generation_id):
        raise InvalidRequest("invalid_id", "generation id must be 16-64 URL-safe characters")
    return generation_id


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard of what is not per generation. Sharded, its keys share one hash tag
    (one Cluster slot), so one script can index a generation and queue its job."""

    index: int
    jobs: str  # the job stream, consumed by the `workers` group
    open_generations: str  # sorted set: open generations by last activity (the sweeper's)
    recent_generations: str  # sorted set: generations by creation (`tokentape ls`)
    cancel_channel: str  # pub/sub: ids of generations whose cancel was requested


class Keys:
    """Key names under one prefix (tests and tenants use their own prefix).

    `shards` 0: one unsharded set of global keys; N: N shards (see the module docstring).
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, shards: int = 0) -> None:
        self.prefix = prefix
        if shards == 0:
            # Each its own hash tag: one key in one slot, as on one Redis they always were.
            tags = ["{jobs}", "{open}", "{recent}", "cancel"]
            self.shards: tuple[Shard, ...] = (Shard(0, *(f"{prefix}:{tag}" for tag in tags)),)
        else:
            names = ["jobs", "open", "recent", "cancel"]
            self.shards = tuple(
                Shard(i, *(f"{prefix}:{{shard:{i}}}:{name}" for name in names))
                for i in range(shards)
            )
        # The first shard's names: on one Redis (no shards) they are the only ones.
        self.jobs = self.shards[0].jobs
        self.open_generations = self.shards[0].open_generations
        self.recent_generations = self.shards[0].recent_generations
        self.cancel_channel = self.shards[0].cancel_channel
        # Always subscribed by each reader's hub on one Redis; nothing is published to it.
        self.hub_channel = f"{prefix}:hub"
        self.worker_group = "workers"

    def shard(self, generation_id: str) -> Shard:
        """The shard of a generation: where its job, index entries and cancels go."""
        if len(self.shards) == 1:
            return self.shards[0]
        return self.shards[zlib.crc32(generation_id.encode()) % len(self.shards)]

    def _tag(self, generation_id: str) -> str:
        return f"{self.prefix}:{{{generation_id}}}"

    def log(self, generation_id: str) -> str:
        """The Redis Stream of events; entry id `<seq>-0`."""
        return f"{self._tag(generation_id)}:log"

    def meta(self, generation_id: str) -> str:
        """Hash: status, model, last_seq, lease epoch, timestamps. Outlives the log."""
        return f"{self._tag(generation_id)}:meta"

    def request(self, generation_id: str) -> str:
        """The generation's request JSON, as the worker needs it (and a takeover)."""
        return f"{self._tag(generation_id)}:request"

    def lease(self, generation_id: str) -> str:
        """String `<worker>:<epoch>` with a TTL: present while a worker holds the generation."""
        return f"{self._tag(generation_id)}:lease"

    def live_channel(self, generation_id: str) -> str:
        """Pub/sub channel that carries each appended batch to live readers."""
        return f"{self._tag(generation_id)}:live"

    # -- Durable Streams (app.durable_streams) ------------------------------------
    # All keys of one stream share the hash tag `{ds:<name>}` (stream names never
    # contain braces), so every script touches one Cluster slot.

    def _stream_tag(self, name: str) -> str:
        return f"{self.prefix}:{{ds:{name}}}"

    def stream_keys(self, name: str) -> list[str]:
        """A stream's keys in the order its scripts expect them: meta (hash: content
        type, TTL, tail, closure), log (Redis Stream, entry id `<seq>-0`), producers
        (hash: producer id -> "epoch seq"), forks (set: names of its forks)."""
        tag = self._stream_tag(name)
        return [f"{tag}:meta", f"{tag}:log", f"{tag}:producers", f"{tag}:forks"]

    def stream_metas(self, name_prefix: str) -> str:
        """A SCAN pattern of the meta keys of every stream whose name starts with
        `name_prefix`."""
        return _glob_escape(f"{self.prefix}:{{ds:{name_prefix}") + "*}:meta"

    def stream_of(self, meta_key: str) -> str:
        """The stream a meta key (as `stream_metas` finds them) belongs to."""
        return meta_key[len(self.prefix) + len(":{ds:") : -len("}:meta")]

    def stream_channel(self, name: str) -> str:
        """Pub/sub channel on which every write to the stream wakes its live readers."""
        return f"{self._stream_tag(name)}:live"

    # -- Durable Streams' subscriptions (app.durable_streams.subscriptions) ----------
    # The keys of one subscription share the hash tag `{dssub:<id>}` (ids never contain
    # braces), so every script over it touches one Cluster slot. What spans them (the
    # registry every reader matches writes against, the deliveries due, the signing
    # seed) shares `{dssubs}`.

    def _subscription_tag(self, subscription_id: str) -> str:
        return f"{self.prefix}:{{dssub:{subscription_id}}}"

    def subscription_keys(self, subscription_id: str) -> list[str]:
        """A subscription's keys in the order its scripts expect them: meta (hash: its
        configuration and its wake's state), links (hash: stream path -> how it is linked),
        acked (hash: path -> the last seq processed), tails (hash: path -> the last seq
        heard of), snapshot (hash: path -> the tail shown to the wake in flight)."""
        tag = self._subscription_tag(subscription_id)
        return [f"{tag}:{name}" for name in ("meta", "links", "acked", "tails", "snapshot")]

    @property
    def subscription_registry(self) -> str:
        """Hash: subscription id -> what writes it hears (its pattern and explicit streams)."""
        return f"{self.prefix}:{{dssubs}}:registry"

    @property
    def subscription_registry_channel(self) -> str:
        """Pub/sub: the registry changed (readers read it again)."""
        return f"{self.prefix}:{{dssubs}}:changed"

    @property
    def subscriptions_due(self) -> str:
        """Sorted set: subscription id -> when (epoch ms) a delivery or a lease is due."""
        return f"{self.prefix}:{{dssubs}}:due"

    @property
    def subscription_sweep(self) -> str:
        """String with a TTL: the reader whose turn it is to sweep every subscription."""
        return f"{self.prefix}:{{dssubs}}:sweep"

    @property
    def webhook_signing_seed(self) -> str:
        """The random seed webhooks' signing key derives from when there is no secret."""
        return f"{self.prefix}:{{dssubs}}:signing-seed"

    # -- API key owners (app.access) ---------------------------------------------
    # The quotas of one key share the hash tag `{owner:<owner hash>}` (base64url, never
    # a brace), so admission touches one Cluster slot.

    def _owner_tag(self, owner: str) -> str:
        return f"{self.prefix}:{{owner:{owner}}}"

    def owner_running(self, owner: str) -> str:
        """Sorted set: the key's generations not yet seen to end, scored by admission ms."""
        return f"{self._owner_tag(owner)}:running"

    def owner_created(self, owner: str) -> str:
        """Sorted set: the key's creations of the last minute, scored by admission ms."""
        return f"{self._owner_tag(owner)}:created"

    def generation_keys(self, generation_id: str) -> list[str]:
        """Every key of one generation; all share its hash tag (one Cluster slot)."""
        return [
            self.meta(generation_id),
            self.log(generation_id),
            self.request(generation_id),
            self.lease(generation_id),
        ]
