"""The detection loop (cerulean.agent.guard): real inotify on a temporary tree, snapshots
of a fake /proc, the shipped rules, alerts in the audit trail."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_sensors import fake_proc
from test_shipped_rules import SHIPPED

from cerulean.agent.audit import AuditLog
from cerulean.agent.detect import load_rule_files
from cerulean.agent.guard import Guard


def test_alerts_from_files_processes_and_accounts_land_in_the_audit_trail(
        tmp_path: Path) -> None:
    fake_proc(tmp_path)
    (tmp_path / "tmp").mkdir()
    trail = AuditLog(tmp_path / "var/lib/cerulean/audit/audit.jsonl")
    said: list[str] = []
    guard = Guard(load_rule_files([SHIPPED]), trail, tmp_path, watch=["/tmp", "/etc"],
                  interval=0, say=said.append)
    guard.start()
    try:
        # Every process already running is checked once: the deleted miner in /tmp.
        first = {a.rule for a in guard.step()}
        assert first == {"program-from-temporary-directory", "program-from-deleted-file"}
        assert guard.step() == []  # once
        f = tmp_path / "tmp/sh"
        f.write_bytes(b"\x7fELF")
        os.chmod(f, 0o4755)
        with (tmp_path / "etc/passwd").open("a") as p:
            p.write("toor:x:0:0::/root:/bin/sh\n")
        rules: set[str] = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not {"setuid-or-setgid-file",
                                                     "new-uid-0-account"} <= rules:
            rules |= {a.rule for a in guard.step(wait=0.5)}
        assert {"setuid-or-setgid-file", "new-uid-0-account"} <= rules
    finally:
        guard.close()
    assert trail.verify().ok
    actions = [e["action"] for e in trail.entries()]
    assert "alert.setuid-or-setgid-file" in actions and "alert.new-uid-0-account" in actions
    entry = next(e for e in trail.entries() if e["action"] == "alert.new-uid-0-account")
    assert entry["actor"] == "guard" and entry["detail"]["evidence"]["user.name"] == "toor"
    assert any(s.startswith("alert [critical] new-uid-0-account: new account toor") for s in said)
    assert guard.alerts == len(actions)


def test_without_file_rules_a_step_waits_instead_of_spinning(tmp_path: Path) -> None:
    rules = [r for r in load_rule_files([SHIPPED]) if r.event != "file"]
    guard = Guard(rules, AuditLog(tmp_path / "a.jsonl"), tmp_path, interval=60, say=lambda m: None)
    guard.start()
    started = time.monotonic()
    for _ in range(3):
        guard.step(wait=0.1)
    assert time.monotonic() - started >= 0.3


JOURNAL = r"""
import json, sys, time
for port in range(40000, 40006):
    print(json.dumps({"MESSAGE": f"Invalid user admin from 203.0.113.9 port {port}",
                      "_PID": "77", "SYSLOG_IDENTIFIER": "sshd-session"}), flush=True)
