"""The detection loop (cerulean.agent.guard): real inotify on a temporary tree, snapshots
of a fake /proc, the shipped rules, alerts in the audit trail."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
