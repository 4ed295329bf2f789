"""The fleet server as hosts and people use it: a real server process over HTTPS with mTLS,
on SQLite and on a real PostgreSQL server, and the agent's own enrollment and reporting code
on a host directory."""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import ssl
import urllib.error
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cerulean.agent import fleetlink
from cerulean.agent.audit import AuditLog
from cerulean.agent.compliance import STORE, PolicyStore
from cerulean.agent.policy import CheckResult, Report, RuleResult
from cerulean.errors import CeruleanError, VerificationError
from cerulean.fleet.ca import FleetCA
from support.fleet_server import Fleet, cli

pytestmark = pytest.mark.fleet


def host_root(tmp_path: Path, name: str) -> Path:
    """A host's files: dpkg's status database (this machine's) and a machine ID."""
    root = tmp_path / name
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy("/var/lib/dpkg/status", root / "var/lib/dpkg/status")
    (root / "etc/machine-id").write_text(f"{name}-machine\n")
    return root


def enroll(fleet: Fleet, root: Path, name: str, token: str | None = None) -> fleetlink.Link:
    fleetlink.enroll(fleet.url, token or fleet.enrollment_token(), fleet.ca_sha256, root=root,
                     hostname=name)
    return fleetlink.Link(root)


def test_a_host_enrolls_reports_and_shows_up_with_packages_alerts_and_compliance(
        fleet: Fleet, tmp_path: Path) -> None:
    root = host_root(tmp_path, "web-1")
    token = fleet.enrollment_token("web", uses=1, environment="cloud", region="eu-west")
    link = enroll(fleet, root, "web-1", token)
    host_id = link.enrollment.host_id
    # What the host has to say: an alert in its audit trail and a compliance result.
    log = AuditLog(root / "var/lib/cerulean/audit/audit.jsonl")
    log.append("guard", "alert.setuid-or-setgid-file",
               {"rule": "setuid-or-setgid-file", "priority": "critical", "tags": ["file"],
                "message": "/tmp/.x was made setuid", "time": 1764230000.0,
                "evidence": {"file.path": "/tmp/.x"}})
    store = PolicyStore(root / STORE)
    store.save(Report("cerulean-baseline", (
        CheckResult("ssh-root-login", "no root login", "passed",
                    (RuleResult("f:/etc/ssh", True, "ok"),), {}),
        CheckResult("ssh-x11", "no X11", "failed",
                    (RuleResult("f:/etc/ssh", False, "X11Forwarding yes"),), {}),
    )), "audit", 1764230100.0)
    store.close()

    r = fleetlink.sync(root, link)  # the system's host name: the real thing
    assert (r.delivered, r.failed, r.pending, r.error) == (5, 0, 0, "")
    assert r.queued == {"inventory": 1, "alert": 1, "audit": 1, "compliance": 1, "metrics": 1}

    status, page = fleet.api("GET", "/api/v1/hosts?environment=cloud")
    assert status == 200 and page["total"] == 1
    h = page["hosts"][0]
    # Enrolled as web-1; the inventory says what the host is called now.
    assert (h["id"], h["hostname"], h["group"]) == (host_id, socket.gethostname(), "web")
    assert h["labels"] == {"environment": "cloud", "region": "eu-west"}
    assert h["open_alerts"] == 1 and h["compliance"] == {"cerulean-baseline": 50.0}
    dpkg = fleetlink.packages(root)
    assert h["packages"] == len(dpkg) > 50
    assert fleet.api("GET", "/api/v1/hosts?environment=edge")[1]["total"] == 0
    assert fleet.api("GET", f"/api/v1/hosts?q={host_id[:8]}")[1]["total"] == 1
    assert fleet.api("GET", f"/api/v1/hosts?q={socket.gethostname()[1:]}")[1]["total"] == 1
    assert fleet.api("GET", "/api/v1/hosts?q=%25")[1]["total"] == 0  # no LIKE wildcards
    assert fleet.api("GET", f"/api/v1/hosts?package={dpkg[0][0]}")[1]["total"] == 1
    assert fleet.api("GET", "/api/v1/hosts?package=no-such-package")[1]["total"] == 0

    _, pkgs = fleet.api("GET", f"/api/v1/hosts/{host_id}/packages")
    assert [[p["name"], p["version"], p["arch"]] for p in pkgs] == dpkg
    _, alerts = fleet.api("GET", f"/api/v1/hosts/{host_id}/alerts")
    assert [(a["rule"], a["severity"], a["evidence"]) for a in alerts] == [
        ("setuid-or-setgid-file", "critical", {"file.path": "/tmp/.x"})]
    status, closed = fleet.api("POST", f"/api/v1/alerts/{alerts[0]['id']}/close")
    assert status == 200 and closed["status"] == "closed"
    assert fleet.api("GET", "/api/v1/hosts")[1]["hosts"][0]["open_alerts"] == 0
    _, comp = fleet.api("GET", f"/api/v1/hosts/{host_id}/compliance")
    assert [(c["profile"], c["score"], c["passed"], c["failed"]) for c in comp] == [
        ("cerulean-baseline", 50.0, 1, 1)]
    assert list(comp[0]["failures"]) == ["ssh-x11"]
    _, detail = fleet.api("GET", f"/api/v1/hosts/{host_id}")
    assert detail["audit_head"]["seq"] == 1 and detail["reports"] == 5
    assert detail["machine_id"] == "web-1-machine"

    # Nothing new: only metrics go; the alert is not sent again.
    r = fleetlink.sync(root, link)
    assert r.queued == {"inventory": 0, "alert": 0, "audit": 0, "compliance": 0, "metrics": 1}
    assert len(fleet.api("GET", f"/api/v1/hosts/{host_id}/alerts")[1]) == 1
    assert link.whoami()["reports"] == 6

    # The admin log has the token and the enrollment, and its chain holds.
    _, entries = fleet.api("GET", "/api/v1/audit")
    assert [e["action"] for e in entries] == ["user.created", "api-token.created",
                                              "enrollment-token.created", "host.enrolled",
                                              "alert.closed"]
    assert fleet.api("GET", "/api/v1/audit/verify")[1] == {"entries": 5, "ok": True,
                                                           "problem": None}


