"""Questions about the fleet that the API and the dashboard both ask, answered in SQL."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from cerulean.fleet import schemas as sc
from cerulean.fleet.db import Alert, ComplianceResult, Host, Package


@dataclass(frozen=True)
class HostFilter:
    group: str | None = None
    environment: str | None = None
    region: str | None = None
    q: str | None = None  # part of the host name, or the start of its ID
    package: str | None = None  # hosts that have this package

    def apply(self, stmt: Select[Any]) -> Select[Any]:
        if self.group:
            stmt = stmt.where(Host.group == self.group)
        for key, want in (("environment", self.environment), ("region", self.region)):
            if want:
                stmt = stmt.where(Host.labels[key].as_string() == want)
        if self.q:
            stmt = stmt.where(or_(Host.hostname.contains(self.q, autoescape=True),
                                  Host.id.startswith(self.q, autoescape=True)))
        if self.package:
            stmt = stmt.where(Host.id.in_(select(Package.host_id)
                                          .where(Package.name == self.package)))
        return stmt


def count_hosts(s: Session, f: HostFilter) -> int:
    return int(s.execute(f.apply(select(func.count()).select_from(Host))).scalar_one())


def find_hosts(s: Session, f: HostFilter, limit: int = 100, offset: int = 0) -> list[Host]:
    stmt = f.apply(select(Host)).order_by(Host.hostname, Host.id).limit(limit).offset(offset)
    return list(s.execute(stmt).scalars())


def latest_scores(s: Session, ids: list[str]) -> dict[str, dict[str, float]]:
    """host → profile → the score of its newest compliance result."""
    latest = (select(ComplianceResult.host_id, ComplianceResult.profile,
                     func.max(ComplianceResult.time).label("t"))
              .where(ComplianceResult.host_id.in_(ids))
              .group_by(ComplianceResult.host_id, ComplianceResult.profile).subquery())
    scores: dict[str, dict[str, float]] = {}
    for hid, profile, score in s.execute(
            select(ComplianceResult.host_id, ComplianceResult.profile, ComplianceResult.score)
            .join(latest, (latest.c.host_id == ComplianceResult.host_id)
                  & (latest.c.profile == ComplianceResult.profile)
                  & (latest.c.t == ComplianceResult.time))):
        scores.setdefault(hid, {})[profile] = score
    return scores


def open_alerts(s: Session, ids: list[str]) -> dict[str, int]:
    return {h: int(n) for h, n in s.execute(
        select(Alert.host_id, func.count()).where(Alert.host_id.in_(ids),
                                                  Alert.status == "open")
        .group_by(Alert.host_id))}


def summaries(s: Session, rows: list[Host]) -> list[sc.HostSummary]:
    ids = [h.id for h in rows]
    alerts, scores = open_alerts(s, ids), latest_scores(s, ids)
    return [sc.HostSummary(
        id=h.id, hostname=h.hostname, group=h.group, labels=h.labels,
        os=str(h.os_release.get("PRETTY_NAME", "")), arch=h.arch,
        version=str(h.update.get("version") or h.os_release.get("VERSION_ID", "")),
        last_seen=h.last_seen, enrolled_at=h.enrolled_at, packages=h.package_count,
        open_alerts=alerts.get(h.id, 0), compliance=scores.get(h.id, {}),
        cves=h.cves, revoked=h.revoked) for h in rows]


@dataclass(frozen=True)
class Overview:
    hosts: int
    by_environment: dict[str, int]
    by_group: dict[str, int]
    stale: int  # not seen for an hour
    open_alerts: int
    alerts_by_priority: dict[str, int]
    compliance: dict[str, tuple[float, int]]  # profile → (mean of newest scores, hosts)
    recent_alerts: list[tuple[Alert, str]]  # (alert, host name)


def overview(s: Session, now: datetime) -> Overview:
    env = Host.labels["environment"].as_string()
    by_env = {str(k or "unlabelled"): int(n) for k, n in s.execute(
        select(env, func.count()).where(Host.revoked.is_(False)).group_by(env))}
    by_group = {str(k): int(n) for k, n in s.execute(
        select(Host.group, func.count()).where(Host.revoked.is_(False))
        .group_by(Host.group))}
    stale = int(s.execute(select(func.count()).select_from(Host).where(
        Host.revoked.is_(False),
        or_(Host.last_seen.is_(None), Host.last_seen < now - timedelta(hours=1))))
        .scalar_one())
    by_priority = {str(k): int(n) for k, n in s.execute(
        select(Alert.severity, func.count()).where(Alert.status == "open")
        .group_by(Alert.severity))}
    ids = list(s.execute(select(Host.id).where(Host.revoked.is_(False))).scalars())
    per_profile: dict[str, list[float]] = {}
    for scores in latest_scores(s, ids).values():
        for profile, score in scores.items():
            per_profile.setdefault(profile, []).append(score)
    recent = [(a, name) for a, name in s.execute(
        select(Alert, Host.hostname).join(Host, Host.id == Alert.host_id)
        .order_by(Alert.time.desc(), Alert.id.desc()).limit(10))]
    return Overview(sum(by_env.values()), by_env, by_group, stale, sum(by_priority.values()),
                    by_priority,
                    {p: (round(sum(v) / len(v), 1), len(v))
                     for p, v in sorted(per_profile.items())}, recent)
