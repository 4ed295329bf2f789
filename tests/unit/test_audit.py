"""The agent's hash-chained audit trail (cerulean.agent.audit) and `cerulean audit`."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cerulean.agent import cli
from cerulean.agent.audit import GENESIS, AuditLog, entry_hash

T0 = datetime(2026, 11, 26, 22, 0, tzinfo=UTC)


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    log = AuditLog(tmp_path / "audit" / "audit.jsonl")
    for i in range(1, 6):
        log.append("policy", "fix.applied", {"check": f"cis-{i}", "evidence": "é ✓"}, now=T0)
    return log


def lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def test_entries_are_chained(log: AuditLog) -> None:
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev"] == GENESIS
    for a, b in itertools.pairwise(entries):
        assert b["prev"] == a["hash"] == entry_hash(a)
    verdict = log.verify()
    assert verdict.ok and verdict.entries == 5 and verdict.head == entries[-1]["hash"]
    assert json.loads(log.head_path.read_bytes()) == {"seq": 5, "hash": entries[-1]["hash"]}


def test_one_changed_byte_anywhere_is_found(log: AuditLog) -> None:
    data = log.path.read_bytes()
    first_line_end = data.index(b"\n")
    for pos in range(0, len(data), 7):
        if data[pos:pos + 1] == b"\n":
            continue
        edited = bytearray(data)
        edited[pos] ^= 0x01
        log.path.write_bytes(bytes(edited))
        verdict = log.verify()
        assert not verdict.ok, f"a change at byte {pos} went unnoticed"
        line = data.count(b"\n", 0, pos) + 1
        assert verdict.problems[0].line == line, (pos, verdict.problems)
        assert verdict.entries == line - 1
        if pos < first_line_end:
            assert verdict.head == GENESIS
    log.path.write_bytes(data)
    assert log.verify().ok


def test_a_recomputed_hash_still_breaks_the_chain(log: AuditLog) -> None:
    """Editing an entry and fixing its own hash is not enough: the next entry names it."""
    ls = lines(log)
    e = json.loads(ls[1])
    e["detail"]["check"] = "cis-forged"
    e["hash"] = entry_hash(e)
    ls[1] = json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() \
        + b"\n"
    log.path.write_bytes(b"".join(ls))
    verdict = log.verify()
    assert [p.line for p in verdict.problems] == [3]
    assert "does not follow entry 2" in verdict.problems[0].message


@pytest.mark.parametrize(("change", "line", "words"), [
    (lambda ls: ls[:2] + ls[3:], 3, "entry 3 is missing"),
    (lambda ls: ls[:1] + ls[3:], 2, "entries 2..3 are missing"),
    (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2, "entry 2 is missing"),
    (lambda ls: [*ls[:3], ls[2], *ls[3:]], 4, "moved or repeated"),
    (lambda ls: ls[1:], 1, "entry 1 is missing"),
    (lambda ls: ls[:4], 0, "removed from its end"),
    (lambda ls: [*ls, b"not json\n"], 6, "not a valid entry"),
])
def test_removed_moved_repeated_and_cut_entries_are_found(log: AuditLog, change: object,
                                                           line: int, words: str) -> None:
    log.path.write_bytes(b"".join(change(lines(log))))  # type: ignore[operator]
    verdict = log.verify()
    assert not verdict.ok and verdict.problems[0].line == line, verdict.problems
    assert words in verdict.problems[0].message, verdict.problems


def test_appending_goes_on_after_the_head(log: AuditLog) -> None:
    log.append("updater", "update.staged", {"message": "13.20261127.0 is written to slot B"})
    assert log.verify().ok and log.verify().entries == 6


def test_cli_verify_and_show(log: AuditLog, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    from cerulean.agent.update import host

    monkeypatch.setattr(host.Host, "audit_log", property(lambda self: log.path))
    assert cli.main(["audit", "verify"]) == 0
    assert "intact: 5 entries" in capsys.readouterr().out
    assert cli.main(["audit", "show", "-n", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].split()[0] == "4" and "policy: fix.applied" in out[0]
    data = bytearray(log.path.read_bytes())
    data[data.index(b"cis-3")] = ord("C")
    log.path.write_bytes(bytes(data))
    assert cli.main(["audit", "verify"]) == 1
    err = capsys.readouterr().err
    assert "error: Entry 3 (line 3) was edited" in err
    assert "Entries 1..2 before it are intact" in err
    assert cli.main(["audit", "verify", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["entries"] == 2 and doc["problems"][0]["line"] == 3
    assert cli.main(["audit", "show", "-n", "-1"]) == 1
    assert capsys.readouterr().err.startswith("error: --last must be")


def test_a_power_cut_in_the_middle_of_an_entry_is_recovered(log: AuditLog) -> None:
    """The entry being written when the power went is cut off by the next write, which
    says so in the trail; until then verify calls it a note, not a problem."""
    whole = log.path.read_bytes()
    with log.path.open("ab") as f:
        f.write(b'{"action":"fix.applied","actor":"pol')  # no newline: torn
    verdict = log.verify()
    assert verdict.ok and verdict.entries == 5, verdict
    assert "cut short by a power cut" in verdict.notes[0]
    log.append("policy", "fix.applied", {"check": "cis-6"})
    assert log.path.read_bytes().startswith(whole)
    entries = list(log.entries())
    assert [e["action"] for e in entries[5:]] == ["alert.audit-trail-recovered", "fix.applied"]
    assert "a torn last entry (36 bytes) was cut off" in entries[5]["detail"]["message"]
    verdict = log.verify()
    assert verdict.ok and not verdict.notes and verdict.entries == 7


def test_a_power_cut_between_an_entry_and_its_head_is_recovered(log: AuditLog) -> None:
    old_head = log.head_path.read_bytes()
    log.append("policy", "fix.applied", {"check": "cis-6"})
    log.head_path.write_bytes(old_head)  # the entry was synced, the head was not
    verdict = log.verify()
    assert verdict.ok and verdict.entries == 6
    assert "written just before a power cut" in verdict.notes[0]
    log.append("policy", "fix.applied", {"check": "cis-7"})
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert entries[6]["action"] == "alert.audit-trail-recovered"
    assert "the head moved on to entry 6" in entries[6]["detail"]["message"]
    assert log.verify().ok and not log.verify().notes


def test_what_a_power_cut_cannot_leave_is_still_a_problem(log: AuditLog) -> None:
    # A torn line that the head already names: the entry had been written whole.
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-10])
    verdict = log.verify()
    assert not verdict.ok and verdict.problems[0].line == 5
    # A valid-looking entry two ahead of the head.
    log.path.write_bytes(data)
    old_head = log.head_path.read_bytes()
    log.append("x", "y")
    log.append("x", "z")
    log.head_path.write_bytes(old_head)
    assert not log.verify().ok


def test_file_names_that_are_not_utf8_are_written_and_verified(tmp_path: Path) -> None:
    import os

    log = AuditLog(tmp_path / "audit.jsonl")
    name = os.fsdecode(b"/tmp/\xff\xfe-evil\nforged line")
    log.append("guard", "alert.setuid-or-setgid-file", {"evidence": {"file.path": name}})
    log.append("guard", "alert.x", {})
    assert log.verify().ok
    (first, _) = list(log.entries())
    assert first["detail"]["evidence"]["file.path"] == name
    assert log.path.read_bytes().count(b"\n") == 2  # the newline in the name stays escaped


def test_a_damaged_head_is_rebuilt_from_the_trail_and_says_so(tmp_path: Path) -> None:
    """A damaged head file does not stop the trail: the next write rebuilds it from the
    last entry and writes an alert that says so."""
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("x", "y")
    log.head_path.write_text("{not json")
    assert not log.verify().ok
    assert "cerulean audit repair" in log.verify().problems[0].message
    log.append("x", "z")
    actions = [e["action"] for e in log.entries()]
    assert actions == ["y", "alert.audit-head-rebuilt", "z"]
    assert log.verify().ok
    assert log.counts()["head-rebuilt"] == 1


# -- archived segments and bounded reading --------------------------------------------------

@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    from cerulean.agent import audit

    monkeypatch.setattr(audit, "ROTATE_BYTES", 3000)
    monkeypatch.setattr(audit, "KEEP_SEGMENTS", 2)


def test_the_trail_rotates_into_segments_that_still_chain(tmp_path: Path, small: None) -> None:
    from cerulean.agent import audit

    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(100):
        log.append("guard", "alert.x", {"message": f"event {i}", "evidence": {"n": i}})
    segments = log.segments()
    assert 1 <= len(segments) <= audit.KEEP_SEGMENTS
    for path in log.files():
        assert path.stat().st_size < audit.ROTATE_BYTES + audit.MAX_ENTRY_BYTES
    entries = list(log.entries())
    for a, b in itertools.pairwise(entries):  # across segment boundaries too
        assert b["seq"] == a["seq"] + 1 and b["prev"] == a["hash"]
    assert entries[0]["seq"] > 1  # the oldest segments went
    verdict = log.verify()
    assert verdict.ok, verdict
    assert verdict.entries == entries[-1]["seq"] and verdict.head == entries[-1]["hash"]
    rotations = [e for e in entries if e["action"] == "alert.audit-trail-rotated"]
    assert rotations and rotations[-1]["detail"]["priority"] == "info"
    assert log.counts()["rotated"] >= 3 and log.counts()["pruned"] >= 1
    # A change in an archived segment is found, and the segment is named.
    data = segments[-1].read_bytes()
    segments[-1].write_bytes(data.replace(b"event", b"Event", 1))
    verdict = log.verify()
    assert not verdict.ok and verdict.problems[0].file == segments[-1].name
    segments[-1].write_bytes(data)
    # Removing the oldest kept segment by hand is found.
    log.segments()[0].unlink()
    assert not log.verify().ok


def test_entries_after_reads_from_a_position_with_a_limit(tmp_path: Path, small: None) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(60):
        log.append("guard", "alert.x", {"message": f"event {i}"})
    last = list(log.entries())[-1]["seq"]
    assert [e["seq"] for e in log.entries_after(last - 3)] == [last - 2, last - 1, last]
    assert [e["seq"] for e in log.entries_after(last - 10, 2)] == [last - 9, last - 8]
    assert list(log.entries_after(last)) == []
    # The archived segments before the position are not opened at all.
    opened: list[str] = []
    real = open

    def spy(path: object, *a: object, **k: object) -> object:
        opened.append(str(path))
        return real(path, *a, **k)  # type: ignore[call-overload]

    import builtins
    builtins.open = spy  # type: ignore[assignment]
    try:
        list(log.entries_after(last - 1))
    finally:
        builtins.open = real
    assert log.segments() and set(opened) == {str(log.path)}


def test_entries_after_misses_nothing_when_the_log_rotates_as_it_is_read(
        tmp_path: Path, small: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet round reads while the guard writes: the live log can be archived between
    the listing of the files and the opening of the live one."""
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("guard", "alert.x", {"message": "event 0"})
    start = log.head()[0]
    writer = AuditLog(log.path)
    real = AuditLog.files
    rotated = []

    def files_then_rotation(self: AuditLog) -> list[Path]:
        listed = real(self)
        if not rotated:  # once: enough entries for the live log to be archived
            rotated.append(True)
            size = 0
            while (now := self.path.stat().st_size) >= size:  # a new live log is smaller
                size = now
                writer.append("guard", "alert.x", {"message": "more"})
        return listed

    monkeypatch.setattr(AuditLog, "files", files_then_rotation)
    seqs = [e["seq"] for e in log.entries_after(start)]
    assert rotated and seqs == list(range(start + 1, log.head()[0] + 1))
    # A jump that stays when read again is real (the oldest segments were removed).
    monkeypatch.setattr(AuditLog, "files", real)
    for _ in range(100):
        log.append("guard", "alert.x", {"message": "enough to remove the oldest"})
    first = next(log.entries())["seq"]
    assert [e["seq"] for e in log.entries_after(1, 1)] == [first] and first > 2


