"""The access benchmark times every check once per call, each as the routes make it."""

from __future__ import annotations

import pytest

from scripts.bench_access import checks, main, measure


def test_every_check_passes_before_it_is_timed() -> None:
    results = {name: check() for name, check in checks(keys=3).items()}
    assert results["key lookup, hit (3 keys)"] is not None
    assert results["key lookup, miss (3 keys)"] is None
    assert results["status request, key in header"] is not None
    assert results["events request, token in query"] is None  # a valid token: nothing left to check


def test_the_report_is_one_line_per_check(capsys: pytest.CaptureFixture[str]) -> None:
    rows = measure(number=5, repeat=2, keys=3)
    assert all(0 < best <= median for _, best, median in rows)
    main(["--number", "5", "--repeat", "1", "--keys", "3"])
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(rows)
