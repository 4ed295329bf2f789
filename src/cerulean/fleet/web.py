"""The web dashboard: server-made HTML pages over the same queries as the API.

People log in with a name and password (``cerulean fleet user add --password-stdin``).
The session is a signed cookie (HMAC-SHA256 with a key kept in the database, so
every replica accepts it), ``HttpOnly``, ``Secure`` and ``SameSite=Strict``, and
valid for 12 hours. Each request checks that the user still exists and is not
disabled. Every form that changes something carries a token derived from the
session, which the server checks. The pages need no script and load nothing from
elsewhere: the one stylesheet is served by the server.

After five failed logins for one name within five minutes, that name is refused
for five minutes. The failures are kept in the database, so replicas count them
together.
"""

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from cerulean import __version__
from cerulean.errors import CeruleanError
from cerulean.fleet import queries, releases, reports, rollouts
from cerulean.fleet import schemas as sc
from cerulean.fleet.auth import (
    MIN_PASSWORD,
    ROLES,
    AuthError,
    Principal,
    add_user,
    audit,
    check_password,
    check_username,
    hash_password,
    issue_token,
    verify_audit,
)
from cerulean.fleet.db import (
    Alert,
    AuditEntry,
    ComplianceResult,
    EnrollmentToken,
    GroupPolicy,
    Host,
    LoginFailure,
    Package,
    Rollout,
    Setting,
    User,
)
from cerulean.fleet.hosts import ENVIRONMENTS, Invalid, create_enrollment_token, enroll_command
from cerulean.protocol.update import CHANNELS

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "cerulean_session"
SESSION_SECONDS = 12 * 3600
# Failed logins: a name from one address is refused after THROTTLE_FAILURES of them, an
# address (whatever names it tries) after THROTTLE_SOURCE_FAILURES, for THROTTLE_SECONDS,
# doubled for every further THROTTLE_FAILURES failures within THROTTLE_MEMORY (at most
# that long). A name is never refused as such: another address still logs in.
THROTTLE_FAILURES, THROTTLE_SOURCE_FAILURES, THROTTLE_SECONDS = 5, 20, 300
THROTTLE_MEMORY = 86_400
ERROR_SECONDS = 300  # how long an error link (_said) shows its text
# Checked against when the name is unknown, disabled or has no password: every failed
# login costs the same work, so that the time of the answer does not tell names apart.
_NO_PASSWORD = hash_password(secrets.token_hex(16))


# Every HTML answer: what it may load (its own style sheet; the compliance report's
# styles are inline in its <head>, hashed below), and nothing that frames or caches it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' "
                               "data:; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store"}
# The compliance report stands alone (a file to keep): its one inline style sheet only.
REPORT_HEADERS = {**PAGE_HEADERS, "Content-Security-Policy": (
    f"default-src 'none'; style-src '{reports.STYLE_HASH}'; frame-ancestors 'none'")}

class LoginRequired(Exception):
    pass


def _said(s: Session, path: str, user: str, error: str) -> RedirectResponse:
    """Back to *path*, showing *error* to *user*: signed with the page, the user and a
    time (ERROR_SECONDS from now), so that no link from elsewhere, nor one kept or
    passed on, can put its own words on the server's pages."""
    until = int(time.time()) + ERROR_SECONDS
    sig = _error_sig(s, path, user, until, error)
    return RedirectResponse(f"{path}?" + urlencode(
        {"error": error, "until": until, "sig": sig}), 303)


def _error_sig(s: Session, path: str, user: str, until: int, error: str) -> str:
    text = "\0".join(("error", path, user, str(until), error))
    return hmac.new(_key(s), text.encode(), "sha256").hexdigest()


def _shown(s: Session, request: Request, user: str, error: str, until: int,
           sig: str) -> str:
    """*error* if the server said it to *user* on this page, lately (see _said)."""
    if not error or until < time.time():
        return ""
    good = _error_sig(s, request.url.path, user, until, error)
    return error[:300] if hmac.compare_digest(sig, good) else ""


def _key(s: Session) -> bytes:
    row = s.get(Setting, "session-key")
    if row is None:
        s.add(Setting(name="session-key", value=secrets.token_hex(32)))
        s.flush()
        row = s.get(Setting, "session-key")
        assert row is not None
    return bytes.fromhex(row.value)


def _sign(key: bytes, data: str) -> str:
    return hmac.new(key, data.encode(), hashlib.sha256).hexdigest()