def test_the_trail_counts_are_metrics(tmp_path: Path, small: None) -> None:
    from cerulean.agent import metrics

    root = tmp_path / "root"
    log = AuditLog(root / "var/lib/cerulean/audit/audit.jsonl")
    for i in range(60):
        log.append("guard", "alert.x", {"message": f"event {i}"})
    text = metrics.render(metrics.cerulean_state(root))
    assert 'cerulean_audit_events_total{event="rotated"}' in text
    assert "cerulean_audit_segments " in text


# -- rolling the trail back -----------------------------------------------------------------

def test_cutting_the_trail_back_and_rewriting_its_head_is_found(log: AuditLog) -> None:
    ls = lines(log)
    log.path.write_bytes(b"".join(ls[:3]))
    third = json.loads(ls[2])
    log.head_path.write_bytes(json.dumps({"seq": 3, "hash": third["hash"]}).encode())
    verdict = log.verify()
    assert not verdict.ok
    assert "entry 5 was written" in verdict.problems[0].message
    # The next write says so in the trail itself (and so to the fleet).
    log.append("guard", "alert.x", {})
    cut = list(log.entries())[3]
    assert cut["action"] == "alert.audit-trail-cut" and cut["detail"]["priority"] == "critical"
    assert cut["detail"]["evidence"]["mark"]["seq"] == 5


