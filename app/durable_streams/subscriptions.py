"""Subscriptions, the protocol's *Reserved subscription APIs*: what a client configures and
is told, and the rules both follow.

A subscription links streams, explicitly by path or by a glob `pattern` over stream paths,
and keeps one cursor per linked stream: its acked offset. It has pending work when a
linked stream's tail is past its cursor; then a *wake* is issued, with a new `generation`
and `wake_id`: a signed webhook POSTed to the subscriber (`type: webhook`), or an event
appended to the subscription's `wake_stream` for workers to claim (`type: pull-wake`).
One wake at a time; a callback, ack or release for any other wake is fenced.

The store keeps them (`app.store.subscriptions`), each reader runs them
(`app.durable_streams.delivery`), `app.http.durable_streams` serves them.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import re
from typing import Any, Literal

import msgspec

from app.durable_streams import protocol
from app.durable_streams.errors import (
    CallbackTokenExpired,
    CallbackTokenInvalid,
    InvalidAckOffset,
    InvalidSubscriptionRequest,
)

WEBHOOK = "webhook"
PULL_WAKE = "pull-wake"
DEFAULT_LEASE_TTL_MS = 30_000
MIN_LEASE_TTL_MS = 1_000
MAX_LEASE_TTL_MS = 600_000
MAX_ID_LENGTH = 256
MAX_STREAMS_PER_REQUEST = 1000
# A callback or claim token is good for this long (and only for its wake's generation).
TOKEN_SECONDS = 3600
BEFORE_FIRST = -1  # an acked seq: nothing processed yet (offset "-1")

_ID_RE = re.compile(protocol.SEGMENT)

SubscriptionType = Literal["webhook", "pull-wake"]


def check_id(raw: str) -> str:
    """A subscription id: one path segment of URL-safe characters (it is part of a hash tag)."""
    if len(raw) > MAX_ID_LENGTH or _ID_RE.fullmatch(raw) is None:
        raise InvalidSubscriptionRequest(
            message=f"a subscription id is up to {MAX_ID_LENGTH} letters, digits and "
            "-._~!$'()*+,;=:@"
        )
    return raw


def stream_path(raw: str, what: str = "a stream path") -> str:
    """A stream-root-relative path as the protocol writes them (`events/abc`), checked."""
    path = raw.strip("/")
    if not protocol.is_stream_name(path) or protocol.is_reserved(path):
        raise InvalidSubscriptionRequest(message=f"{what} is not a stream name: {raw!r}")
    return path


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A glob over stream paths: `*` is one whole segment, `**` any number of them (none
    included); any other segment matches itself."""

    text: str
    parts: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text = self.text.strip("/")
        parts = tuple(text.split("/"))
        for part in parts:
            if part not in ("*", "**") and _ID_RE.fullmatch(part) is None:
                raise InvalidSubscriptionRequest(
                    message=f"pattern segments are *, ** or stream name segments: {self.text!r}"
                )
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "parts", parts)

    def matches(self, path: str) -> bool:
        return _match(self.parts, tuple(path.split("/")))

    @property
    def literal_prefix(self) -> str:
        """The segments before the first wildcard, each followed by `/` ('' for none)."""
        literal: list[str] = []
        for part in self.parts:
            if part in ("*", "**"):
                return "".join(f"{each}/" for each in literal)
            literal.append(part)
        return "/".join(literal)  # no wildcard: the one path it matches


