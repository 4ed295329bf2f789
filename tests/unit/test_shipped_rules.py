"""The detection rules the agent ships (agent/data/rules.d), loaded as a host loads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import cerulean
from cerulean.agent import yamlfile
from cerulean.agent.detect import DetectError, load_rule_files, match
from cerulean.build import agent

SHIPPED = Path(cerulean.__file__).parent / "agent/data/rules.d"

# One event per rule that must fire it, and one close to it that must not.
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("setuid-or-setgid-file", "file",
     {"file.path": "/tmp/x", "file.exists": True, "file.setuid": True, "file.setgid": False,
      "file.action": "attributes", "file.mode": "4755", "file.uid": 0, "file.gid": 0},
     {"file.path": "/tmp/x", "file.exists": True, "file.setuid": False,
      "file.setgid": False, "file.action": "attributes"}),
    ("program-from-temporary-directory", "process",
     {"proc.exe": "/dev/shm/.k", "proc.pid": 9, "proc.uid": 33, "proc.cmdline": ".k",
      "proc.exe_deleted": False},
     {"proc.exe": "/usr/bin/tmpreaper", "proc.exe_deleted": False}),
    ("program-from-deleted-file", "process",
     {"proc.exe": "/usr/sbin/sshd", "proc.exe_deleted": True, "proc.pid": 1, "proc.uid": 0},
     {"proc.exe": "/usr/sbin/sshd", "proc.exe_deleted": False}),
    ("program-from-memory", "process",
     {"proc.exe": "/memfd:x", "proc.exe_memfd": True, "proc.exe_deleted": False,
      "proc.pid": 7, "proc.uid": 1000, "proc.cmdline": "x"},
     {"proc.exe": "/usr/bin/memfd-tool", "proc.exe_memfd": False,
      "proc.exe_deleted": False}),
    ("new-uid-0-account", "account", {"user.name": "toor", "user.uid": 0},
     {"user.name": "ops", "user.uid": 1000}),
    ("new-listening-socket", "socket",
     {"sock.proto": "tcp", "sock.addr": "0.0.0.0", "sock.port": 4444, "sock.uid": 0},
     {"sock.proto": "udp", "sock.addr": "0.0.0.0", "sock.port": 68, "sock.uid": 0}),
    ("kernel-module-loaded", "module", {"module.name": "nf_tables", "module.size": 1},
     {"module.size": 1}),
    ("authorized-keys-changed", "file",
     {"file.path": "/home/ops/.ssh/authorized_keys", "file.action": "written"},
     {"file.path": "/home/ops/.ssh/known_hosts", "file.action": "written"}),
    ("sudoers-changed", "file", {"file.path": "/etc/sudoers.d/90-ops", "file.action": "created"},
     {"file.path": "/etc/sudo.conf", "file.action": "written"}),
    ("pam-changed", "file", {"file.path": "/etc/pam.d/sshd", "file.action": "written"},
     {"file.path": "/etc/pamrc", "file.action": "written"}),
]


def fired(kind: str, event: dict[str, Any]) -> set[str]:
    return {a.rule for a in match(load_rule_files([SHIPPED]), kind, event, now=0.0)}


@pytest.mark.parametrize(("rule", "kind", "hit", "miss"), CASES, ids=[c[0] for c in CASES])
def test_each_shipped_rule_fires_on_its_event_only(rule: str, kind: str, hit: dict[str, Any],
                                                   miss: dict[str, Any]) -> None:
    assert rule in fired(kind, hit)
    assert rule not in fired(kind, miss)


def test_every_shipped_rule_is_covered_and_the_package_carries_them() -> None:
    names = {r.name for r in load_rule_files([SHIPPED])}
    assert names == {c[0] for c in CASES} | {"ssh-login-failures"}
    assert "usr/lib/cerulean/rules.d/cerulean.yaml" in agent.contents()


def test_the_administrators_files_replace_and_add(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "cerulean.yaml").write_text("")  # turns the shipped file off
    (etc / "local.yaml").write_text(
        "- rule: web-shell\n  event: process\n  condition: proc.name = sh and proc.uid = 33\n")
    assert [r.name for r in load_rule_files([SHIPPED, etc])] == ["web-shell"]
    (etc / "other.yaml").write_text(
        "- rule: web-shell\n  event: process\n  condition: proc.name = bash\n")
    with pytest.raises(DetectError, match="'web-shell' is also in"):
        load_rule_files([SHIPPED, etc])


def test_yaml_errors_and_unsafe_tags_are_one_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- rule: x\n  event: [file\n")
    with pytest.raises(yamlfile.YamlError, match=r"bad.yaml is not valid YAML at line 3"):
        yamlfile.load(bad)
    bad.write_text("!!python/object/apply:os.system ['touch /tmp/pwned']\n")
    with pytest.raises(yamlfile.YamlError, match="is not valid YAML"):
        yamlfile.load(bad)
    with pytest.raises(yamlfile.YamlError, match="does not exist"):
        yamlfile.load(tmp_path / "nope.yaml")


def test_ssh_failures_fire_on_the_fifth_within_a_minute() -> None:
    rules = load_rule_files([SHIPPED])
    event = {"auth.service": "sshd", "auth.result": "failed", "auth.user": "root",
             "source.ip": "203.0.113.9"}
    got = [[a.rule for a in match(rules, "auth", event, now=float(t))] for t in range(0, 50, 10)]
    assert got == [[], [], [], [], ["ssh-login-failures"]]
