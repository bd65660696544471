"""Microbenchmark of a reader's live path: pub/sub bytes in, SSE chunks out.

Live messages as append.lua publishes them (`--events` per message, spread over
`--generations`) are fed as RESP bytes, in 64 KiB reads, through the hub's parse
path: hiredis, `live_frames`, every feed's subscriptions (`--subscribers` each).
Each subscription has a task that drains it with `next_chunk`, as the events
handler does, minus the socket write. The figure is CPU µs per delivered event
(one event handed to one subscription), best of `--repeats`.

No Redis command runs in the timed part; Redis is needed only to set the
subscriptions up (their first log read, empty, puts them live):

    .venv/bin/python -m scripts.bench_hub --repeats 7
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from redis.asyncio import Redis

from app.hub import Hub, Subscription
from app.hub.pubsub import PubSubConnection
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog

READ_SIZE = 64 * 1024  # what the hub reads from its pub/sub connection at once


def resp(*items: bytes | int) -> bytes:
    """One RESP2 array, as Redis sends pub/sub replies."""
    out = [b"*%d\r\n" % len(items)]
    for item in items:
        if isinstance(item, int):
            out.append(b":%d\r\n" % item)
        else:
            out.append(b"$%d\r\n%b\r\n" % (len(item), item))
    return b"".join(out)


def live_stream(channels: list[bytes], messages: int, events: int) -> list[bytes]:
    """`messages` live messages round-robin over `channels`, cut into reads."""
    next_seq = dict.fromkeys(channels, 1)
    replies = []
    for i in range(messages):
        channel = channels[i % len(channels)]
        seq = next_seq[channel]
        fields = [b"%d" % seq, b"1700000000000"]
        for n in range(seq, seq + events):
            fields += [b"token", b'{"type":"token","text":"tok%d "}' % n]
        next_seq[channel] = seq + events
        replies.append(resp(b"message", channel, b"\n".join(fields)))
    data = b"".join(replies)
    return [data[i : i + READ_SIZE] for i in range(0, len(data), READ_SIZE)]


async def drain(subscription: Subscription, until_seq: int) -> int:
    received = 0
    while subscription.delivered < until_seq:
        chunk = await subscription.next_chunk(60.0)
        assert chunk, "a live subscription fell back to its log or ended"
        received += len(chunk)
    return received


async def run_once(args: argparse.Namespace) -> float:
    """CPU seconds of one pass: every message parsed, dispatched and drained."""
    redis = Redis.from_url(args.redis)
    prefix = f"ttbench:{uuid.uuid4().hex[:12]}"
    log = GenerationLog(redis, Settings(key_prefix=prefix))
    hub = Hub(log, redis, buffer_limit=1 << 30)  # not started: this feeds its parser itself
    generation_ids = [new_generation_id() for _ in range(args.generations)]
    channels = [log.keys.live_channel(g).encode() for g in generation_ids]
    subscribing = [
        asyncio.create_task(hub.subscribe(g, 0))
        for g in generation_ids
        for _ in range(args.subscribers)
    ]
    await asyncio.sleep(0)  # every subscribe waits for its confirmation now
    hub_received(hub, b"".join(resp(b"subscribe", c, 1) for c in channels), 0.0)
    subscriptions = await asyncio.gather(*subscribing)
    # The first log read (an empty log) puts each live.
    await asyncio.gather(*(s.next_chunk(0.05) for s in subscriptions))

    reads = live_stream(channels, args.messages, args.events)
    last_seq = args.messages // args.generations * args.events
    loop = asyncio.get_running_loop()
    started = time.process_time()
    draining = [asyncio.create_task(drain(s, last_seq)) for s in subscriptions]
    for data in reads:
        hub_received(hub, data, loop.time())
        await asyncio.sleep(0)  # the drain tasks run
    delivered = sum(await asyncio.gather(*draining))
    spent = time.process_time() - started
    assert delivered > 0
    for subscription in subscriptions:
        hub.unsubscribe(subscription)
    await redis.aclose()
    return spent


def hub_received(hub: Hub, data: bytes, now: float) -> None:
    pubsub = hub.pubsub
    assert isinstance(pubsub, PubSubConnection)  # one Redis
    pubsub.received(data, now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--subscribers", type=int, default=5, help="per generation")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=2, help="per message")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    args.messages -= args.messages % args.generations  # every generation the same length
    delivered = args.messages * args.events * args.subscribers
    runs = []
    for _ in range(args.repeats):
        if args.loop == "uvloop":
            import uvloop

            spent = uvloop.run(run_once(args))
        else:
            spent = asyncio.run(run_once(args))
        runs.append(spent * 1e6 / delivered)
    print(
        f"{delivered} events delivered per run ({args.messages} messages of {args.events},"
        f" {args.generations} generations x {args.subscribers} subscribers, {args.loop}):"
        f" best {min(runs):.3f} µs/event, runs " + " ".join(f"{r:.3f}" for r in runs)
    )


if __name__ == "__main__":
    main()