def test_a_batch_sent_twice_is_counted_once(fleet: Fleet, tmp_path: Path) -> None:
    root = host_root(tmp_path, "db-1")
    link = enroll(fleet, root, "db-1")
    box = link.outbox()
    for i in range(3):
        box.put("alert", {"rule": f"r{i}", "priority": "warning", "message": "m",
                          "time": 1764230000.0 + i})
    msgs = box.due()
    box.close()
    first = link.send(msgs, 0)
    again = link.send(msgs, 0)  # the acknowledgement was lost: the agent sends it again
    assert first == again == {m.id for m in msgs}
    host = link.enrollment.host_id
    assert len(fleet.api("GET", f"/api/v1/hosts/{host}/alerts")[1]) == 3
    assert fleet.api("GET", f"/api/v1/hosts/{host}")[1]["reports"] == 3


def _forged_cert(host_id: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate for *host_id* from a CA of the attacker's own."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Cerulean fleet CA")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id)]))
        .issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(hours=1))
        .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _client_ctx(fleet: Fleet, tmp_path: Path, cert_pem: bytes,
                key: ec.EllipticCurvePrivateKey) -> ssl.SSLContext:
    (tmp_path / "c.crt").write_bytes(cert_pem)
    (tmp_path / "c.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = fleet.ctx()
    ctx.load_cert_chain(tmp_path / "c.crt", tmp_path / "c.key")
    return ctx


def _refused_in_handshake(fleet: Fleet, ctx: ssl.SSLContext) -> bool:
    """No HTTP answer at all: the server ended the TLS handshake. (With TLS 1.3 the client
    learns it on its first read, as the server's alert or as a closed connection.)"""
    try:
        fleet.api("GET", "/api/v1/agent/self", token="", ctx=ctx)
    except (ssl.SSLError, http.client.RemoteDisconnected, ConnectionResetError):
        return True
    except urllib.error.URLError as e:
        return isinstance(e.reason, ssl.SSLError | ConnectionResetError)
    return False


def test_forged_expired_and_revoked_certificates_and_reused_tokens_are_refused(
        fleet: Fleet, tmp_path: Path) -> None:
    a_root, b_root = host_root(tmp_path, "a"), host_root(tmp_path, "b")
    token = fleet.enrollment_token("edge", uses=1)
    a = enroll(fleet, a_root, "edge-a", token)
    # The token is used up.
    with pytest.raises(CeruleanError, match="used up"):
        enroll(fleet, b_root, "edge-b", token)
    # A wrong CA hash stops enrollment before anything is sent.
    with pytest.raises(VerificationError, match="refusing to enroll"):
        fleetlink.enroll(fleet.url, fleet.enrollment_token(), "sha256:" + "0" * 64,
                         root=b_root)
    b = enroll(fleet, b_root, "edge-b")

    # A certificate for host a from another CA.
    key = ec.generate_private_key(ec.SECP256R1())
    assert _refused_in_handshake(fleet, _client_ctx(
        fleet, tmp_path, _forged_cert(a.enrollment.host_id, key), key))
    # An expired certificate from the fleet's own CA, for host a's key.
    ca = FleetCA.load(fleet.data)
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")])).sign(key, hashes.SHA256())
    old = ca.issue_host(csr.public_bytes(serialization.Encoding.PEM).decode(),
                        a.enrollment.host_id, timedelta(hours=1),
                        now=datetime.now(UTC) - timedelta(hours=3))
    assert _refused_in_handshake(fleet, _client_ctx(fleet, tmp_path, old.pem.encode(), key))
    # A certificate the fleet's CA signed but the server never issued (a stolen CA
    # signature is no identity).
    unknown = ca.issue_host(csr.public_bytes(serialization.Encoding.PEM).decode(),
                            a.enrollment.host_id, timedelta(hours=1))
    status, body = fleet.api("GET", "/api/v1/agent/self", token="",
                             ctx=_client_ctx(fleet, tmp_path, unknown.pem.encode(), key))
    assert status == 403 and "not issued by this fleet" in body["detail"]

    # A host is no admin: its certificate opens no admin endpoint, and it has no way to
    # name another host.
    for path in ("/api/v1/hosts", f"/api/v1/hosts/{b.enrollment.host_id}",
                 f"/api/v1/hosts/{b.enrollment.host_id}/packages"):
        assert fleet.api("GET", path, token="", ctx=a.ctx)[0] == 401
    assert a.whoami()["host_id"] == a.enrollment.host_id
    assert b.whoami()["host_id"] == b.enrollment.host_id

    # Revoked: the handshake still succeeds (TLS cannot know), the call does not.
    status, _ = fleet.api("POST", f"/api/v1/hosts/{a.enrollment.host_id}/revoke")
    assert status == 200
    with pytest.raises(CeruleanError, match="revoked"):
        a.whoami()
    assert b.whoami()["hostname"] == "edge-b"
    # Re-enrollment with a new token gives a new identity that works.
    a2 = enroll(fleet, a_root, "edge-a")
    assert a2.enrollment.host_id != a.enrollment.host_id
    assert a2.whoami()["hostname"] == "edge-a"
    # The old record goes when an operator deletes it, with all it reported.
    old = a.enrollment.host_id
    assert fleet.api("DELETE", f"/api/v1/hosts/{old}")[0] == 200
    assert fleet.api("GET", f"/api/v1/hosts/{old}")[0] == 404
    assert fleet.api("GET", "/api/v1/hosts")[1]["total"] == 2  # b and the new a


def test_renewal_gives_a_new_certificate_for_a_new_key(fleet: Fleet, tmp_path: Path) -> None:
    root = host_root(tmp_path, "r")
    link = enroll(fleet, root, "r-1")
    key_before = (root / "var/lib/cerulean/fleet/host.key").read_bytes()
    cert_before = (root / "var/lib/cerulean/fleet/host.crt").read_bytes()
    assert not link.renew_if_due()
    assert link.renew_if_due(now=datetime.now(UTC) + timedelta(hours=13))
    assert (root / "var/lib/cerulean/fleet/host.key").read_bytes() != key_before
    assert (root / "var/lib/cerulean/fleet/host.crt").read_bytes() != cert_before
    assert fleetlink.Link(root).whoami()["host_id"] == link.enrollment.host_id


def test_roles_decide_what_a_token_may_do(fleet: Fleet) -> None:
    def user(name: str, role: str) -> str:
        status, _ = fleet.api("POST", "/api/v1/users", {"name": name, "role": role})
        assert status == 201
        status, body = fleet.api("POST", "/api/v1/api-tokens", {"user": name, "role": role})
        assert status == 201
        return str(body["token"])

    auditor, operator = user("audrey", "auditor"), user("otto", "operator")
    token = {"group": "web", "uses": 1}
    assert fleet.api("GET", "/api/v1/hosts", token=auditor)[0] == 200
    assert fleet.api("POST", "/api/v1/enrollment-tokens", token, token=auditor)[0] == 403
    assert fleet.api("POST", "/api/v1/enrollment-tokens", token, token=operator)[0] == 201
    assert fleet.api("POST", "/api/v1/users", {"name": "x", "role": "admin"},
                     token=operator)[0] == 403
    # A token cannot be given more than its user has.
    status, body = fleet.api("POST", "/api/v1/api-tokens", {"user": "otto", "role": "admin"})
    assert status == 400 and "cannot be given the admin role" in body["detail"]
    assert fleet.api("GET", "/api/v1/hosts", token="cat_00000000_" + "x" * 43)[0] == 401
    assert fleet.api("GET", "/api/v1/hosts", token="")[0] == 401
    _, entries = fleet.api("GET", "/api/v1/audit", token=auditor)
    # (The first two: the admin and their token, made on the server's machine.)
    assert [(e["actor"], e["action"]) for e in entries][2:] == [
        ("root-admin", "user.created"), ("root-admin", "api-token.created"),
        ("root-admin", "user.created"), ("root-admin", "api-token.created"),
        ("otto", "enrollment-token.created")]


def test_the_audit_log_cannot_be_changed_in_the_database(fleet: Fleet) -> None:
    from sqlalchemy import text

    from cerulean.fleet.db import make_engine
    from cerulean.fleet.server import load_config

    engine = make_engine(load_config(fleet.data).database)
    try:
        for sql in ("UPDATE audit_log SET actor = 'someone-else'", "DELETE FROM audit_log"):
            with pytest.raises(Exception, match="append-only"), engine.begin() as c:
                c.execute(text(sql))
        with engine.begin() as c:
            assert c.execute(text("SELECT actor FROM audit_log")).scalars().all() == [
                "local:" + __import__("getpass").getuser()] * 2  # the admin and their token
    finally:
        engine.dispose()


def _answer_before_body(fleet: Fleet, path: str, ctx: ssl.SSLContext | None = None,
                        size: int = 100 << 20, **headers: str) -> tuple[int, dict[str, str]]:
    """Announce a body of *size* bytes and send none of it: only a server that decides
    without reading the body answers (status, headers); one that reads it times out."""
    host, port = fleet.url.removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx or fleet.ctx(),
                                       timeout=10)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(size))
        for k, v in headers.items():
            conn.putheader(k.replace("_", "-"), v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def test_nothing_but_enrollment_is_read_before_the_caller_is_known(
        fleet: Fleet, tmp_path: Path) -> None:
    # (Bodies each call would take: larger ones are refused for their size first.)
    assert _answer_before_body(fleet, "/api/v1/users", size=1000)[0] == 401
    assert _answer_before_body(fleet, "/api/v1/rollouts", size=1000,
                               Authorization="Bearer cat_x_y")[0] == 401
    assert _answer_before_body(fleet, "/api/v1/agent/reports", size=1000)[0] == 401
    # A certificate the fleet's CA signed but never issued to a host.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])).sign(key, hashes.SHA256())
    unknown = FleetCA.load(fleet.data).issue_host(
        csr.public_bytes(serialization.Encoding.PEM).decode(), "x", timedelta(hours=1))
    ctx = _client_ctx(fleet, tmp_path, unknown.pem.encode(), key)
    assert _answer_before_body(fleet, "/api/v1/agent/reports", ctx, size=1000)[0] == 403
    # The dashboard's forms without a session go to the login page.
    status, headers = _answer_before_body(fleet, "/rollouts", size=1000)
    assert status == 303 and headers["location"] == "/login"
    # Enrollment is the one call that reads its body first: it waits for it (when the
    # body it announces is one it would take).
    with pytest.raises(TimeoutError):
        _answer_before_body(fleet, "/api/v1/enroll", size=1000)


def _post_chunked(fleet: Fleet, path: str, total: int,
                  kind: str = "application/json", **headers: str) -> int:
    """POST *total* bytes of JSON-looking text in chunks, with no length announced; the
    status of the answer (the server may answer, and close, before all is sent)."""
    host, port = fleet.url.removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=fleet.ctx(), timeout=30)
    chunk = b"[" + b"1," * 8191 + b"1]"
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", kind)
        conn.putheader("Transfer-Encoding", "chunked")
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        sent = 0
        try:
            while sent < total:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: its answer is there to read
        return conn.getresponse().status
    finally:
        conn.close()


