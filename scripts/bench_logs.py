"""CPU per log line: tokentape's JSON lines beside the standard library's plain ones.

    python scripts/bench_logs.py --lines 50000 --repeats 5

A reader writes two info lines per generation (the access lines of its POST and,
when the stream ends, of its GET), so their cost is part of every generation's. Each
line here is an access line as `app.http.access_log.log_request` writes it (three
arguments, three extras), written to a file: through `app.telemetry.configure_logging`'s
handler (JSON, trace ids, extras), and through a stock `logging.StreamHandler` with
`%(asctime)s %(levelname)s %(name)s %(message)s`, the baseline any service pays.
Prints the best of `--repeats` in µs per line. Run it in two trees for an A/B.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import logging
import tempfile
import time

from app.telemetry import configure_logging


def per_line(logger: logging.Logger, lines: int, repeats: int) -> float:
    """Best of `repeats` runs of `lines` access lines, in µs per line."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(lines):
            logger.info(
                "%s %s %d",
                "GET",
                "/v1/generations/Y2F0ZWdvcnktdGhyZWU/events",
                200,
                extra={"remote": "127.0.0.1", "bytes_sent": 123, "duration_ms": 1.2},
            )
        best = min(best, (time.perf_counter() - started) / lines * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logger = logging.getLogger("tokentape.access")
    with tempfile.TemporaryFile("w") as out:
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        plain = per_line(logger, args.lines, args.repeats)
        root.removeHandler(handler)
        configure_logging("INFO", stream=out, json=True)
        json_lines = per_line(logger, args.lines, args.repeats)
    print(f"stdlib plain lines: {plain:.1f} µs per line")
    print(f"tokentape JSON lines: {json_lines:.1f} µs per line")


if __name__ == "__main__":
    main()
