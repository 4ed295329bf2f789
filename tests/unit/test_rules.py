"""Policy rules (cerulean.agent.rules): the grammar, each rule type and its evidence."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cerulean.agent import rules
from cerulean.agent.rules import Host, RuleError, evaluate, parse_rule
from cerulean.agent.saferegex import MAX_MATCH_CHARS

SSHD = """\
# PermitRootLogin yes
PermitRootLogin no
MaxAuthTries 6
Protocol 2
"""


@pytest.fixture
def host(tmp_path: Path) -> Host:
    (tmp_path / "etc/ssh").mkdir(parents=True)
    (tmp_path / "etc/ssh/sshd_config").write_text(SSHD)
    (tmp_path / "etc/cron.d").mkdir()
    (tmp_path / "etc/cron.d/e2scrub_all").write_text("30 3 * * 0 root test -e /run/x\n")
    (tmp_path / "etc/cron.d/backup").write_text("0 1 * * * root /usr/bin/backup --all\n")
    (tmp_path / "proc/sys/net/ipv4").mkdir(parents=True)
    (tmp_path / "proc/sys/net/ipv4/ip_forward").write_text("0\n")
    (tmp_path / "proc/mounts").write_text(
        "/dev/vda6 / ext4 rw,relatime 0 0\ntmpfs /tmp tmpfs rw,nosuid,nodev,noexec 0 0\n")
    for pid, comm, argv in (("1", "systemd", b"/sbin/init\0splash\0"),
                            ("612", "sshd", b"sshd: /usr/sbin/sshd -D [listener]\0")):
        (tmp_path / "proc" / pid).mkdir()
        (tmp_path / "proc" / pid / "comm").write_text(comm + "\n")
        (tmp_path / "proc" / pid / "cmdline").write_bytes(argv)
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text(
        "Package: openssh-server\nStatus: install ok installed\nVersion: 1:10.0p1-7\n\n"
        "Package: telnetd\nStatus: deinstall ok config-files\nVersion: 0.17-1\n")

    def run(argv: Sequence[str]) -> tuple[int, str]:
        table = {
            ("systemctl", "is-enabled", "ssh.service"): (0, "enabled\n"),
            ("systemctl", "is-active", "ssh.service"): (0, "active\n"),
            ("systemctl", "is-enabled", "rsync.service"): (1, "disabled\n"),
            ("systemctl", "is-active", "rsync.service"): (3, "inactive\n"),
            ("systemctl", "is-enabled", "nope.service"): (
                1, "Failed to get unit file state for nope.service: No such file or directory\n"),
            ("systemctl", "is-active", "nope.service"): (4, "inactive\n"),
            ("stat", "-c", "%a %U", "/etc/shadow"): (0, "640 root\n"),
        }
        return table.get(tuple(argv), (127, f"{argv[0]}: command not found"))

    return Host(tmp_path, run)


@pytest.mark.parametrize(("rule", "passed", "evidence"), [
    ("f:/etc/ssh/sshd_config", True, "/etc/ssh/sshd_config exists"),
    ("f:/etc/ssh/missing", False, "/etc/ssh/missing does not exist"),
    ("not f:/etc/hosts.equiv", True, "does not exist"),
    (r"f:/etc/ssh/sshd_config -> r:^\s*PermitRootLogin\s+no", True,
     "/etc/ssh/sshd_config line 2: 'PermitRootLogin no'"),
    (r"f:/etc/ssh/sshd_config -> !r:^\s*# && r:PermitRootLogin\s+yes", False,
     r"no line of /etc/ssh/sshd_config passes !r:^\s*# && r:PermitRootLogin\s+yes"),
    (r"f:/etc/ssh/sshd_config -> n:^\s*MaxAuthTries\s+(\d+) compare <= 4", False,
     "no line of"),
    (r"f:/etc/ssh/sshd_config -> n:^\s*MaxAuthTries\s+(\d+) compare <= 6", True, "line 3"),
    ("f:/etc/ssh/sshd_config -> Protocol 2", True, "line 4: 'Protocol 2'"),
    (r"not f:/etc/ssh/sshd_config -> r:^PermitRootLogin\s+yes", True, "no line"),
    (r"not f:/etc/ssh/sshd_config -> r:^PermitRootLogin\s+no", False, "not: "),
    ("d:/etc/cron.d", True, "/etc/cron.d exists"),
    ("d:/etc/cron.d -> r:^backup$", True, "/etc/cron.d line 1: 'backup'"),
    ("d:/etc/cron.d -> r:. -> r:--all", True, "/etc/cron.d/backup line 1"),
    ("d:/etc/cron.d -> r:^e2 -> r:--all", False, "no line of /etc/cron.d passes r:--all"),
    ("p:sshd", True, "process sshd exists"),
    ("p:sshd -> r:-D", True, "process sshd line 1: 'sshd: /usr/sbin/sshd -D [listener]'"),
    ("not p:telnetd", True, "process telnetd does not exist"),
    ("c:stat -c '%a %U' /etc/shadow -> r:^6[0-4]0 root$", True, "line 1: '640 root'"),
    ("c:missing-tool --version", False, "'missing-tool --version' (exit 127) failed"),
    (r"sysctl:net.ipv4.ip_forward -> r:^0$", True, "net.ipv4.ip_forward line 1: '0'"),
    ("sysctl:net.ipv4.nope", False, "net.ipv4.nope does not exist"),
    ("service:ssh.service -> r:active=active", True, "enabled=enabled active=active"),
    ("service:rsync.service -> r:enabled=enabled", False, "no line of rsync.service"),
    ("service:rsync.service", True, "rsync.service: enabled=disabled active=inactive"),
    ("not service:nope.service", True, "nope.service does not exist"),
    ("package:openssh-server -> n:^1:(\\d+)\\. compare >= 9", True, "'1:10.0p1-7'"),
    ("not package:telnetd", True, "package telnetd does not exist"),
    ("mount:/tmp -> r:\\bnoexec\\b", True, "mount /tmp line 1: 'tmpfs tmpfs rw,nosuid"),
    ("mount:/var/tmp", False, "mount /var/tmp does not exist"),
])
def test_rules(host: Host, rule: str, passed: bool, evidence: str) -> None:
    out = evaluate(parse_rule(rule), host)
    assert out.passed is passed, out
    assert evidence in out.evidence, out.evidence


@pytest.mark.parametrize(("rule", "words"), [
    ("x:/etc/passwd", "must start with one of f:, d:, p:"),
    ("f:", "and a target"),
    ("f:/etc/a -> r:(unclosed", "is not a valid regex"),
    ("f:/etc/a -> n:^x compare <= 3", "needs a group around the number"),
    ("f:/etc/a -> n:^x(\\d+) compare about 3", "must read 'n:REGEX compare OP NUMBER'"),
    ("d:/etc -> name -> r:x", "matched with r:REGEX"),
    ("c:echo 'unbalanced", "cannot be split"),
    ("f:/etc/a -> r:(a+)+$", "could take exponential time"),
    ("f:/etc/a -> r:^(x|xy)*z", "could take exponential time"),
    ("f:/etc/a -> n:^((\\d)+)+ compare <= 3", "could take exponential time"),
    ("d:/etc -> r:(a*)*b -> r:x", "could take exponential time"),
    ("f:/etc/a -> r:a*a*b", "could take too long on a long line"),
    ("f:/etc/a -> r:.*x.*y", "could take too long on a long line"),
    ("f:/etc/a -> r:^a*a*a*b", "could take too long on a long line"),
])
def test_bad_rules_are_one_clear_sentence(host: Host, rule: str, words: str) -> None:
    with pytest.raises(RuleError, match=words.replace("(", r"\(").replace(")", r"\)")):
        evaluate(parse_rule(rule), host)


def test_an_unreadable_file_is_an_error_not_a_pass(host: Host,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the agent may not read does not make "not f:... -> r:..." pass."""
    real = os.open

    def refuse(path: Any, *a: Any, **k: Any) -> int:
        if Path(path).name == "secret":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    (host.root / "etc/secret").write_text("x")
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(RuleError, match=r"cannot be read \(permission denied\)"):
        evaluate(parse_rule("not f:/etc/secret -> r:x"), host)