def test_every_call_bounds_the_body_it_reads(fleet: Fleet, tmp_path: Path) -> None:
    """One unauthenticated 192 MB enrollment took the server from 343 to 736 MB: a body
    larger than its call takes is refused, announced or not, enrollment first."""
    from cerulean.protocol.fleet import (
        MAX_BODY,
        MAX_ENROLL_BODY,
        MAX_REPORT_BYTES,
        MAX_REPORTS_BODY,
        REPORTS_PATH,
    )

    status, _ = _answer_before_body(fleet, "/api/v1/enroll")
    assert status == 413
    assert _answer_before_body(fleet, "/api/v1/enroll", size=MAX_ENROLL_BODY + 1)[0] == 413
    assert _post_chunked(fleet, "/api/v1/enroll", 10 * MAX_ENROLL_BODY) == 413
    assert _post_chunked(fleet, "/login", 10 * MAX_ENROLL_BODY,
                         "application/x-www-form-urlencoded") == 413
    # A person's call: past MAX_BODY, whether or not its length is said.
    assert _post_chunked(fleet, "/api/v1/rollouts", 2 * MAX_BODY,
                         Authorization=f"Bearer {fleet.admin}") == 413
    status, body = fleet.api("POST", "/api/v1/rollouts", {"name": "x" * (2 * MAX_BODY)})
    assert status == 413 and "larger than this call takes" in body["detail"], body
    # A host's batch: the largest report an agent queues still goes; more does not.
    link = enroll(fleet, host_root(tmp_path, "big-1"), "big-1")
    host_id = link.enrollment.host_id
    n = (MAX_REPORT_BYTES - 64) // 32
    report = {"id": f"{host_id}:1:1", "kind": "metrics", "created": 1764230000.0,
              "body": {f"cerulean_m_{i:012d}": 1.0 for i in range(n)}}
    ack = link.call(REPORTS_PATH, {"reports": [report], "dropped": 0})
    assert isinstance(ack, dict)  # answered (taken or rejected on its merits), not 413
    report["id"] = f"{host_id}:1:2"
    report["body"] = {"pad": "a" * MAX_REPORTS_BODY}
    with pytest.raises(fleetlink.FleetLinkError, match="larger than this call takes"):
        link.call(REPORTS_PATH, {"reports": [report], "dropped": 0})
    # What was refused cost the server nothing it keeps: it still answers.
    assert fleet.api("GET", "/api/v1/health", token="")[0] == 200