print("not json", flush=True)
raw = list("Invalid user \xff from 198.51.100.1 port 1".encode("latin-1"))
print(json.dumps({"MESSAGE": raw}), flush=True)
time.sleep(30)
"""


def test_failed_ssh_logins_from_the_journal_raise_one_alert(tmp_path: Path) -> None:
    import sys

    from cerulean.agent.sensors import JournalFollower

    follower = JournalFollower([sys.executable, "-c", JOURNAL])
    trail = AuditLog(tmp_path / "audit.jsonl")
    rules = [r for r in load_rule_files([SHIPPED]) if r.event == "auth"]
    guard = Guard(rules, trail, tmp_path, interval=60, say=lambda m: None, journal=follower)
    guard.start()
    alerts = []
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not alerts:
            alerts += guard.step(wait=0.2)
        assert [a.rule for a in alerts] == ["ssh-login-failures"]
        assert alerts[0].evidence["source.ip"] == "203.0.113.9"
        assert alerts[0].evidence["proc.pid"] == 77
        more = []
        for _ in range(5):
            more += guard.step(wait=0.2)
        assert more == []  # one alert per burst and address; the odd bytes line is no burst
    finally:
        guard.close()
    assert follower._proc is not None and follower._proc.poll() is not None  # stopped


def test_a_missing_journalctl_is_tried_again_later_not_in_a_loop() -> None:
    from cerulean.agent.sensors import JournalFollower

    now = [0.0]
    follower = JournalFollower(["/nonexistent/journalctl"], clock=lambda: now[0])
    assert follower.read() == [] and follower._started == 0.0
    now[0] = 30.0
    assert follower.read() == [] and follower._started == 0.0
    now[0] = 61.0
    assert follower.read() == [] and follower._started == 61.0


def _file_guard(tmp_path: Path, said: list[str]) -> tuple[Guard, AuditLog]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    trail = AuditLog(tmp_path / "var/lib/cerulean/audit/audit.jsonl")
    rules = [r for r in load_rule_files([SHIPPED]) if r.event == "file"]
    return Guard(rules, trail, tmp_path, watch=["/tmp"], interval=60, say=said.append), trail


def _metric(guard: Guard, name: str) -> float:
    from cerulean.agent.metrics import render

    for line in render(guard.families()).splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}")


def test_an_overflow_is_audited_exported_and_followed_by_a_rescan(tmp_path: Path) -> None:
    from test_watch import flood, setuid_file

    said: list[str] = []
    guard, trail = _file_guard(tmp_path, said)
    (tmp_path / "tmp/flood").mkdir()
    guard.start()
    try:
        flood(tmp_path / "tmp/flood")  # 16,000 files while nobody reads: an overflow
        (tmp_path / "tmp/a/b").mkdir(parents=True)  # its events are lost
        f = setuid_file(tmp_path / "tmp/a/b/sh")
        rules: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "setuid-or-setgid-file" not in rules:
            rules += [a.rule for a in guard.step(wait=0.2)]
        assert "setuid-or-setgid-file" in rules
        assert _metric(guard, "cerulean_watch_overflows_total") == 1
        assert _metric(guard, "cerulean_watch_rescans_total") >= 1
        # A second overflow within the reporting interval is counted, not written again.
        flood(tmp_path / "tmp/flood")
        deadline = time.monotonic() + 20  # 16,384 events, MAX_BATCH a step
        while time.monotonic() < deadline and \
                _metric(guard, "cerulean_watch_overflows_total") < 2:
            guard.step(wait=0.2)
        assert _metric(guard, "cerulean_watch_overflows_total") == 2
    finally:
        guard.close()
    entries = list(trail.entries())
    alert = next(e for e in entries if e["action"] == "alert.setuid-or-setgid-file")
    assert alert["detail"]["evidence"]["file.path"] == str(f)
    overflow = [e for e in entries if e["action"] == "alert.agent-watch-overflow"]
    assert len(overflow) == 1 and overflow[0]["detail"]["rule"] == "agent-watch-overflow"
    assert "scanned again" in overflow[0]["detail"]["message"]
    assert any(s.startswith("degraded [warning] agent-watch-overflow") for s in said)
    assert trail.verify().ok


def test_the_guard_starts_when_directories_cannot_be_watched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from test_watch import FullLibc, setuid_file

    from cerulean.agent import watch

    real = watch._libc()
    monkeypatch.setattr(watch, "_libc", lambda: FullLibc(real, "full", errno.ENOSPC))
    said: list[str] = []
    guard, trail = _file_guard(tmp_path, said)
    (tmp_path / "tmp/full").mkdir()
    guard.start()  # the watch limit is reached: the agent still starts
    try:
        f = setuid_file(tmp_path / "tmp/full/sh")
        rules = [a.rule for a in guard.step(wait=0.2)]
        assert rules == ["setuid-or-setgid-file"]  # found by the rescan of /tmp/full
        assert _metric(guard, "cerulean_watch_unwatched_directories") == 1
        assert _metric(guard, 'cerulean_watch_errors_total') == 1
        assert _metric(guard, "cerulean_watch_up") == 1
    finally:
        guard.close()
    (entry,) = [e for e in trail.entries() if e["action"] == "alert.agent-watch-degraded"]
    detail = entry["detail"]
    assert detail["priority"] == "error" and "max_user_watches" in detail["message"]
    assert detail["evidence"]["watch.unwatched"] == {
        str(tmp_path / "tmp/full"): "the inotify watch limit is reached "
                                    "(fs.inotify.max_user_watches)"}
    assert any(e["detail"].get("evidence", {}).get("file.path") == str(f)
               for e in trail.entries())


def test_the_guard_runs_without_inotify_and_tries_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from cerulean.agent import watch

    class NoInotify:
        def inotify_init1(self, flags: int) -> int:
            import ctypes

            ctypes.set_errno(errno.EMFILE)
            return -1

    monkeypatch.setattr(watch, "_libc", NoInotify)
    said: list[str] = []
    now = [1000.0]
    guard, trail = _file_guard(tmp_path, said)
    guard.clock = lambda: now[0]
    guard.start()
    guard.step()
    assert _metric(guard, "cerulean_watch_up") == 0
    (entry,) = [e for e in trail.entries() if e["action"] == "alert.agent-watch-degraded"]
    assert "inotify cannot start" in entry["detail"]["message"]
    monkeypatch.undo()
    now[0] += 61
    guard.step()
    try:
        assert _metric(guard, "cerulean_watch_up") == 1
    finally:
        guard.close()


def test_the_journal_is_read_in_bounded_steps_and_only_from_root(tmp_path: Path) -> None:
    """Any user can log as sshd (logger -t sshd) and flood the journal: the follower asks
    journald for root's entries only, and one read takes JOURNAL_READ_BYTES at most (the
    rest waits in the pipe), never the whole flood at once."""
    from cerulean.agent import sensors

    assert "_UID=0" in sensors.JournalFollower().argv
    flood = ("import sys, time\nline = b'{\"MESSAGE\": \"" + "x" * 1000 + "\"}\\n'\n"
             "sys.stdout.buffer.write(line * 8000); sys.stdout.flush(); time.sleep(30)\n")
    follower = sensors.JournalFollower([sys.executable, "-c", flood])

    class Counted:
        def __init__(self, raw: Any) -> None:
            self.raw, self.n = raw, 0

        def read(self, size: int) -> bytes | None:
            data = self.raw.read(size)
            self.n += len(data or b"")
            return data

        def close(self) -> None:
            self.raw.close()

    try:
        follower.read()  # starts it
        assert follower._proc is not None
        counted = Counted(follower._proc.stdout)
        follower._proc.stdout = counted  # type: ignore[assignment]
        steps = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(steps) < 4 << 20:
            before = counted.n
            follower.read()
            steps.append(counted.n - before)
            time.sleep(0.02)
        assert sum(steps) >= 4 << 20, "the flood never came"
        assert max(steps) <= sensors.JOURNAL_READ_BYTES + 65536, max(steps)
    finally:
        follower.close()


def test_a_failed_round_of_detection_is_a_metric_and_an_audit_entry(tmp_path: Path) -> None:
    """A round that raises loses what it was handling: the agent must say so, not only in
    its journal."""
    from cerulean.agent import metrics

    said: list[str] = []
    guard, trail = _file_guard(tmp_path, said)
    guard.start()
    try:
        for _ in range(3):
            guard.failed(RuntimeError("boom"))
        entries = [e for e in trail.entries() if e["action"] == "alert.agent-detection-error"]
        assert len(entries) == 1  # one entry; the others are counted into the next
        assert "boom" in entries[0]["detail"]["message"]
        text = metrics.render(guard.families())
        assert "cerulean_detection_errors_total 3" in text, text
    finally:
        guard.close()


def test_a_program_deleted_after_a_snapshot_saw_it_running_is_reported(
        tmp_path: Path) -> None:
    """Run a program, let one snapshot see it, then delete its file: the snapshot keyed
    the process by PID and path alone, so the deletion was never a new item and the
    rule never fired (a booted vm's test found it, one run in several)."""
    import subprocess

    prog = tmp_path / "gone"
    prog.write_bytes(Path("/usr/bin/sleep").read_bytes())
    prog.chmod(0o755)
    proc = subprocess.Popen([str(prog), "30"])
    try:
        trail = AuditLog(tmp_path / "audit.jsonl")
        rules = [r for r in load_rule_files([SHIPPED]) if r.name == "program-from-deleted-file"]
        guard = Guard(rules, trail, Path("/"), interval=0.01, say=lambda m: None)
        guard.start()
        try:
            time.sleep(0.05)
            assert guard.step() == []  # running, its file there: nothing yet
            prog.unlink()
            time.sleep(0.05)
            alerts = guard.step()
            assert [a.rule for a in alerts] == ["program-from-deleted-file"], alerts
            assert alerts[0].evidence["proc.pid"] == proc.pid
        finally:
            guard.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_set_id_file_past_the_watch_limit_is_alerted_at_once_with_marks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard marks the watched file systems: a set-ID file made in a directory the
    watch limit left unwatched is alerted in the step that reads it, not at a rescan."""
    from test_watch import setuid_file

    from cerulean.agent import watch

    monkeypatch.setattr(watch, "MAX_WATCHED", 1)
    said: list[str] = []
    guard, _trail = _file_guard(tmp_path, said)
    (tmp_path / "tmp/blind").mkdir()
    guard.start()
    try:
        if _metric(guard, "cerulean_watch_marked_filesystems") == 0:
            pytest.skip(f"no marks here: {said}")
        guard._next_rescan = guard.clock() + 3600  # no rescan may find it
        setuid_file(tmp_path / "tmp/blind/sh")
        rules: list[str] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "setuid-or-setgid-file" not in rules:
            rules += [a.rule for a in guard.step(wait=0.2)]
        assert "setuid-or-setgid-file" in rules
        assert _metric(guard, "cerulean_watch_rescans_total") == 0
    finally:
        guard.close()


def test_without_marks_the_guard_still_watches(tmp_path: Path) -> None:
    said: list[str] = []
    guard, _trail = _file_guard(tmp_path, said)
    guard.marks = False
    guard.start()
    try:
        assert _metric(guard, "cerulean_watch_marked_filesystems") == 0
        assert _metric(guard, "cerulean_watch_up") == 1
    finally:
        guard.close()
