"""The fleet's REST API (``/api/v1``), as a FastAPI application.

Three kinds of caller, checked before any body is read:

- anyone: ``GET /ca``, ``GET /health`` and ``POST /enroll`` (which needs a
  valid enrollment token);
- a host, by its client certificate (mTLS): ``/agent/...``, only ever about
  itself;
- people and scripts, by an API token (``Authorization: Bearer cat_...``)
  whose role (auditor, operator, admin) decides what they may do.

(No ``from __future__ import annotations`` here: FastAPI reads the annotations of
the endpoints, which name dependencies defined inside :func:`create_app`.)
"""


from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cerulean import __version__
from cerulean.fleet import hosts as hostsvc
from cerulean.fleet import schemas as sc
from cerulean.fleet.auth import (
    AuthError,
    Principal,
    audit,
    check_role,
    check_username,
    create_token,
    hash_password,
    token_principal,
    verify_audit,
)
from cerulean.fleet.ca import FleetCA, serial_of
from cerulean.fleet.db import (
    Alert,
    AuditEntry,
    Certificate,
    ComplianceResult,
    EnrollmentToken,
    Host,
    Package,
    User,
)
from cerulean.fleet.ingest import BadReport, ingest
from cerulean.fleet.tls import client_der
from cerulean.protocol.fleet import (
    API,
    EnrollRequest,
    EnrollResponse,
    HostSelf,
    RenewRequest,
    ReportAck,
    ReportBatch,
)