def _log_in(fleet: Fleet, name: str, password: str, forwarded: str = "") -> str:
    """The login page's answer: 'in' (a session), or the error it shows."""
    host, port = fleet.url.removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=fleet.ctx(), timeout=30)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if forwarded:
        headers["X-Forwarded-For"] = forwarded
    try:
        conn.request("POST", "/login", urllib.parse.urlencode(
            {"name": name, "password": password}), headers)
        r = conn.getresponse()
        body = r.read().decode()
        if r.status == 303 and "cerulean_session=" in (r.getheader("set-cookie") or ""):
            return "in"
        m = re.search(r'role="alert">([^<]*)<', body)
        return m[1] if m else f"HTTP {r.status}"
    finally:
        conn.close()


def test_failed_logins_are_throttled_across_restarts(fleet: Fleet) -> None:
    password = "correct horse battery staple"
    cli("fleet", "user", "add", "olga", "--role", "operator", "--password-stdin",
        "--data", str(fleet.data), stdin=password + "\n")
    assert _log_in(fleet, "olga", password) == "in"
    for i in range(3):  # what a header says of the client's address changes nothing
        assert _log_in(fleet, "olga", "wrong", forwarded=f"203.0.113.{i}") == \
            "Wrong name or password."
    # Another server process (here: the same one, restarted) counts the same failures.
    fleet.kill_and_restart()
    for _ in range(2):
        assert _log_in(fleet, "olga", "wrong") == "Wrong name or password."
    assert _log_in(fleet, "olga", password) == "Too many failed logins from here: wait 5 minutes."
    # Other names are not held up.
    assert _log_in(fleet, "nobody", "x") == "Wrong name or password."
    assert _log_in(fleet, "no\0body", "x") == "Wrong name or password."  # not a 500
    # Logins, good and failed, are in the audit log, with where they came from.
    status, entries = fleet.api("GET", "/api/v1/audit?limit=100")
    assert status == 200
    seen = [(e["action"], e["detail"].get("name", e["actor"]), e["detail"]["source"])
            for e in entries if e["action"].startswith("login")]
    assert ("login", "olga", "127.0.0.1") in seen
    assert seen.count(("login.failed", "olga", "127.0.0.1")) == 5
    assert ("login.failed", "nobody", "127.0.0.1") in seen
    assert ("login.failed", "(not a user name)", "127.0.0.1") in seen


