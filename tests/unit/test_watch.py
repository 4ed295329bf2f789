"""Watching directory trees with inotify (cerulean.agent.watch), and the rule it feeds."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cerulean.agent.detect import load_rules, match
from cerulean.agent.watch import Watcher


def collect(w: Watcher, until: Any, timeout: float = 5.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got += w.read(0.2)
        if until(got):
            break
    return got


def test_a_setuid_file_in_tmp_raises_an_alert_within_a_second(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    rules = load_rules([{
        "rule": "setuid-file-in-tmp", "event": "file", "priority": "critical",
        "condition": f"file.setuid and file.path startswith {tmp}/",
        "output": "setuid file %file.path (mode %file.mode)"}])
    with Watcher([tmp]) as w:
        f = tmp / "sh"
        f.write_bytes(b"\x7fELF")
        os.chmod(f, 0o4755)
        events = collect(w, lambda got: any(e.get("file.setuid") for e in got))
        events += w.read(0.3)
        alerts = [a for e in events for a in match(rules, "file", e, time.time())]
        assert [a.message for a in alerts][:1] == [f"setuid file {f} (mode 4755)"]
        assert alerts[0].evidence["file.action"] in ("created", "attributes")
        # created, written and attributes arrive in one batch and the file is described
        # once, so a rule on its final state fires once.
        assert len(alerts) == 1, events
        assert alerts[0].evidence["file.actions"][0] == "created"


def test_new_directories_are_watched_too(tmp_path: Path) -> None:
    with Watcher([tmp_path]) as w:
        (tmp_path / "a/b").mkdir(parents=True)  # made before its watch can be set
        (tmp_path / "a/b/early").write_text("x")
        time.sleep(0.2)
        collect(w, lambda got: False, 0.5)
        (tmp_path / "a/b/late").write_text("y")
        (tmp_path / "a/b/late").unlink()
        events = collect(w, lambda got: any("deleted" in e["file.actions"] for e in got))
    by_path = {(e["file.path"], a) for e in events for a in e["file.actions"]}
    assert (str(tmp_path / "a/b/late"), "created") in by_path
    assert (str(tmp_path / "a/b/late"), "deleted") in by_path


def test_what_the_first_scan_of_a_new_directory_finds(tmp_path: Path) -> None:
    """Files made in a new directory before its watch exists still show up (as created):
    nothing slips in between mkdir and the watch."""
    with Watcher([tmp_path]) as w:
        d = tmp_path / "drop"
        d.mkdir()
        (d / "payload").write_text("x")
        events = collect(w, lambda got: any(e["file.path"].endswith("payload") for e in got),
                         3.0)
    made = [e for e in events if e["file.path"] == str(d / "payload")]
    assert made and made[0]["file.action"] == "created" and made[0]["file.type"] == "file"


def test_a_file_replaced_through_a_temporary_name_is_one_event(tmp_path: Path) -> None:
    """write_atomic (like editors and dpkg) writes a temporary file and renames it onto
    the real name: one event for the real name, not one per step."""
    from cerulean.agent.fileio import write_atomic

    pam = tmp_path / "pam.d"
    pam.mkdir()
    (pam / "common-auth").write_text("old\n")
    with Watcher([pam]) as w:
        write_atomic(pam / "common-auth", b"auth required pam_deny.so\n", mode=0o644)
        events = collect(w, lambda got: any(e["file.action"] == "moved-in" for e in got))
        events += w.read(0.3)
    assert [(e["file.path"], e["file.action"]) for e in events] == [
        (str(pam / "common-auth"), "moved-in")]
    assert events[0]["file.renamed_from"].startswith(str(pam) + "/")


def test_a_rename_of_a_file_that_was_already_there_is_still_seen(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    with Watcher([tmp_path]) as w:
        os.rename(tmp_path / "a", tmp_path / "b")
        events = collect(w, lambda got: any(e["file.action"] == "moved-in" for e in got))
    assert {(Path(e["file.path"]).name, e["file.action"]) for e in events} == {
        ("a", "moved-out"), ("b", "moved-in")}
    assert all("file.renamed_from" not in e for e in events)
