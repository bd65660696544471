"""The subscriptions' Lua scripts (`lua/sub_*.lua`), declared as `app.store.scripts` declares
the others: KEYS and ARGV by name, and the reply codes each answers. They share
`lua/subscription.lua`: the wake's state machine over a subscription's keys.

Every script touches the keys of one subscription (the hash tag `{dssub:<id>}`, one Cluster
slot). What they need of streams (their tails) the caller reads first and passes in:
streams live in slots of their own.
"""

from __future__ import annotations

from typing import NamedTuple

from app.store.scripts import A, Reply, Script


class SubscriptionKeys(NamedTuple):
    """A subscription's keys, in the order `app.keys.Keys.subscription_keys` names them."""

    meta: str
    links: str
    acked: str
    tails: str
    snapshot: str


class NoArgs(NamedTuple):
    pass


def _script(
    name: str, args: type[A], replies: tuple[Reply, ...], *, rest: str | None = None
) -> Script[SubscriptionKeys, A]:
    return Script(name, SubscriptionKeys, args, rest=rest, replies=replies, library="subscription")


class CreateSubscriptionArgs(NamedTuple):
    config: bytes  # the configuration, as `app.durable_streams.subscriptions` encodes it
    config_hash: str
    subscription_type: str  # 'webhook' or 'pull-wake'
    lease_ttl_ms: int
    callback_base: str  # the service's URL the subscription was created through
    token_key: str  # signs the subscription's callback and claim tokens (hex)
    incarnation: str  # names this subscription among any of the same id before or after


# Then `links`: triples (path, kind 'e' or 'g', tail).
SUB_CREATE = _script(
    "sub_create",
    CreateSubscriptionArgs,
    (Reply.CREATED, Reply.EXISTS, Reply.CONFLICT),
    rest="links",
)
SUB_READ = _script("sub_read", NoArgs, (Reply.OK, Reply.MISSING))


class TouchArgs(NamedTuple):
    new_wake_id: str  # the wake_id of a wake issued now


# Then `writes`: triples (path, tail, 'g' | '' | 'gone').
SUB_TOUCH = _script(
    "sub_touch", TouchArgs, (Reply.WOKEN, Reply.QUIET, Reply.MISSING), rest="writes"
)


class DeliverArgs(NamedTuple):
    new_wake_id: str
    attempt_ms: int  # how long the caller has the delivery


SUB_DELIVER = _script("sub_deliver", DeliverArgs, (Reply.DELIVER, Reply.WAIT, Reply.MISSING))


class AttemptArgs(NamedTuple):
    generation: int
    wake_id: str
    attempt_ms: int


SUB_ATTEMPT = _script("sub_attempt", AttemptArgs, (Reply.DELIVER, Reply.STALE, Reply.MISSING))


class DeliveredArgs(NamedTuple):
    generation: int
    wake_id: str
    done: str  # '1': the webhook answered {"done": true}
    new_wake_id: str


SUB_DELIVERED = _script("sub_delivered", DeliveredArgs, (Reply.OK, Reply.STALE, Reply.MISSING))


class FailedArgs(NamedTuple):
    generation: int
    wake_id: str
    delay_ms: int  # until the next attempt
    attempt_ms: int


SUB_FAILED = _script("sub_failed", FailedArgs, (Reply.RETRY, Reply.STALE, Reply.MISSING))


class ClaimArgs(NamedTuple):
    worker: str
    new_wake_id: str


SUB_CLAIM = _script(
    "sub_claim",
    ClaimArgs,
    (Reply.OK, Reply.CLAIMED, Reply.IDLE, Reply.WRONG_TYPE, Reply.MISSING),
)


class AckArgs(NamedTuple):
    subscription_type: str  # the type the call is for: a callback is a webhook's
    incarnation: str
    generation: int
    wake_id: str
    done: str  # '1': the wake ends
    new_wake_id: str


# Then `acks`: triples (path, seq, the stream's tail as read, '' when unknown).
SUB_ACK = _script(
    "sub_ack",
    AckArgs,
    (Reply.OK, Reply.FENCED, Reply.INVALID_OFFSET, Reply.WRONG_TYPE, Reply.MISSING),
    rest="acks",
)


class ReleaseArgs(NamedTuple):
    incarnation: str
    generation: int
    wake_id: str
    new_wake_id: str


SUB_RELEASE = _script(
    "sub_release", ReleaseArgs, (Reply.OK, Reply.FENCED, Reply.WRONG_TYPE, Reply.MISSING)
)


class StreamsArgs(NamedTuple):
    op: str  # 'add' or 'remove'


# Then `streams`: pairs (path, tail) to add, or the one path to remove.
SUB_STREAMS = _script("sub_streams", StreamsArgs, (Reply.OK, Reply.MISSING), rest="streams")