def make_cookie(key: bytes, user: str, now: float) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(
        {"u": user, "exp": int(now) + SESSION_SECONDS}).encode()).decode()
    return f"{payload}.{_sign(key, payload)}"


def read_cookie(key: bytes, cookie: str, now: float) -> str | None:
    payload, _, sig = cookie.partition(".")
    if not hmac.compare_digest(_sign(key, payload), sig):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(payload.encode()))
    except (ValueError, TypeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("exp"), int) \
            or data["exp"] < now or not isinstance(data.get("u"), str):
        return None
    return str(data["u"])


def csrf_token(key: bytes, cookie: str) -> str:
    return _sign(key, "csrf:" + cookie)[:32]


def _refused_until(s: Session, where: Any, threshold: int, now: datetime) -> datetime | None:
    """Until when the failures matching *where* refuse a login (None: they do not)."""
    since = now - timedelta(seconds=THROTTLE_MEMORY)
    n, last = s.execute(select(func.count(), func.max(LoginFailure.time)).where(
        where, LoginFailure.time > since)).one()
    if int(n) < threshold or last is None:
        return None
    if last.tzinfo is None:  # SQLite keeps no zone: these are UTC
        last = last.replace(tzinfo=UTC)
    doublings = (int(n) - threshold) // THROTTLE_FAILURES
    wait = min(THROTTLE_SECONDS * 2 ** min(doublings, 20), THROTTLE_MEMORY)
    until: datetime = last + timedelta(seconds=wait)
    return until if until > now else None