def test_texts_no_database_can_hold_and_the_fleets_own_rules_are_refused(
        fleet: Fleet, tmp_path: Path) -> None:
    """A hostile host sends what its agent never would: each such report is rejected
    with its reason, the rest of the batch is stored, and the server answers (no 500)."""
    link = enroll(fleet, host_root(tmp_path, "web-9"), "web-9")
    host = link.enrollment.host_id
    alert = {"priority": "critical", "message": "m", "time": 1764230000.0}
    bodies = {
        "fleet-rule": {**alert, "rule": "fleet.audit-trail-rewritten"},
        "look-alike": {**alert, "rule": "\u200bＦleet\u2024audit-trail-rewritten"},
        "nul": {**alert, "rule": "r", "message": "a\x00b"},
        "surrogate-key": {**alert, "rule": "r", "evidence": {"\ud800": "x"}},
        "surrogate-deep": {**alert, "rule": "r", "evidence": {"a": [{"b": "\udfff"}]}},
        "good": {**alert, "rule": "fine"},
    }
    reports = [{"id": f"{host}:1:{i}", "kind": "alert", "created": 1764230000.0 + i,
                "body": body} for i, body in enumerate(bodies.values())]
    ack = link.call(fleetlink.REPORTS_PATH, {"reports": reports, "dropped": 0})
    assert ack["acknowledged"] == [f"{host}:1:5"]
    reasons = {r["id"].rsplit(":", 1)[1]: r["reason"] for r in ack["rejected"]}
    assert reasons["0"] == reasons["1"] == "rule names starting 'fleet.' are the fleet's own"
    assert reasons["2"] == "a text holds a NUL character"
    assert "lone UTF-16 surrogate" in reasons["3"] and "lone UTF-16 surrogate" in reasons["4"]
    assert [a["rule"] for a in fleet.api("GET", f"/api/v1/hosts/{host}/alerts")[1]] == ["fine"]


