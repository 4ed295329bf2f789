"""The fleet's REST API (``/api/v1``), as a FastAPI application.

Three kinds of caller, checked by :mod:`cerulean.fleet.gate` before any body is read:

- anyone: ``GET /ca``, ``GET /health`` and ``POST /enroll`` (which needs a
  valid enrollment token);
- a host, by its client certificate (mTLS): ``/agent/...``, only ever about
  itself;
- people and scripts, by an API token (``Authorization: Bearer cat_...``)
  whose role (auditor, operator, admin) decides what they may do.

(No ``from __future__ import annotations`` here: FastAPI reads the annotations of
the endpoints, which name dependencies defined inside :func:`create_app`.)
"""


from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cerulean import __version__
from cerulean.errors import CeruleanError
from cerulean.fleet import hosts as hostsvc
from cerulean.fleet import queries, releases, reports, rollouts, web
from cerulean.fleet import schemas as sc
from cerulean.fleet.auth import (
    AuthError,
    Principal,
    UserExists,
    add_user,
    audit,
    issue_token,
    verify_audit,
)
from cerulean.fleet.ca import FleetCA
from cerulean.fleet.db import (
    Alert,
    AuditEntry,
    Certificate,
    ComplianceResult,
    EnrollmentToken,
    GroupPolicy,
    Host,
    Package,
    Rollout,
    User,
)
from cerulean.fleet.gate import Gate, caller_of
from cerulean.fleet.ingest import BadReport, ingest
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
    # The TUF repository rollouts choose releases from, and its trust anchor.
    update_repo: releases.Source | None = None
    threads: int = 40  # request threads: no more than the database pool's connections


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def create_app(state: FleetState) -> FastAPI:
    # Every refusal is {"detail": "one sentence"}; 422 is FastAPI's own, for a body or
    # parameter that does not fit the schema at all.
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": sc.Error, "description": what} for code, what in (
            (400, "the request is understood but not valid"),
            (401, "no valid API token or client certificate"),
            (403, "the caller may not do this"), (404, "no such thing"),
            (409, "it clashes with the current state"),
            (503, "the database cannot be reached for now"))}
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = state.threads
        yield

    app = FastAPI(title="Cerulean fleet", version=__version__, lifespan=lifespan,
                  description="Enrollment, inventory, alerts, compliance and rollouts of "
                              "Cerulean hosts.",
                  openapi_url=f"{API}/openapi.json", docs_url=None, redoc_url=None,
                  responses=errors)
    app.state.fleet = state
    # No endpoint reads its body before the gate has decided who is calling.
    app.add_middleware(Gate, sessions=state.sessions)

    @app.exception_handler(hostsvc.Refused)
    async def refused(_r: Request, e: hostsvc.Refused) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=403)

    @app.exception_handler(hostsvc.Invalid)
    async def invalid(_r: Request, e: hostsvc.Invalid) -> JSONResponse:
        return JSONResponse({"detail": str(e)},
                            status_code=409 if isinstance(e, rollouts.Conflict) else 400)

    async def database_down(_r: Request, _e: Exception) -> JSONResponse:
        # A database restart or failover: the agent keeps its reports and tries again.
        return JSONResponse({"detail": "The database cannot be reached; try again shortly."},
                            status_code=503, headers={"Retry-After": "5"})

    # A connection lost mid-request comes as either, depending on when it was noticed.
    app.add_exception_handler(OperationalError, database_down)
    app.add_exception_handler(InterfaceError, database_down)

    @app.exception_handler(RequestValidationError)
    async def unprocessable(_r: Request, e: RequestValidationError) -> JSONResponse:
        # Where and what, never the input itself: it may be a NaN or an infinity (which
        # no JSON answer can hold: that was a 500), or megabytes of a hostile body.
        return JSONResponse({"detail": [
            {"loc": [str(x)[:64] for x in err.get("loc", ())][:16],
             "msg": str(err.get("msg", ""))[:500], "type": str(err.get("type", ""))[:64]}
            for err in e.errors()[:20]]}, status_code=422)

    @app.exception_handler(web.LoginRequired)
    async def login_required(_r: Request, _e: web.LoginRequired) -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)


    @app.exception_handler(CeruleanError)
    async def unavailable(_r: Request, e: CeruleanError) -> JSONResponse:
        # Anything else the server cannot do now, such as an unreadable update repository.
        return JSONResponse({"detail": str(e)}, status_code=503)

    @app.exception_handler(AuthError)
    async def auth_error(_r: Request, e: AuthError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=400)

    def db() -> Iterator[Session]:
        with state.sessions.begin() as s:
            yield s

    # The transaction commits before the answer leaves: an acknowledgement is never sent
    # for something the database does not hold yet. A request's work hops between worker
    # threads (its dependencies, the endpoint, the commit) while it holds a connection,
    # and on SQLite the write lock; fewer requests are let in at once than there are
    # threads, so the one that holds them always finds a thread to finish on.
    Db = Annotated[Session, Depends(db, scope="function",
                                    max_concurrency=max(1, state.threads - 2))]
    app.include_router(web.router(Db, state.update_repo, state.public_url,
                                  state.ca.fingerprint))

    def caller(request: Request) -> Principal:
        p = caller_of(request.state).principal
        if p is None:  # the gate lets no such request through; this is a second lock
            raise HTTPException(401, "An API token is needed.")
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
        # The gate checked the certificate; this transaction checks the host once more.
        c = caller_of(request.state)
        if not c.host_id:
            raise _error(401, "This call needs the host's client certificate (mTLS).")
        return hostsvc.authenticate_host(s, c.serial, c.host_id)

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
    async def enroll(req: EnrollRequest) -> EnrollResponse:
        # One transaction on one worker thread, like the check-in: on SQLite the write
        # lock is held only while this thread runs.
        def work() -> EnrollResponse:
            with state.sessions.begin() as s:
                return hostsvc.enroll(s, state.ca, req, state.cert_lifetime)
        return await anyio.to_thread.run_sync(work)

    # -- hosts (mTLS) ---------------------------------------------------------------------

    @app.get(f"{API}/agent/self", tags=["agent"])
    def agent_self(host: ThisHost, request: Request, s: Db) -> HostSelf:
        cert = s.get(Certificate, caller_of(request.state).serial)
        return HostSelf(host.id, host.hostname, host.group,
                        {k: str(v) for k, v in host.labels.items()},
                        cert.not_after.isoformat() if cert else "",
                        host.reports)

    @app.post(f"{API}/agent/reports", tags=["agent"])
    async def agent_reports(batch: ReportBatch, request: Request) -> ReportAck:
        """Store the reports (each ID once) and answer with what the host should run."""
        c = caller_of(request.state)

        # The busiest call: all its database work (checking the host, storing, the
        # desired state, the commit) in one transaction on one worker thread.
        def work() -> ReportAck:
            with state.sessions.begin() as s:
                host = hostsvc.authenticate_host(s, c.serial, c.host_id)
                ack = ingest(s, host, batch)
                return replace(ack, desired=rollouts.desired(s, host))

        if not c.host_id:
            raise _error(401, "This call needs the host's client certificate (mTLS).")
        try:
            return await anyio.to_thread.run_sync(work)
        except BadReport as e:
            raise _error(400, str(e)) from e

    @app.post(f"{API}/agent/renew", tags=["agent"])
    def agent_renew(req: RenewRequest, host: ThisHost, s: Db) -> EnrollResponse:
        return hostsvc.renew(s, state.ca, host, req.csr, state.cert_lifetime)

    # -- people and scripts ---------------------------------------------------------------

    @app.get(f"{API}/whoami", tags=["admin"])
    def whoami(p: Auditor) -> sc.Whoami:
        return sc.Whoami(name=p.name, role=p.role)

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
        offset: sc.Offset = 0,
    ) -> sc.HostPage:
        f = queries.HostFilter(group, environment, region, q, package)
        return sc.HostPage(total=queries.count_hosts(s, f),
                           hosts=queries.summaries(s, queries.find_hosts(s, f, limit, offset)))

    def _host(s: Session, host_id: str) -> Host:
        host = s.get(Host, host_id)
        if host is None:
            raise _error(404, f"There is no host {host_id!r}.")
        return host

    @app.get(f"{API}/hosts/{{host_id}}", tags=["inventory"])
    def get_host(host_id: str, s: Db, _p: Auditor) -> sc.HostDetail:
        h = _host(s, host_id)
        base = queries.summaries(s, [h])[0]
        return sc.HostDetail(**base.model_dump(), machine_id=h.machine_id, kernel=h.kernel,
                             os_release=h.os_release, update=h.update, metrics=h.metrics,
                             reports=h.reports, dropped=h.dropped, audit_head=h.audit_head,
                             release_cves=releases.release_cves(state.update_repo, h.update))

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

    @app.delete(f"{API}/hosts/{{host_id}}", tags=["inventory"])
    def delete_host(host_id: str, s: Db, p: Operator) -> dict[str, str]:
        """Forget a host and all it reported (its certificates stop working too)."""
        h = _host(s, host_id)
        audit(s, p.name, "host.deleted", {"host": host_id, "hostname": h.hostname,
                                          "group": h.group})
        s.delete(h)
        return {"deleted": host_id}

    @app.post(f"{API}/alerts/{{alert_id}}/close", tags=["inventory"])
    def close_alert(alert_id: sc.RowId, s: Db, p: Operator) -> sc.AlertOut:
        """Mark an alert as dealt with: it no longer counts as open."""
        a = s.get(Alert, alert_id)
        if a is None:
            raise _error(404, f"There is no alert {alert_id}.")
        if a.status != "closed":
            a.status = "closed"
            audit(s, p.name, "alert.closed", {"alert": alert_id, "host": a.host_id,
                                              "rule": a.rule})
        return sc.AlertOut.model_validate(a, from_attributes=True)

    @app.post(f"{API}/enrollment-tokens", tags=["enrollment"], status_code=201)
    def create_enrollment_token(req: sc.TokenRequest, s: Db, p: Operator) -> sc.TokenCreated:
        if not 0 < req.hours <= 24 * 365:
            raise _error(400, "'hours' must be more than 0 and at most 8760.")
        t = hostsvc.create_enrollment_token(s, p.name, req.group, req.labels, req.uses,
                                            timedelta(hours=req.hours))
        return sc.TokenCreated(
            token=t.token, id=t.id, expires_at=t.expires_at, ca_sha256=state.ca.fingerprint,
            command=hostsvc.enroll_command(state.public_url, t.token, state.ca.fingerprint))

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
        try:
            user = add_user(s, p.name, req.name, req.role, req.password)
        except UserExists as e:
            raise _error(409, str(e)) from e
        return sc.UserOut.model_validate(user, from_attributes=True)

    @app.post(f"{API}/api-tokens", tags=["admin"], status_code=201)
    def create_api_token(req: sc.ApiTokenRequest, s: Db, p: Admin) -> sc.ApiTokenCreated:
        try:
            token = issue_token(s, p.name, req.user, req.role, req.description, req.days)
        except IntegrityError as e:
            raise _error(409, "That token could not be stored; try again.") from e
        return sc.ApiTokenCreated(token=token)

    @app.get(f"{API}/audit", tags=["admin"])
    def audit_log(s: Db, _p: Auditor,
                  after: sc.Offset = 0,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[sc.AuditOut]:
        rows = s.execute(select(AuditEntry).where(AuditEntry.seq > after)
                         .order_by(AuditEntry.seq).limit(limit)).scalars()
        return [sc.AuditOut.model_validate(r, from_attributes=True) for r in rows]

    @app.get(f"{API}/audit/verify", tags=["admin"])
    def audit_verify(s: Db, _p: Auditor) -> sc.AuditVerdict:
        n, problem = verify_audit(s)
        return sc.AuditVerdict(entries=n, ok=problem is None, problem=problem)

    # -- rollouts and policies ------------------------------------------------------------

    def _rollout_out(s: Session, r: Rollout, detail: bool = False) -> Any:
        p = rollouts.progress(s, r)
        base = dict(id=r.id, name=r.name, group=r.group, channel=r.channel, target=r.target,
                    waves=r.waves["percent"], wave=r.wave, state=r.state, reason=r.reason,
                    soak_minutes=r.soak_minutes, max_failure_percent=r.max_failure_percent,
                    window=r.window, created_by=r.created_by, created_at=r.created_at,
                    wave_started_at=r.wave_started_at, hosts=p.hosts)
        if not detail:
            return sc.RolloutOut(**base)
        return sc.RolloutDetail(**base, per_wave=p.waves, per_host=[
            sc.RolloutHost(host_id=h.id, hostname=h.hostname, wave=w, state=st,
                           version=str(h.update.get("version") or ""))
            for h, w, st in p.by_host])

    def _rollout(s: Session, rollout_id: int) -> Rollout:
        r = s.get(Rollout, rollout_id)
        if r is None:
            raise _error(404, f"There is no rollout {rollout_id}.")
        return r

    @app.post(f"{API}/rollouts", tags=["rollouts"], status_code=201)
    def create_rollout(req: sc.RolloutRequest, s: Db, p: Operator) -> sc.RolloutOut:
        if state.update_repo is not None:
            releases.check_target(state.update_repo, req.channel, req.target)
        r = rollouts.create(s, p.name, **req.model_dump())
        out: sc.RolloutOut = _rollout_out(s, r)
        return out

    @app.get(f"{API}/releases", tags=["rollouts"])
    def list_releases(_p: Auditor) -> list[sc.ReleaseOut]:
        """The releases of the update repository's channels, newest first (empty when the
        fleet has no update-repo)."""
        if state.update_repo is None:
            return []
        return [sc.ReleaseOut(channel=r.channel, image=r.image, version=r.version,
                              published=r.published, state=r.state, cves=list(r.cves),
                              cve_count=len(r.cves))
                for r in releases.offered(state.update_repo)]

    @app.get(f"{API}/rollouts", tags=["rollouts"])
    def list_rollouts(s: Db, _p: Auditor, group: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[sc.RolloutOut]:
        stmt = select(Rollout).order_by(Rollout.id.desc()).limit(limit)
        if group:
            stmt = stmt.where(Rollout.group == group)
        return [_rollout_out(s, r) for r in s.execute(stmt).scalars()]

    @app.get(f"{API}/rollouts/{{rollout_id}}", tags=["rollouts"])
    def get_rollout(rollout_id: sc.RowId, s: Db, _p: Auditor) -> sc.RolloutDetail:
        r = _rollout(s, rollout_id)
        rollouts.evaluate(s, r, force=True)
        out: sc.RolloutDetail = _rollout_out(s, r, detail=True)
        return out

    @app.post(f"{API}/rollouts/{{rollout_id}}/{{action}}", tags=["rollouts"])
    def rollout_action(rollout_id: sc.RowId, action: str, s: Db, p: Operator) -> sc.RolloutOut:
        """pause, resume or abort."""
        r = rollouts.act(s, p.name, _rollout(s, rollout_id), action)
        out: sc.RolloutOut = _rollout_out(s, r)
        return out

    @app.get(f"{API}/groups", tags=["policies"])
    def list_groups(s: Db, _p: Auditor) -> list[sc.GroupOut]:
        counts: dict[str, int] = dict(s.execute(
            select(Host.group, func.count()).where(Host.revoked.is_(False))
            .group_by(Host.group)).all())
        policies = {g.group: g for g in s.execute(select(GroupPolicy)).scalars()}
        out = []
        for g in sorted(set(counts) | set(policies)):
            gp = policies.get(g)
            r = rollouts.current(s, g)
            out.append(sc.GroupOut(
                group=g, hosts=int(counts.get(g, 0)),
                profiles=list(gp.profiles.get("profiles", [])) if gp else [],
                mode=gp.mode if gp else None,
                rollout=f"{r.id} {r.name} ({r.state})" if r else None))
        return out

    @app.put(f"{API}/groups/{{group}}/policy", tags=["policies"])
    def assign_policy(group: str, req: sc.PolicyRequest, s: Db, p: Operator) -> sc.GroupOut:
        rollouts.assign_policy(s, p.name, group, req.profiles, req.mode)
        return next(g for g in list_groups(s, p) if g.group == group)

    @app.get(f"{API}/compliance/report", tags=["policies"],
             responses={200: {"content": {"text/csv": {}, "text/html": {}}}})
    def compliance_report(s: Db, _p: Auditor, group: str | None = None,
                          host: str | None = None, profile: str | None = None,
                          format: Annotated[str, Query(pattern="^(csv|html)$")] = "csv",
                          ) -> Response:
        """Each host's newest result per profile, with the evidence of every failed check."""
        rows = reports.latest_results(s, group, host, profile)
        # Only safe characters reach the header (no quotes, line breaks or non-ASCII).
        name = "compliance-" + "".join(c if c.isascii() and (c.isalnum() or c in "-_.")
                                       else "_" for c in (host or group or "fleet")[:40])
        if format == "csv":
            return Response(reports.csv_report(rows), media_type="text/csv",
                            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
        return HTMLResponse(reports.html_report(rows, reports.report_title(rows, group, host)),
                            headers=web.REPORT_HEADERS)

    @app.get(f"{API}/compliance/history", tags=["policies"])
    def compliance_history(s: Db, _p: Auditor, group: str | None = None,
                           profile: str | None = None,
                           days: Annotated[int, Query(ge=1, le=366)] = 30,
                           ) -> list[dict[str, Any]]:
        """Per day and profile, the mean of each host's last score that day."""
        return reports.history(s, group, profile, days)

    return app
