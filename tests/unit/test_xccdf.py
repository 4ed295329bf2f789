"""Setting a policy report beside OpenSCAP's XCCDF results (cerulean.agent.xccdf and
``cerulean policy compare``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cerulean.agent import cli, xccdf

NS = "http://checklists.nist.gov/xccdf/1.2"
P = "xccdf_org.ssgproject.content_rule_"


def results_xml(results: dict[str, str]) -> str:
    rows = "".join(f'<rule-result idref="{P}{rule}" severity="medium"><result>{r}</result>'
                   "</rule-result>" for rule, r in results.items())
    return (f'<?xml version="1.0"?><Benchmark xmlns="{NS}" id="b"><TestResult id="t">'
            f"{rows}<score>1</score></TestResult></Benchmark>")


REPORT = {"policy": "anssi-bp28-intermediary", "checks": [
    {"id": "sysctl_kernel_kptr_restrict", "result": "passed",
     "compliance": {"anssi-bp28": ["R9"], "ssg-debian12": ["sysctl_kernel_kptr_restrict"]},
     "rules": [{"rule": "sysctl:kernel.kptr_restrict -> r:^2$", "held": True, "evidence": "2"}]},
    {"id": "accounts_tmout", "result": "failed",
     "compliance": {"ssg-debian12": ["accounts_tmout"]},
     "rules": [{"rule": "c:grep ...", "held": False, "evidence": "no TMOUT line"}]},
    {"id": "grub2_password", "result": "notapplicable",
     "compliance": {"ssg-debian12": ["grub2_password"]}, "rules": []},
    {"id": "own-check", "result": "passed", "compliance": {}, "rules": []},
    {"id": "package_aide_installed", "result": "passed",
     "compliance": {"ssg-debian12": ["package_aide_installed"]}, "rules": []},
]}


def test_results_are_read_and_paired_rule_by_rule(tmp_path: Path) -> None:
    f = tmp_path / "results.xml"
    f.write_text(results_xml({"sysctl_kernel_kptr_restrict": "pass", "accounts_tmout": "pass",
                              "grub2_password": "notapplicable", "package_aide_installed": "fail",
                              "partition_for_home": "fail", "selinux_state": "notselected"}))
    theirs = xccdf.read_results(f)
    assert "selinux_state" not in theirs and theirs["accounts_tmout"] == "pass"
    pairs = {p.rule: p for p in xccdf.compare(REPORT, theirs)}
    assert pairs["sysctl_kernel_kptr_restrict"].agree
    assert not pairs["accounts_tmout"].agree and pairs["accounts_tmout"].ours == "fail"
    assert pairs["accounts_tmout"].evidence == "no TMOUT line"
    assert pairs["grub2_password"].agree and not pairs["grub2_password"].both_judged
    assert pairs["partition_for_home"].check is None  # only OpenSCAP has it
    assert xccdf.summary(list(pairs.values())) == {
        "rules": 5, "both": 4, "agree": 2, "differ": 2, "both_judged": 3, "agree_judged": 1,
        "only_openscap": 1, "only_ours": 0}


def test_cli_compare_lists_the_differences_and_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f, report = tmp_path / "results.xml", tmp_path / "ours.json"
    f.write_text(results_xml({"sysctl_kernel_kptr_restrict": "pass", "accounts_tmout": "pass"}))
    report.write_text(json.dumps(REPORT))
    assert cli.main(["policy", "compare", "--openscap", str(f), "--report", str(report)]) == 2
    out = capsys.readouterr().out
    assert "DIFF  accounts_tmout" in out and "no TMOUT line" in out
    assert "kptr_restrict" not in out  # agreeing rules only with --all
    assert "2 rules evaluated by both: 1 agree, 1 differ" in out
    f.write_text(results_xml({"sysctl_kernel_kptr_restrict": "pass"}))
    assert cli.main(["policy", "compare", "--openscap", str(f), "--report", str(report),
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["agree"] == 1 and doc["rules"][0]["openscap"] == "pass"


@pytest.mark.parametrize(("content", "words"), [
    (None, "does not exist"),
    ("<not xml", "is not a readable XML file"),
    (f'<Benchmark xmlns="{NS}"/>', "holds no XCCDF 1.2 rule results"),
    # an entity bomb is refused by the parser, never expanded
    ('<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
     + "".join(f'<!ENTITY {chr(98 + i)} "' + f"&{chr(97 + i)};" * 10 + '">' for i in range(8))
     + f']><l xmlns="{NS}">&i;</l>', "is not a readable XML file"),
])
def test_bad_results_files_are_one_sentence(content: str | None, words: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "results.xml"
    if content is not None:
        f.write_text(content)
    report = tmp_path / "ours.json"
    report.write_text(json.dumps(REPORT))
    assert cli.main(["policy", "compare", "--openscap", str(f), "--report", str(report)]) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_a_report_of_another_profile_is_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    f, report = tmp_path / "results.xml", tmp_path / "ours.json"
    f.write_text(results_xml({"partition_for_home": "fail"}))
    report.write_text(json.dumps({"policy": "demo", "checks": [
        {"id": "x", "result": "passed", "compliance": {}, "rules": []}]}))
    assert cli.main(["policy", "compare", "--openscap", str(f), "--report", str(report)]) == 1
    assert "No check of demo names an SSG rule" in capsys.readouterr().err