def _source(host: str) -> str:
    """Where a login comes from, as the throttle counts it: the address, or for IPv6
    its /64 (one machine may hold all of one)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


def _throttled(s: Session, name: str, source: str, now: datetime) -> datetime | None:
    """Until when a login of *name* from *source* is refused (None: it is not)."""
    pair = _refused_until(s, (LoginFailure.name == name) & (LoginFailure.source == source),
                          THROTTLE_FAILURES, now)
    anyone = _refused_until(s, LoginFailure.source == source, THROTTLE_SOURCE_FAILURES, now)
    return max((t for t in (pair, anyone) if t is not None), default=None)


def _failed(s: Session, name: str, source: str, now: datetime) -> None:
    # Failures older than the throttle remembers count for no one: they go as new ones come.
    s.execute(delete(LoginFailure).where(
        LoginFailure.time <= now - timedelta(seconds=THROTTLE_MEMORY)))
    s.add(LoginFailure(name=name, source=source, time=now))


def router(Db: Any, update_repo: releases.Source | None = None, public_url: str = "",
           ca_sha256: str = "") -> APIRouter:
    """The pages; *Db* is the API's session dependency (one limit for both)."""
    r = APIRouter(include_in_schema=False)
    env = reports.templates()

    def viewer(request: Request) -> Principal:
        # The gate (cerulean.fleet.gate) checked the cookie and the user before the request
        # got here; it found the form token as well.
        c = getattr(request.state, "caller", None)
        if c is None or c.principal is None:
            raise LoginRequired()
        request.state.csrf = c.csrf
        who: Principal = c.principal
        return who

    Viewer = Annotated[Principal, Depends(viewer)]

    def page(request: Request, template: str, who: Principal | None, **ctx: Any) -> HTMLResponse:
        html = env.get_template(template).render(
            request=request, who=who, csrf=getattr(request.state, "csrf", ""),
            version=__version__, now=datetime.now(UTC), **ctx)
        return HTMLResponse(html, headers=PAGE_HEADERS)

    def check_form(request: Request, token: str, who: Principal, role: str) -> None:
        if not hmac.compare_digest(token, getattr(request.state, "csrf", "")):
            raise Invalid("The form is out of date; reload the page and try again.")
        if not who.can(role):
            raise Invalid(f"This needs the {role} role; you have {who.role}.")

    @r.get("/static/style.css")
    def style() -> Response:
        return Response((STATIC / "style.css").read_bytes(), media_type="text/css",
                        headers={"Cache-Control": "max-age=3600"})

    @r.get("/login")
    def login_form(request: Request) -> HTMLResponse:
        # No error from the link: only the server's own answers show one.
        return page(request, "login.html", None, error="")

    @r.post("/login")
    def login(request: Request, s: Db, name: Annotated[str, Form(max_length=64)],
              password: Annotated[str, Form(max_length=1024)]) -> Response:
        now = datetime.now(UTC)
        source = _source(request.client.host if request.client else "")
        try:
            name = check_username(name)
        except AuthError:
            name = "(not a user name)"  # never a user's (and no NUL reaches the database)
        until = _throttled(s, name, source, now)
        if until is not None:
            wait = max(1, round((until - now).total_seconds() / 60))
            return page(request, "login.html", None,
                        error=f"Too many failed logins from here: wait {wait} minutes.")
        user = s.get(User, name)
        usable = user is not None and not user.disabled and bool(user.password_hash)
        # The same work whether or not the name is a user's (see _NO_PASSWORD).
        good = check_password(password, user.password_hash if usable and user is not None
                              else _NO_PASSWORD) and usable
        if not good:
            _failed(s, name, source, now)
            audit(s, "login", "login.failed", {"name": name, "source": source})
            return page(request, "login.html", None, error="Wrong name or password.")
        s.execute(delete(LoginFailure).where(LoginFailure.name == name,
                                             LoginFailure.source == source))
        audit(s, name, "login", {"source": source})
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, make_cookie(_key(s), name, now.timestamp()),
                        max_age=SESSION_SECONDS,
                        httponly=True, secure=True, samesite="strict")
        return resp

    @r.post("/logout")
    def logout() -> Response:
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    @r.get("/")
    def overview(request: Request, s: Db, who: Viewer) -> HTMLResponse:
        now = datetime.now(UTC)
        active = list(s.execute(select(Rollout).where(Rollout.state.in_(rollouts.ACTIVE))
                                .order_by(Rollout.id.desc())).scalars())
        return page(request, "overview.html", who, o=queries.overview(s, now),
                    active=[(ro, rollouts.progress(s, ro, now)) for ro in active])

    @r.get("/hosts")
    def hosts(request: Request, s: Db, who: Viewer,
              q: Annotated[str, Query(max_length=200)] = "",
              group: Annotated[str, Query(max_length=64)] = "",
              environment: Annotated[str, Query(max_length=64)] = "",
              package: Annotated[str, Query(max_length=128)] = "",
              offset: sc.Offset = 0) -> HTMLResponse:
        f = queries.HostFilter(group or None, environment or None, None, q or None,
                               package or None)
        rows = queries.summaries(s, queries.find_hosts(s, f, 100, offset))
        groups = sorted({g for g in s.execute(select(Host.group).distinct()).scalars()})
        params = {k: v for k, v in (("q", q), ("group", group), ("environment", environment),
                                    ("package", package)) if v}
        return page(request, "hosts.html", who, rows=rows, total=queries.count_hosts(s, f),
                    offset=offset, groups=groups, f=params,
                    more=urlencode({**params, "offset": offset + 100}))

    @r.get("/hosts/{host_id}")
    def host(request: Request, host_id: str, s: Db, who: Viewer) -> HTMLResponse:
        h = s.get(Host, host_id)
        if h is None:
            return page(request, "missing.html", who, what=f"host {host_id}")
        pkgs = list(s.execute(select(Package).where(Package.host_id == host_id)
                              .order_by(Package.name)).scalars())
        alerts = list(s.execute(select(Alert).where(Alert.host_id == host_id)
                                .order_by(Alert.time.desc()).limit(50)).scalars())
        results = list(s.execute(select(ComplianceResult)
                                 .where(ComplianceResult.host_id == host_id)
                                 .order_by(ComplianceResult.time.desc()).limit(200)).scalars())
        latest: dict[str, ComplianceResult] = {}
        for res in results:
            latest.setdefault(res.profile, res)
        ro = rollouts.current(s, h.group)
        state = rollouts.host_state(ro, h, datetime.now(UTC)) if ro else None
        return page(request, "host.html", who, h=h, summary=queries.summaries(s, [h])[0],
                    packages=pkgs, alerts=alerts, latest=latest,
                    trend=_trend(results), rollout=ro, rollout_state=state,
                    release_cves=releases.release_cves(update_repo, h.update))

    @r.get("/rollouts")
    def rollouts_page(request: Request, s: Db, who: Viewer, error: str = "",
                      until: int = 0, sig: str = "") -> HTMLResponse:
        error = _shown(s, request, who.name, error, until, sig)
        rows = list(s.execute(select(Rollout).order_by(Rollout.id.desc()).limit(100)).scalars())
        groups = sorted({g for g in s.execute(select(Host.group).distinct()).scalars()})
        offered: list[Any] = []
        if update_repo is not None:
            try:
                offered = releases.offered(update_repo)
            except CeruleanError as e:
                error = error or str(e)
        return page(request, "rollouts.html", who, rows=[
            (ro, rollouts.progress(s, ro)) for ro in rows], groups=groups, channels=CHANNELS,
            releases=offered, error=error[:300])

    @r.post("/rollouts")
    def start_rollout(request: Request, s: Db, who: Viewer,
                      csrf: Annotated[str, Form()], name: Annotated[str, Form()],
                      group: Annotated[str, Form()], channel: Annotated[str, Form()],
                      target: Annotated[str, Form()] = "",
                      waves: Annotated[str, Form()] = "10,50,100",
                      soak_minutes: Annotated[int, Form()] = 30,
                      max_failure_percent: Annotated[float, Form()] = 10.0,
                      window: Annotated[str, Form()] = "") -> Response:
        try:
            check_form(request, csrf, who, "operator")
            try:
                wave_list = [int(w) for w in waves.replace(" ", "").split(",") if w]
            except ValueError as e:
                raise Invalid("Waves are percentages separated by commas, such as "
                              "10,50,100.") from e
            if update_repo is not None:
                releases.check_target(update_repo, channel, target.strip())
            ro = rollouts.create(s, who.name, name=name, group=group, channel=channel,
                                 target=target.strip(), waves=wave_list,
                                 soak_minutes=soak_minutes,
                                 max_failure_percent=max_failure_percent, window=window)
        except CeruleanError as e:
            return _said(s, "/rollouts", who.name, str(e))
        return RedirectResponse(f"/rollouts/{ro.id}", status_code=303)

    @r.get("/rollouts/{rollout_id}")
    def rollout(request: Request, rollout_id: sc.RowId, s: Db, who: Viewer,
                error: str = "", until: int = 0, sig: str = "") -> HTMLResponse:
        ro = s.get(Rollout, rollout_id)
        if ro is None:
            return page(request, "missing.html", who, what=f"rollout {rollout_id}")
        rollouts.evaluate(s, ro, force=True)
        return page(request, "rollout.html", who, r=ro, p=rollouts.progress(s, ro),
                    error=_shown(s, request, who.name, error, until, sig))

    @r.post("/rollouts/{rollout_id}/{action}")
    def rollout_action(request: Request, rollout_id: sc.RowId, action: str, s: Db, who: Viewer,
                       csrf: Annotated[str, Form()]) -> Response:
        ro = s.get(Rollout, rollout_id)
        if ro is None:
            return RedirectResponse("/rollouts", status_code=303)
        try:
            check_form(request, csrf, who, "operator")
            rollouts.act(s, who.name, ro, action)
        except Invalid as e:
            return _said(s, f"/rollouts/{rollout_id}", who.name, str(e))
        return RedirectResponse(f"/rollouts/{rollout_id}", status_code=303)

    @r.get("/policies")
    def policies(request: Request, s: Db, who: Viewer, error: str = "",
                 until: int = 0, sig: str = "") -> HTMLResponse:
        error = _shown(s, request, who.name, error, until, sig)
        groups = sorted({g for g in s.execute(select(Host.group).distinct()).scalars()})
        assigned = {g.group: g for g in s.execute(select(GroupPolicy)).scalars()}
        hist = reports.history(s, None, None, 30)
        return page(request, "policies.html", who, groups=groups, assigned=assigned,
                    history=hist, modes=rollouts.MODES, error=error[:300])

    @r.post("/policies")
    def assign(request: Request, s: Db, who: Viewer, csrf: Annotated[str, Form()],
               group: Annotated[str, Form()], profiles: Annotated[str, Form()],
               mode: Annotated[str, Form()]) -> Response:
        try:
            check_form(request, csrf, who, "operator")
            rollouts.assign_policy(s, who.name, group,
                                   [p for p in profiles.replace(",", " ").split() if p], mode)
        except Invalid as e:
            return _said(s, "/policies", who.name, str(e))
        return RedirectResponse("/policies", status_code=303)

    @r.get("/compliance/report")
    def report(s: Db, who: Viewer, group: str = "", host: str = "",
               format: Annotated[str, Query(pattern="^(csv|html)$")] = "html") -> Response:
        rows = reports.latest_results(s, group or None, host or None)
        if format == "csv":
            return Response(reports.csv_report(rows), media_type="text/csv", headers={
                "Content-Disposition": 'attachment; filename="compliance.csv"'})
        return HTMLResponse(reports.html_report(
            rows, reports.report_title(rows, group or None, host or None)),
            headers=REPORT_HEADERS)

    def access_page(request: Request, s: Db, who: Principal, error: str = "",
                    made: dict[str, str] | None = None) -> HTMLResponse:
        tokens = list(s.execute(select(EnrollmentToken)
                                .order_by(EnrollmentToken.created_at.desc()).limit(100))
                      .scalars())
        users = list(s.execute(select(User).order_by(User.name)).scalars()) \
            if who.can("admin") else []
        groups = sorted({g for g in s.execute(select(Host.group).distinct()).scalars()})
        return page(request, "access.html", who, tokens=tokens, users=users, groups=groups,
                    roles=ROLES, environments=ENVIRONMENTS, min_password=MIN_PASSWORD,
                    error=error[:300], made=made)

    @r.get("/access")
    def access(request: Request, s: Db, who: Viewer, error: str = "",
               until: int = 0, sig: str = "") -> HTMLResponse:
        return access_page(request, s, who, _shown(s, request, who.name, error, until, sig))

    @r.post("/access/enrollment-tokens")
    def new_enrollment_token(request: Request, s: Db, who: Viewer,
                             csrf: Annotated[str, Form()],
                             group: Annotated[str, Form(max_length=64)],
                             environment: Annotated[str, Form(max_length=16)] = "",
                             region: Annotated[str, Form(max_length=64)] = "",
                             uses: Annotated[int, Form()] = 1,
                             hours: Annotated[float, Form()] = 24.0) -> Response:
        try:
            check_form(request, csrf, who, "operator")
            if not 0 < hours <= 24 * 365:
                raise Invalid("A token is valid for more than 0 and at most 8760 hours.")
            labels = {k: v for k, v in (("environment", environment), ("region", region)) if v}
            t = create_enrollment_token(s, who.name, group.strip(), labels, uses,
                                        timedelta(hours=hours))
        except CeruleanError as e:
            return _said(s, "/access", who.name, str(e))
        return access_page(request, s, who, made={
            "what": f"Enrollment token {t.id} for {uses} host(s) of group {group.strip()}",
            "secret": t.token, "command": enroll_command(public_url, t.token, ca_sha256)})

    @r.post("/access/users")
    def new_user(request: Request, s: Db, who: Viewer, csrf: Annotated[str, Form()],
                 name: Annotated[str, Form(max_length=64)],
                 role: Annotated[str, Form(max_length=16)],
                 password: Annotated[str, Form(max_length=1024)] = "") -> Response:
        try:
            check_form(request, csrf, who, "admin")
            add_user(s, who.name, name.strip(), role, password)
        except CeruleanError as e:
            return _said(s, "/access", who.name, str(e))
        return RedirectResponse("/access", status_code=303)

    @r.post("/access/api-tokens")
    def new_api_token(request: Request, s: Db, who: Viewer, csrf: Annotated[str, Form()],
                      user: Annotated[str, Form(max_length=64)],
                      role: Annotated[str, Form(max_length=16)],
                      days: Annotated[str, Form(max_length=8)] = "",
                      description: Annotated[str, Form(max_length=200)] = "") -> Response:
        try:
            check_form(request, csrf, who, "admin")
            try:
                lifetime = float(days) if days.strip() else None
            except ValueError as e:
                raise Invalid("'days' must be a number of days.") from e
            token = issue_token(s, who.name, user, role, description, lifetime)
        except CeruleanError as e:
            return _said(s, "/access", who.name, str(e))
        return access_page(request, s, who, made={
            "what": f"API token for {user} ({role})", "secret": token, "command": ""})

    @r.get("/audit")
    def audit_page(request: Request, s: Db, who: Viewer,
                   before: sc.Offset = 0, verify: bool = False) -> HTMLResponse:
        stmt = select(AuditEntry).order_by(AuditEntry.seq.desc()).limit(100)
        if before:
            stmt = stmt.where(AuditEntry.seq < before)
        rows = list(s.execute(stmt).scalars())
        # Checking the chain reads the whole log: only when asked.
        n, problem = verify_audit(s) if verify else (0, None)
        return page(request, "audit.html", who, rows=rows, entries=n, problem=problem,
                    verified=verify)

    return r


def _trend(results: list[ComplianceResult]) -> dict[str, str]:
    """profile → SVG polyline points of its scores, oldest first (0..100 over 200x40)."""
    by: dict[str, list[float]] = {}
    for res in reversed(results):
        by.setdefault(res.profile, []).append(res.score)
    out = {}
    for profile, scores in by.items():
        scores = scores[-50:]
        if len(scores) < 2:
            continue
        step = 200 / (len(scores) - 1)
        out[profile] = " ".join(f"{i * step:.1f},{40 - s * 0.4:.1f}"
                                for i, s in enumerate(scores))
    return out
