"""Limits on what detection writes: fields cut to size, a rate limit per rule with a
summary alert, and client UDP sockets that are not taken for listening ones."""

from __future__ import annotations

import os
from pathlib import Path

from test_sensors import UDP, fake_proc
from test_shipped_rules import SHIPPED

from cerulean.agent import metrics, sensors
from cerulean.agent.audit import AuditLog
from cerulean.agent.detect import (
    MAX_ALERT_MESSAGE,
    MAX_EVIDENCE_TEXT,
    RATE_BURST,
    RATE_WINDOW,
    Alert,
    RateLimit,
    load_rule_files,
    load_rules,
    match,
)
from cerulean.agent.guard import Guard


class Clock:
    def __init__(self) -> None:
        self.now = 1_764_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_rule_writes_a_burst_then_one_summary_per_window() -> None:
    limit = RateLimit(burst=3, window=60)
    a = [Alert("noisy", "warning", ("network",), f"n{i}", 100.0 + i, {}) for i in range(10)]
    assert [limit.admit(x) for x in a] == [True] * 3 + [False] * 7
    assert limit.admit(Alert("quiet", "warning", (), "q", 105.0, {}))  # rules apart
    assert limit.summaries(150.0) == []  # the window has not ended
    (summary,) = limit.summaries(160.0)
    assert summary.rule == "noisy" and summary.priority == "warning"
    assert summary.message.startswith("rule noisy fired 7 more times within 60 s")
    assert summary.evidence["rule.suppressed"] == 7 and "rate-limited" in summary.tags
    assert limit.admit(Alert("noisy", "warning", (), "again", 170.0, {}))  # a new window
    assert limit.summaries(500.0) == []  # nothing was held back


def test_decoys_of_ones_own_never_hide_an_alert_about_something_else() -> None:
    """A user who sets off a rule twenty times about files of their own, to use up its
    rate, must not hide the alert about another file, nor a critical one at all."""
    limit = RateLimit(burst=3, window=60)

    def keys(path: str, t: float, priority: str = "warning") -> Alert:
        return Alert("authorized-keys-changed", priority, (), f"{path} changed", t,
                     {"file.path": path})

    mine = [limit.admit(keys("/home/eve/.ssh/authorized_keys", 100.0 + i)) for i in range(20)]
    assert mine == [True] * 3 + [False] * 17
    assert limit.admit(keys("/root/.ssh/authorized_keys", 121.0))
    setuid = [limit.admit(Alert("setuid-or-setgid-file", "critical", (), f"d{i}", 100.0 + i,
                                {"file.path": f"/tmp/decoy{i}"})) for i in range(50)]
    assert all(setuid)
    (summary,) = limit.summaries(200.0)
    assert "about /home/eve/.ssh/authorized_keys" in summary.message
    assert summary.evidence["rule.subject"] == "/home/eve/.ssh/authorized_keys"


def test_many_subjects_still_meet_the_rules_own_limit() -> None:
    from cerulean.agent.detect import RATE_RULE_BURST

    limit = RateLimit(burst=3, window=60)
    admitted = [limit.admit(Alert("program-from-temporary-directory", "error", (), "x", 100.0,
                                  {"proc.exe": f"/tmp/p{i}"})) for i in range(500)]
    assert sum(admitted) == RATE_RULE_BURST
    (summary,) = limit.summaries(200.0)
    assert summary.evidence["rule.suppressed"] == 500 - RATE_RULE_BURST


def test_the_windows_kept_are_bounded() -> None:
    from cerulean.agent.detect import RATE_SUBJECTS

    limit = RateLimit(burst=1, window=60)
    for i in range(RATE_SUBJECTS * 3):
        limit.admit(Alert("program-from-temporary-directory", "error", (), "x", 100.0,
                          {"proc.exe": f"/tmp/p{i}"}))
    assert len(limit._open) <= RATE_SUBJECTS + 1