def test_an_optional_number_group_and_half_installed_packages(host: Host) -> None:
    rule = parse_rule(r"f:/etc/ssh/sshd_config -> n:^Port\s*(\d+)? compare == 22")
    assert not evaluate(rule, host).passed  # no Port line: no crash either
    status = host.root / "var/lib/dpkg/status"
    status.write_text(status.read_text() + "\nPackage: nis\nStatus: install reinstreq "
                      "half-installed\nVersion: 4.17\n")
    assert evaluate(parse_rule("not package:nis"), host).passed


def test_a_regex_that_could_blow_up_is_refused_and_atomic_ones_finish_fast(host: Host
                                                                         ) -> None:
    """(a+)+$ against a long line of a's that does not end it tries 2**n splits: refused
    when the rule loads. The same pattern made atomic, and a quadratic one on a line of a
    million characters (only the first MAX_MATCH_CHARS are looked at), finish at once."""
    with pytest.raises(RuleError, match=r"could take exponential time \(it repeats a "
                       r"quantifier inside a quantifier\)"):
        parse_rule("f:/etc/long -> r:(a+)+$")
    (host.root / "etc/long").write_text("a" * (MAX_MATCH_CHARS - 1) + "!\n" +
                                        "a" * 1_000_000 + "\n")
    start = time.monotonic()
    for pattern in ("(?>a+)+b", "(a++)+b$", "^.*a.*c", "[^a]*a.*c", ".*c"):
        assert not evaluate(parse_rule(f"f:/etc/long -> r:{pattern}"), host).passed
    assert time.monotonic() - start < 1.0
    # only the first MAX_MATCH_CHARS characters of a line are matched
    (host.root / "etc/long").write_text("a" * MAX_MATCH_CHARS + "needle\n")
    assert not evaluate(parse_rule("f:/etc/long -> r:needle"), host).passed


