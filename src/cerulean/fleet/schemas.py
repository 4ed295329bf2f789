"""The admin API's request and response bodies (what people and scripts see).

The agent's side of the API uses the wire types of :mod:`cerulean.protocol.fleet`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel, Field

# Numbers in paths and queries fit the databases' 32-bit integer columns.
MAX_INT = 2 ** 31 - 1
RowId = Annotated[int, Path(ge=1, le=MAX_INT)]
Offset = Annotated[int, Query(ge=0, le=MAX_INT)]


class Error(BaseModel):
    detail: str = Field(description="what is wrong, in one sentence")


class TokenRequest(BaseModel):
    group: str = Field(description="the group enrolled hosts join (a-z, 0-9, '-', '_')")
    labels: dict[str, str] = Field(default_factory=dict,
                                   description="environment (cloud, on-prem, edge), region, "
                                               "site, provider, role, owner")
    uses: int = Field(1, description="how many hosts may enroll with it")
    hours: float = Field(24.0, description="how long it is valid")


class TokenCreated(BaseModel):
    token: str = Field(description="shown once; only its hash is kept")
    id: str
    expires_at: datetime
    ca_sha256: str = Field(description="give this to the host with the token")
    command: str = Field(description="what to run on the host")


class TokenInfo(BaseModel):
    id: str
    group: str
    labels: dict[str, Any]
    uses_left: int
    used: int
    expires_at: datetime
    created_at: datetime
    created_by: str
    revoked: bool


class HostSummary(BaseModel):
    id: str
    hostname: str
    group: str
    labels: dict[str, Any]
    os: str
    arch: str
    version: str
    last_seen: datetime | None
    enrolled_at: datetime
    packages: int
    open_alerts: int
    compliance: dict[str, float]
    cves: dict[str, Any]
    revoked: bool


class HostPage(BaseModel):
    total: int
    hosts: list[HostSummary]


class HostDetail(HostSummary):
    machine_id: str
    kernel: str
    os_release: dict[str, Any]
    update: dict[str, Any]
    metrics: dict[str, Any]
    reports: int
    dropped: int
    audit_head: dict[str, Any]
    release_cves: list[str] = []  # the CVEs the release it runs fixes (update repository)


class PackageOut(BaseModel):
    name: str
    version: str
    arch: str


class AlertOut(BaseModel):
    id: int
    host_id: str
    rule: str
    severity: str
    summary: str
    time: datetime
    evidence: dict[str, Any]
    status: str


class ComplianceOut(BaseModel):
    profile: str
    time: datetime
    score: float
    passed: int
    failed: int
    errors: int
    notapplicable: int
    mode: str
    failures: dict[str, Any]


class UserRequest(BaseModel):
    name: str
    role: str
    password: str = Field("", description="for the dashboard; empty: API tokens only")


class UserOut(BaseModel):
    name: str
    role: str
    created_at: datetime
    disabled: bool


class ApiTokenRequest(BaseModel):
    user: str
    role: str
    description: str = ""
    days: float | None = Field(None, description="lifetime; none: until revoked")


class ApiTokenCreated(BaseModel):
    token: str = Field(description="shown once; only its hash is kept")


class AuditOut(BaseModel):
    seq: int
    time: str
    actor: str
    action: str
    detail: dict[str, Any]
    prev: str
    hash: str


class AuditVerdict(BaseModel):
    entries: int
    ok: bool
    problem: str | None


class Whoami(BaseModel):
    name: str
    role: str


class RolloutRequest(BaseModel):
    name: str
    group: str
    channel: str = "stable"
    target: str = Field("", description="the release to move to; empty: the channel's newest")
    waves: list[int] = Field(default_factory=lambda: [10, 50, 100],
                             description="rising percentages of the group, ending at 100")
    soak_minutes: int = Field(30, description="how long a wave runs before the next opens")
    max_failure_percent: float = Field(10.0, description="pause by itself above this")
    window: str = Field("", description="maintenance window, such as 'Sat 02:00-04:00'")


class RolloutOut(BaseModel):
    id: int
    name: str
    group: str
    channel: str
    target: str
    waves: list[int]
    wave: int
    state: str
    reason: str
    soak_minutes: int
    max_failure_percent: float
    window: str
    created_by: str
    created_at: datetime
    wave_started_at: datetime
    hosts: dict[str, int] = Field(description="hosts by state: waiting, updating, done, "
                                              "failed, offline")


class RolloutHost(BaseModel):
    host_id: str
    hostname: str
    wave: int
    state: str
    version: str


class RolloutDetail(RolloutOut):
    per_wave: list[dict[str, int]]
    per_host: list[RolloutHost]


class PolicyRequest(BaseModel):
    profiles: list[str]
    mode: str = Field("audit", description="audit, enforce or autocorrect")


class GroupOut(BaseModel):
    group: str
    hosts: int
    profiles: list[str]
    mode: str | None
    rollout: str | None


class ReleaseOut(BaseModel):
    channel: str
    image: str
    version: str
    published: str
    state: str
    cves: list[str] = Field(description="the CVEs its package changes fix, from its signed "
                            "release.json")
    cve_count: int
