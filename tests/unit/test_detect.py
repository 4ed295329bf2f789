"""Detection rules (cerulean.agent.detect): the condition language, rules, bursts."""

from __future__ import annotations

from typing import Any

import pytest

from cerulean.agent.detect import DetectError, compile_condition, load_rules, match

RULES: list[dict[str, Any]] = [
    {"rule": "setuid-file-in-tmp", "event": "file", "priority": "critical",
     "condition": 'file.setuid and (file.path startswith "/tmp/" or '
                  'file.path startswith /dev/shm/)',
     "output": "setuid file %file.path (uid %file.uid, mode %file.mode)",
     "tags": ["T1548.001"]},
    {"rule": "program-from-tmp", "event": "process",
     "condition": "proc.exe glob '/tmp/*' or proc.exe glob '/dev/shm/*' or proc.exe_deleted",
     "output": "%proc.exe runs (pid %proc.pid)", "priority": "error"},
    {"rule": "new-uid-0", "event": "account",
     "condition": "user.uid = 0 and user.name != root", "priority": "critical"},
    {"rule": "ssh-failures", "event": "auth", "priority": "warning",
     "condition": "auth.service = sshd and auth.result in (failed, invalid-user)",
     "threshold": {"count": 3, "within": 60, "by": ["source.ip"]},
     "output": "failed SSH logins from %source.ip"},
    {"rule": "disabled", "event": "module", "condition": "module.name matches .", "enabled": False},
]


@pytest.mark.parametrize(("condition", "event", "want"), [
    ("file.path = /etc/passwd", {"file.path": "/etc/passwd"}, True),
    ("file.path != /etc/passwd", {"file.path": "/etc/shadow"}, True),
    ("file.path != /etc/passwd", {}, False),  # a missing field never matches
    ("file.size > 10 and file.size <= 20", {"file.size": 20}, True),
    ("file.size >= 30", {"file.size": "oops"}, False),
    ("proc.cmdline contains 'nc -l'", {"proc.cmdline": "/bin/nc -l -p 4444"}, True),
    ("proc.name endswith sh", {"proc.name": "bash"}, True),
    ("proc.exe matches '^/(tmp|dev/shm)/'", {"proc.exe": "/dev/shm/x"}, True),
    ("not proc.exe glob '/usr/*'", {"proc.exe": "/opt/x"}, True),
    ("sock.port in (22, 9477)", {"sock.port": 9477}, True),
    ("sock.port in (22, 9477)", {"sock.port": 8080}, False),
    ("file.setuid", {"file.setuid": False}, False),
    ("file.setuid = true", {"file.setuid": True}, True),
    ("a.b or c.d and e.f", {"a.b": 0, "c.d": 1, "e.f": 1}, True),  # and binds tighter
    ("(a.b or c.d) and e.f", {"a.b": 1, "e.f": 0}, False),
    ('x.y = "say \\"hi\\""', {"x.y": 'say "hi"'}, True),
])
def test_conditions(condition: str, event: dict[str, Any], want: bool) -> None:
    test, _ = compile_condition(condition)
    assert test(event) is want


@pytest.mark.parametrize(("condition", "words"), [
    ("file.path =", "ends too early"),
    ("path = /x", "Expected a field such as file.path"),
    ("(file.path = /x", "is not closed"),
    ("file.size > big", "> needs a number"),
    ("file.path matches '('", "is not a valid regex"),
    ("proc.cmdline matches '(a+)+$'", "could take exponential time"),
    ("file.path in /x", "'in' takes a list in parentheses"),
    ("file.path = /x )", "Unexpected ')'"),
    ("file.path = /x ; rm", "Cannot read the condition"),
])
def test_bad_conditions(condition: str, words: str) -> None:
    with pytest.raises(DetectError, match=words.replace("(", r"\(").replace(")", r"\)")):
        compile_condition(condition)


