"""Compliance policies (cerulean.agent.policy): loading, scoring, fixing by mode."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cerulean.agent.policy import (
    SYSCTL_FILE,
    Action,
    Fixer,
    PolicyError,
    fix,
    is_profile_name,
    load_policy,
    load_profile,
    run_policy,
)
from cerulean.agent.rules import Host

POLICY: dict[str, Any] = {
    "policy": {"id": "test-baseline", "name": "Test baseline"},
    "checks": [
        {"id": "ssh-root", "title": "SSH does not accept root logins",
         "compliance": {"cis-debian": ["5.1.20"]},
         "rules": [r"f:/etc/ssh/sshd_config -> r:^\s*PermitRootLogin\s+no\b"],
         "fix": [{"set-line": {"file": "/etc/ssh/sshd_config",
                               "match": r"^\s*#?\s*PermitRootLogin\b",
                               "line": "PermitRootLogin no"}},
                 {"command": ["systemctl", "reload", "ssh.service"]}]},
        {"id": "ip-forward", "title": "IP forwarding is off",
         "rules": [r"sysctl:net.ipv4.ip_forward -> r:^0$"],
         "fix": [{"sysctl": {"key": "net.ipv4.ip_forward", "value": "0"}}]},
        {"id": "shadow-mode", "title": "/etc/shadow is not world-readable",
         "rules": [r"c:stat -c %a /etc/shadow -> r:^[0-7][0-4]0$"],
         "fix": [{"mode": {"path": "/etc/shadow", "mode": "0640"}}]},
        {"id": "no-telnet", "title": "No telnet server", "condition": "none",
         "rules": ["package:telnetd", "p:in.telnetd"]},
        {"id": "tmp-options", "title": "/tmp is noexec and nosuid", "condition": "all",
         "rules": [r"mount:/tmp -> r:\bnoexec\b", r"mount:/tmp -> r:\bnosuid\b"]},
        {"id": "one-of", "title": "Either tool", "condition": "any",
         "rules": ["f:/usr/bin/a", "f:/usr/bin/b"]},
    ],
}


@pytest.fixture
def host(tmp_path: Path) -> Host:
    (tmp_path / "etc/ssh").mkdir(parents=True)
    (tmp_path / "etc/ssh/sshd_config").write_text("#PermitRootLogin prohibit-password\n"
                                                  "PermitRootLogin yes\nPort 22\n")
    (tmp_path / "etc/shadow").write_text("root:*::::::\n")
    os.chmod(tmp_path / "etc/shadow", 0o644)
    (tmp_path / "proc/sys/net/ipv4").mkdir(parents=True)
    (tmp_path / "proc/sys/net/ipv4/ip_forward").write_text("1\n")
    (tmp_path / "proc/mounts").write_text("tmpfs /tmp tmpfs rw,nosuid,nodev 0 0\n")
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/b").write_text("")
    root = tmp_path

    def run(argv: Sequence[str]) -> tuple[int, str]:
        if list(argv[:3]) == ["stat", "-c", "%a"]:
            return 0, f"{(root / argv[3].lstrip('/')).stat().st_mode & 0o777:o}\n"
        return 127, "not here"

    return Host(tmp_path, run)


class Commands:
    """What fixes run; sysctl -w writes the fake /proc/sys like the kernel would."""

    def __init__(self, root: Path) -> None:
        self.root, self.seen = root, []  # type: ignore[var-annotated]

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        self.seen.append(list(argv))
        if argv[0] == "sysctl":
            key, value = argv[-1].split("=", 1)
            (self.root / "proc/sys" / key.replace(".", "/")).write_text(value + "\n")
        return 0, ""


def test_report_scores_and_shows_evidence(host: Host) -> None:
    report = run_policy(load_policy(POLICY), host)
    by_id = {r.id: r for r in report.results}
    assert {i: r.result for i, r in by_id.items()} == {
        "ssh-root": "failed", "ip-forward": "failed", "shadow-mode": "failed",
        "no-telnet": "passed", "tmp-options": "failed", "one-of": "passed"}
    assert report.score == round(100 * 2 / 6, 1)
    tmp = by_id["tmp-options"]
    assert [r.held for r in tmp.rules] == [False, True]
    assert "mount /tmp line 1: 'tmpfs tmpfs rw,nosuid,nodev'" in tmp.rules[1].evidence
    assert by_id["ssh-root"].compliance == {"cis-debian": ("5.1.20",)}
    doc = report.to_json()
    assert (doc["passed"], doc["failed"], doc["errors"]) == (2, 4, 0)
    assert doc["checks"][0]["rules"][0]["evidence"].startswith("no line of")


def test_audit_changes_nothing_enforce_fixes_once_autocorrect_always(host: Host) -> None:
    policy = load_policy(POLICY)
    cmds = Commands(host.root)
    fixer = Fixer(host, cmds)
    before = run_policy(policy, host)
    assert fix(policy, before, fixer, "audit") == [] and cmds.seen == []
    done = fix(policy, before, fixer, "enforce")
    assert {d.check: d.error for d in done} == {"ssh-root": "", "ip-forward": "",
                                                "shadow-mode": ""}  # tmp-options has no fix
    after = run_policy(policy, host)
    assert after.score == round(100 * 5 / 6, 1)
    sshd = (host.root / "etc/ssh/sshd_config").read_text()
    assert sshd == "PermitRootLogin no\nPort 22\n"  # the commented default went too
    assert (host.root / SYSCTL_FILE.lstrip("/")).read_text() == "net.ipv4.ip_forward = 0\n"
    assert ["systemctl", "reload", "ssh.service"] in cmds.seen
    assert (host.root / "etc/shadow").stat().st_mode & 0o777 == 0o640
    # Drift: enforce reports it but does not fix a check it fixed before.
    (host.root / "etc/ssh/sshd_config").write_text("PermitRootLogin yes\n")
    drift = run_policy(policy, host)
    assert fix(policy, drift, fixer, "enforce", fixed_before={"ssh-root"}) == []
    assert "yes" in (host.root / "etc/ssh/sshd_config").read_text()
    (again,) = fix(policy, drift, fixer, "autocorrect")
    assert again.check == "ssh-root" and not again.error
    assert (host.root / "etc/ssh/sshd_config").read_text() == "PermitRootLogin no\n"


def test_a_failing_fix_is_reported_and_the_rest_go_on(host: Host) -> None:
    policy = load_policy(POLICY)

    def refuse(argv: Sequence[str]) -> tuple[int, str]:
        return 1, "Failed to reload ssh.service: Unit ssh.service not found.\n"

    done = {d.check: d for d in fix(policy, run_policy(policy, host), Fixer(host, refuse),
                                    "autocorrect")}
    assert done["ssh-root"].actions == ("set-line file=/etc/ssh/sshd_config, match="
                                        r"^\s*#?\s*PermitRootLogin\b, line=PermitRootLogin no",)
    assert done["ssh-root"].error == ("systemctl reload ssh.service failed: Failed to reload "
                                      "ssh.service: Unit ssh.service not found.")
    assert done["shadow-mode"].error == ""


def test_set_line_appends_and_keeps_the_file_mode(host: Host) -> None:
    f = host.root / "etc/login.defs"
    f.write_text("PASS_MAX_DAYS 99999\n")
    os.chmod(f, 0o600)
    policy = load_policy({"policy": {"id": "p"}, "checks": [{
        "id": 1, "title": "umask", "rules": [r"f:/etc/login.defs -> r:^UMASK\s+027$"],
        "fix": [{"set-line": {"file": "/etc/login.defs", "match": "^UMASK\\b",
                              "line": "UMASK 027"}},
                {"remove-line": {"file": "/etc/login.defs", "match": "^PASS_MAX_DAYS"}}]}]})
    fix(policy, run_policy(policy, host), Fixer(host, Commands(host.root)), "autocorrect")
    assert f.read_text() == "UMASK 027\n" and f.stat().st_mode & 0o777 == 0o600
    assert run_policy(policy, host).score == 100.0


@pytest.mark.parametrize(("change", "words"), [
    (lambda p: p.pop("policy"), "needs a 'policy' mapping"),
    (lambda p: p["policy"].update(id="Bad Id"), "'policy.id' must be lower-case"),
    (lambda p: p.update(checks=[]), "'checks' must be a non-empty list"),
    (lambda p: p["checks"][1].update(id="ssh-root"), "needs its own 'id'"),
    (lambda p: p["checks"][0].pop("title"), "check ssh-root: 'title' is missing"),
    (lambda p: p["checks"][0].update(condition="most"), "'condition' must be one of"),
    (lambda p: p["checks"][0].update(rules=["q:/etc"]), "check ssh-root: 'q:/etc' is not a"),
    (lambda p: p["checks"][0].update(applies="package:x"), "'applies' must be a list"),
    (lambda p: p["checks"][0].update(applies=["q:/etc"]), "check ssh-root: 'q:/etc' is not a"),
    (lambda p: p["checks"][0].update(fix=[{"rm": {}}]), "fix 1: unknown fix action 'rm'"),
    (lambda p: p["checks"][0].update(fix=[{"command": "systemctl reload ssh"}]),
     "'command' takes a list of strings"),
    (lambda p: p["checks"][1].update(fix=[{"sysctl": {"key": "x"}}]), "'sysctl' needs value"),
    (lambda p: p["checks"][2].update(fix=[{"mode": {"path": "/x", "mode": "rw-r--r--"}}]),
     "must be an octal mode"),
    (lambda p: p["checks"][0].update(fix=[{"set-line": {"file": "/x", "match": "(",
                                                        "line": "y"}}]),
     "'set-line.match': '(' is not a valid regex"),
    (lambda p: p["checks"][0].update(fix=[{"remove-line": {"file": "/x", "match": "(a+)+$"}}]),
     "'remove-line.match': '(a+)+$' could take exponential time"),
    (lambda p: p["checks"][0].update(fix=[{"service": {"unit": "x"}}]),
     "'service' needs 'enabled' or 'active'"),
    (lambda p: p["checks"][0].update(fix=[{"service": {"unit": "x", "enabled": "yes"}}]),
     "'service.enabled' must be a bool"),
])
def test_bad_policies_are_one_clear_sentence(change: Any, words: str) -> None:
    data = copy.deepcopy(POLICY)
    change(data)
    with pytest.raises(PolicyError) as e:
        load_policy(data, "cis.yaml")
    assert words in str(e.value) and str(e.value).startswith("cis.yaml")


def test_an_unknown_mode_is_refused(host: Host) -> None:
    policy = load_policy(POLICY)
    with pytest.raises(PolicyError, match="'fix-all' is not one of audit, enforce"):
        fix(policy, run_policy(policy, host), Fixer(host), "fix-all")


def test_a_fix_never_writes_through_a_link(host: Host, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("PermitRootLogin yes\n")
    sshd = host.root / "etc/ssh/sshd_config"
    sshd.unlink()
    sshd.symlink_to(target)
    policy = load_policy(POLICY)
    done = {d.check: d for d in fix(policy, run_policy(policy, host),
                                    Fixer(host, Commands(host.root)), "autocorrect")}
    assert "is not a regular file" in done["ssh-root"].error
    assert sshd.is_symlink() and target.read_text() == "PermitRootLogin yes\n"
    assert not [p for p in sshd.parent.iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_check_that_does_not_apply_counts_nowhere(host: Host) -> None:
    data = copy.deepcopy(POLICY)
    data["checks"][0]["applies"] = ["f:/etc/ssh/sshd_config"]   # holds: judged, fails
    data["checks"][1]["applies"] = ["package:postfix"]          # not installed: n/a
    data["checks"] = [*data["checks"][:2], data["checks"][3]]
    report = run_policy(load_policy(data), host)
    assert [r.result for r in report.results] == ["failed", "notapplicable", "passed"]
    na = report.results[1]
    assert na.rules[0].rule == "package:postfix" and not na.rules[0].held
    assert report.score == 50.0 and not report.clean
    assert report.to_json()["notapplicable"] == 1
    # a fix never touches a check that does not apply
    commands = Commands(host.root)
    done = fix(load_policy(data), report, Fixer(host, commands), "autocorrect")
    assert [f.check for f in done] == ["ssh-root"]
    assert not any(c[0] == "sysctl" for c in commands.seen)
    only_na = copy.deepcopy(data)
    only_na["checks"] = [data["checks"][1], data["checks"][2]]
    assert run_policy(load_policy(only_na), host).clean


def test_the_mode_fix_changes_the_path_itself_never_a_link_target(host: Host,
                                                                  tmp_path: Path) -> None:
    """/etc/shadow swapped for a link to another file: the fix refuses, and the file the
    link points to keeps its mode."""
    target = tmp_path / "elsewhere"
    target.write_text("x")
    os.chmod(target, 0o600)
    shadow = host.root / "etc/shadow"
    shadow.unlink()
    shadow.symlink_to(target)
    fixer = Fixer(host, Commands(host.root))
    with pytest.raises(PolicyError, match="is a symbolic link"):
        fixer.apply(Action("mode", {"path": "/etc/shadow", "mode": "0644"}))
    assert target.stat().st_mode & 0o777 == 0o600
    # nor through a linked directory on the way
    (host.root / "etc/linked").symlink_to(tmp_path)
    with pytest.raises(PolicyError, match="/etc/linked is a symbolic link"):
        fixer.apply(Action("mode", {"path": "/etc/linked/elsewhere", "mode": "0644"}))
    assert target.stat().st_mode & 0o777 == 0o600
    # a real file is changed
    (host.root / "etc/real").write_text("x")
    fixer.apply(Action("mode", {"path": "/etc/real", "mode": "0640"}))
    assert (host.root / "etc/real").stat().st_mode & 0o777 == 0o640


def test_set_line_never_writes_through_a_linked_directory(host: Host, tmp_path: Path) -> None:
    """/etc/ssh swapped for a link to a directory elsewhere: nothing is written there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "sshd_config").write_text("PermitRootLogin yes\n")
    ssh = host.root / "etc/ssh"
    (ssh / "sshd_config").unlink()
    ssh.rmdir()
    ssh.symlink_to(elsewhere)
    policy = load_policy(POLICY)
    done = {d.check: d for d in fix(policy, run_policy(policy, host),
                                    Fixer(host, Commands(host.root)), "autocorrect")}
    assert "/etc/ssh is a symbolic link" in done["ssh-root"].error
    assert (elsewhere / "sshd_config").read_text() == "PermitRootLogin yes\n"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["sshd_config"]
    # a missing directory is still made, as before
    fixer = Fixer(host, Commands(host.root))
    fixer.apply(Action("set-line", {"file": "/etc/new.d/x.conf", "match": "^a", "line": "a"}))
    assert (host.root / "etc/new.d/x.conf").read_text() == "a\n"


def test_policy_names_are_names_never_paths(host: Host, tmp_path: Path) -> None:
    """A name from agent.toml or the fleet is looked up among the profiles only."""
    evil = tmp_path / "evil.yaml"
    evil.write_text("policy: {id: evil}\nchecks:\n- {id: x, title: x, rules: ['f:/x'],"
                    " fix: [{command: [touch, /tmp/pwned]}]}\n")
    for name in (str(evil), "../../../" + str(evil), "..", "a/b", "-x", "x\n"):
        with pytest.raises(PolicyError, match="is not a profile name"):
            load_profile(name, host.root)
    with pytest.raises(PolicyError, match=r"There is no policy profile 'evil\.yaml'"):
        load_profile("evil.yaml", host.root)  # a name: looked up, not opened
    assert load_profile(str(evil), host.root, allow_path=True).id == "evil"  # by hand
    assert not is_profile_name("../x") and is_profile_name("cis-debian-l1-server")
