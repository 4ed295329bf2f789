"""Policy profiles run on this host: by mode, remembered in SQLite, every fix audited.

:func:`apply_profile` checks one profile, fixes what its mode allows
(:func:`cerulean.agent.policy.fix`), checks again when something was fixed,
and keeps the last report. What it did goes to the audit trail:

- ``policy.fix``: a check's fix, its actions and any error;
- ``policy.drift``: checks that passed on the run before and fail now;
- ``policy.assigned``: the configured profiles or modes changed.

:class:`PolicyStore` (``/var/lib/cerulean/agent/policy.db``) remembers the
checks enforce mode has fixed once (it then only reports their drift), the last
report of each profile (for metrics and the fleet) and the assignment.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cerulean.agent.audit import AuditLog
from cerulean.agent.policy import Fixer, FixResult, Policy, Report, fix, run_policy
from cerulean.agent.rules import Host
from cerulean.errors import CeruleanError

STORE = "var/lib/cerulean/agent/policy.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS fixed (policy TEXT NOT NULL, check_id TEXT NOT NULL,
                                  time REAL NOT NULL, PRIMARY KEY (policy, check_id));
CREATE TABLE IF NOT EXISTS result (policy TEXT PRIMARY KEY, time REAL NOT NULL,
                                   mode TEXT NOT NULL, report TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assignment (policy TEXT PRIMARY KEY, mode TEXT NOT NULL);
"""


class StoreError(CeruleanError):
    pass


class PolicyStore:
    """What policy runs remember between runs (one SQLite file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=30)
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"The policy state {path} cannot be used: {e}.") from None

    def close(self) -> None:
        self.db.close()

    def fixed(self, policy: str) -> set[str]:
        rows = self.db.execute("SELECT check_id FROM fixed WHERE policy = ?", (policy,))
        return {r[0] for r in rows}

    def mark_fixed(self, policy: str, checks: Iterable[str], when: float) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO fixed VALUES (?, ?, ?)",
                                [(policy, c, when) for c in checks])

    def save(self, report: Report, mode: str, when: float) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO result VALUES (?, ?, ?, ?)",
                            (report.policy, when, mode, json.dumps(report.to_json())))

    def last(self) -> dict[str, dict[str, Any]]:
        """Each profile's last report (its JSON, with ``time`` and ``mode`` added)."""
        return _reports(self.db.execute("SELECT * FROM result").fetchall())

    def assignment(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT policy, mode FROM assignment").fetchall())

    def assign(self, wanted: Mapping[str, str]) -> None:
        with self.db:
            self.db.execute("DELETE FROM assignment")
            self.db.executemany("INSERT INTO assignment VALUES (?, ?)", sorted(wanted.items()))


def last_reports(root: Path = Path("/")) -> dict[str, dict[str, Any]]:
    """The last stored report of each profile ({} when there is no store yet)."""
    path = root / STORE
    if not path.exists():
        return {}
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            rows = db.execute("SELECT * FROM result").fetchall()
    except sqlite3.Error:
        return {}
    return _reports(rows)


def _reports(rows: Iterable[tuple[str, float, str, str]]) -> dict[str, dict[str, Any]]:
    out = {}
    for policy, when, mode, text in rows:
        try:
            out[policy] = {**json.loads(text), "time": when, "mode": mode}
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class Outcome:
    policy: Policy
    mode: str
    before: Report
    fixes: tuple[FixResult, ...]
    after: Report
    drift: tuple[str, ...] = ()


def apply_profile(policy: Policy, host: Host, mode: str, *, fixer: Fixer | None = None,
                  store: PolicyStore | None = None, audit: AuditLog | None = None,
                  only: Iterable[str] = (), actor: str = "policy",
                  say: Callable[[str], None] = lambda _m: None,
                  clock: Callable[[], float] = time.time) -> Outcome:
    """Check *policy*, fix what *mode* allows (only the checks in *only*, when given),
    check again if anything was fixed; remember and audit it."""
    before = run_policy(policy, host)
    wanted = set(only)
    if wanted:
        unknown = wanted - {c.id for c in policy.checks}
        if unknown:
            raise CeruleanError(f"{policy.id} has no check {', '.join(sorted(unknown))}.")
    chosen = Report(policy.id, tuple(r for r in before.results
                                     if not wanted or r.id in wanted))
    done = fix(policy, chosen, fixer or Fixer(host), mode,
               store.fixed(policy.id) if store else frozenset())
    now = clock()
    for f in done:
        say(f"{'could not fix' if f.error else 'fixed'} {f.check}: "
            f"{f.error or '; '.join(f.actions)}")
        if audit is not None:
            audit.append(actor, "policy.fix", {"policy": policy.id, "check": f.check,
                                               "mode": mode, "actions": list(f.actions),
                                               "error": f.error})
    after = run_policy(policy, host) if done else before
    drift: tuple[str, ...] = ()
    if store is not None:
        store.mark_fixed(policy.id, [f.check for f in done if not f.error], now)
        previous = store.last().get(policy.id)
        if previous is not None:
            passed = {c["id"] for c in previous.get("checks", []) if c.get("result") == "passed"}
            drift = tuple(r.id for r in before.results if r.id in passed and
                          r.result in ("failed", "error"))
        store.save(after, mode, now)
    if drift and audit is not None:
        audit.append(actor, "policy.drift", {"policy": policy.id, "checks": list(drift),
                                             "mode": mode})
    return Outcome(policy, mode, before, tuple(done), after, drift)


def record_assignment(store: PolicyStore, wanted: Mapping[str, str],
                      audit: AuditLog | None, actor: str = "policy") -> bool:
    """Remember which profiles run in which mode; audit a change. True if it changed."""
    old = store.assignment()
    if old == dict(wanted):
        return False
    if audit is not None:
        audit.append(actor, "policy.assigned", {"old": old, "new": dict(wanted)})
    store.assign(wanted)
    return True
