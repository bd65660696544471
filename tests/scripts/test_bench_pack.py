"""The packer benchmark compares packers that write the same bytes, and reports each."""

from __future__ import annotations

import pytest

from scripts.bench_pack import main, measure


def test_every_packer_is_timed_on_both_commands() -> None:
    rows = measure(number=10, repeat=2)
    assert [(command.split(" ")[0], packer) for command, packer, _, _ in rows] == [
        ("append", "hiredis (the store's)"),
        ("append", "hand-written"),
        ("append", "redis-py"),
        ("HGET", "hiredis (the store's)"),
        ("HGET", "hand-written"),
        ("HGET", "redis-py"),
    ]
    assert all(0 < best <= median for _, _, best, median in rows)


def test_the_report_is_one_line_per_command_and_packer(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--number", "10", "--repeat", "1"])
    assert len(capsys.readouterr().out.splitlines()) == 1 + 6
