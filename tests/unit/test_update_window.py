"""Maintenance windows (cerulean.protocol.window)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cerulean.protocol.window import WindowError, in_window, next_opening, parse_window

SAT_0300 = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)  # a Saturday


def test_empty_means_any_time() -> None:
    assert in_window("", SAT_0300) and next_opening("", SAT_0300) is None


def test_a_weekly_window() -> None:
    assert in_window("Sat 02:00-04:00", SAT_0300)
    assert not in_window("Sat 02:00-04:00", SAT_0300.replace(hour=4))
    assert not in_window("Sun 02:00-04:00", SAT_0300)
    assert next_opening("Sun 02:00-04:00", SAT_0300) == datetime(2026, 11, 29, 2, 0, tzinfo=UTC)


def test_windows_across_midnight_and_lists() -> None:
    assert in_window("Fri 23:00-04:00", SAT_0300)  # started on Friday
    assert not in_window("Sat 23:00-04:00", SAT_0300)
    assert in_window("Mon,Sat 02:30-03:30; daily 12:00-13:00", SAT_0300)
    assert in_window("daily 00:00-24:00", SAT_0300)


@pytest.mark.parametrize("bad", ["Sat", "someday 02:00-03:00", "Sat 25:00-26:00",
                                 "Sat 2-3", "daily 01:60-02:00"])
def test_bad_windows_are_refused(bad: str) -> None:
    with pytest.raises(WindowError):
        parse_window(bad)
