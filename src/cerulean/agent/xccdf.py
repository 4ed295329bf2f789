"""Comparing a policy report with OpenSCAP's results for the same host.

OpenSCAP (``oscap xccdf eval --results FILE`` or ``--results-arf FILE``) writes
an XCCDF 1.2 ``TestResult`` with one ``rule-result`` per rule: its ``idref``
(``xccdf_org.ssgproject.content_rule_NAME``) and a ``result``. A check of ours
names the SCAP Security Guide rules it stands for under ``compliance``
(``ssg-debian12: [NAME]``). :func:`compare` pairs them up.

The results file is parsed with :mod:`xml.etree.ElementTree`, which resolves
no external entities and, with the expat Python ships, refuses entity
expansion bombs; nothing in it is executed or turned into objects.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cerulean.errors import CeruleanError

XCCDF_NS = "http://checklists.nist.gov/xccdf/1.2"
RULE_PREFIX = "xccdf_org.ssgproject.content_rule_"
# Our check results and OpenSCAP's, on one scale.
OURS = {"passed": "pass", "failed": "fail", "notapplicable": "notapplicable", "error": "error"}
JUDGED = ("pass", "fail")
SSG_KEYS = ("ssg-debian12", "ssg")


class XccdfError(CeruleanError):
    pass


def read_results(path: Path) -> dict[str, str]:
    """SSG rule name → OpenSCAP's result (pass, fail, notapplicable, notchecked, error,
    unknown, ...) from an XCCDF 1.2 results or ARF file; rules not selected are left out."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise XccdfError(f"The OpenSCAP results file {path} does not exist.") from None
    except (ET.ParseError, OSError) as e:
        raise XccdfError(f"{path} is not a readable XML file ({e}).") from None
    results: dict[str, str] = {}
    for rr in tree.getroot().iter(f"{{{XCCDF_NS}}}rule-result"):
        idref = rr.get("idref", "")
        res = rr.find(f"{{{XCCDF_NS}}}result")
        if res is None or not idref or res.text is None:
            continue
        value = res.text.strip()
        if value == "notselected":
            continue
        results[idref.removeprefix(RULE_PREFIX)] = value
    if not results:
        raise XccdfError(f"{path} holds no XCCDF 1.2 rule results (run oscap xccdf eval "
                         "with --results or --results-arf).")
    return results


@dataclass(frozen=True)
class Pair:
    """One SSG rule: OpenSCAP's result and the result of our check that stands for it."""

    rule: str
    check: str | None  # our check's id, None when none stands for the rule
    ours: str | None   # pass | fail | notapplicable | error, None without a check
    theirs: str | None  # OpenSCAP's result, None when it did not evaluate the rule
    evidence: str = ""

    @property
    def agree(self) -> bool:
        return self.ours is not None and self.ours == self.theirs

    @property
    def both_judged(self) -> bool:
        return self.ours in JUDGED and self.theirs in JUDGED

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "check": self.check, "ours": self.ours,
                "openscap": self.theirs, "agree": self.agree, "evidence": self.evidence}


def _ssg_rules(compliance: Mapping[str, Iterable[str]]) -> list[str]:
    return [r for k in SSG_KEYS for r in compliance.get(k, ())]


def compare(report: Mapping[str, Any], openscap: Mapping[str, str]) -> list[Pair]:
    """Every SSG rule either side knows, in our report's order, then OpenSCAP's only.

    *report* is a policy report as JSON (``cerulean policy check --json``).
    """
    pairs: list[Pair] = []
    seen: set[str] = set()
    for c in report.get("checks", []):
        for rule in _ssg_rules(c.get("compliance", {})):
            if rule in seen:
                continue
            seen.add(rule)
            failed = [r.get("evidence", "") for r in c.get("rules", []) if not r.get("held")]
            pairs.append(Pair(rule, c.get("id"), OURS.get(c.get("result", ""), "error"),
                              openscap.get(rule), "; ".join(failed)[:300]))
    pairs.extend(Pair(rule, None, None, result)
                 for rule, result in openscap.items() if rule not in seen)
    return pairs


def summary(pairs: list[Pair]) -> dict[str, int]:
    both = [p for p in pairs if p.ours is not None and p.theirs is not None]
    return {
        "rules": len(pairs),
        "both": len(both),
        "agree": sum(1 for p in both if p.agree),
        "differ": sum(1 for p in both if not p.agree),
        "both_judged": sum(1 for p in both if p.both_judged),
        "agree_judged": sum(1 for p in both if p.both_judged and p.agree),
        "only_openscap": sum(1 for p in pairs if p.ours is None),
        "only_ours": sum(1 for p in pairs if p.theirs is None),
    }