def test_deleting_the_trail_alone_is_said(log: AuditLog) -> None:
    log.path.unlink()
    assert not log.verify().ok
    log.append("guard", "alert.x", {})
    first = next(log.entries())
    assert first["seq"] == 6 and first["action"] == "alert.audit-trail-restarted"


def test_deleting_the_trail_and_its_head_is_found(log: AuditLog) -> None:
    log.path.unlink()
    log.head_path.unlink()
    verdict = log.verify()
    assert not verdict.ok and "The audit trail is empty, but entry 5" in \
        verdict.problems[0].message
    # The agent goes on from the mark, so the gap stays visible, and says so.
    log.append("guard", "alert.x", {})
    first = next(log.entries())
    assert first["seq"] == 6 and first["action"] == "alert.audit-trail-restarted"
    assert first["detail"]["priority"] == "critical"
    assert not log.verify().ok


def test_a_forged_last_entry_is_not_taken_for_a_power_cut(log: AuditLog) -> None:
    last = json.loads(lines(log)[-1])
    forged = {"seq": 6, "time": last["time"], "actor": "admin", "action": "update.forged",
              "detail": {}, "prev": last["hash"]}
    forged["hash"] = entry_hash(forged)
    with log.path.open("ab") as f:
        f.write(json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    verdict = log.verify()
    assert not verdict.ok and "the agent did not write it" in verdict.problems[0].message
    log.append("policy", "fix.applied", {"check": "cis-6"})
    entries = list(log.entries())
    assert "update.forged" not in [e["action"] for e in entries]
    assert entries[5]["action"] == "alert.audit-entry-rejected"
    assert entries[5]["detail"]["priority"] == "critical"
    assert b"update.forged" in log.rejected_path.read_bytes()
    assert log.verify().ok


def test_the_head_for_the_fleet_names_the_one_it_extends(log: AuditLog) -> None:
    entries = list(log.entries())
    known = f"5:{entries[4]['hash']}"
    assert log.anchor(None, known) is None  # nothing new
    log.append("guard", "alert.x", {})
    new = list(log.entries())[-1]
    assert log.anchor(new, known) == {"seq": 6, "hash": new["hash"],
                                      "base": {"seq": 5, "hash": entries[4]["hash"]}}
    # The trail is cut back and written again: the agent reports a restarted chain.
    ls = lines(log)
    log.path.write_bytes(b"".join(ls[:3]))
    log.head_path.write_bytes(json.dumps({"seq": 3, "hash": entries[2]["hash"]}).encode())
    report = log.anchor(None, f"6:{new['hash']}")
    assert report is not None and report["restarted"] is True and report["seq"] == 3
    # Rewritten past the known head: the base is this trail's entry, not the known one.
    for _ in range(4):
        log.append("x", "y")
    head = list(log.entries())[-1]
    report = log.anchor(head, f"6:{new['hash']}")
    assert report is not None and report["restarted"] is True
    assert report["base"]["seq"] == 6 and report["base"]["hash"] != new["hash"]


# -- size and repair ------------------------------------------------------------------------

def test_a_torn_entry_of_any_size_is_cut_off(log: AuditLog) -> None:
    whole = log.path.read_bytes()
    torn = b'{"action":"alert.x","detail":{"message":"' + b"a" * 300_000
    with log.path.open("ab") as f:
        f.write(torn)
    log.append("policy", "fix.applied", {"check": "cis-6"})
    assert log.path.read_bytes().startswith(whole)
    entries = list(log.entries())
    assert [e["action"] for e in entries[5:]] == ["alert.audit-trail-recovered", "fix.applied"]
    assert f"({len(torn)} bytes)" in entries[5]["detail"]["message"]
    assert log.rejected_path.read_bytes().startswith(torn)
    assert log.verify().ok


def test_an_entry_larger_than_the_limit_is_cut_down_with_a_marker(tmp_path: Path) -> None:
    from cerulean.agent.audit import MAX_ENTRY_BYTES

    log = AuditLog(tmp_path / "audit.jsonl")
    detail = {"rule": "program-from-temporary-directory", "priority": "error",
              "message": "program /tmp/x " + "A" * (1 << 20),
              "evidence": {"process.cmdline": "B" * (1 << 20)}}
    entry = log.append("guard", "alert.program-from-temporary-directory", detail)
    assert log.path.stat().st_size <= MAX_ENTRY_BYTES
    d = entry["detail"]
    assert d["rule"] == "program-from-temporary-directory" and d["priority"] == "error"
    assert d["message"].startswith("program /tmp/x AAA")
    assert d["message"].endswith(f"…[{(1 << 20) + 15 - 2000} more characters]")
    # The evidence keeps every field, cut short with the same marker.
    assert d["evidence"] == {"process.cmdline": "B" * 200 + f"…[{(1 << 20) - 200} more "
                                                            "characters]"}
    assert d["truncated"]["bytes"] > 2 << 20 and d["truncated"]["limit"] == MAX_ENTRY_BYTES
    assert log.verify().ok and log.counts()["truncated"] == 1


def test_cli_repair(log: AuditLog, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    from cerulean.agent.update import host

    monkeypatch.setattr(host.Host, "audit_log", property(lambda self: log.path))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["audit", "repair", "--help"])
    assert exit_.value.code == 0
    assert "never rewrites" in capsys.readouterr().out
    log.head_path.write_text("{garbage")
    with log.path.open("ab") as f:
        f.write(b'{"torn')
    assert cli.main(["audit", "verify"]) == 1
    capsys.readouterr()
    assert cli.main(["audit", "repair"]) == 0
    out = capsys.readouterr().out
    assert "torn last entry" in out and "rebuilt" in out and "intact" in out
    assert [e["action"] for e in log.entries()][-1] == "alert.audit-trail-repaired"
    assert cli.main(["audit", "verify"]) == 0


def test_fleet_reports_carry_the_head_they_extend(tmp_path: Path) -> None:
    """What fleetlink.collect queues: each new head with the entry at the head reported
    before, and word of a trail that no longer holds it."""
    from cerulean.agent import fleetlink
    from cerulean.agent.outbox import Outbox

    root = tmp_path / "root"
    log = AuditLog(root / "var/lib/cerulean/audit/audit.jsonl")
    box = Outbox(tmp_path / "outbox.db", "h")

    def audit_reports() -> list[dict[str, object]]:
        fleetlink.collect(box, root, hostname="h")
        rows = box.db.execute("SELECT body FROM message WHERE kind = 'audit' ORDER BY seq")
        return [json.loads(r[0]) for r in rows]

    try:
        for i in range(3):
            log.append("guard", "alert.x", {"rule": "x", "message": str(i)})
        first = list(log.entries())
        assert audit_reports() == [{"seq": 3, "hash": first[2]["hash"]}]
        log.append("guard", "alert.x", {"rule": "x", "message": "3"})
        assert audit_reports()[-1]["base"] == {"seq": 3, "hash": first[2]["hash"]}
        # Cut back to two entries, the head rewritten to match: the next round says so.
        data = log.path.read_bytes().splitlines(keepends=True)
        log.path.write_bytes(b"".join(data[:2]))
        log.head_path.write_text(json.dumps({"seq": 2, "hash": first[1]["hash"]}))
        last = audit_reports()[-1]
        assert last["seq"] == 2 and last["restarted"] is True
        assert audit_reports()[-1] == last  # once
    finally:
        box.close()


def test_a_long_entry_from_before_the_bound_is_not_taken_for_tampering(
        tmp_path: Path) -> None:
    """Trails written before entries were bounded may end with a very long entry: the
    next write goes on after it, with or without a readable head."""
    from cerulean.protocol.audit import canonical

    entries, prev = [], GENESIS
    for i in (1, 2):
        e = {"seq": i, "time": "2026-01-01T00:00:00Z", "actor": "guard", "action": "alert.x",
             "detail": {"message": "m" * (300_000 if i == 2 else 1)}, "prev": prev}
        e["hash"] = prev = entry_hash(e)
        entries.append(canonical(e) + b"\n")
    for damaged in (False, True):
        log = AuditLog(tmp_path / str(damaged) / "audit.jsonl")
        log.path.parent.mkdir()
        log.path.write_bytes(b"".join(entries))
        log.head_path.write_text("{x" if damaged else json.dumps({"seq": 2, "hash": prev}))
        log.append("x", "y")
        actions = [e["action"] for e in log.entries()]
        assert actions == ["alert.x", "alert.x", *(["alert.audit-head-rebuilt"] * damaged),
                           "y"]
        assert log.verify().ok


def test_verify_never_sees_an_append_half_done(tmp_path: Path) -> None:
    """An append writes its line, then the head: a verify that read between the two took
    the head for deleted (the agent's first alert and a verify at the same moment)."""
    import threading
    import time

    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("test", "first")
    held = threading.Event()

    def mid_append() -> None:  # what an append looks like from outside, half done
        with log._locked():
            head = log.head_path.read_bytes()
            log.head_path.unlink()
            held.set()
            time.sleep(0.3)
            log.head_path.write_bytes(head)

    t = threading.Thread(target=mid_append)
    t.start()
    held.wait(5)
    try:
        assert log.verify().ok
    finally:
        t.join()
