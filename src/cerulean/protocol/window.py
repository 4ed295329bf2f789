"""Maintenance windows: when a host may reboot into an update (UTC).

Grammar: one or more windows separated by ``;``, each ``DAYS HH:MM-HH:MM``
where DAYS is ``daily``, a day (``Sat``) or a comma list (``Mon,Wed,Fri``).
A window may cross midnight (``Sun 23:00-01:30`` ends on Monday). An empty
specification means any time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_ONE = re.compile(r"^\s*([A-Za-z,]+)\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class WindowError(ValueError):
    """A window specification is not valid (one sentence)."""


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start: int  # minutes after midnight
    end: int  # minutes after midnight; <= start means the next day

    @property
    def minutes(self) -> int:
        return (self.end - self.start) % (24 * 60) or 24 * 60


def parse_window(spec: str) -> tuple[Window, ...]:
    out = []
    for part in [p for p in spec.split(";") if p.strip()]:
        m = _ONE.match(part)
        if not m:
            raise WindowError(
                f"{part.strip()!r} is not a maintenance window like 'Sat 02:00-04:00' or "
                "'daily 01:00-05:00'.")
        names = [d.strip().lower()[:3] for d in m[1].split(",") if d.strip()]
        if names == ["dai"]:
            days = frozenset(range(7))
        else:
            bad = [n for n in names if n not in DAYS]
            if bad or not names:
                raise WindowError(f"{m[1]!r} is not 'daily' or a list of days like 'Mon,Thu'.")
            days = frozenset(DAYS.index(n) for n in names)
        h1, m1, h2, m2 = (int(m[i]) for i in range(2, 6))
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise WindowError(f"{part.strip()!r} has a time that does not exist.")
        out.append(Window(days, h1 * 60 + m1, (h2 * 60 + m2) % (24 * 60)))
    return tuple(out)


def in_window(spec: str, now: datetime) -> bool:
    windows = parse_window(spec)
    if not windows:
        return True
    return any(_inside(w, now) for w in windows)


def _inside(w: Window, now: datetime) -> bool:
    minute = now.hour * 60 + now.minute
    # A window that started today, or one that started yesterday and runs past midnight.
    for back in (0, 1):
        day = (now.weekday() - back) % 7
        if day not in w.days:
            continue
        since = minute + back * 24 * 60 - w.start
        if 0 <= since < w.minutes:
            return True
    return False


def next_opening(spec: str, now: datetime) -> datetime | None:
    """When the next window opens (None: always open, or now inside one)."""
    windows = parse_window(spec)
    if not windows or any(_inside(w, now) for w in windows):
        return None
    base = now.replace(second=0, microsecond=0)
    best: datetime | None = None
    for w in windows:
        for ahead in range(8):
            day = base + timedelta(days=ahead)
            if day.weekday() not in w.days:
                continue
            t = day.replace(hour=w.start // 60, minute=w.start % 60)
            if t > now and (best is None or t < best):
                best = t
                break
    return best
