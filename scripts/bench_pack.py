"""RESP packers, ns per command: the store's (`hiredis.pack_command`) beside a hand-written
packer and redis-py's own.

    python scripts/bench_pack.py [--number 200000] [--repeat 7]

Two commands: a typical append (append.lua's EVALSHA for one token, its KEYS and
ARGV built from the store's declarations: 20 arguments) and a short HGET. Every
packer's bytes are checked equal first; then each is timed `--repeat` times over
`--number` calls (timeit), and the best and median ns per command are printed.
The hand packer is kept here only as the reference the store's choice is measured
against (docs/benchmarks.md, "Packing commands").
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import statistics
import timeit
from collections.abc import Callable

from redis.asyncio.connection import Connection

from app import events
from app.keys import Keys, new_generation_id
from app.store.scripts import APPEND, AppendArgs, AppendKeys
from app.store.transport import Arg, pack

Packer = Callable[..., object]


def hand_pack(*args: bytes | str | int) -> bytes:
    """One command in RESP, written out by hand (what the store used before hiredis)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        elif not isinstance(arg, bytes):
            raise TypeError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def append_command() -> tuple[Arg, ...]:
    """append.lua for one token, as `GenerationLog` sends it."""
    k, generation_id = Keys(), new_generation_id()
    token = events.Token(text=" durable")
    keys = AppendKeys(
        meta=k.meta(generation_id),
        log=k.log(generation_id),
        request=k.request(generation_id),
        lease=k.lease(generation_id),
    )
    args = AppendArgs(
        epoch="1",
        first_seq=17,
        maxlen=b"100000",
        open_ttl_ms=b"90000000",
        log_ttl_ms=b"86400000",
        meta_ttl_ms=b"604800000",
        channel=k.live_channel(generation_id),
        final="",
        reason="",
        min_idle_ms="",
        n=1,
    )
    return (*APPEND.evalsha, *keys, *args, events.event_type(token), events.encode(token))


def packers() -> dict[str, Packer]:
    redis_py = Connection()  # the asyncio client's packer; never connected
    return {
        "hiredis (the store's)": pack,
        "hand-written": hand_pack,
        "redis-py": redis_py.pack_command,
    }


def measure(number: int, repeat: int) -> list[tuple[str, str, float, float]]:
    """(command, packer, best ns, median ns) for every pair."""
    commands: dict[str, tuple[Arg, ...]] = {
        f"append EVALSHA ({len(append_command())} args)": append_command(),
        "HGET": (b"HGET", Keys().meta(new_generation_id()), "last_seq"),
    }
    rows: list[tuple[str, str, float, float]] = []
    for name, command in commands.items():
        expected = pack(*command)
        for packer_name, packer in packers().items():
            packed = packer(*command)
            assert (b"".join(packed) if isinstance(packed, list) else packed) == expected
            times = timeit.repeat(lambda: packer(*command), number=number, repeat=repeat)  # noqa: B023
            per_call = [t / number * 1e9 for t in times]
            rows.append((name, packer_name, min(per_call), statistics.median(per_call)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings per packer")
    args = parser.parse_args(argv)
    print(f"{'command':<26} {'packer':<22} {'best ns':>8} {'median ns':>10}")
    for command, packer, best, median in measure(args.number, args.repeat):
        print(f"{command:<26} {packer:<22} {best:>8.0f} {median:>10.0f}")


if __name__ == "__main__":
    main()
