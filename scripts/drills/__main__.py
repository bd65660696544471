"""`scripts/drill NAME`: run one fault drill (or `all`), print what it did and verified.

Exits 0 when every check passed. Each drill keeps its Redis files and process logs
in a directory of its own (`--dir`, else a temporary one, kept when a check failed).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import shutil
import sys
import tempfile
from pathlib import Path

from scripts.drills import scenarios


def main(argv: list[str] | None = None) -> int:
    names = list(scenarios.DRILLS)
    parser = argparse.ArgumentParser(
        prog="scripts/drill",
        description="Redis fault drills with real reader and worker processes.",
        epilog="\n".join(
            f"{name}: {inspect.getdoc(drill) or ''}".replace("\n", " ")
            for name, (drill, _) in scenarios.DRILLS.items()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=[*names, "all"])
    parser.add_argument("--dir", type=Path, help="where to keep Redis files and process logs")
    args = parser.parse_args(argv)
    failed = 0
    for name in names if args.name == "all" else [args.name]:
        directory = args.dir / name if args.dir else Path(tempfile.mkdtemp(prefix=f"drill-{name}-"))
        directory.mkdir(parents=True, exist_ok=True)
        drill, _ = scenarios.DRILLS[name]
        print(f"== drill {name}: {' '.join((inspect.getdoc(drill) or '').split())}", flush=True)
        report = asyncio.run(scenarios.run(name, directory, lambda line: print(line, flush=True)))
        if report.passed:
            print(f"== {name}: every check passed", flush=True)
            if args.dir is None:
                shutil.rmtree(directory, ignore_errors=True)
        else:
            failed += 1
            print(f"== {name}: FAILED (files kept in {directory})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