def test_fields_are_cut_before_an_alert_is_written() -> None:
    (rule,) = load_rules([{"rule": "tmp", "event": "process", "condition": "proc.exe "
                           "startswith /tmp/", "output": "%proc.exe runs: %proc.cmdline"}])
    cmdline = "A" * (1 << 20)
    (alert,) = match([rule], "process", {"proc.exe": "/tmp/x", "proc.cmdline": cmdline}, 0)
    assert alert.evidence["proc.exe"] == "/tmp/x"
    assert alert.evidence["proc.cmdline"] == (
        "A" * MAX_EVIDENCE_TEXT + f"…[{len(cmdline) - MAX_EVIDENCE_TEXT} more characters]")
    assert len(alert.message) < MAX_ALERT_MESSAGE + 40 and alert.message.endswith(
        "more characters]")
    assert alert.to_json()["truncated"] == ["proc.cmdline", "message"]
    # Cut once: the fleet report takes such an alert as it is.
    from cerulean.agent.fleetlink import fit_alert

    assert fit_alert(alert.to_json()) == (alert.to_json(), False)


def programs_from_tmp(root: Path, pids: range) -> None:
    for pid in pids:  # one program from /tmp run many times, 256 KiB of arguments each
        d = root / "proc" / str(pid)
        d.mkdir()
        os.symlink("/tmp/run", d / "exe")
        os.symlink("/tmp", d / "cwd")
        (d / "cmdline").write_bytes(b"x\0" + b"\x01" * (256 << 10))
        (d / "comm").write_text("run\n")
        (d / "status").write_text("Name:\trun\nUid:\t1000\t1000\t1000\t1000\n")


def test_many_huge_command_lines_write_a_bounded_trail(tmp_path: Path) -> None:
    fake_proc(tmp_path)
    programs_from_tmp(tmp_path, range(5000, 5040))
    trail = AuditLog(tmp_path / "audit.jsonl")
    clock = Clock()
    rules = [r for r in load_rule_files([SHIPPED]) if r.event == "process"]
    guard = Guard(rules, trail, tmp_path, interval=3600, say=lambda m: None, clock=clock)
    guard.start()
    written = guard.step()
    tmp = [a for a in written if a.rule == "program-from-temporary-directory"]
    # fake_proc's miner (a program of its own), then /tmp/run up to the burst.
    assert len(tmp) == 1 + RATE_BURST
    assert guard.suppressed == {"program-from-temporary-directory": 40 - RATE_BURST}
    lines = trail.path.read_bytes().splitlines()
    assert max(len(line) for line in lines) < 64 << 10
    assert trail.path.stat().st_size < 2 << 20
    clock.now += RATE_WINDOW
    (summary,) = guard.step()
    assert summary.rule == "program-from-temporary-directory"
    assert f"fired {40 - RATE_BURST} more times about /tmp/run" in summary.message
    assert trail.verify().ok
    assert list(trail.entries())[-1]["detail"]["evidence"]["rule.suppressed"] == 20
    text = metrics.render(guard.families())
    assert 'cerulean_alerts_suppressed_total{rule="program-from-temporary-directory"} 20' in text
    # (the miner of fake_proc has a short command line)
    assert f"cerulean_alerts_truncated_total {RATE_BURST}" in text
    # What is held back when the agent stops is said too.
    programs_from_tmp(tmp_path, range(6000, 6030))
    clock.now += 3600
    assert len(guard.step()) == RATE_BURST
    guard.close()
    last = list(trail.entries())[-1]["detail"]
    assert last["message"].startswith("rule program-from-temporary-directory fired 10 more")


