"""`make test` runs the unit tests a second time under a wall clock moved ahead
(faketime); this test fails if that run's clock did not really move, so the
guard cannot pass by doing nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path


def test_the_wall_clock_is_where_make_test_put_it(tmp_path: Path) -> None:
    stamp = tmp_path / "now"
    stamp.touch()
    # A new file's time comes from the kernel's clock, which faketime does not move.
    ahead_days = (time.time() - stamp.stat().st_mtime) / 86400
    expected = float(os.environ.get("CERULEAN_CLOCK_AHEAD_DAYS", "0"))
    assert abs(ahead_days - expected) < 0.01, (ahead_days, expected)
