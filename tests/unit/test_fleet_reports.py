"""What the agent queues for the fleet (cerulean.agent.fleetlink.collect and the sync round):
bounded reports, a trail read in batches from its cursor, and delivery that never waits
on queuing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cerulean.agent import fleetlink
from cerulean.agent.audit import AuditLog, read_after
from cerulean.agent.outbox import Message, Outbox


def trail(root: Path) -> AuditLog:
    return AuditLog(root / "var/lib/cerulean/audit/audit.jsonl")


def alert(rule: str, message: str, **evidence: Any) -> dict[str, Any]:
    return {"rule": rule, "priority": "error", "tags": ["execution"], "message": message,
            "time": 1_764_000_000.0, "evidence": evidence}


def queued(box: Outbox, kind: str) -> list[dict[str, Any]]:
    return [m.body for m in box.due(10_000, max_bytes=1 << 40) if m.kind == kind]


def test_one_huge_alert_is_cut_and_the_ones_after_it_still_go(tmp_path: Path) -> None:
    log = trail(tmp_path)
    # A program run from /tmp with 1 MiB of arguments: 6 MB of escapes in the trail.
    args = "\x01" * (1 << 20)
    log.append("guard", "alert.program-from-temporary-directory",
               alert("program-from-temporary-directory", f"/tmp/x runs: {args}",
                     **{"proc.cmdline": args, "proc.exe": "/tmp/x"}))
    log.append("guard", "alert.new-uid-0-account", alert("new-uid-0-account", "toor"))
    box = Outbox(tmp_path / "outbox.db", "h")
    errors: list[str] = []
    put = fleetlink.collect(box, tmp_path, hostname="h", errors=errors)
    assert errors == [] and put["alert"] == 2 and put["audit"] == 1
    big, small = queued(box, "alert")
    # The trail cut it when it was written (audit.MAX_ENTRY_BYTES); the report cuts the
    # rest to the fleet's limits. (An older trail's line too long to read is summarised:
    # test_a_line_too_long_to_read_is_summarised_and_passed_over.)
    assert big["truncated"] is True and big["rule"] == "program-from-temporary-directory"
    assert big["message"].startswith("/tmp/x runs: ")
    assert len(json.dumps(big)) <= fleetlink.MAX_ALERT_BYTES
    assert small["rule"] == "new-uid-0-account" and "truncated" not in small
    assert box.get("audit-seq") == "2"
    # The cut is said: counted, and an alert about it in the trail for the next round.
    assert box.counters()["truncated"] == 1
    said = [e for e in log.entries() if e["action"] == "alert.agent-report-truncated"]
    assert len(said) == 1 and "entries 1" in said[0]["detail"]["message"]
    fleetlink.collect(box, tmp_path, hostname="h")
    assert queued(box, "alert")[-1]["rule"] == "agent-report-truncated"
    box.close()


def test_the_fields_of_a_large_alert_are_cut_with_a_marker(tmp_path: Path) -> None:
    log = trail(tmp_path)
    args = "a" * 20_000  # within the trail's bound (audit.MAX_ENTRY_BYTES), over the report's
    log.append("guard", "alert.program-from-temporary-directory",
               alert("program-from-temporary-directory", f"/tmp/x runs: {args}",
                     **{"proc.cmdline": args, "proc.exe": "/tmp/x"}))
    box = Outbox(tmp_path / "outbox.db", "h")
    fleetlink.collect(box, tmp_path, hostname="h")
    (big,) = queued(box, "alert")
    assert big["truncated"] is True and len(big["message"]) <= fleetlink.MAX_ALERT_MESSAGE
    assert len(json.dumps(big)) <= fleetlink.MAX_ALERT_BYTES
    assert big["evidence"]["proc.exe"] == "/tmp/x"
    assert big["evidence"]["proc.cmdline"].endswith(
        f"…[{20_000 - fleetlink.MAX_REPORT_TEXT} more characters]")
    assert box.counters()["truncated"] == 1
    box.close()


def test_a_line_too_long_to_read_is_summarised_and_passed_over(tmp_path: Path) -> None:
    log = trail(tmp_path)
    log.append("guard", "alert.program-from-temporary-directory",
               alert("program-from-temporary-directory", "x" * 5000))
    log.append("guard", "alert.kernel-module-loaded", alert("kernel-module-loaded", "m"))
    entries, offset = read_after(log.path, 0, max_line=1000)
    assert entries[0] == {"oversized": len(log.path.read_bytes().splitlines()[0]) + 1,
                          "action": "alert.program-from-temporary-directory", "seq": 1,
                          "time": entries[0]["time"]}
    assert entries[1]["seq"] == 2 and offset == log.path.stat().st_size
    body = fleetlink._oversized_alert(entries[0])
    assert body["rule"] == "program-from-temporary-directory" and body["truncated"]


def test_the_trail_is_read_from_the_cursor_in_bounded_batches(tmp_path: Path) -> None:
    log = trail(tmp_path)
    for i in range(25):
        log.append("updater", "update.checked", {"n": i})
    first, at = read_after(log.path, 0, max_entries=10)
    assert [e["seq"] for e in first] == list(range(1, 11))
    again, at2 = read_after(log.path, 10, at, max_entries=10)
    assert [e["seq"] for e in again] == list(range(11, 21))
    # A wrong hint (the log was cut or replaced) is noticed: read from the start.
    assert [e["seq"] for e in read_after(log.path, 20, 7, max_entries=3)[0]] == [21, 22, 23]
    assert read_after(log.path, 20, at2 + 1000)[0][0]["seq"] == 21
    # A last line still being written is left for the next call.
    with log.path.open("ab") as f:
        f.write(b'{"action":"alert.x","seq":26')
    assert [e["seq"] for e in read_after(log.path, 24, at2)[0]] == [25]
    assert read_after(tmp_path / "none.jsonl", 0) == ([], 0)


def test_a_round_queues_a_bounded_batch_of_the_trail(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from cerulean.agent import audit

    monkeypatch.setattr(audit, "READ_ENTRIES", 10)
    monkeypatch.setattr(audit.read_after, "__defaults__", (0, 10, audit.READ_BYTES,
                                                           audit.MAX_LINE))
    log = trail(tmp_path)
    for i in range(25):
        log.append("guard", "alert.kernel-module-loaded", alert("kernel-module-loaded", str(i)))
    box = Outbox(tmp_path / "outbox.db", "h")
    assert fleetlink.collect(box, tmp_path, hostname="h")["alert"] == 10
    assert box.get("audit-seq") == "10"
    assert fleetlink.collect(box, tmp_path, hostname="h")["alert"] == 10
    assert fleetlink.collect(box, tmp_path, hostname="h")["alert"] == 5
    assert [int(b["message"]) for b in queued(box, "alert")] == list(range(25))
    assert [b["seq"] for b in queued(box, "audit")] == [10, 20, 25]
    box.close()


class FakeLink:
    def __init__(self, root: Path) -> None:
        self.dir = root / "fleet"
        self.dir.mkdir()
        self.desired = None
        self.sent: list[Message] = []

    def renew_if_due(self) -> bool:
        return False

    def outbox(self) -> Outbox:
        return Outbox(self.dir / "outbox.db", "h")

    def send(self, msgs: list[Message], dropped: int) -> set[str]:
        self.sent += msgs
        return {m.id for m in msgs}


def test_what_is_queued_is_delivered_whatever_queuing_does(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    link = FakeLink(tmp_path)
    box = link.outbox()
    box.put("alert", alert("new-uid-0-account", "toor"))
    box.close()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(fleetlink, "inventory", broken)
    monkeypatch.setattr(fleetlink, "metric_values", broken)
    r = fleetlink._sync(tmp_path, link, "h")  # type: ignore[arg-type]
    assert r.delivered >= 1 and link.sent[0].body["rule"] == "new-uid-0-account"
    assert "the inventory could not be queued: No space left on device" in r.error
    assert "the metrics could not be queued" in r.error


def test_a_corrupt_outbox_is_made_again_and_said(tmp_path: Path) -> None:
    link = FakeLink(tmp_path)
    (link.dir / "outbox.db").write_bytes(b"garbage" * 1000)
    r = fleetlink._sync(tmp_path, link, "h")  # type: ignore[arg-type]
    assert r.delivered >= 1
    said = [e for e in trail(tmp_path).entries() if e["action"] == "alert.agent-outbox-degraded"]
    assert len(said) == 1 and "corrupt" in said[0]["detail"]["message"]
    fleetlink._sync(tmp_path, link, "h")  # type: ignore[arg-type]
    rules = [m.body.get("rule") for m in link.sent if m.kind == "alert"]
    assert "agent-outbox-degraded" in rules
    metrics = [m.body for m in link.sent if m.kind == "metrics"][-1]
    assert metrics["cerulean_fleet_outbox_recovered_total"] == 1


def test_a_file_name_that_is_not_utf8_reaches_the_fleet_escaped(tmp_path: Path) -> None:
    """touch $'/tmp/\\xff'; chmod u+s: the name must not make the server refuse reports."""
    log = trail(tmp_path)
    name = b"/tmp/\xff\x00x".decode("utf-8", "surrogateescape")
    log.append("guard", "alert.setuid-or-setgid-file",
               alert("setuid-or-setgid-file", f"set-ID file {name}", **{"file.path": name}))
    box = Outbox(tmp_path / "outbox.db", "h")
    fleetlink.collect(box, tmp_path, hostname="h")
    (got,) = queued(box, "alert")
    json.dumps(got).encode("utf-8")  # no lone surrogate left
    assert got["evidence"]["file.path"] == "/tmp/\\udcff\\x00x"
    assert "\x00" not in json.dumps(got, ensure_ascii=False)
    box.close()


def test_a_report_the_server_refuses_does_not_hold_back_the_others(tmp_path: Path) -> None:
    from cerulean.agent.outbox import MAX_REFUSALS
    from cerulean.errors import CeruleanError

    box = Outbox(tmp_path / "outbox.db", "h")
    for i in range(3):
        box.put("alert", alert("r", "poison" if i == 1 else f"fine {i}"))
    delivered: list[str] = []

    def send(msgs: list[Message], _dropped: int) -> set[str]:
        if any(m.body["message"] == "poison" for m in msgs):
            raise CeruleanError("The fleet server answered 500.")
        delivered.extend(m.body["message"] for m in msgs)
        return {m.id for m in msgs}

    box.deliver(send)
    assert delivered == ["fine 0", "fine 2"]
    for i in range(MAX_REFUSALS - 1):  # the first refusal was above
        box.clock = lambda i=i: 1e12 + i * 1e4  # type: ignore[misc]  # back-offs passed
        assert box.due(10) != [] and "unsendable" not in box.counters()
        box.deliver(send)
    assert box.due(10) == [] and box.counters()["unsendable"] == 1
    box.close()


def test_a_burst_of_alerts_is_sent_in_one_round_while_the_fleet_takes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who raises alerts faster than one batch a round must not leave the fleet
    further behind each round: while the fleet takes what is sent, the round goes on."""
    from cerulean.agent import audit

    monkeypatch.setattr(audit, "READ_ENTRIES", 10)
    monkeypatch.setattr(audit.read_after, "__defaults__", (0, 10, audit.READ_BYTES,
                                                           audit.MAX_LINE))
    monkeypatch.setattr(fleetlink, "CATCH_UP_BATCHES", 3)
    log = trail(tmp_path)
    for i in range(55):
        log.append("guard", "alert.kernel-module-loaded", alert("kernel-module-loaded", str(i)))
    link = FakeLink(tmp_path)
    fleetlink._sync(tmp_path, link, "h")  # type: ignore[arg-type]
    sent = [int(m.body["message"]) for m in link.sent if m.kind == "alert"]
    assert sent == list(range(40))  # the round's batch and three more
    fleetlink._sync(tmp_path, link, "h")  # type: ignore[arg-type]
    sent = [int(m.body["message"]) for m in link.sent if m.kind == "alert"]
    assert sent == list(range(55))


def test_entries_archived_away_before_they_were_sent_are_counted_and_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cerulean.agent import audit

    monkeypatch.setattr(audit, "ROTATE_BYTES", 3000)
    monkeypatch.setattr(audit, "KEEP_SEGMENTS", 1)
    log = trail(tmp_path)
    log.append("guard", "alert.kernel-module-loaded", alert("kernel-module-loaded", "0"))
    box = Outbox(tmp_path / "outbox.db", "h")
    fleetlink.collect(box, tmp_path, hostname="h")
    assert box.get("audit-seq") == "1"
    for i in range(1, 200):  # the fleet is unreachable: the trail rotates past the cursor
        log.append("guard", "alert.kernel-module-loaded", alert("kernel-module-loaded", str(i)))
    first = next(log.entries())["seq"]
    assert first > 2
    fleetlink.collect(box, tmp_path, hostname="h")
    assert box.counters()["audit-pruned-unsent"] == first - 2
    (said,) = [e for e in log.entries() if e["action"] == "alert.agent-report-lost"]
    assert said["detail"]["evidence"] == {"first": 2, "count": first - 2}
    assert f"{first - 2} audit entries (from 2)" in said["detail"]["message"]
    box.close()