@dataclass
class FleetState:
    sessions: sessionmaker[Session]
    ca: FleetCA
    cert_lifetime: timedelta = timedelta(hours=24)
    public_url: str = ""  # how hosts reach the server (for the enroll command it prints)


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def create_app(state: FleetState) -> FastAPI:
    app = FastAPI(title="Cerulean fleet", version=__version__,
                  description="Enrollment, inventory, alerts and compliance of Cerulean hosts.",
                  openapi_url=f"{API}/openapi.json", docs_url=f"{API}/docs", redoc_url=None)
    app.state.fleet = state

    @app.exception_handler(hostsvc.Refused)
    async def refused(_r: Request, e: hostsvc.Refused) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=403)

    @app.exception_handler(hostsvc.Invalid)
    async def invalid(_r: Request, e: hostsvc.Invalid) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=422)

    @app.exception_handler(AuthError)
    async def auth_error(_r: Request, e: AuthError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=422)

    def db() -> Iterator[Session]:
        with state.sessions.begin() as s:
            yield s

    Db = Annotated[Session, Depends(db)]

    def caller(request: Request, s: Db) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "An API token is needed (Authorization: Bearer cat_...).",
                                headers={"WWW-Authenticate": "Bearer"})
        p = token_principal(s, token.strip())
        if p is None:
            raise HTTPException(401, "The API token is not valid, has expired or was revoked.",
                                headers={"WWW-Authenticate": "Bearer"})
        return p

    def role(needed: str) -> Any:
        def check(p: Annotated[Principal, Depends(caller)]) -> Principal:
            if not p.can(needed):
                raise _error(403, f"This needs the {needed} role; {p.name} has {p.role}.")
            return p
        return Depends(check)

    Auditor = Annotated[Principal, role("auditor")]
    Operator = Annotated[Principal, role("operator")]
    Admin = Annotated[Principal, role("admin")]

    def this_host(request: Request, s: Db) -> Host:
        der = client_der(request.scope)
        if der is None:
            raise _error(401, "This call needs the host's client certificate (mTLS).")
        serial, cn = serial_of(der)
        request.state.cert_serial = serial
        return hostsvc.authenticate_host(s, serial, cn)

    ThisHost = Annotated[Host, Depends(this_host)]

    # -- anyone -------------------------------------------------------------------------

    @app.get(f"{API}/health", tags=["server"])
    def health(s: Db) -> dict[str, str]:
        s.execute(select(1))
        return {"status": "ok", "version": __version__}

    @app.get(f"{API}/ca", tags=["server"], response_class=PlainTextResponse)
    def ca_certificate() -> str:
        """The fleet CA's certificate (PEM); hosts check its SHA-256 before they trust it."""
        return state.ca.pem

    @app.post(f"{API}/enroll", tags=["agent"])
    def enroll(req: EnrollRequest, s: Db) -> EnrollResponse:
        return hostsvc.enroll(s, state.ca, req, state.cert_lifetime)

    # -- hosts (mTLS) ---------------------------------------------------------------------

    @app.get(f"{API}/agent/self", tags=["agent"])
    def agent_self(host: ThisHost, request: Request, s: Db) -> HostSelf:
        cert = s.get(Certificate, request.state.cert_serial)
        return HostSelf(host.id, host.hostname, host.group,
                        {k: str(v) for k, v in host.labels.items()},
                        hostsvc.aware(cert.not_after).isoformat() if cert else "",
                        host.reports)

    @app.post(f"{API}/agent/reports", tags=["agent"])
    def agent_reports(batch: ReportBatch, host: ThisHost, s: Db) -> ReportAck:
        try:
            return ingest(s, host, batch)
        except BadReport as e:
            raise _error(422, str(e)) from e

    @app.post(f"{API}/agent/renew", tags=["agent"])
    def agent_renew(req: RenewRequest, host: ThisHost, s: Db) -> EnrollResponse:
        return hostsvc.renew(s, state.ca, host, req.csr, state.cert_lifetime)

    # -- people and scripts ---------------------------------------------------------------

    @app.get(f"{API}/whoami", tags=["admin"])
    def whoami(p: Auditor) -> sc.Whoami:
        return sc.Whoami(name=p.name, role=p.role)

    def _summaries(s: Session, rows: list[Host]) -> list[sc.HostSummary]:
        ids = [h.id for h in rows]
        alerts = dict(s.execute(select(Alert.host_id, func.count())
                                .where(Alert.host_id.in_(ids), Alert.status == "open")
                                .group_by(Alert.host_id)).tuples().all())
        latest = (select(ComplianceResult.host_id, ComplianceResult.profile,
                         func.max(ComplianceResult.time).label("t"))
                  .where(ComplianceResult.host_id.in_(ids))
                  .group_by(ComplianceResult.host_id, ComplianceResult.profile).subquery())
        scores: dict[str, dict[str, float]] = {}
        for hid, profile, score in s.execute(
                select(ComplianceResult.host_id, ComplianceResult.profile,
                       ComplianceResult.score)
                .join(latest, (latest.c.host_id == ComplianceResult.host_id)
                      & (latest.c.profile == ComplianceResult.profile)
                      & (latest.c.t == ComplianceResult.time))):
            scores.setdefault(hid, {})[profile] = score
        return [sc.HostSummary(
            id=h.id, hostname=h.hostname, group=h.group, labels=h.labels,
            os=str(h.os_release.get("PRETTY_NAME", "")), arch=h.arch,
            version=str(h.update.get("version") or h.os_release.get("VERSION_ID", "")),
            last_seen=h.last_seen, enrolled_at=h.enrolled_at, packages=h.package_count,
            open_alerts=int(alerts.get(h.id, 0)), compliance=scores.get(h.id, {}),
            cves=h.cves, revoked=h.revoked) for h in rows]

    @app.get(f"{API}/hosts", tags=["inventory"])
    def list_hosts(
        s: Db, _p: Auditor,
        group: str | None = None,
        environment: str | None = None,
        region: str | None = None,
        q: Annotated[str | None, Query(max_length=200,
                                       description="part of the host name or ID")] = None,
        package: Annotated[str | None, Query(max_length=128,
                                             description="hosts with this package")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> sc.HostPage:
        stmt = select(Host)
        if group:
            stmt = stmt.where(Host.group == group)
        if q:
            stmt = stmt.where(or_(Host.hostname.contains(q, autoescape=True),
                                  Host.id.startswith(q, autoescape=True)))
        if package:
            stmt = stmt.where(Host.id.in_(select(Package.host_id)
                                          .where(Package.name == package)))
        rows = list(s.execute(stmt.order_by(Host.hostname, Host.id)).scalars())
        # Labels are JSON, filtered here the same way on both databases.
        for key, want in (("environment", environment), ("region", region)):
            if want:
                rows = [h for h in rows if h.labels.get(key) == want]
        return sc.HostPage(total=len(rows),
                           hosts=_summaries(s, rows[offset:offset + limit]))

    def _host(s: Session, host_id: str) -> Host:
        host = s.get(Host, host_id)
        if host is None:
            raise _error(404, f"There is no host {host_id!r}.")
        return host

    @app.get(f"{API}/hosts/{{host_id}}", tags=["inventory"])
    def get_host(host_id: str, s: Db, _p: Auditor) -> sc.HostDetail:
        h = _host(s, host_id)
        base = _summaries(s, [h])[0]
        return sc.HostDetail(**base.model_dump(), machine_id=h.machine_id, kernel=h.kernel,
                             os_release=h.os_release, update=h.update, metrics=h.metrics,
                             reports=h.reports, dropped=h.dropped, audit_head=h.audit_head)

    @app.get(f"{API}/hosts/{{host_id}}/packages", tags=["inventory"])
    def host_packages(host_id: str, s: Db, _p: Auditor) -> list[sc.PackageOut]:
        _host(s, host_id)
        rows = s.execute(select(Package).where(Package.host_id == host_id)
                         .order_by(Package.name, Package.arch)).scalars()
        return [sc.PackageOut(name=r.name, version=r.version, arch=r.arch) for r in rows]

    @app.get(f"{API}/hosts/{{host_id}}/alerts", tags=["inventory"])
    def host_alerts(host_id: str, s: Db, _p: Auditor,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[sc.AlertOut]:
        _host(s, host_id)
        rows = s.execute(select(Alert).where(Alert.host_id == host_id)
                         .order_by(Alert.time.desc(), Alert.id.desc()).limit(limit)).scalars()
        return [sc.AlertOut.model_validate(r, from_attributes=True) for r in rows]

    @app.get(f"{API}/hosts/{{host_id}}/compliance", tags=["inventory"])
    def host_compliance(host_id: str, s: Db, _p: Auditor,
                        profile: str | None = None,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                        ) -> list[sc.ComplianceOut]:
        _host(s, host_id)
        stmt = select(ComplianceResult).where(ComplianceResult.host_id == host_id)
        if profile:
            stmt = stmt.where(ComplianceResult.profile == profile)
        rows = s.execute(stmt.order_by(ComplianceResult.time.desc()).limit(limit)).scalars()
        return [sc.ComplianceOut.model_validate(r, from_attributes=True) for r in rows]

    @app.post(f"{API}/hosts/{{host_id}}/revoke", tags=["inventory"])
    def revoke_host(host_id: str, s: Db, p: Operator) -> dict[str, str]:
        _host(s, host_id)
        hostsvc.revoke_host(s, p.name, host_id)
        return {"revoked": host_id}

    @app.post(f"{API}/enrollment-tokens", tags=["enrollment"], status_code=201)
    def create_enrollment_token(req: sc.TokenRequest, s: Db, p: Operator) -> sc.TokenCreated:
        if not 0 < req.hours <= 24 * 365:
            raise _error(422, "'hours' must be more than 0 and at most 8760.")
        t = hostsvc.create_enrollment_token(s, p.name, req.group, req.labels, req.uses,
                                            timedelta(hours=req.hours))
        server = state.public_url or "https://FLEET:8443"
        return sc.TokenCreated(
            token=t.token, id=t.id, expires_at=t.expires_at, ca_sha256=state.ca.fingerprint,
            command=f"cerulean agent enroll --server {server} --token {t.token} "
                    f"--ca-sha256 {state.ca.fingerprint}")

    @app.get(f"{API}/enrollment-tokens", tags=["enrollment"])
    def list_enrollment_tokens(s: Db, _p: Auditor) -> list[sc.TokenInfo]:
        rows = s.execute(select(EnrollmentToken)
                         .order_by(EnrollmentToken.created_at.desc())).scalars()
        return [sc.TokenInfo.model_validate(r, from_attributes=True) for r in rows]

    @app.delete(f"{API}/enrollment-tokens/{{token_id}}", tags=["enrollment"])
    def revoke_enrollment_token(token_id: str, s: Db, p: Operator) -> dict[str, str]:
        if s.get(EnrollmentToken, token_id) is None:
            raise _error(404, f"There is no enrollment token {token_id!r}.")
        hostsvc.revoke_enrollment_token(s, p.name, token_id)
        return {"revoked": token_id}

    @app.get(f"{API}/users", tags=["admin"])
    def list_users(s: Db, _p: Admin) -> list[sc.UserOut]:
        rows = s.execute(select(User).order_by(User.name)).scalars()
        return [sc.UserOut.model_validate(r, from_attributes=True) for r in rows]

    @app.post(f"{API}/users", tags=["admin"], status_code=201)
    def create_user(req: sc.UserRequest, s: Db, p: Admin) -> sc.UserOut:
        check_username(req.name)
        check_role(req.role)
        if s.get(User, req.name) is not None:
            raise _error(409, f"There is already a user {req.name!r}.")
        user = User(name=req.name, role=req.role,
                    password_hash=hash_password(req.password) if req.password else "",
                    created_at=datetime.now(UTC), disabled=False)
        s.add(user)
        audit(s, p.name, "user.created", {"user": req.name, "role": req.role})
        return sc.UserOut.model_validate(user, from_attributes=True)

    @app.post(f"{API}/api-tokens", tags=["admin"], status_code=201)
    def create_api_token(req: sc.ApiTokenRequest, s: Db, p: Admin) -> sc.ApiTokenCreated:
        if req.days is not None and not 0 < req.days <= 3650:
            raise _error(422, "'days' must be more than 0 and at most 3650.")
        expires = datetime.now(UTC) + timedelta(days=req.days) if req.days else None
        try:
            token = create_token(s, req.user, req.role, req.description[:200], expires)
            audit(s, p.name, "api-token.created", {"user": req.user, "role": req.role,
                                                   "token": token.split("_")[1]})
        except IntegrityError as e:
            raise _error(409, "That token could not be stored; try again.") from e
        return sc.ApiTokenCreated(token=token)

    @app.get(f"{API}/audit", tags=["admin"])
    def audit_log(s: Db, _p: Auditor,
                  after: Annotated[int, Query(ge=0, le=1 << 62)] = 0,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[sc.AuditOut]:
        rows = s.execute(select(AuditEntry).where(AuditEntry.seq > after)
                         .order_by(AuditEntry.seq).limit(limit)).scalars()
        return [sc.AuditOut.model_validate(r, from_attributes=True) for r in rows]

    @app.get(f"{API}/audit/verify", tags=["admin"])
    def audit_verify(s: Db, _p: Auditor) -> sc.AuditVerdict:
        n, problem = verify_audit(s)
        return sc.AuditVerdict(entries=n, ok=problem is None, problem=problem)

    return app
