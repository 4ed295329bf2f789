"""The agent's detection loop: file events as they happen, snapshots on a schedule, rules,
and every alert into the audit trail.

:class:`Guard` watches its directories (:mod:`cerulean.agent.watch`), takes
snapshots of processes, accounts, listening sockets and kernel modules every
*interval* seconds (:mod:`cerulean.agent.sensors`; only what is new counts, and
the first snapshot of accounts, sockets and modules is the baseline, while every
process already running is checked once), matches all of it against the rules
(:mod:`cerulean.agent.detect`), and appends each alert to the audit trail.

The file watch degrades instead of stopping: when inotify cannot start the
agent runs without it and tries again every :data:`WATCH_RETRY_S`; directories
that cannot be watched, queue overflows and truncated rescans are metrics
(:meth:`Guard.families`) and, at most once per :data:`REPORT_EVERY_S` and kind,
``alert.agent-watch-*`` entries in the audit trail, which reach the fleet as
alerts; after an overflow (or while directories are unwatched) the trees are
scanned again, at most once per :data:`RESCAN_EVERY_S`.
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
from cerulean.agent.metrics import Family
from cerulean.agent.watch import FsMarks, Watcher, WatchError
from cerulean.errors import CeruleanError

WATCH = ("/etc", "/boot", "/root", "/home", "/tmp", "/var/tmp", "/dev/shm")
RESCAN_EVERY_S = 2.0  # rescans after an overflow or of unwatched directories: this far apart
REPORT_EVERY_S = 60.0  # audit entries about the watch's own trouble: one per kind this often
WATCH_RETRY_S = 60.0  # when inotify cannot start at all, the next try
REPORT_PATHS = 10  # unwatched paths named in one audit entry
REPORT_PATH_CHARS = 256  # of each, at most this much (long paths are how some get there)
STEP_KEEP = 1000  # alerts one step returns (and holds in memory), at most


def self_alert(audit: AuditLog, rule: str, priority: str, message: str,
               evidence: dict[str, Any], say: Callable[[str], None] = print) -> None:
    """The agent's own degradation, said in the journal and written to the audit trail as
    ``alert.RULE`` (so it reaches the fleet as an alert, like the rules' alerts). Raises
    what the audit trail raises."""
    say(f"degraded [{priority}] {rule}: "
        + message.encode("unicode_escape", "backslashreplace").decode("ascii"))
    alert = Alert(rule, priority, ("agent-health",), message, time.time(), evidence)
    audit.append("agent", f"alert.{rule}", alert.to_json())


def _short(text: str) -> str:
    return text if len(text) <= REPORT_PATH_CHARS else \
        f"{text[:REPORT_PATH_CHARS]}... ({len(text)} characters)"


@dataclass
class Guard:
    rules: list[DetectionRule]
    audit: AuditLog
    root: Path = Path("/")
    watch: Sequence[str] = WATCH
    interval: float = 10.0
    say: Callable[[str], None] = print
    clock: Callable[[], float] = time.time
    # fanotify marks on the watched trees' file systems, beside the inotify watches (see
    # cerulean.agent.watch.FsMarks): without them (no CAP_SYS_ADMIN), what changes in a
    # directory inotify cannot watch waits for a rescan.
    marks: bool = True
    alerts: int = 0
    by_rule: dict[tuple[str, str], int] = field(default_factory=dict)  # (rule, priority)
    journal: sensors.JournalFollower | None = None  # auth events; made by start()
    limit: RateLimit = field(default_factory=RateLimit)  # per rule
    suppressed: dict[str, int] = field(default_factory=dict)  # by rule: held back
    truncated: int = 0  # alerts written with fields cut
    step_errors: int = 0  # rounds of the detection loop that failed (see failed())
    _watcher: Watcher | None = field(default=None, repr=False)
    _snapshots: list[tuple[str, sensors.NewOnly]] = field(default_factory=list, repr=False)
    _next_poll: float = field(default=0.0, repr=False)
    _watch_error: str = field(default="", repr=False)  # why inotify could not start
    _marks: FsMarks | None = field(default=None, repr=False)
    _marks_error: str = field(default="", repr=False)  # why there are none
    _watch_retry: float = field(default=0.0, repr=False)
    _next_rescan: float = field(default=0.0, repr=False)
    _seen: dict[str, int] = field(default_factory=dict, repr=False)  # counts reported
    _pending: dict[str, int] = field(default_factory=dict, repr=False)  # not yet reported
    _reported_at: dict[str, float] = field(default_factory=dict, repr=False)
    _last_error: str = field(default="", repr=False)

    def start(self) -> None:
        kinds = {r.event for r in self.rules}
        if "file" in kinds:
            self._open_marks()
            self._start_watch()
        if "auth" in kinds and self.journal is None and self.root == Path("/"):
            self.journal = sensors.JournalFollower()
        root = self.root
        table: list[tuple[str, Callable[[], list[dict[str, Any]]], Callable[[Any], Any], bool]] = [
            # A program whose file is deleted once it runs is another item: a snapshot
            # taken between its start and the deletion must not hide the deletion.
            ("process", lambda: sensors.processes(root),
             lambda e: (e["proc.pid"], e["proc.exe"], bool(e.get("proc.exe_deleted"))), True),
            ("account", lambda: sensors.accounts(root), lambda e: (e["user.name"], e["user.uid"]),
             False),
            ("socket", lambda: sensors.listening(root),
             lambda e: (e["sock.proto"], e["sock.addr"], e["sock.port"]), False),
            ("module", lambda: sensors.modules(root), lambda e: e["module.name"], False),
        ]
        # A client's UDP socket on a port the kernel picked comes and goes; a server's
        # stays: such a socket counts once it has lasted from one snapshot to the next.
        hold = {"socket": lambda e: bool(e.get("sock.ephemeral"))}
        self._snapshots = [(kind, sensors.NewOnly(sense, key, report_first=first,
                                                  hold=hold.get(kind)))
                           for kind, sense, key, first in table if kind in kinds]

    def close(self) -> None:
        self._write(self.limit.summaries(self.clock(), flush=True))  # nothing held back
        if self._watcher is not None:
            self._watcher.close()
        if self._marks is not None:
            self._marks.close()
        if self.journal is not None:
            self.journal.close()

    def _open_marks(self) -> None:
        """The fanotify marks, set once (a watch started again uses them too)."""
        if self.marks:
            try:
                self._marks = FsMarks([str(self.root / w.lstrip("/")) for w in self.watch])
                self._marks_error = "; ".join(self._marks.failed)
            except WatchError as e:
                self._marks_error = str(e.strerror or e)

    @property
    def fs_marks(self) -> FsMarks | None:
        return self._marks

    def drop_marks(self, why: str) -> None:
        """Close the marks (the process cannot confine their use, say), and say why."""
        if self._marks is None:
            return
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._marks.close()
        self._marks = None
        self._marks_error = why
        self._start_watch()  # the watch again, without them

    def _start_watch(self) -> None:
        """Watch the directories; when inotify cannot start, run without and say so."""
        try:
            self._watcher = Watcher([self.root / w.lstrip("/") for w in self.watch],
                                    marks=self._marks or False)
            self._watch_error = ""
            error = self._marks_error if self._marks is None else self._watcher.marks_error
            if self.marks and error:
                self.say(f"note: file systems are not all marked ({error}): what changes "
                         "in a directory inotify cannot watch there waits for a rescan.")
        except WatchError as e:
            self._watch_error = str(e.strerror or e)
            self._watch_retry = self.clock() + WATCH_RETRY_S
            self._note("nowatch")
        self._check_watch()

    def _note(self, kind: str, n: int = 1) -> None:
        self._pending[kind] = self._pending.get(kind, 0) + n

    def _check_watch(self) -> None:
        """Count what went wrong in the watch since the last look."""
        w = self._watcher
        if w is None:
            return
        for kind, count in (("overflow", w.overflowed + w.marks_overflowed),
                            ("unwatched", w.unwatched_total),
                            ("truncated", w.rescans_truncated)):
            if count > self._seen.get(kind, 0):
                self._note(kind, count - self._seen.get(kind, 0))
                self._seen[kind] = count

    def _report(self, now: float) -> None:
        """The audit entries about the watch's trouble that are due (one per kind per
        REPORT_EVERY_S; what happens in between is counted into the next)."""
        w = self._watcher
        for kind, n in sorted(self._pending.items()):
            if now - self._reported_at.get(kind, -REPORT_EVERY_S) < REPORT_EVERY_S:
                continue
            evidence: dict[str, Any] = {"watch.count": n}
            if kind == "overflow":
                rule, priority = "agent-watch-overflow", "warning"
                message = (f"The inotify event queue overflowed {n} time{'s' * (n != 1)}: "
                           "file events were lost; the watched trees are scanned again.")
            elif kind == "nowatch":
                rule, priority = "agent-watch-degraded", "error"
                message = (f"File events are not watched: inotify cannot start "
                           f"({self._watch_error}); tried again every {WATCH_RETRY_S:g} s.")
            elif kind == "error":
                rule, priority = "agent-detection-error", "error"
                message = (f"{n} round{'s' * (n != 1)} of detection failed (last: "
                           f"{self._last_error[:500]}); what each was handling may be "
                           "lost, and detection goes on.")
            elif kind == "truncated":
                rule, priority = "agent-watch-degraded", "warning"
                message = (f"A rescan of the watched trees stopped after its limit of "
                           f"entries ({n} time{'s' * (n != 1)}); it goes on at the next.")
            else:
                rule, priority = "agent-watch-degraded", "error"
                unwatched = list(w.unwatched.items()) if w is not None else []
                reasons = sorted({why for _p, why in unwatched})
                message = (f"{n} director{'ies' if n != 1 else 'y'} could not be watched "
                           f"({'; '.join(reasons) or 'see the metrics'}); they are scanned "
                           f"every {RESCAN_EVERY_S:g} s instead.")
                evidence["watch.unwatched"] = {_short(p): why
                                               for p, why in unwatched[-REPORT_PATHS:]}
                evidence["watch.errors"] = dict(w.errors) if w is not None else {}
            try:
                self_alert(self.audit, rule, priority, message, evidence, self.say)
            except (OSError, CeruleanError) as e:
                self.say(f"warning: the audit trail could not be written: {e}")
                continue  # still pending: tried again at the next round
            self._reported_at[kind] = now
            del self._pending[kind]

    def families(self) -> list[Family]:
        """The guard's own state: what the alert limits held back or cut
        (cerulean_alerts_*), and the watch's state (cerulean_watch_*)."""
        if not any(r.event == "file" for r in self.rules):
            return self._alert_families()
        w = self._watcher
        fams = [*self._alert_families(),
                Family("cerulean_watch_up", "gauge",
                       "1 when file events are watched (inotify started).",
                       [({}, 1.0 if w is not None else 0.0)])]
        if w is None:
            return fams
        for name, kind, text, value in (
                ("cerulean_watch_directories", "gauge", "Directories watched.", len(w.paths)),
                ("cerulean_watch_marked_filesystems", "gauge",
                 "File systems under fanotify marks (what changes in directories inotify "
                 "does not watch is reported as it happens).", w.marked),
                ("cerulean_watch_unwatched_directories", "gauge",
                 "Directories that could not be watched (scanned instead).",
                 len(w.unwatched)),
                ("cerulean_watch_overflows_total", "counter",
                 "Times the inotify queue overflowed and events were lost.", w.overflowed),
                ("cerulean_watch_marks_overflows_total", "counter",
                 "Times a fanotify mark's queue overflowed and events were lost.",
                 w.marks_overflowed),
                ("cerulean_watch_rescans_total", "counter",
                 "Rescans of the watched trees (after overflows, of unwatched directories).",
                 w.rescans),
                ("cerulean_watch_rescans_truncated_total", "counter",
                 "Rescans that stopped at their limit of entries.", w.rescans_truncated),
                ("cerulean_watch_rescans_restarted_total", "counter",
                 "Walks started over: events were lost again while a long one went on.",
                 w.rescans_restarted)):
            fams.append(Family(name, kind, text, [({}, float(value))]))
        errors = Family("cerulean_watch_errors_total", "counter",
                        "Directories left unwatched or paths left undescribed, by error.")
        for code, n in sorted(dict(w.errors).items()):  # a copy: the guard thread adds
            errors.add(n, error=code)
        return [*fams, errors]

    def step(self, wait: float = 0.0) -> list[Alert]:
        """One round: file events (waiting up to *wait* s for them), a rescan when one is
        due, then the snapshots when their time has come. Returns the alerts it wrote
        (the first :data:`STEP_KEEP` of them: all are in the audit trail)."""
        written: list[Alert] = []
        if (self._watcher is None and self._watch_error
                and self.clock() >= self._watch_retry):
            self._start_watch()
        if self._watcher is not None:
            self._handle("file", self._watcher.read(wait), written)
            self._check_watch()
            if self._watcher.needs_rescan and self.clock() >= self._next_rescan:
                self._next_rescan = self.clock() + RESCAN_EVERY_S
                # What a rescan finds is matched as it is found: a tree of changed files
                # is never held in memory at once.
                now = self.clock()
                self._watcher.rescan(sink=lambda e: self._handle("file", [e], written, now))
                self._check_watch()
        elif wait:
            time.sleep(wait)  # nothing to wait on: do not spin
        if self.journal is not None:
            self._handle("auth", self.journal.read(), written)
        now = self.clock()
        if now >= self._next_poll:
            self._next_poll = now + self.interval
            for kind, snap in self._snapshots:
                self._handle(kind, snap.poll(), written)
        # Each rule writes a bounded number of alerts a window; the rest became a count
        # and, when the window ends, one summary alert.
        summaries = self.limit.summaries(now)
        self._write(summaries)
        if self._pending:
            self._report(now)
        return written + summaries

    def _handle(self, kind: str, events: list[dict[str, Any]], written: list[Alert],
                now: float | None = None) -> None:
        """Match *events* against the rules and write the alerts the rate limit admits
        (added to *written*); count the others."""
        now = self.clock() if now is None else now
        for e in events:
            for a in match(self.rules, kind, e, now):
                self.alerts += 1
                self.by_rule[a.rule, a.priority] = self.by_rule.get((a.rule, a.priority), 0) + 1
                if self.limit.admit(a):
                    self._write([a])
                    if len(written) < STEP_KEEP:
                        written.append(a)
                else:
                    self.suppressed[a.rule] = self.suppressed.get(a.rule, 0) + 1

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

    def failed(self, e: BaseException) -> None:
        """A round of :meth:`step` raised *e*: counted (a metric), and written to the audit
        trail at most once every REPORT_EVERY_S with the count since (the detection loop
        goes on; this never raises)."""
        self.step_errors += 1
        self._last_error = f"{type(e).__name__}: {e}"
        self._note("error")
        try:
            self._report(self.clock())
        except Exception as err:  # the trail itself may be what fails
            self.say(f"warning: a detection error could not be audited: {err}")

    def _alert_families(self) -> list[metrics.Family]:
        """What the alert limits held back or cut, as metrics."""
        held = metrics.Family("cerulean_alerts_suppressed_total", "counter",
                              "Alerts not written one by one (a rule's rate limit), by rule.")
        for rule, n in sorted(self.suppressed.items()):
            held.add(n, rule=rule)
        cut = metrics.Family("cerulean_alerts_truncated_total", "counter",
                             "Alerts written with a field cut to its size limit.")
        cut.add(self.truncated)
        failed = metrics.Family("cerulean_detection_errors_total", "counter",
                                "Rounds of the detection loop that failed (each audited).")
        failed.add(self.step_errors)
        return [held, cut, failed]
