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
    assert [e["action"] for e in entries[5:]] == ["audit.recovered", "fix.applied"]
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
    assert entries[6]["action"] == "audit.recovered"
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


def test_a_damaged_head_is_one_sentence(tmp_path: Path) -> None:
    from cerulean.agent.audit import AuditError

    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("x", "y")
    log.head_path.write_text("{not json")
    with pytest.raises(AuditError, match=r"head file .* is damaged; run cerulean audit verify"):
        log.append("x", "z")
    assert not log.verify().ok