def test_client_udp_sockets_are_not_listening_ones(tmp_path: Path) -> None:
    fake_proc(tmp_path)
    rules = [r for r in load_rule_files([SHIPPED]) if r.name == "new-listening-socket"]
    socks = sensors.NewOnly(lambda: sensors.listening(tmp_path),
                            lambda e: (e["sock.proto"], e["sock.addr"], e["sock.port"]),
                            hold=lambda e: e["sock.ephemeral"])  # as the guard makes it

    def udp(*sockets: tuple[str, str, str]) -> None:
        (tmp_path / "proc/net/udp").write_text(UDP + "".join(
            f"  {i}: {local} {remote} {st} 00000000:00000000 00:00000000 00000000  1000 0 "
            f"{9000 + i} 2 0 0\n" for i, (local, remote, st) in enumerate(sockets, start=2)))

    def fired() -> list[str]:
        return [a.message for e in socks.poll() for a in match(rules, "socket", e, 0)]

    assert socks.poll() == []
    client = ("00000000:D431", "00000000:0000", "07")  # sent without binding: port 54321
    udp(client,
        ("0F02000A:C350", "08080808:0035", "01"),  # connected to 8.8.8.8:53
        ("00000000:1F90", "00000000:0000", "07"))  # a server on 8080
    assert fired() == ["udp 0.0.0.0 port 8080 is now listening (uid 1000)"]
    # A socket on an ephemeral port counts once it lasts from one snapshot to the next:
    # a client's comes and goes, a server bound there stays.
    udp(("00000000:D432", "00000000:0000", "07"))  # 54322: the client of 54321 is gone
    assert fired() == []
    udp(("00000000:D432", "00000000:0000", "07"), client)  # 54322 stayed; 54321 again
    assert fired() == ["udp 0.0.0.0 port 54322 is now listening (uid 1000)"]
    udp(("00000000:D432", "00000000:0000", "07"))
    assert fired() == []  # 54321 went again; 54322 is known
    (tmp_path / "proc/sys/net/ipv4").mkdir(parents=True)
    (tmp_path / "proc/sys/net/ipv4/ip_local_port_range").write_text("1024\t9000\n")
    udp(client, ("00000000:1F90", "00000000:0000", "07"))
    assert {s["sock.port"]: s["sock.ephemeral"] for s in sensors.listening(tmp_path)
            if s["sock.proto"] == "udp" and s["sock.family"] == "ipv4"} == {
        53: False, 54321: False, 8080: True}


def test_critical_alerts_are_limited_by_whose_they_are_never_for_root() -> None:
    """3,000 set-ID links to a user's own file delayed the alert about someone else's by
    18 s (each alert written on its own, with an fsync): a user other than root gets a
    burst of critical alerts a rule and a window, then one summary; root's, and alerts
    that name no one, always pass."""
    limit = RateLimit(burst=3, window=60)

    def setuid(path: str, uid: int | None, t: float) -> Alert:
        ev: dict[str, object] = {"file.path": path}
        if uid is not None:
            ev["file.uid"] = uid
        return Alert("setuid-or-setgid-file", "critical", (), f"set-ID {path}", t, ev)

    eve = [limit.admit(setuid(f"/tmp/link{i}", 1000, 100.0 + i / 100)) for i in range(3000)]
    assert eve == [True] * 3 + [False] * 2997
    assert limit.admit(setuid("/tmp/mallory", 1001, 131.0))  # another user's: at once
    assert all(limit.admit(setuid(f"/tmp/root{i}", 0, 131.0)) for i in range(50))
    assert all(limit.admit(setuid(f"/tmp/x{i}", None, 131.0)) for i in range(50))
    # A process is counted by who ran it (its real UID), not by a set-UID root program's.
    runs = [limit.admit(Alert("deleted-program", "critical", (), "p", 140.0,
                              {"proc.ruid": 1000, "proc.uid": 0})) for _ in range(5)]
    assert runs == [True] * 3 + [False] * 2
    (summary, runs_summary) = sorted(limit.summaries(200.0), key=lambda a: a.rule, reverse=True)
    assert summary.priority == "critical" and "fired 2997 more times about uid 1000" in \
        summary.message, summary.message
    assert runs_summary.evidence["rule.suppressed"] == 2