def _match(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    # `matched[j]`: pattern[:i] matches path[:j], row by row over the pattern.
    matched = [True] + [False] * len(path)
    for part in pattern:
        if part == "**":
            for j in range(1, len(path) + 1):
                matched[j] = matched[j] or matched[j - 1]
        else:
            for j in range(len(path), 0, -1):
                matched[j] = matched[j - 1] and (part == "*" or part == path[j - 1])
            matched[0] = False
    return matched[len(path)]


# -- what a client sends -------------------------------------------------------


class _Webhook(msgspec.Struct, forbid_unknown_fields=False):
    url: str


class _CreateRequest(msgspec.Struct, forbid_unknown_fields=False):
    type: SubscriptionType
    pattern: str | None = None
    streams: list[str] | None = None
    webhook: _Webhook | None = None
    wake_stream: str | None = None
    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS
    description: str | None = None


@dataclasses.dataclass(frozen=True)
class SubscriptionConfig:
    """A subscription as created: a PUT of the same one again is 200, another one 409."""

    type: SubscriptionType
    pattern: Pattern | None
    streams: tuple[str, ...]  # explicit, in the order given, without repeats
    webhook_url: str | None
    wake_stream: str | None
    lease_ttl_ms: int
    description: str | None

    @property
    def config_hash(self) -> str:
        """What a repeated PUT is compared by: the protocol's normalized configuration."""
        canonical = {
            "type": self.type,
            "pattern": self.pattern.text if self.pattern else None,
            "streams": sorted(self.streams),
            "webhook": {"url": self.webhook_url} if self.webhook_url else None,
            "wake_stream": self.wake_stream,
            "lease_ttl_ms": self.lease_ttl_ms,
            "description": self.description,
        }
        return hashlib.sha256(msgspec.json.encode(canonical, order="sorted")).hexdigest()


class _StoredConfig(msgspec.Struct):
    type: SubscriptionType
    pattern: str | None
    streams: list[str]
    webhook_url: str | None
    wake_stream: str | None
    lease_ttl_ms: int
    description: str | None


def encode_config(config: SubscriptionConfig) -> bytes:
    """`config` as the store keeps it."""
    return msgspec.json.encode(
        _StoredConfig(
            type=config.type,
            pattern=config.pattern.text if config.pattern else None,
            streams=list(config.streams),
            webhook_url=config.webhook_url,
            wake_stream=config.wake_stream,
            lease_ttl_ms=config.lease_ttl_ms,
            description=config.description,
        )
    )


def decode_config(raw: bytes) -> SubscriptionConfig:
    stored = msgspec.json.decode(raw, type=_StoredConfig)
    return SubscriptionConfig(
        type=stored.type,
        pattern=Pattern(stored.pattern) if stored.pattern else None,
        streams=tuple(stored.streams),
        webhook_url=stored.webhook_url,
        wake_stream=stored.wake_stream,
        lease_ttl_ms=stored.lease_ttl_ms,
        description=stored.description,
    )


class _StoredInterest(msgspec.Struct):
    pattern: str | None
    streams: list[str]


@dataclasses.dataclass(frozen=True)
class Interest:
    """Which writes a subscription hears of: to the streams its pattern matches, and to its
    explicit streams. Every reader keeps each subscription's, to match its writes against."""

    pattern: Pattern | None
    explicit: frozenset[str]

    def how(self, path: str) -> str | None:
        """'g' when the pattern matches `path`, '' when it is only an explicit stream, None
        when the subscription does not hear of it."""
        if self.pattern is not None and self.pattern.matches(path):
            return "g"
        return "" if path in self.explicit else None

    def encode(self) -> bytes:
        pattern = self.pattern.text if self.pattern else None
        return msgspec.json.encode(_StoredInterest(pattern, sorted(self.explicit)))

    @classmethod
    def decode(cls, raw: bytes) -> Interest:
        stored = msgspec.json.decode(raw, type=_StoredInterest)
        pattern = Pattern(stored.pattern) if stored.pattern else None
        return cls(pattern, frozenset(stored.streams))


def _decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.DecodeError as exc:
        raise InvalidSubscriptionRequest(message=f"the body is not valid JSON: {exc}") from None
    except msgspec.ValidationError as exc:
        raise InvalidSubscriptionRequest(message=str(exc)) from None


def parse_config(body: bytes) -> SubscriptionConfig:
    """A PUT's body, or INVALID_REQUEST saying what is wrong with it."""
    request: _CreateRequest = _decode(body, _CreateRequest)
    pattern = Pattern(request.pattern) if request.pattern else None
    raw_streams = request.streams or []
    if len(raw_streams) > MAX_STREAMS_PER_REQUEST:
        raise InvalidSubscriptionRequest(
            message=f"at most {MAX_STREAMS_PER_REQUEST} streams per request"
        )
    streams = tuple(dict.fromkeys(stream_path(raw) for raw in raw_streams))
    if pattern is None and not streams:
        raise InvalidSubscriptionRequest(message="give a pattern, streams, or both")
    if not MIN_LEASE_TTL_MS <= request.lease_ttl_ms <= MAX_LEASE_TTL_MS:
        raise InvalidSubscriptionRequest(
            message=f"lease_ttl_ms is an integer from {MIN_LEASE_TTL_MS} to {MAX_LEASE_TTL_MS}"
        )
    webhook_url = request.webhook.url if request.webhook else None
    if request.type == WEBHOOK and not webhook_url:
        raise InvalidSubscriptionRequest(message="a webhook subscription needs webhook.url")
    wake_stream = stream_path(request.wake_stream, "wake_stream") if request.wake_stream else None
    if request.type == PULL_WAKE and wake_stream is None:
        raise InvalidSubscriptionRequest(message="a pull-wake subscription needs wake_stream")
    return SubscriptionConfig(
        type=request.type,
        pattern=pattern,
        streams=streams,
        webhook_url=webhook_url if request.type == WEBHOOK else None,
        wake_stream=wake_stream if request.type == PULL_WAKE else None,
        lease_ttl_ms=request.lease_ttl_ms,
        description=request.description,
    )


class _StreamList(msgspec.Struct, forbid_unknown_fields=False):
    streams: list[str]


def parse_stream_list(body: bytes) -> list[str]:
    """The body of `POST .../streams`: `{"streams": [path, ...]}`, at least one."""
    request: _StreamList = _decode(body, _StreamList)
    if not request.streams or len(request.streams) > MAX_STREAMS_PER_REQUEST:
        raise InvalidSubscriptionRequest(
            message=f"streams is a list of 1 to {MAX_STREAMS_PER_REQUEST} stream paths"
        )
    return list(dict.fromkeys(stream_path(raw) for raw in request.streams))


class _Ack(msgspec.Struct, forbid_unknown_fields=False):
    offset: str
    stream: str | None = None
    path: str | None = None


class _WakeRequest(msgspec.Struct, forbid_unknown_fields=False):
    wake_id: str = ""
    generation: int = -1
    acks: list[_Ack] = []
    done: bool = False


@dataclasses.dataclass(frozen=True)
class Ack:
    path: str
    seq: int


@dataclasses.dataclass(frozen=True)
class WakeRequest:
    """A callback, ack or release: which wake it is for, what it acks, whether it is done."""

    wake_id: str
    generation: int
    acks: tuple[Ack, ...]
    done: bool


def parse_wake_request(body: bytes) -> WakeRequest:
    request: _WakeRequest = _decode(body, _WakeRequest)
    acks = []
    for ack in request.acks:
        raw_path = ack.stream or ack.path
        if not raw_path:
            raise InvalidSubscriptionRequest(message="every ack names its stream")
        if ack.offset == protocol.START:
            raise InvalidAckOffset(message="an ack offset is never -1")
        position = protocol.parse_offset(ack.offset, "an ack's offset")
        if position.now:
            raise InvalidAckOffset(message="an ack offset is an offset a read returned")
        acks.append(Ack(stream_path(raw_path), position.seq))
    return WakeRequest(request.wake_id, request.generation, tuple(acks), request.done)


class _ClaimRequest(msgspec.Struct, forbid_unknown_fields=False):
    worker: str


def parse_claim(body: bytes) -> str:
    """The claiming worker's name."""
    request: _ClaimRequest = _decode(body, _ClaimRequest)
    if not request.worker or len(request.worker) > MAX_ID_LENGTH:
        raise InvalidSubscriptionRequest(message=f"worker is a name of 1 to {MAX_ID_LENGTH}")
    return request.worker


# -- what a client is told -----------------------------------------------------


def offset_of(seq: int) -> str:
    """A cursor as the protocol writes it: "-1" before the first append."""
    return protocol.START if seq == BEFORE_FIRST else protocol.format_offset(seq)


@dataclasses.dataclass(frozen=True)
class StreamLink:
    """One linked stream: how it is linked, its cursor, and its tail as the subscription
    knows it (the wake's snapshot, in a wake)."""

    path: str
    explicit: bool
    acked_seq: int
    tail_seq: int

    @property
    def has_pending(self) -> bool:
        return self.tail_seq > self.acked_seq

    def cursor(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "link_type": "explicit" if self.explicit else "glob",
            "acked_offset": offset_of(self.acked_seq),
        }

    def info(self) -> dict[str, Any]:
        return {
            **self.cursor(),
            "tail_offset": protocol.format_offset(self.tail_seq),
            "has_pending": self.has_pending,
        }


@dataclasses.dataclass(frozen=True)
class Subscription:
    id: str
    config: SubscriptionConfig
    created_ms: int
    failing: bool  # a webhook delivery failed and is scheduled again
    links: tuple[StreamLink, ...]


@dataclasses.dataclass(frozen=True)
class Wake:
    """A wake as it is delivered, or as a worker claims it."""

    subscription_id: str
    type: SubscriptionType
    generation: int
    wake_id: str
    lease_ttl_ms: int
    retry_count: int  # failed deliveries in a row before this one
    webhook_url: str
    wake_stream: str
    callback_base: str  # the service's URL the subscription was created through
    token_key: bytes
    links: tuple[StreamLink, ...]

    def token(self, now: float) -> str:
        return issue_token(self.token_key, self.subscription_id, self.generation, now)


def control_url(base: str, *segments: str) -> str:
    """`<base>/v1/stream/__ds/<segments>`: a URL of the protocol's control API."""
    return "/".join([base.rstrip("/"), "v1", "stream", protocol.RESERVED, *segments])


def view(subscription: Subscription, signing: dict[str, str] | None) -> dict[str, Any]:
    """A subscription as PUT and GET answer it (`signing`: the webhook signing metadata)."""
    config = subscription.config
    body: dict[str, Any] = {
        "id": subscription.id,
        "subscription_id": subscription.id,
        "type": config.type,
        "streams": [link.cursor() for link in subscription.links],
        "lease_ttl_ms": config.lease_ttl_ms,
        "created_at": _iso(subscription.created_ms),
        "status": "failed" if subscription.failing else "active",
    }
    if config.pattern is not None:
        body["pattern"] = config.pattern.text
    if config.webhook_url is not None:
        body["webhook"] = {"url": config.webhook_url, "signing": signing or {}}
    if config.wake_stream is not None:
        body["wake_stream"] = config.wake_stream
    if config.description is not None:
        body["description"] = config.description
    return body


def notification(wake: Wake, now: float) -> bytes:
    """The webhook's body, exactly the bytes that are signed and sent."""
    return msgspec.json.encode(
        {
            "subscription_id": wake.subscription_id,
            "wake_id": wake.wake_id,
            "generation": wake.generation,
            "streams": [link.info() for link in wake.links],
            "callback_url": control_url(
                wake.callback_base, "subscriptions", wake.subscription_id, "callback"
            ),
            "callback_token": wake.token(now),
        }
    )


def wake_event(wake: Wake, now: float) -> bytes:
    """The event a pull-wake subscription's wake appends to its wake stream."""
    pending = next((link.path for link in wake.links if link.has_pending), "")
    return msgspec.json.encode(
        {
            "type": "wake",
            "subscription_id": wake.subscription_id,
            "stream": pending,
            "generation": wake.generation,
            "ts": int(now * 1000),
        }
    )


def claim_view(wake: Wake, now: float) -> dict[str, Any]:
    return {
        "wake_id": wake.wake_id,
        "generation": wake.generation,
        "token": wake.token(now),
        "streams": [link.info() for link in wake.links],
        "lease_ttl_ms": wake.lease_ttl_ms,
    }


def _iso(ms: int) -> str:
    return protocol.format_expires_at(ms)


# -- callback and claim tokens -------------------------------------------------
# Signed with a key of the subscription's own (kept with it, gone with it): a token
# names its subscription and its wake's generation, so a stale one is fenced, not
# refused as unknown, and none outlives the subscription it was issued for.


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _TokenClaims(msgspec.Struct):
    sub: str
    gen: int
    exp: int


def issue_token(key: bytes, subscription_id: str, generation: int, now: float) -> str:
    claims = _b64(
        msgspec.json.encode(_TokenClaims(subscription_id, generation, int(now) + TOKEN_SECONDS))
    )
    signature = hmac.digest(key, claims.encode(), "sha256")
    return f"{claims}.{_b64(signature)}"


def verify_token(key: bytes, subscription_id: str, token: str, now: float) -> int:
    """The generation `token` was issued for; TOKEN_INVALID or TOKEN_EXPIRED."""
    claims_text, _, signature = token.partition(".")
    try:
        # Compared as text: decoding would also take the encodings of the same bytes
        # that differ in the last character's unused bits.
        expected = _b64(hmac.digest(key, claims_text.encode(), "sha256"))
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise ValueError("signature")
        claims = msgspec.json.decode(_unb64(claims_text), type=_TokenClaims)
    except (ValueError, msgspec.DecodeError):
        raise CallbackTokenInvalid(
            message="the token is not one this subscription issued"
        ) from None
    if claims.sub != subscription_id:
        raise CallbackTokenInvalid(message="the token is another subscription's")
    if claims.exp < now:
        raise CallbackTokenExpired(message="the token expired: claim the subscription again")
    return claims.gen
