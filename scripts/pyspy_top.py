"""The functions a py-spy recording spent its samples in, self and inclusive.

    pip install py-spy
    py-spy record -p <pid> -d 10 -r 200 -f raw -o profile.txt --nonblocking
    python scripts/pyspy_top.py profile.txt --top 20

`-f raw` writes one collapsed stack per line with its sample count; this prints the
share of samples each frame (function and line) was on top of the stack (self), and
each function anywhere in it (inclusive). Samples of an idle loop count too: in a
uvloop process, time in libuv's C code (socket writes, polling) shows as
`Runner.run` self.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def summarize(lines: list[str]) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for function in {frame.split(" (")[0] + " (" + _file(frame) + ")" for frame in frames}:
            anywhere[function] += samples
    return total, own, anywhere


def _file(frame: str) -> str:
    """`module.py` of `name (path/module.py:123)`."""
    where = frame.rpartition(" (")[2].rstrip(")")
    return where.rpartition(":")[0].rpartition("/")[2] or where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    total, own, anywhere = summarize(args.profile.read_text().splitlines())
    print(f"{total} samples")
    for title, counts in (("self", own), ("inclusive", anywhere)):
        print(f"\n| {title} | share |\n| --- | --- |")
        for frame, samples in counts.most_common(args.top):
            print(f"| `{frame}` | {samples / total:.1%} |")


if __name__ == "__main__":
    main()
