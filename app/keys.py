"""The Redis key schema: every key tokentape touches is named here and nowhere else.

All keys of one generation share the hash tag `{<generation id>}`, so a
generation lives in one Redis Cluster slot and one Lua script can touch all of
its keys atomically. The few global keys carry their own tag.
"""

from __future__ import annotations

import re
import secrets

from app.errors import InvalidRequest

DEFAULT_PREFIX = "tt"

# 16 random bytes = 128 bits, base64url without padding: 22 characters.
_ID_BYTES = 16
GENERATION_ID_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
_ID_RE = re.compile(GENERATION_ID_PATTERN)


def new_generation_id() -> str:
    return secrets.token_urlsafe(_ID_BYTES)


def check_generation_id(generation_id: str) -> str:
    if not _ID_RE.match(generation_id):
        raise InvalidRequest("invalid_id", "generation id must be 16-64 URL-safe characters")
    return generation_id


class Keys:
    """Key names under one prefix (tests and tenants use their own prefix)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        # Global keys get their own hash tags: each is one key in one slot.
        self.jobs = f"{prefix}:{{jobs}}"
        self.open_generations = f"{prefix}:{{open}}"
        self.recent_generations = f"{prefix}:{{recent}}"
        self.cancel_channel = f"{prefix}:cancel"
        # Always subscribed by each reader's hub; nothing is published to it.
        self.hub_channel = f"{prefix}:hub"
        self.worker_group = "workers"

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

    def stream_channel(self, name: str) -> str:
        """Pub/sub channel on which every write to the stream wakes its live readers."""
        return f"{self._stream_tag(name)}:live"

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
