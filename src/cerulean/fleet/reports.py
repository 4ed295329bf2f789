"""Compliance reports for auditors (CSV and HTML, per group or per host, with evidence)
and compliance over time."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cerulean import __version__
from cerulean.fleet.db import ComplianceResult, Host
from cerulean.fleet.queries import HostFilter, find_hosts

_env = Environment(loader=PackageLoader("cerulean.fleet", "templates"),
                   autoescape=select_autoescape(default=True, default_for_string=True))


def templates() -> Environment:
    return _env


def _style_hash() -> str:
    """The CSP source of the report's inline style sheet (it holds no template code:
    what is rendered is what the template says)."""
    text = _env.loader.get_source(_env, "report.html")[0] if _env.loader else ""
    css = text.split("<style>", 1)[1].split("</style>", 1)[0]
    return "sha256-" + base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()


STYLE_HASH = _style_hash()


@dataclass(frozen=True)
class HostResult:
    host: Host
    result: ComplianceResult


def latest_results(s: Session, group: str | None = None, host_id: str | None = None,
                   profile: str | None = None, limit: int = 10000) -> list[HostResult]:
    """Each host's newest result per profile, hosts by name."""
    if host_id:
        hosts = [h for h in [s.get(Host, host_id)] if h is not None]
    else:
        hosts = find_hosts(s, HostFilter(group=group), limit=limit)
    # Each host's newest result per profile, for 500 hosts per query.
    by_host: dict[str, list[ComplianceResult]] = defaultdict(list)
    for i in range(0, len(hosts), 500):
        rank = func.row_number().over(
            partition_by=(ComplianceResult.host_id, ComplianceResult.profile),
            order_by=(ComplianceResult.time.desc(), ComplianceResult.id.desc()))
        ranked = select(ComplianceResult.id, rank.label("n")).where(
            ComplianceResult.host_id.in_([h.id for h in hosts[i:i + 500]]))
        if profile:
            ranked = ranked.where(ComplianceResult.profile == profile)
        sub = ranked.subquery()
        for r in s.execute(select(ComplianceResult).join(sub, sub.c.id == ComplianceResult.id)
                           .where(sub.c.n == 1)).scalars():
            by_host[r.host_id].append(r)
    return [HostResult(h, r) for h in hosts
            for r in sorted(by_host.get(h.id, []), key=lambda r: r.profile)]


def _evidence(rules: Any) -> str:
    if isinstance(rules, list):
        return "; ".join(f"{r.get('rule', '?')}: {r.get('evidence', '')}"
                         for r in rules if isinstance(r, dict) and not r.get("held", False))
    return str(rules)


CSV_HEADER = ("host", "host_id", "group", "profile", "checked_at", "score", "passed",
              "failed", "errors", "not_applicable", "mode", "check", "result", "evidence")


def _cell(value: object) -> str:
    # Text from hosts that starts with =, +, - or @ would run as a formula in a spreadsheet.
    text = str(value)
    if text[:1] in ("=", "+", "-", "@") and not text.lstrip("+-").replace(".", "").isdigit():
        return "'" + text
    return text


def csv_report(rows: list[HostResult]) -> str:
    """One line per failed check, and one per host and profile with nothing failed."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for hr in rows:
        h, r = hr.host, hr.result
        base = [h.hostname, h.id, h.group, r.profile, r.time.isoformat(), f"{r.score:g}",
                r.passed, r.failed, r.errors, r.notapplicable, r.mode]
        if not r.failures:
            w.writerow([_cell(c) for c in [*base, "", "passed", ""]])
        for check, rules in sorted(r.failures.items()):
            w.writerow([_cell(c) for c in [*base, check, "failed", _evidence(rules)]])
    return buf.getvalue()


def report_title(rows: list[HostResult], group: str | None, host: str | None) -> str:
    what = (f"host {rows[0].host.hostname}" if host and rows
            else f"group {group}" if group else "all hosts")
    return f"Compliance of {what}"


def html_report(rows: list[HostResult], title: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    profiles: dict[str, list[float]] = defaultdict(list)
    for hr in rows:
        profiles[hr.result.profile].append(hr.result.score)
    summary = {p: (round(sum(v) / len(v), 1), len(v)) for p, v in sorted(profiles.items())}
    return templates().get_template("report.html").render(
        title=title, rows=rows, summary=summary, now=now, version=__version__,
        evidence=_evidence)


def history(s: Session, group: str | None, profile: str | None, days: int = 30,
            now: datetime | None = None) -> list[dict[str, Any]]:
    """Per day and profile: the mean of each host's last score that day."""
    now = now or datetime.now(UTC)
    since = now - timedelta(days=days)
    stmt = select(ComplianceResult.host_id, ComplianceResult.profile, ComplianceResult.time,
                  ComplianceResult.score).where(ComplianceResult.time >= since)
    if group:
        stmt = stmt.join(Host, Host.id == ComplianceResult.host_id).where(Host.group == group)
    if profile:
        stmt = stmt.where(ComplianceResult.profile == profile)
    last: dict[tuple[str, str, str], float] = {}
    for hid, prof, t, score in s.execute(stmt.order_by(ComplianceResult.time)):
        last[(t.date().isoformat(), prof, hid)] = score
    days_: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (day, prof, _), score in last.items():
        days_[(day, prof)].append(score)
    return [{"day": day, "profile": prof, "score": round(sum(v) / len(v), 1), "hosts": len(v)}
            for (day, prof), v in sorted(days_.items())]
