"""Detection rules: conditions over host events, in the spirit of Falco's rules.

A rule (the agent reads them from YAML; here they are already mappings)::

    - rule: setuid-file-in-tmp
      desc: A set-user-ID file appeared where anyone can write
      event: file                         # which events it looks at
      condition: >
        file.setuid and (file.path startswith "/tmp/" or file.path startswith "/dev/shm/")
      output: "setuid file %file.path (owner %file.uid, mode %file.mode)"
      priority: critical                  # info notice warning error critical
      tags: [mitre_privilege_escalation, T1548.001]
      threshold: {count: 5, within: 60, by: [source.ip]}   # optional: bursts only

Events are flat mappings of dotted field names (``file.path``, ``proc.exe``,
``user.uid``...). Conditions combine comparisons with ``and``, ``or``, ``not``
and parentheses:

    =  !=  <  <=  >  >=  startswith  endswith  contains  glob  matches (regex)  in (a, b)

A field alone is true when it is set and not false, zero or empty; a field the
event does not have makes every comparison on it false. Every alert carries
the event's fields as its evidence.
"""

from __future__ import annotations

import fnmatch
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cerulean.errors import CeruleanError
from cerulean.protocol.fleet import PRIORITIES

EVENTS = ("file", "process", "account", "socket", "module", "auth")
OPERATORS = ("=", "!=", "<=", ">=", "<", ">", "startswith", "endswith", "contains", "glob",
             "matches", "in")
TOKEN = re.compile(r"""
    \s*(?:
      (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<op><=|>=|!=|=|<|>)
    | (?P<paren>[(),])
    | (?P<word>[A-Za-z0-9_./:*?\[\]~+-]+)
    )""", re.VERBOSE)
MAX_KEYS = 10_000  # sources a threshold rule counts at once before forgetting quiet ones
# What one alert carries, cut before it is written anywhere (a command line or a file name
# is the attacker's to choose; cut text ends with "…[N more characters]").
MAX_EVIDENCE_TEXT = 4096  # characters of each text field of an alert's evidence
MAX_ALERT_MESSAGE = 1024  # characters of an alert's message
# Each rule writes at most RATE_BURST alerts in RATE_WINDOW seconds about one subject (the
# file, the program, the account); the rest are counted and summed up in one alert ("rule
# X fired N more times") when the window ends. Critical alerts are never held back: a user
# who sets off a rule twenty times about files of their own must not hide the one about
# someone else's. At most RATE_SUBJECTS windows are open; past that, one per rule.
RATE_BURST = 20
RATE_WINDOW = 60.0
RATE_SUBJECTS = 256
RATE_RULE_BURST = 100  # and at most this many a window for one rule, whatever the subjects
SUBJECT_FIELDS = ("file.path", "proc.exe", "user.name", "module.name", "auth.user")
# Whose doing a critical alert is: a user other than root gets RATE_BURST of them a rule and
# a window (their own set-ID files must not delay, one fsync each, the alert about another).
OWNER_FIELDS = ("file.uid", "proc.ruid", "proc.uid", "user.uid")
FIELD = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+")

Node = Callable[[Mapping[str, Any]], bool]