def test_numbers_json_allows_and_no_column_holds_are_refused_not_500(
        fleet: Fleet, tmp_path: Path) -> None:
    """NaN and 1e999 (infinity) in any body, a time past the year 9999, a count past 64
    bits: each was a 500. A report carrying one is rejected with its reason (an alert's
    own time out of range falls back to when the report was made), a batch whose count
    is out of range is a 400, and the server goes on answering."""
    link = enroll(fleet, host_root(tmp_path, "web-8"), "web-8")
    host = link.enrollment.host_id
    alert = {"priority": "critical", "message": "m", "time": 1764230000.0, "rule": "r"}
    bodies = [
        {**alert, "evidence": {"x": float("nan")}},
        {**alert, "evidence": {"x": [float("inf")]}},
        {**alert, "time": float("-inf")},
        {**alert, "rule": "far", "time": 1e308},  # finite: the report's time stands in
        {**alert, "rule": "fine"},
    ]
    reports = [{"id": f"{host}:1:{i}", "kind": "alert", "created": 1764230000.0 + i,
                "body": body} for i, body in enumerate(bodies)]
    reports += [{**reports[4], "id": f"{host}:1:5", "created": 1e308},
                {**reports[4], "id": f"{host}:1:6", "created": float("nan")}]
    ack = link.call(fleetlink.REPORTS_PATH, {"reports": reports, "dropped": 0})
    assert ack["acknowledged"] == [f"{host}:1:3", f"{host}:1:4"], ack
    reasons = {r["id"].rsplit(":", 1)[1]: r["reason"] for r in ack["rejected"]}
    assert reasons["0"] == reasons["1"] == reasons["2"] == (
        "a number is not finite (NaN or infinity)")
    assert reasons["5"].startswith("'created' is not a time") and reasons["6"] == reasons["5"]
    alerts = {a["rule"]: a for a in fleet.api("GET", f"/api/v1/hosts/{host}/alerts")[1]}
    assert alerts["far"]["time"].startswith("2025-11-27T"), alerts["far"]
    with pytest.raises(fleetlink.FleetLinkError, match="'dropped' must be a count"):
        link.call(fleetlink.REPORTS_PATH, {"reports": [], "dropped": 10**40})
    status, body = fleet.api("POST", "/api/v1/enroll", {
        "token": "cet_00000000_" + "a" * 32, "csr": "x", "hostname": "h",
        "machine_id": float("nan")}, token="")
    assert 400 <= status < 500, (status, body)
    assert fleet.api("GET", "/api/v1/health", token="")[0] == 200