def test_a_fifo_is_not_read_and_never_hangs_a_check(host: Host) -> None:
    os.mkfifo(host.root / "etc/fifo")
    result: list[Any] = []

    def check() -> None:
        try:
            result.append(evaluate(parse_rule("f:/etc/fifo -> r:x"), host))
        except RuleError as e:
            result.append(e)

    t = threading.Thread(target=check, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # let the test end: a writer releases the blocked open
        fd = os.open(host.root / "etc/fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("a policy check blocked on a FIFO")
    assert isinstance(result[0], RuleError)
    assert "is not a regular file" in str(result[0])


def test_a_file_too_large_is_an_error_and_is_never_read_whole(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "MAX_FILE_BYTES", 1 << 20)
    big = host.root / "etc/big"
    with open(big, "wb") as f:
        f.truncate(200 << 20)  # sparse: 200 MiB of zeros, no disk used
    reads: list[int] = []
    real = os.read

    def counting(fd: int, n: int) -> bytes:
        reads.append(n)
        return real(fd, n)

    monkeypatch.setattr(os, "read", counting)
    with pytest.raises(RuleError, match=r"/etc/big is too large to check \(200 MiB, more "
                       r"than 1 MiB\)"):
        evaluate(parse_rule("f:/etc/big -> r:x"), host)
    assert sum(reads) <= 1 << 20
    assert evaluate(parse_rule("f:/etc/ssh/sshd_config -> r:^Protocol"), host).passed


def test_a_file_of_millions_of_lines_is_split_only_up_to_the_limit(host: Host) -> None:
    import tracemalloc

    many = host.root / "etc/many"
    many.write_bytes(b"\n" * (rules.MAX_FILE_BYTES - 1) + b"x")  # 8 million empty lines
    tracemalloc.start()
    try:
        result = evaluate(parse_rule("f:/etc/many -> r:^x"), host)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not result.passed  # line 8,388,608 is past the first MAX_LINES
    # The text itself (8 MiB, twice while it is decoded) and MAX_LINES lines, no more.
    assert peak < 3 * rules.MAX_FILE_BYTES + 8 * rules.MAX_LINES, peak
    assert rules._lines("a\r\nb\n\nc") == ["a", "b", "", "c"]
    assert rules._lines("a\n") == ["a"] and rules._lines("") == []
