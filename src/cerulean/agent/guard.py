"""The agent's detection loop: file events as they happen, snapshots on a schedule, rules,
and every alert into the audit trail.

:class:`Guard` watches its directories (:mod:`cerulean.agent.watch`), takes
snapshots of processes, accounts, listening sockets and kernel modules every
*interval* seconds (:mod:`cerulean.agent.sensors`; only what is new counts, and
the first snapshot of accounts, sockets and modules is the baseline, while every
process already running is checked once), matches all of it against the rules
(:mod:`cerulean.agent.detect`), and appends each alert to the audit trail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cerulean.agent import metrics, sensors
from cerulean.agent.audit import AuditLog
from cerulean.agent.detect import Alert, DetectionRule, RateLimit, match
from cerulean.agent.watch import Watcher
from cerulean.errors import CeruleanError

WATCH = ("/etc", "/boot", "/root", "/home", "/tmp", "/var/tmp", "/dev/shm")


@dataclass
class Guard:
    rules: list[DetectionRule]
    audit: AuditLog
    root: Path = Path("/")
    watch: Sequence[str] = WATCH
    interval: float = 10.0
    say: Callable[[str], None] = print
    clock: Callable[[], float] = time.time
    alerts: int = 0
    by_rule: dict[tuple[str, str], int] = field(default_factory=dict)  # (rule, priority)
    journal: sensors.JournalFollower | None = None  # auth events; made by start()
    limit: RateLimit = field(default_factory=RateLimit)  # per rule
    suppressed: dict[str, int] = field(default_factory=dict)  # by rule: held back
    truncated: int = 0  # alerts written with fields cut
    _watcher: Watcher | None = field(default=None, repr=False)
    _snapshots: list[tuple[str, sensors.NewOnly]] = field(default_factory=list, repr=False)
    _next_poll: float = field(default=0.0, repr=False)

    def start(self) -> None:
        kinds = {r.event for r in self.rules}
        if "file" in kinds:
            self._watcher = Watcher([self.root / w.lstrip("/") for w in self.watch])
        if "auth" in kinds and self.journal is None and self.root == Path("/"):
            self.journal = sensors.JournalFollower()
        root = self.root
        table: list[tuple[str, Callable[[], list[dict[str, Any]]], Callable[[Any], Any], bool]] = [
            ("process", lambda: sensors.processes(root),
             lambda e: (e["proc.pid"], e["proc.exe"]), True),
            ("account", lambda: sensors.accounts(root), lambda e: (e["user.name"], e["user.uid"]),
             False),
            ("socket", lambda: sensors.listening(root),
             lambda e: (e["sock.proto"], e["sock.addr"], e["sock.port"]), False),
            ("module", lambda: sensors.modules(root), lambda e: e["module.name"], False),
        ]
        self._snapshots = [(kind, sensors.NewOnly(sense, key, report_first=first))
                           for kind, sense, key, first in table if kind in kinds]

    def close(self) -> None:
        self._write(self.limit.summaries(self.clock(), flush=True))  # nothing held back
        if self._watcher is not None:
            self._watcher.close()
        if self.journal is not None:
            self.journal.close()

    def step(self, wait: float = 0.0) -> list[Alert]:
        """One round: file events (waiting up to *wait* s for them), then the snapshots
        when their time has come. Returns the alerts it raised (and wrote)."""
        events: list[tuple[str, dict[str, Any]]] = []
        if self._watcher is not None:
            events += [("file", e) for e in self._watcher.read(wait)]
        elif wait:
            time.sleep(wait)  # nothing to wait on: do not spin
        if self.journal is not None:
            events += [("auth", e) for e in self.journal.read()]
        now = self.clock()
        if now >= self._next_poll:
            self._next_poll = now + self.interval
            for kind, snap in self._snapshots:
                events += [(kind, e) for e in snap.poll()]
        raised = [a for kind, e in events for a in match(self.rules, kind, e, now)]
        # Each rule writes a bounded number of alerts a window; the rest become a count
        # and, when the window ends, one summary alert.
        written = self.limit.summaries(now)
        for a in raised:
            self.alerts += 1
            self.by_rule[a.rule, a.priority] = self.by_rule.get((a.rule, a.priority), 0) + 1
            if self.limit.admit(a):
                written.append(a)
            else:
                self.suppressed[a.rule] = self.suppressed.get(a.rule, 0) + 1
        self._write(written)
        return written

    def _write(self, alerts: list[Alert]) -> None:
        for a in alerts:
            self.truncated += bool(a.truncated)
            # The journal gets one line per alert: control characters in a file name
            # or command line cannot forge more.
            self.say(f"alert [{a.priority}] {a.rule}: "
                     + a.message.encode("unicode_escape", "backslashreplace").decode("ascii"))
            try:
                self.audit.append("guard", f"alert.{a.rule}", a.to_json())
            except (OSError, CeruleanError) as e:
                self.say(f"warning: the audit trail could not be written: {e}")

    def families(self) -> list[metrics.Family]:
        """What the alert limits held back or cut, as metrics."""
        held = metrics.Family("cerulean_alerts_suppressed_total", "counter",
                              "Alerts not written one by one (a rule's rate limit), by rule.")
        for rule, n in sorted(self.suppressed.items()):
            held.add(n, rule=rule)
        cut = metrics.Family("cerulean_alerts_truncated_total", "counter",
                             "Alerts written with a field cut to its size limit.")
        cut.add(self.truncated)
        return [held, cut]
