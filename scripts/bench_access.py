"""What access control costs a connection, µs per check: a read token verified, an API
key looked up, and the whole check of a request as the events and status routes make it.

    python scripts/bench_access.py [--number 20000] [--repeat 7]

Each check runs once per connection (an SSE stream pays it when it opens, never per
event), and none touches Redis. A token is verified under the current secret and,
when one is set, the previous secret too (always both: the time must not say which
matched). Keys are looked up by SHA-256 among `--keys` of them. The request checks run
on mocked aiohttp requests: header and query parsing included. Figures:
docs/benchmarks.md ("Access control").
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

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from app.access import Access
from app.http import auth
from app.http.state import ACCESS
from app.keys import new_generation_id
from app.settings import Settings

SECRET = "s" * 43
PREVIOUS = "p" * 43


def _access(keys: int, previous: bool) -> tuple[Access, str]:
    listed = [f"key-{i:06d}-0123456789abcdef" for i in range(keys)]
    settings = Settings(
        api_keys=",".join(listed), secret=SECRET, previous_secret=PREVIOUS if previous else ""
    )
    return Access.from_settings(settings), listed[keys // 2]


def checks(keys: int) -> dict[str, Callable[[], object]]:
    """Name -> one check, ready to time."""
    generation_id = new_generation_id()
    access, key = _access(keys, previous=False)
    rotating, _ = _access(keys, previous=True)
    token = access.mint(generation_id).token
    app = web.Application()
    app[ACCESS] = access
    by_query = make_mocked_request(
        "GET", f"/v1/generations/{generation_id}/events?token={token}", app=app
    )
    by_key = make_mocked_request(
        "GET",
        f"/v1/generations/{generation_id}",
        headers={"Authorization": f"Bearer {key}"},
        app=app,
    )
    return {
        "token verify, one secret": lambda: access.verify(token, generation_id),
        "token verify, two secrets": lambda: rotating.verify(token, generation_id),
        "token mint": lambda: access.mint(generation_id),
        f"key lookup, hit ({keys} keys)": lambda: access.caller(key),
        f"key lookup, miss ({keys} keys)": lambda: access.caller("key-unknown-0123456789abcdef"),
        "events request, token in query": lambda: auth.authorize_read(by_query, generation_id),
        "status request, key in header": lambda: auth.require_key(by_key),
    }


def measure(number: int, repeat: int, keys: int) -> list[tuple[str, float, float]]:
    """(check, best µs, median µs) for every check."""
    rows = []
    for name, check in checks(keys).items():
        times = timeit.repeat(check, number=number, repeat=repeat)
        per_call = [t / number * 1e6 for t in times]
        rows.append((name, min(per_call), statistics.median(per_call)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--number", type=int, default=20_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings per check")
    parser.add_argument("--keys", type=int, default=1000, help="API keys configured")
    args = parser.parse_args(argv)
    print(f"{'check':<36} {'best µs':>8} {'median µs':>10}")
    for name, best, median in measure(args.number, args.repeat, args.keys):
        print(f"{name:<36} {best:>8.2f} {median:>10.2f}")


if __name__ == "__main__":
    main()