def test_alerts_carry_their_evidence() -> None:
    rules = load_rules(RULES)
    assert [r.name for r in rules] == ["setuid-file-in-tmp", "program-from-tmp", "new-uid-0",
                                       "ssh-failures"]
    event = {"file.path": "/tmp/.x/sh", "file.setuid": True, "file.uid": 0, "file.mode": "4755"}
    (alert,) = match(rules, "file", event, now=100.0)
    assert alert.rule == "setuid-file-in-tmp" and alert.priority == "critical"
    assert alert.message == "setuid file /tmp/.x/sh (uid 0, mode 4755)"
    assert alert.evidence == event and alert.to_json()["tags"] == ["T1548.001"]
    assert match(rules, "file", {**event, "file.path": "/usr/bin/sudo"}, now=101.0) == []
    assert match(rules, "process", {"proc.exe": "/usr/bin/ls", "proc.exe_deleted": True,
                                    "proc.pid": 7}, now=1)[0].message == "/usr/bin/ls runs (pid 7)"
    assert match(rules, "account", {"user.uid": 0, "user.name": "toor"}, now=1)[0].message == \
        "new-uid-0"


def test_bursts_raise_one_alert_per_source_within_the_window() -> None:
    rules = load_rules(RULES)

    def fail(ip: str, t: float) -> list[str]:
        return [a.message for a in match(rules, "auth", {"auth.service": "sshd",
                                                        "auth.result": "failed",
                                                        "source.ip": ip}, now=t)]

    assert fail("203.0.113.9", 0) == [] and fail("203.0.113.9", 10) == []
    assert fail("198.51.100.1", 11) == []  # another source counts on its own
    assert fail("203.0.113.9", 20) == ["failed SSH logins from 203.0.113.9"]
    assert fail("203.0.113.9", 21) == []  # the burst was reported; counting starts again
    # Slow failures never make a burst.
    assert [fail("192.0.2.7", t) for t in (100, 170, 240, 310)] == [[], [], [], []]


@pytest.mark.parametrize(("change", "words"), [
    (lambda r: r[0].update(event="disk"), "'event' must be one of file, process"),
    (lambda r: r[0].update(priority="urgent"), "'priority' must be one of info"),
    (lambda r: r[0].pop("condition"), "'condition' is missing"),
    (lambda r: r[0].update(condition="file.path = "), "rule setuid-file-in-tmp: The condition"),
    (lambda r: r[1].update(rule="setuid-file-in-tmp"), "used twice"),
    (lambda r: r[3].update(threshold={"count": 0, "within": 1}), "needs a count (1 or more)"),
    (lambda r: r[0].update(tags="a,b"), "'tags' is a list of words"),
])
def test_bad_rules_are_one_clear_sentence(change: Any, words: str) -> None:
    import copy

    rules = copy.deepcopy(RULES)
    change(rules)
    with pytest.raises(DetectError) as e:
        load_rules(rules, "rules.yaml")
    assert words in str(e.value) and str(e.value).startswith("rules.yaml")


def test_regex_backslashes_survive_quoting() -> None:
    test, _ = compile_condition(r'proc.cmdline matches "\d+" and proc.name = "a\"b"')
    assert test({"proc.cmdline": "x 123", "proc.name": 'a"b'})
    assert not test({"proc.cmdline": "dd", "proc.name": 'a"b'})


def test_threshold_by_must_be_a_list() -> None:
    import copy

    rules = copy.deepcopy(RULES)
    rules[3]["threshold"]["by"] = "source.ip"
    with pytest.raises(DetectError, match=r"'threshold\.by' is a list of field names"):
        load_rules(rules)


def test_quiet_sources_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    from cerulean.agent import detect

    monkeypatch.setattr(detect, "MAX_KEYS", 50)
    rules = load_rules(RULES)
    for i in range(200):
        match(rules, "auth", {"auth.service": "sshd", "auth.result": "failed",
                              "source.ip": f"10.0.{i}.1"}, now=float(i * 100))
    assert len(rules[3]._seen) <= 51