def test_a_host_renames_itself_only_to_a_host_name(fleet: Fleet, tmp_path: Path) -> None:
    """A host could rename itself to anything through its inventory: only what
    enrollment takes as a host name is taken (the rest of the inventory is rejected
    with it; the name shown stays)."""
    link = enroll(fleet, host_root(tmp_path, "web-7"), "web-7")
    host = link.enrollment.host_id
    inventory = {"packages": [["bash", "5.2", "amd64"]], "arch": "amd64"}
    bad = ["<b>web-1</b>", "web 1", "ｗeb-1", "-web", "a" * 254, ""]
    reports = [{"id": f"{host}:1:{i}", "kind": "inventory", "created": 1764230000.0 + i,
                "body": {**inventory, "hostname": name}} for i, name in enumerate(bad)]
    reports.append({"id": f"{host}:1:9", "kind": "inventory", "created": 1764230100.0,
                    "body": {**inventory, "hostname": "web-7.example.org"}})
    ack = link.call(fleetlink.REPORTS_PATH, {"reports": reports, "dropped": 0})
    assert ack["acknowledged"] == [f"{host}:1:9"], ack
    assert {r["reason"] for r in ack["rejected"]} == {
        "'hostname' is not a host name (letters, digits, dots and hyphens)",
        "'hostname' must be a text of at most 253 characters"}
    assert fleet.api("GET", f"/api/v1/hosts/{host}")[1]["hostname"] == "web-7.example.org"


def test_every_answer_asks_for_tls_and_the_login_page_shows_no_words_from_links(
        fleet: Fleet) -> None:
    host, port = fleet.url.removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=fleet.ctx(), timeout=30)
    try:
        for path, status in (("/api/v1/health", 200), ("/api/v1/hosts", 401),
                             ("/login?error=Your+account+is+locked%3A+call+%2B1+555+0100",
                              200)):
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read().decode()
            assert r.status == status, path
            assert r.getheader("strict-transport-security") == "max-age=31536000", path
        assert "account is locked" not in body and "role=\"alert\"" not in body
        assert "default-src 'none'" in (r.getheader("content-security-policy") or "")
    finally:
        conn.close()
    req = urllib.request.Request(fleet.url + "/api/v1/compliance/report?format=html",
                                 headers={"Authorization": f"Bearer {fleet.admin}"})
    with urllib.request.urlopen(req, context=fleet.ctx()) as resp:
        policy = resp.headers["Content-Security-Policy"]
    assert policy.startswith("default-src 'none'; style-src 'sha256-")
