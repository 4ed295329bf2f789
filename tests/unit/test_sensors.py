"""Detection event sources (cerulean.agent.sensors), and rules firing on what they see."""

from __future__ import annotations

import os
from pathlib import Path

from cerulean.agent import sensors
from cerulean.agent.detect import load_rules, match

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1581 1
   1: 0100007F:24E5 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1208 1
   2: 0F02000A:0016 0202000A:C350 01 00000000:00000000 02:000A7E3B 00000000     0        0 2222 4
"""
TCP6 = (
    "  sl  local_address remote_address st ...\n"
    "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000  1000        0 7777 1\n"
)
UDP = (
    "  sl  local_address rem_address   st ...\n"
    "  1: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 "
    "3333 2 0 0\n"
)


def fake_proc(root: Path) -> None:
    proc = root / "proc"
    for pid, exe, comm, uid in (("1", "/usr/lib/systemd/systemd", "systemd", 0),
                                ("4242", "/tmp/.x/miner (deleted)", "kworker", 1000)):
        d = proc / pid
        d.mkdir(parents=True)
        os.symlink(exe, d / "exe")
        os.symlink("/tmp/.x", d / "cwd")
        (d / "cmdline").write_bytes(comm.encode() + b"\0--quiet\0")
        (d / "comm").write_text(comm + "\n")
        (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (proc / "2").mkdir()  # a kernel thread: no exe
    (proc / "2/comm").write_text("kthreadd\n")
    (proc / "net").mkdir()
    (proc / "net/tcp").write_text(TCP)
    (proc / "net/tcp6").write_text(TCP6)
    (proc / "net/udp").write_text(UDP)
    (proc / "modules").write_text("ext4 1011712 2 - Live 0x0000000000000000\n"
                                  "dm_verity 53248 1 - Live 0x0000000000000000\n")
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                     "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
                                     "broken line\n")


def test_snapshots(tmp_path: Path) -> None:
    fake_proc(tmp_path)
    procs = {p["proc.pid"]: p for p in sensors.processes(tmp_path)}
    assert sorted(procs) == [1, 4242]
    miner = procs[4242]
    assert (miner["proc.exe"], miner["proc.exe_deleted"], miner["proc.uid"]) == \
        ("/tmp/.x/miner", True, 1000)
    assert miner["proc.cmdline"] == "kworker --quiet" and miner["proc.cwd"] == "/tmp/.x"
    socks = {(s["sock.proto"], s["sock.addr"], s["sock.port"]) for s in sensors.listening(tmp_path)}
    assert socks == {("tcp", "0.0.0.0", 22), ("tcp", "127.0.0.1", 9445), ("tcp", "::1", 8080),
                     ("udp", "127.0.0.53", 53)}
    assert [m["module.name"] for m in sensors.modules(tmp_path)] == ["ext4", "dm_verity"]
    assert [(a["user.name"], a["user.uid"]) for a in sensors.accounts(tmp_path)] == [
        ("root", 0), ("nobody", 65534)]


def test_this_machine_parses() -> None:
    mine = [p for p in sensors.processes() if p["proc.pid"] == os.getpid()]
    assert mine and mine[0]["proc.exe"].endswith(("python3", "python3.11", "python"))
    assert any(a["user.uid"] == 0 for a in sensors.accounts())
    for s in sensors.listening():
        assert 0 < s["sock.port"] < 65536 and s["sock.family"] in ("ipv4", "ipv6")


def test_sshd_messages() -> None:
    e = sensors.sshd_event("Failed password for invalid user admin from 203.0.113.9 port 50122 "
                           "ssh2", {"_PID": "812"})
    assert e is not None
    assert (e["auth.result"], e["auth.user"], e["source.ip"], e["source.port"], e["proc.pid"]) \
        == ("failed", "admin", "203.0.113.9", 50122, 812)
    e = sensors.sshd_event("Invalid user oracle from 2001:db8::7 port 4711")
    assert e is not None and (e["auth.result"], e["source.ip"]) == ("invalid-user", "2001:db8::7")
    e = sensors.sshd_event("Accepted publickey for ops from 10.0.2.2 port 40000 ssh2: ED25519")
    assert e is not None and (e["auth.result"], e["auth.method"]) == ("accepted", "publickey")
    assert sensors.sshd_event("Server listening on 0.0.0.0 port 22.") is None


def test_new_things_fire_rules_once(tmp_path: Path) -> None:
    fake_proc(tmp_path)
    rules = load_rules([
        {"rule": "new-uid-0", "event": "account", "priority": "critical",
         "condition": "user.uid = 0 and user.name != root",
         "output": "new UID 0 account %user.name"},
        {"rule": "new-listener", "event": "socket", "condition": "sock.port != 22",
         "output": "%sock.proto %sock.addr:%sock.port is now listening"},
        {"rule": "program-from-tmp", "event": "process",
         "condition": "proc.exe startswith /tmp/ or proc.exe_deleted",
         "output": "%proc.exe runs as uid %proc.uid"},
    ])
    accounts = sensors.NewOnly(lambda: sensors.accounts(tmp_path), lambda e: e["user.name"])
    socks = sensors.NewOnly(lambda: sensors.listening(tmp_path),
                            lambda e: (e["sock.proto"], e["sock.addr"], e["sock.port"]))
    procs = sensors.NewOnly(lambda: sensors.processes(tmp_path),
                            lambda e: (e["proc.pid"], e["proc.exe"]), report_first=True)
    assert accounts.poll() == [] and socks.poll() == []  # the baseline
    started = [a.message for e in procs.poll() for a in match(rules, "process", e, 0)]
    assert started == ["/tmp/.x/miner runs as uid 1000"]
    with (tmp_path / "etc/passwd").open("a") as f:
        f.write("toor:x:0:0::/root:/bin/sh\n")
    (tmp_path / "proc/net/tcp").write_text(TCP + "   3: 00000000:115C 00000000:0000 0A "
                                           "00000000:00000000 00:00000000 00000000 0 0 4444 1\n")
    raised = [a.message for e in accounts.poll() for a in match(rules, "account", e, 1)]
    raised += [a.message for e in socks.poll() for a in match(rules, "socket", e, 1)]
    assert raised == ["new UID 0 account toor", "tcp 0.0.0.0:4444 is now listening"]
    assert accounts.poll() == [] and socks.poll() == [] and procs.poll() == []


def test_a_user_name_cannot_choose_the_source_address() -> None:
    e = sensors.sshd_event("Invalid user admin from 10.9.9.9 from 203.0.113.5 port 4444")
    assert e is not None and e["source.ip"] == "203.0.113.5"
    assert e["auth.user"] == "admin from 10.9.9.9"
    e = sensors.sshd_event("Failed password for invalid user x from 10.9.9.9 port 1 from "
                           "198.51.100.2 port 2222 ssh2")
    assert e is not None and (e["source.ip"], e["source.port"]) == ("198.51.100.2", 2222)


def test_a_file_named_deleted_is_not_taken_for_a_deleted_one(tmp_path: Path) -> None:
    fake_proc(tmp_path)
    real = tmp_path / "bin" / "tool (deleted)"
    real.parent.mkdir()
    real.write_text("")
    d = tmp_path / "proc/4242"
    (d / "exe").unlink()
    (d / "exe").symlink_to(real)
    (d / "status").write_text("Name:\tkworker\nUid:\t1000\t0\t0\t0\n")
    p = next(p for p in sensors.processes(tmp_path) if p["proc.pid"] == 4242)
    assert p["proc.exe_deleted"] is False and p["proc.exe"] == str(real)
    assert (p["proc.uid"], p["proc.ruid"]) == (0, 1000)  # effective, real
