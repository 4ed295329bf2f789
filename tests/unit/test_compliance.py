"""Profiles run by mode with their state in SQLite (cerulean.agent.compliance), the HTML
report, the shipped profiles and ``cerulean policy``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path

import pytest

import cerulean
from cerulean.agent import cli, compliance, htmlreport, metrics
from cerulean.agent.audit import AuditLog
from cerulean.agent.policy import Fixer, load_policy, load_profile, profiles, run_policy
from cerulean.agent.rules import Host
from cerulean.agent.yamlfile import load

SHIPPED = Path(cerulean.__file__).parent / "agent/data/policies"

POLICY = {
    "policy": {"id": "demo", "name": "Demo <profile>"},
    "checks": [
        {"id": "umask", "title": "New files are private to their group",
         "compliance": {"cis-debian-12": ["5.4.3.3"]},
         "rules": [r"f:/etc/login.defs -> r:^UMASK\s+027$"],
         "fix": [{"set-line": {"file": "/etc/login.defs", "match": r"^\s*UMASK\b",
                               "line": "UMASK 027"}}]},
        {"id": "motd", "title": "No <script> in the motd",
         "rules": ["not f:/etc/motd -> r:<script>"]},
        {"id": "banner", "title": "A login banner exists", "rules": ["f:/etc/issue.net"]},
    ],
}


class Commands:
    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        self.seen.append(list(argv))
        return 0, ""


@pytest.fixture
def host(tmp_path: Path) -> Host:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/login.defs").write_text("UMASK 022\nPASS_MAX_DAYS 365\n")
    (root / "etc/motd").write_text("hello <script>alert(1)</script>\n")
    (root / "etc/issue.net").write_text("Authorised use only.\n")
    return Host(root, Commands())


def test_enforce_fixes_once_then_reports_drift_and_audits_it(host: Host,
                                                             tmp_path: Path) -> None:
    policy = load_policy(POLICY)
    store = compliance.PolicyStore(tmp_path / "policy.db")
    audit = AuditLog(tmp_path / "audit/audit.jsonl")
    fixer = Fixer(host, Commands())
    first = compliance.apply_profile(policy, host, "enforce", fixer=fixer, store=store,
                                     audit=audit, clock=lambda: 100.0)
    assert [f.check for f in first.fixes] == ["umask"] and not first.fixes[0].error
    assert (first.before.count("passed"), first.after.count("passed")) == (1, 2)
    assert store.fixed("demo") == {"umask"}
    # Someone puts it back: enforce reports the drift and leaves it; autocorrect fixes it.
    (host.root / "etc/login.defs").write_text("UMASK 022\n")
    second = compliance.apply_profile(policy, host, "enforce", fixer=fixer, store=store,
                                      audit=audit, clock=lambda: 200.0)
    assert second.fixes == () and second.drift == ("umask",)
    assert second.after.count("failed") == 2
    third = compliance.apply_profile(policy, host, "autocorrect", fixer=fixer, store=store,
                                     audit=audit, clock=lambda: 300.0)
    assert [f.check for f in third.fixes] == ["umask"] and third.drift == ()
    entries = list(audit.entries())
    assert [e["action"] for e in entries] == ["policy.fix", "policy.drift", "policy.fix"]
    assert entries[0]["detail"]["actions"] == [
        r"set-line file=/etc/login.defs, match=^\s*UMASK\b, line=UMASK 027"]
    assert entries[1]["detail"] == {"policy": "demo", "checks": ["umask"], "mode": "enforce"}
    assert audit.verify().ok
    last = store.last()["demo"]
    assert (last["time"], last["mode"], last["passed"]) == (300.0, "autocorrect", 2)
    store.close()


def test_audit_mode_changes_nothing(host: Host, tmp_path: Path) -> None:
    before = (host.root / "etc/login.defs").read_text()
    out = compliance.apply_profile(load_policy(POLICY), host, "audit",
                                   store=compliance.PolicyStore(tmp_path / "p.db"))
    assert out.fixes == () and (host.root / "etc/login.defs").read_text() == before


def test_only_the_named_checks_are_fixed_and_unknown_names_refused(host: Host) -> None:
    policy = load_policy(POLICY)
    out = compliance.apply_profile(policy, host, "autocorrect", only=["motd"])
    assert out.fixes == ()  # motd has no fix, umask was not asked for
    with pytest.raises(cerulean.errors.CeruleanError, match="demo has no check nope"):
        compliance.apply_profile(policy, host, "autocorrect", only=["nope"])


def test_an_assignment_change_is_audited_once(tmp_path: Path) -> None:
    store = compliance.PolicyStore(tmp_path / "p.db")
    audit = AuditLog(tmp_path / "audit.jsonl")
    assert compliance.record_assignment(store, {"cerulean-baseline": "audit"}, audit)
    assert not compliance.record_assignment(store, {"cerulean-baseline": "audit"}, audit)
    assert compliance.record_assignment(store, {"cerulean-baseline": "enforce"}, audit)
    details = [e["detail"] for e in audit.entries()]
    assert details[-1] == {"old": {"cerulean-baseline": "audit"},
                           "new": {"cerulean-baseline": "enforce"}}
    assert len(details) == 2


def test_metrics_show_the_last_results(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "metrics-root"
    store = compliance.PolicyStore(root / compliance.STORE)
    store.save(run_policy(load_policy(POLICY), host), "audit", 1234.0)
    store.close()
    text = metrics.render(metrics.policy_families(root))
    assert 'cerulean_policy_checks{policy="demo",result="passed"} 1' in text
    assert 'cerulean_policy_checks{policy="demo",result="failed"} 2' in text
    assert re.search(r'cerulean_policy_score_ratio\{policy="demo"\} 0\.3333', text)
    assert 'cerulean_policy_last_run_timestamp_seconds{policy="demo"} 1234' in text
    assert metrics.render(metrics.policy_families(tmp_path / "none")).count("{") == 0
    alerts = metrics.render([metrics.alert_family({("setuid-or-setgid-file", "critical"): 2})])
    assert 'cerulean_alerts_total{priority="critical",rule="setuid-or-setgid-file"} 2' in alerts


class Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_the_html_report_escapes_what_the_host_says(host: Host) -> None:
    policy = load_policy(POLICY)
    page = htmlreport.render(policy, run_policy(policy, host), "web-<1>")
    parsed = Text()
    parsed.feed(page)
    assert "script" not in parsed.tags  # the motd's <script> is text, not markup
    text = "".join(parsed.text)
    assert "<script>alert(1)</script>" in text
    assert "Demo <profile> on web-<1>" in text
    assert "33.3% of the checks pass: 1 passed, 2 failed, 0 could not be checked." in \
        re.sub(r"\s+", " ", text)
    # Failed checks first; each check's benchmark IDs and its fix are there.
    assert text.index("New files are private") < text.index("A login banner exists")
    assert "cis-debian-12 5.4.3.3" in text and "UMASK 027" in text


@pytest.mark.parametrize("name", sorted(p.stem for p in SHIPPED.glob("*.yaml")))
def test_shipped_profiles_load(name: str) -> None:
    policy = load_policy(load(SHIPPED / f"{name}.yaml"), name)
    assert policy.id == name and len(policy.checks) >= 10
    for c in policy.checks:
        for standard, ids in c.compliance.items():
            assert re.fullmatch(r"[a-z0-9-]+", standard) and ids, (c.id, standard)
            pattern = r"[a-z0-9_-]+" if standard.startswith("ssg") else r"[0-9]+(\.[0-9]+)*|R[0-9]+"
            assert all(re.fullmatch(pattern, i) for i in ids), (c.id, ids)


def test_the_cis_profile_maps_every_check_to_a_benchmark_id() -> None:
    policy = load_profile(str(SHIPPED / "cis-debian-l1-server.yaml"), allow_path=True)
    assert all(c.compliance.get("cis-debian-12") for c in policy.checks), [
        c.id for c in policy.checks if not c.compliance.get("cis-debian-12")]


def test_the_anssi_profile_stands_for_each_rule_of_ssg_s_debian_12_profile_once() -> None:
    policy = load_profile(str(SHIPPED / "anssi-bp28-intermediary.yaml"), allow_path=True)
    rules = [r for c in policy.checks for r in c.compliance.get("ssg-debian12", ())]
    assert len(rules) == len(set(rules)) == 220  # SSG 0.1.76's selection for Debian 12
    assert all(c.id in c.compliance["ssg-debian12"] for c in policy.checks)
    assert sum(1 for c in policy.checks if c.compliance.get("anssi-bp28")) == 218


def test_host_profiles_replace_shipped_ones(tmp_path: Path) -> None:
    shipped, own = tmp_path / "usr/lib/cerulean/policies", tmp_path / "etc/cerulean/policies"
    shipped.mkdir(parents=True)
    own.mkdir(parents=True)
    for d, title in ((shipped, "shipped"), (own, "own")):
        (d / "demo.yaml").write_text(json.dumps({**POLICY, "policy": {"id": "demo",
                                                                      "name": title}}))
    (shipped / "other.yaml").write_text(json.dumps({**POLICY, "policy": {"id": "other"}}))
    (own / "off.yaml").write_text("")
    (shipped / "off.yaml").write_text(json.dumps(POLICY))
    assert sorted(profiles(tmp_path)) == ["demo", "other"]
    assert load_profile("demo", tmp_path).name == "own"
    with pytest.raises(cerulean.errors.CeruleanError,
                       match=re.escape("no policy profile 'cis' (this host has: demo, other)")):
        load_profile("cis", tmp_path)


def _cli_profile(tmp_path: Path, host: Host) -> Path:
    data = json.loads(json.dumps(POLICY).replace("/etc/", f"{host.root}/etc/"))
    path = tmp_path / "demo.yaml"
    path.write_text(json.dumps(data))
    return path


def test_cli_check_prints_the_score_and_exits_2_on_failures(
        host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compliance, "STORE", str(tmp_path / "state/policy.db"))
    profile = _cli_profile(tmp_path, host)
    html = tmp_path / "out/report.html"
    html.parent.mkdir()
    assert cli.main(["policy", "check", "--profile", str(profile), "--html", str(html)]) == 2
    out = capsys.readouterr().out
    assert "FAIL  umask" in out and "[cis-debian-12 5.4.3.3]" in out
    assert "Score: 33.3% (1 passed, 2 failed, 0 could not be checked, of 3)." in out
    assert "<!DOCTYPE html>" in html.read_text()
    assert [p.name for p in html.parent.iterdir()] == ["report.html"]  # no temporary left
    assert compliance.last_reports(Path("/"))["demo"]["failed"] == 2
    assert cli.main(["policy", "report", "-p", str(profile), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == 33.3


@pytest.mark.parametrize(("argv", "words"), [
    (["policy", "check", "--profile", "no-such"], "There is no policy profile 'no-such'"),
    (["policy", "check", "--profile", "/nonexistent/p.yaml"], "/nonexistent/p.yaml does not"),
    (["policy", "fix", "--profile", "{profile}", "--check", "nope"], "demo has no check nope"),
])
def test_cli_errors_are_one_sentence(argv: list[str], words: str, host: Host, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compliance, "STORE", str(tmp_path / "state/policy.db"))
    profile = _cli_profile(tmp_path, host)
    assert cli.main([a.replace("{profile}", str(profile)) for a in argv]) == 1
    err = capsys.readouterr().err
    assert words in err and err.startswith("error: ") and err.count("\n") == 1


def test_cli_dry_run_changes_nothing(host: Host, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    profile = _cli_profile(tmp_path, host)
    before = (host.root / "etc/login.defs").read_text()
    assert cli.main(["policy", "fix", "--dry-run", "-p", str(profile)]) == 0
    out = capsys.readouterr().out
    assert "would fix umask: set-line" in out
    assert "1 of 2 failed checks would be fixed" in out
    assert (host.root / "etc/login.defs").read_text() == before



def test_a_command_many_checks_read_runs_once_per_pass(tmp_path: Path) -> None:
    calls = Commands()
    policy = load_policy({"policy": {"id": "ssh"}, "checks": [
        {"id": n, "title": n, "rules": [f"c:sshd -T -> r:^{n} no$"]}
        for n in ("permitrootlogin", "x11forwarding", "hostbasedauthentication")]})
    host = Host(tmp_path, calls)
    run_policy(policy, host)
    run_policy(policy, host)
    assert calls.seen == [["sshd", "-T"], ["sshd", "-T"]]  # once per pass, not per check


def test_every_shipped_check_is_documented() -> None:
    docs = (Path(cerulean.__file__).parents[2] / "docs/agent.md").read_text()
    for f in sorted(SHIPPED.glob("*.yaml")):
        policy = load_policy(load(f), f.name)
        assert f"#### `{policy.id}` ({len(policy.checks)} checks)" in docs, policy.id
        missing = [c.id for c in policy.checks if f"| `{c.id}` |" not in docs]
        assert not missing, f"docs/agent.md lacks {f.name}'s checks {missing}"