class DetectError(CeruleanError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise DetectError(f"Cannot read the condition at {text[pos:pos + 20]!r}.")
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "str":
            # Only quotes and backslashes are escapes: "\d+" stays a regex.
            value = re.sub(r"\\([\\\"'])", r"\1", value[1:-1])
        out.append((kind, value))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.fields: set[str] = set()

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise DetectError(f"The condition {self.text!r} ends too early.")
        self.i += 1
        return tok

    def word(self, w: str) -> bool:
        tok = self.peek()
        if tok == ("word", w):
            self.i += 1
            return True
        return False

    def parse(self) -> Node:
        node = self.or_()
        if self.peek() is not None:
            raise DetectError(f"Unexpected {self.peek()[1]!r} in the condition "  # type: ignore[index]
                              f"{self.text!r}.")
        return node

    def or_(self) -> Node:
        parts = [self.and_()]
        while self.word("or"):
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else (lambda e: any(p(e) for p in parts))

    def and_(self) -> Node:
        parts = [self.not_()]
        while self.word("and"):
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else (lambda e: all(p(e) for p in parts))

    def not_(self) -> Node:
        if self.word("not"):
            inner = self.not_()
            return lambda e: not inner(e)
        return self.atom()

    def atom(self) -> Node:
        kind, value = self.take()
        if (kind, value) == ("paren", "("):
            node = self.or_()
            if self.peek() != ("paren", ")"):
                raise DetectError(f"A '(' is not closed in the condition {self.text!r}.")
            self.take()
            return node
        if kind != "word" or not FIELD.fullmatch(value):
            raise DetectError(f"Expected a field such as file.path, not {value!r}, in the "
                              f"condition {self.text!r}.")
        name = value
        self.fields.add(name)
        tok = self.peek()
        if tok is None or tok[0] not in ("op", "word") or tok[1] not in OPERATORS:
            return lambda e: bool(e.get(name))
        op = self.take()[1]
        if op == "in":
            if self.take() != ("paren", "("):
                raise DetectError(f"'in' takes a list in parentheses: {self.text!r}.")
            values = [self.value()]
            while self.peek() == ("paren", ","):
                self.take()
                values.append(self.value())
            if self.take() != ("paren", ")"):
                raise DetectError(f"The list after 'in' is not closed: {self.text!r}.")
            return lambda e: name in e and any(_equal(e[name], v) for v in values)
        return _compare(name, op, self.value(), self.text)

    def value(self) -> str:
        kind, value = self.take()
        if kind not in ("str", "word"):
            raise DetectError(f"Expected a value, not {value!r}, in the condition "
                              f"{self.text!r}.")
        return value


def _equal(actual: Any, want: str) -> bool:
    if isinstance(actual, bool):
        return want.lower() == str(actual).lower()
    if isinstance(actual, (int, float)):
        try:
            return float(want) == float(actual)
        except ValueError:
            return False
    return str(actual) == want


def _compare(name: str, op: str, want: str, text: str) -> Node:
    if op in ("=", "!="):
        neg = op == "!="
        return lambda e: name in e and _equal(e[name], want) != neg
    if op in ("<", "<=", ">", ">="):
        try:
            number = float(want)
        except ValueError:
            raise DetectError(f"{op} needs a number, not {want!r}: {text!r}.") from None

        def cmp(e: Mapping[str, Any]) -> bool:
            try:
                v = float(e[name])
            except (KeyError, TypeError, ValueError):
                return False
            return {"<": v < number, "<=": v <= number, ">": v > number,
                    ">=": v >= number}[op]
        return cmp
    if op == "matches":  # no exponential patterns; the first MAX_MATCH_CHARS of a field
        from cerulean.agent.saferegex import RegexError, bounded, compile_safe

        try:
            rx = compile_safe(want)
        except RegexError as err:
            raise DetectError(f"{str(err).rstrip('.')}: {text!r}.") from None
        return lambda e: name in e and rx.search(bounded(str(e[name]))) is not None
    tests: dict[str, Callable[[str], bool]] = {
        "startswith": lambda s: s.startswith(want), "endswith": lambda s: s.endswith(want),
        "contains": lambda s: want in s, "glob": lambda s: fnmatch.fnmatchcase(s, want)}
    test = tests[op]
    return lambda e: name in e and test(str(e[name]))


def compile_condition(text: str) -> tuple[Node, frozenset[str]]:
    """The condition as a predicate over events, and the fields it reads."""
    p = _Parser(text)
    node = p.parse()
    return node, frozenset(p.fields)


@dataclass(frozen=True)
class Threshold:
    count: int
    within: float
    by: tuple[str, ...] = ()


@dataclass
class DetectionRule:
    name: str
    desc: str
    event: str
    condition: str
    output: str
    priority: str
    tags: tuple[str, ...]
    threshold: Threshold | None
    test: Node = field(repr=False)
    fields: frozenset[str] = frozenset()
    _seen: dict[tuple[Any, ...], deque[float]] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Alert:
    rule: str
    priority: str
    tags: tuple[str, ...]
    message: str
    time: float
    evidence: Mapping[str, Any]
    truncated: tuple[str, ...] = ()  # the fields cut to the limits above

    def to_json(self) -> dict[str, Any]:
        out = {"rule": self.rule, "priority": self.priority, "tags": list(self.tags),
               "message": self.message, "time": self.time, "evidence": dict(self.evidence)}
        if self.truncated:
            out["truncated"] = list(self.truncated)
        return out


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"…[{len(text) - limit} more characters]"


def bounded_alert(rule: DetectionRule, event: Mapping[str, Any], now: float) -> Alert:
    """The alert *rule* raises for *event*, every text within the limits (the fields
    that were cut are named in :attr:`Alert.truncated`)."""
    evidence: dict[str, Any] = {}
    cut = []
    for k, v in event.items():
        if isinstance(v, str) and len(v) > MAX_EVIDENCE_TEXT:
            v = _cut(v, MAX_EVIDENCE_TEXT)
            cut.append(k)
        evidence[k] = v
    message = _render(rule.output, evidence)
    if len(message) > MAX_ALERT_MESSAGE:
        message = _cut(message, MAX_ALERT_MESSAGE)
        cut.append("message")
    return Alert(rule.name, rule.priority, rule.tags, message, now, evidence, tuple(cut))


@dataclass
class _Window:
    start: float
    written: int = 0
    more: int = 0
    priority: str = "warning"
    tags: tuple[str, ...] = ()
    last: str = ""


@dataclass
class RateLimit:
    """At most *burst* alerts per rule and subject in *window* seconds (a fixed window from
    the first alert); the others are counted, and :meth:`summaries` gives one alert for
    each window that ended with some held back. Critical alerts are counted by whose they
    are (:data:`OWNER_FIELDS`) instead, *burst* a window for each user but root; those of
    root, or of no one, always pass. Memory: at most RATE_SUBJECTS windows."""

    burst: int = RATE_BURST
    window: float = RATE_WINDOW
    rule_burst: int = RATE_RULE_BURST
    _open: dict[tuple[str, str], _Window] = field(default_factory=dict, repr=False)
    _rules: dict[str, _Window] = field(default_factory=dict, repr=False)  # one per rule

    def admit(self, alert: Alert) -> bool:
        critical = alert.priority == "critical"
        if critical:
            owner = next((str(alert.evidence[k]) for k in OWNER_FIELDS
                          if alert.evidence.get(k) not in (None, "")), "0")
            if owner == "0":
                return True
            subject = f"uid {owner[:32]}"
        else:
            subject = next((str(alert.evidence[k]) for k in SUBJECT_FIELDS
                            if alert.evidence.get(k) not in (None, "")), "")
        key = (alert.rule, subject[:512])
        if key not in self._open and len(self._open) >= RATE_SUBJECTS:
            key = (alert.rule, "")
        w = self._open.get(key)
        if w is None or alert.time >= w.start + self.window:
            w = self._open[key] = _Window(alert.time)
        total = None  # a critical alert meets its owner's limit only, never the rule's
        if not critical:
            total = self._rules.get(alert.rule)
            if total is None or alert.time >= total.start + self.window:
                total = self._rules[alert.rule] = _Window(alert.time)
        if w.written < self.burst and (total is None or total.written < self.rule_burst):
            w.written += 1
            if total is not None:
                total.written += 1
            return True
        held = w if total is None or w.written >= self.burst else total  # whose limit
        held.more += 1
        held.priority, held.tags, held.last = alert.priority, alert.tags, alert.message
        return False

    def summaries(self, now: float, flush: bool = False) -> list[Alert]:
        """One alert per rule whose window has ended (all of them, with *flush*) with
        alerts held back: "rule X fired N more times"."""
        out = []
        windows = [*(((rule, subject), w) for (rule, subject), w in self._open.items()),
                   *(((rule, None), w) for rule, w in self._rules.items())]
        for (rule, subject), w in windows:
            if not flush and now < w.start + self.window:
                continue
            if subject is None:
                del self._rules[rule]
            else:
                del self._open[rule, subject]
            if w.more:
                about = (f" about {_cut(subject, 200)}" if subject else
                         f" over its limit of {self.rule_burst}" if subject is None else "")
                out.append(Alert(
                    rule, w.priority, (*w.tags, "rate-limited"),
                    f"rule {rule} fired {w.more} more time{'s' if w.more != 1 else ''}"
                    f"{about} within {self.window:g} s, not written one by one (last: "
                    f"{_cut(w.last, 200)})", now,
                    {"rule.suppressed": w.more, "rule.window": self.window,
                     "rule.written": w.written, "rule.subject": _cut(subject or "", 200)}))
        return out


def load_rules(items: Any, source: str = "the rules") -> list[DetectionRule]:
    if not isinstance(items, list):
        raise DetectError(f"{source}: the rules are a list.")
    out, names = [], set()
    for i, r in enumerate(items, start=1):
        where = f"{source}, rule {i}"
        if not isinstance(r, Mapping) or not isinstance(r.get("rule"), str):
            raise DetectError(f"{where}: each rule is a mapping with a 'rule' name.")
        name = r["rule"]
        if name in names:
            raise DetectError(f"{where}: the name {name!r} is used twice.")
        names.add(name)
        where = f"{source}, rule {name}"
        if r.get("enabled", True) is False:
            continue
        event = r.get("event")
        if event not in EVENTS:
            raise DetectError(f"{where}: 'event' must be one of {', '.join(EVENTS)}.")
        priority = r.get("priority", "warning")
        if priority not in PRIORITIES:
            raise DetectError(f"{where}: 'priority' must be one of {', '.join(PRIORITIES)}.")
        if not isinstance(r.get("condition"), str):
            raise DetectError(f"{where}: 'condition' is missing.")
        try:
            test, fields = compile_condition(r["condition"])
        except DetectError as e:
            raise DetectError(f"{where}: {e}") from None
        tags = r.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DetectError(f"{where}: 'tags' is a list of words.")
        th = r.get("threshold")
        threshold = None
        if th is not None:
            if not isinstance(th, Mapping) or not isinstance(th.get("count"), int) or \
                    th["count"] < 1 or not isinstance(th.get("within"), (int, float)):
                raise DetectError(f"{where}: 'threshold' needs a count (1 or more) and "
                                  "'within' seconds.")
            by = th.get("by", [])
            if not isinstance(by, list) or not all(isinstance(f, str) for f in by):
                raise DetectError(f"{where}: 'threshold.by' is a list of field names.")
            threshold = Threshold(th["count"], float(th["within"]), tuple(by))
        out.append(DetectionRule(name, str(r.get("desc", "")), event, r["condition"],
                                 str(r.get("output", name)), priority, tuple(tags), threshold,
                                 test, fields))
    return out


def _render(template: str, event: Mapping[str, Any]) -> str:
    return re.sub(r"%([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)",
                  lambda m: str(event.get(m.group(1), "<unknown>")), template)


def match(rules: list[DetectionRule], kind: str, event: Mapping[str, Any],
          now: float) -> list[Alert]:
    """The alerts *event* (of *kind*) raises; threshold rules count it in their window."""
    alerts = []
    for rule in rules:
        if rule.event != kind or not rule.test(event):
            continue
        th = rule.threshold
        if th is not None:
            key = tuple(event.get(f) for f in th.by)
            window = rule._seen.setdefault(key, deque())
            window.append(now)
            while window and window[0] <= now - th.within:
                window.popleft()
            if len(rule._seen) > MAX_KEYS:  # keys are the attacker's: forget quiet ones
                for k in [k for k, w in rule._seen.items() if not w or w[-1] <= now - th.within]:
                    del rule._seen[k]
            if len(window) < th.count:
                continue
            window.clear()  # one alert per burst
        alerts.append(bounded_alert(rule, event, now))
    return alerts


RULE_DIRS = (Path("/usr/lib/cerulean/rules.d"), Path("/etc/cerulean/rules.d"))


def load_rule_files(dirs: Sequence[Path] = RULE_DIRS) -> list[DetectionRule]:
    """The rules of the YAML files in *dirs* (see :func:`cerulean.agent.yamlfile.layered`);
    a name used in two files is an error."""
    from cerulean.agent import yamlfile

    out: list[DetectionRule] = []
    where: dict[str, Path] = {}
    for f in yamlfile.layered(list(dirs)):
        for rule in load_rules(yamlfile.load(f), str(f)):
            if rule.name in where:
                raise DetectError(f"{f}: the rule {rule.name!r} is also in {where[rule.name]}.")
            where[rule.name] = f
            out.append(rule)
    return out
