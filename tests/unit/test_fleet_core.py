"""The fleet's parts without a server: CA, tokens and passwords, report ingestion, settings."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from cerulean.agent.fleetlink import check_server, packages
from cerulean.agent.outbox import PRIORITY, Outbox
from cerulean.fleet import hosts as hostsvc
from cerulean.fleet.auth import (
    audit,
    check_password,
    create_token,
    hash_password,
    token_principal,
    verify_audit,
)
from cerulean.fleet.ca import CAError, FleetCA
from cerulean.fleet.db import Alert, Host, Package, User, make_engine, migrate, sessions
from cerulean.fleet.ingest import ingest
from cerulean.fleet.server import FleetConfigError, check_settings, init, load_config
from cerulean.protocol.fleet import REPORT_KINDS, EnrollRequest, Report, ReportBatch


def csr_for(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str = "h") -> str:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA.create(tmp_path / "ca")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrate(engine)
    with sessions(engine).begin() as s:
        yield s
    engine.dispose()


def test_host_certificates_name_the_host_and_allow_client_authentication_only(
        ca: FleetCA) -> None:
    issued = ca.issue_host(csr_for(ec.generate_private_key(ec.SECP256R1()), "evil-admin"),
                           "2b1e8a6c-0000-4000-8000-000000000001", timedelta(hours=2))
    cert = x509.load_pem_x509_certificate(issued.pem.encode())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "2b1e8a6c-0000-4000-8000-000000000001"  # not what the request asked for
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued.not_after - issued.not_before == timedelta(hours=2, minutes=5)
    cert.verify_directly_issued_by(ca.cert)


def test_bad_signing_requests_are_refused(ca: FleetCA) -> None:
    with pytest.raises(CAError, match="not a PEM CSR"):
        ca.issue_host("hello", "h", timedelta(hours=1))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CAError, match="1024 bits"):
        ca.issue_host(csr_for(weak), "h", timedelta(hours=1))
    odd = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(CAError, match="secp256k1"):
        ca.issue_host(csr_for(odd), "h", timedelta(hours=1))
    # A request whose signature was made by another key.
    pem = csr_for(ec.generate_private_key(ec.SECP256R1()))
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(
        serialization.Encoding.DER))
    der[-5] ^= 1
    broken = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CAError, match="signature does not verify"):
        ca.issue_host(broken.decode(), "h", timedelta(hours=1))


def test_passwords_and_api_tokens_are_kept_as_hashes(db: Session) -> None:
    stored = hash_password("correct horse battery")
    assert "correct" not in stored and check_password("correct horse battery", stored)
    assert not check_password("correct horse batterz", stored)
    assert not check_password("x", "not-a-hash")
    db.add(User(name="ann", role="operator"))
    db.flush()
    token = create_token(db, "ann", "auditor")
    assert token_principal(db, token) is not None
    assert token_principal(db, token).role == "auditor"  # type: ignore[union-attr]
    assert token_principal(db, token[:-1] + ("a" if token[-1] != "a" else "b")) is None
    # A token never has more rights than its user has now.
    db.get(User, "ann").role = "auditor"  # type: ignore[union-attr]
    ops = create_token(db, "ann", "auditor")
    assert token_principal(db, ops).role == "auditor"  # type: ignore[union-attr]
    db.get(User, "ann").disabled = True  # type: ignore[union-attr]
    assert token_principal(db, token) is None


def test_the_audit_log_chain_names_the_first_broken_entry(db: Session) -> None:
    for i in range(3):
        audit(db, "ann", "thing.done", {"i": i})
    assert verify_audit(db) == (3, None)
    # Triggers stop UPDATE; a copy of the database without them would not.
    db.execute(select(1))
    conn = db.connection()
    conn.exec_driver_sql("DROP TRIGGER audit_log_no_update")
    conn.exec_driver_sql("UPDATE audit_log SET actor = 'bob' WHERE seq = 2")
    assert verify_audit(db) == (2, "entry 2 was changed")


def _enrolled(db: Session, ca: FleetCA) -> Host:
    t = hostsvc.create_enrollment_token(db, "ann", "web", {"environment": "edge"}, 1,
                                        timedelta(hours=1))
    resp = hostsvc.enroll(db, ca, EnrollRequest(
        t.token, csr_for(ec.generate_private_key(ec.SECP256R1())), "web-1"), timedelta(hours=4))
    host = db.get(Host, resp.host_id)
    assert host is not None
    return host


def test_enrollment_tokens_are_spent_and_expire(db: Session, ca: FleetCA) -> None:
    host = _enrolled(db, ca)
    assert (host.group, host.labels) == ("web", {"environment": "edge"})
    t = hostsvc.create_enrollment_token(db, "ann", "web", {}, 2, timedelta(minutes=5))
    req = EnrollRequest(t.token, csr_for(ec.generate_private_key(ec.SECP256R1())), "h")
    later = datetime.now(UTC) + timedelta(minutes=6)
    with pytest.raises(hostsvc.Refused):
        hostsvc.enroll(db, ca, req, timedelta(hours=1), now=later)
    hostsvc.revoke_enrollment_token(db, "ann", t.id)
    with pytest.raises(hostsvc.Refused):
        hostsvc.enroll(db, ca, req, timedelta(hours=1))
    with pytest.raises(hostsvc.Invalid, match="not a label"):
        hostsvc.create_enrollment_token(db, "ann", "web", {"colour": "red"}, 1,
                                        timedelta(hours=1))
    with pytest.raises(hostsvc.Invalid, match="'environment' must be one of"):
        hostsvc.create_enrollment_token(db, "ann", "web", {"environment": "moon"}, 1,
                                        timedelta(hours=1))


def _batch(*reports: Report, dropped: int = 0) -> ReportBatch:
    return ReportBatch(list(reports), dropped)


def test_ingest_stores_each_report_once_and_keeps_the_newest_inventory(
        db: Session, ca: FleetCA) -> None:
    host = _enrolled(db, ca)
    new = Report("h:ab:2", "inventory", 200.0, {"hostname": "web-1b",
                                                  "packages": [["bash", "5.2", "amd64"]]})
    old = Report("h:ab:1", "inventory", 100.0, {"hostname": "web-1a",
                                                  "packages": [["bash", "5.1", "amd64"]]})
    ack = ingest(db, host, _batch(new, old, dropped=4))
    assert (sorted(ack.acknowledged), ack.duplicates, ack.rejected) == (
        ["h:ab:1", "h:ab:2"], 0, [])
    assert host.hostname == "web-1b" and host.dropped == 4
    assert [(p.name, p.version) for p in db.execute(select(Package)).scalars()] == [
        ("bash", "5.2")]
    again = ingest(db, host, _batch(new, old))
    assert again.duplicates == 2 and host.reports == 2


def test_a_new_inventory_replaces_the_packages_writing_only_what_changed(
        db: Session, ca: FleetCA) -> None:
    host = _enrolled(db, ca)
    first = [["bash", "5.2", "amd64"], ["curl", "8.1", "amd64"], ["tzdata", "2024a", "all"],
             ["libc6", "2.36", "amd64"], ["libc6", "2.36", "i386"]]
    ingest(db, host, _batch(Report("h:ab:1", "inventory", 1.0, {"packages": first})))
    second = [["bash", "5.2", "amd64"], ["curl", "8.2", "amd64"], ["jq", "1.7", "amd64"],
              ["libc6", "2.36", "amd64"]]
    statements: list[str] = []
    event.listen(db.get_bind(), "before_cursor_execute",
                 lambda *a: statements.append(a[2].split()[0]))
    ingest(db, host, _batch(Report("h:ab:2", "inventory", 2.0, {"packages": second})))
    rows = db.execute(select(Package.name, Package.arch, Package.version)
                      .where(Package.host_id == host.id).order_by(Package.name,
                                                                  Package.arch)).all()
    assert [tuple(r) for r in rows] == [("bash", "amd64", "5.2"), ("curl", "amd64", "8.2"),
                                        ("jq", "amd64", "1.7"), ("libc6", "amd64", "2.36")]
    assert host.package_count == 4
    # One DELETE (curl's old version, tzdata, libc6:i386) and one INSERT (curl, jq).
    assert statements.count("DELETE") == 1 and statements.count("INSERT") == 2  # + report ID
    statements.clear()
    ingest(db, host, _batch(Report("h:ab:3", "inventory", 3.0, {"packages": second})))
    assert statements.count("DELETE") == 0 and statements.count("INSERT") == 1


def test_ingest_rejects_bad_reports_one_by_one(db: Session, ca: FleetCA) -> None:
    host = _enrolled(db, ca)
    ack = ingest(db, host, _batch(
        Report("h:ab:1", "alert", 1.0, {"rule": "r", "priority": "urgent"}),
        Report("not an id", "alert", 1.0, {}),
        Report("h:ab:2", "gossip", 1.0, {}),
        Report("h:ab:3", "compliance", 1.0, {"profile": "p", "score": 140}),
        Report("h:ab:4", "alert", 1.0, {"rule": "ok", "priority": "error"})))
    reasons = {r.id: r.reason for r in ack.rejected}
    assert "'priority' must be one of" in reasons["h:ab:1"]
    assert reasons["not an id"] == "the ID is not host:epoch:sequence"
    assert reasons["h:ab:2"] == "unknown kind 'gossip'"
    assert reasons["h:ab:3"] == "'score' must be a percentage"
    assert ack.acknowledged == ["h:ab:4"]
    assert [a.rule for a in db.execute(select(Alert)).scalars()] == ["ok"]


def test_an_audit_trail_that_goes_backwards_raises_a_critical_alert(
        db: Session, ca: FleetCA) -> None:
    host = _enrolled(db, ca)
    ingest(db, host, _batch(Report("h:ab:1", "audit", 1.0, {"seq": 10, "hash": "a" * 64})))
    ingest(db, host, _batch(Report("h:ab:2", "audit", 2.0, {"seq": 11, "hash": "b" * 64})))
    assert db.execute(select(Alert)).first() is None
    ingest(db, host, _batch(Report("h:ab:3", "audit", 3.0, {"seq": 4, "hash": "c" * 64})))
    alerts = list(db.execute(select(Alert)).scalars())
    assert [(a.rule, a.severity) for a in alerts] == [("fleet.audit-trail-rewritten",
                                                        "critical")]
    assert host.audit_head["seq"] == 11


def test_settings_are_checked_and_written_once(tmp_path: Path) -> None:
    with pytest.raises(FleetConfigError, match="unknown key 'colour'"):
        check_settings({"colour": "blue"}, "x")
    with pytest.raises(FleetConfigError, match="is not an address:port"):
        check_settings({"listen": "8443"}, "x")
    with pytest.raises(FleetConfigError, match="run `cerulean fleet init"):
        load_config(tmp_path / "nothing")
    cfg, created = init(tmp_path / "d", {"names": ["fleet.example", "10.0.2.2"]})
    assert created and cfg.names == ["fleet.example", "10.0.2.2"]
    assert oct((tmp_path / "d/ca.key").stat().st_mode & 0o777) == "0o600"
    ca_before = (tmp_path / "d/ca.crt").read_bytes()
    _, created = init(tmp_path / "d", {"names": ["fleet.example"]})
    assert not created and (tmp_path / "d/ca.crt").read_bytes() == ca_before


def test_the_agent_side_pieces(tmp_path: Path) -> None:
    assert set(PRIORITY) == set(REPORT_KINDS)
    assert check_server("https://fleet.example:8443/") == "https://fleet.example:8443"
    for bad in ("http://fleet.example", "https://fleet.example/x", "fleet.example"):
        with pytest.raises(Exception, match="is not a fleet server address"):
            check_server(bad)
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text(
        "Package: b\nStatus: install ok installed\nVersion: 2\nArchitecture: all\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
        "Package: a\nStatus: install ok installed\nVersion: 1:1.0\nArchitecture: amd64\n"
        "Description: x\n more\n")
    assert packages(tmp_path) == [["a", "1:1.0", "amd64"], ["b", "2", "all"]]
    box = Outbox(tmp_path / "o.db", "h")
    box.put("metrics", {"x": 1}, {"cursor": "7"})
    assert box.get("cursor") == "7" and box.get("other", "-") == "-"
    box.close()


def test_csv_cells_from_hosts_cannot_become_formulas() -> None:
    from cerulean.fleet.reports import _cell

    assert _cell("=cmd|' /C calc'!A0") == "'=cmd|' /C calc'!A0"
    assert _cell("@SUM(A1)") == "'@SUM(A1)" and _cell("+1+1") == "'+1+1"
    assert _cell("-12.5") == "-12.5" and _cell("50") == "50" and _cell("web-1") == "web-1"


def test_the_agent_writes_what_the_fleet_says_and_refuses_what_it_should_not(
        tmp_path: Path) -> None:
    from cerulean.agent.daemon import load_agent_config
    from cerulean.agent.fleetlink import FleetLinkError, apply_desired
    from cerulean.agent.update.host import Host, load_config

    (tmp_path / "var/lib/cerulean/fleet").mkdir(parents=True)
    desired = {"update": {"channel": "lts", "target": "1.20261120.0", "hold": True,
                          "window": "Sat 02:00-04:00"},
               "agent": {"policies": ["cis-debian12-l1-server"], "policy-mode": "enforce"},
               "rollout": "3:november"}
    assert apply_desired(tmp_path, desired) == ("update.toml", "agent.toml")
    assert apply_desired(tmp_path, desired) == ()  # nothing changed: nothing written
    cfg = load_config(Host(tmp_path))
    assert (cfg.channel, cfg.target, cfg.hold, cfg.window) == (
        "lts", "1.20261120.0", True, "Sat 02:00-04:00")
    agent = load_agent_config(tmp_path)
    assert (agent.policies, agent.policy_mode) == (["cis-debian12-l1-server"], "enforce")
    trail = (tmp_path / "var/lib/cerulean/audit/audit.jsonl").read_text().splitlines()
    assert len(trail) == 2 and '"rollout":"3:november"' in trail[0]
    # The fleet stops setting anything: the host's own settings apply again.
    assert apply_desired(tmp_path, {"update": {}, "agent": {}}) == ("update.toml",
                                                                    "agent.toml")
    assert not (tmp_path / "var/lib/cerulean/fleet/update.toml").exists()
    for bad, why in (({"update": {"url": "http://evil"}}, "does not know"),
                     ({"update": {"channel": "nightly"}}, "unknown channel"),
                     ({"update": {"target": "latest"}}, "bad target"),
                     ({"update": {"window": "whenever"}}, "bad window"),
                     ({"agent": {"policy-mode": "yolo"}}, "unknown policy mode"),
                     ({"agent": {"policies": "cis"}}, "not profile names"),
                     ({"agent": {"policies": ["/tmp/evil.yaml"]}}, "not profile names"),
                     ({"agent": {"policies": ["../../tmp/evil"]}}, "not profile names")):
        with pytest.raises(FleetLinkError, match=why):
            apply_desired(tmp_path, bad)
    assert not (tmp_path / "var/lib/cerulean/fleet/update.toml").exists()


def test_the_enrollment_credential_is_read_or_refused(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from cerulean.agent.fleetlink import FleetLinkError, enroll_from_credential

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert enroll_from_credential(tmp_path) is None  # no credential: nothing to do
    (tmp_path / "cerulean.fleet").write_text('{"server": "https://f:8443"}')
    with pytest.raises(FleetLinkError, match="not JSON with server, token and ca-sha256"):
        enroll_from_credential(tmp_path)
    (tmp_path / "cerulean.fleet").write_text(
        '{"server": "https://f:8443", "token": "t", "ca-sha256": "md5:x"}')
    with pytest.raises(FleetLinkError, match="--ca-sha256 must be"):
        enroll_from_credential(tmp_path)


def test_init_again_changes_only_the_settings_given(tmp_path: Path) -> None:
    from cerulean.cli import main

    data = tmp_path / "d"
    assert main(["fleet", "init", "--data", str(data), "--workers", "3", "--keep-alive", "7",
                 "--max-connections", "500", "--public-url", "https://f.example"]) == 0
    assert main(["fleet", "init", "--data", str(data), "--cert-hours", "12"]) == 0
    cfg = load_config(data)
    assert (cfg.workers, cfg.keep_alive, cfg.max_connections, cfg.public_url,
            cfg.cert_hours) == (3, 7, 500, "https://f.example", 12)
    assert cfg.database.startswith("sqlite:///")  # still the default, not a fixed path
    assert 'database = ""' in (data / "fleet.toml").read_text()


def test_the_host_page_shows_a_refused_update_run() -> None:
    from types import SimpleNamespace as NS

    from cerulean.fleet.reports import templates

    last = {"time": "2026-11-26T02:00:00Z", "result": "refused",
            "message": "The update repository's metadata has expired; refusing it."}
    h = NS(id="h1", hostname="web-1", group="default", labels={}, arch="x86_64",
           kernel="6.12", update={"version": "13.20261125.0", "last": last},
           enrolled_at=datetime.now(UTC), last_seen=None, reports=1, dropped=0,
           audit_head={}, revoked=False)
    html = templates().get_template("host.html").render(
        who=None, h=h, summary=NS(os="Cerulean"), packages=[], alerts=[], latest={},
        trend={}, rollout=None, rollout_state=None)
    assert ('<dt>Last update run</dt><dd class="sev-error">refused · 2026-11-26T02:00:00Z: '
            "The update repository&#39;s metadata has expired; refusing it.</dd>") in html


def test_dashboard_errors_show_only_what_the_server_said(
        db: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link from elsewhere cannot put its own words on the server's pages: an error
    shown after a redirect carries the server's signature, for that page, that user,
    for a few minutes."""
    from urllib.parse import parse_qs, urlsplit

    from starlette.requests import Request

    from cerulean.fleet import web

    def on(path: str) -> Request:
        return Request({"type": "http", "path": path, "query_string": b"", "headers": []})

    where = web._said(db, "/policies", "olga", "No such profile: cis-x")
    q = {k: v[0] for k, v in parse_qs(urlsplit(where.headers["location"]).query).items()}
    until, sig = int(q["until"]), q["sig"]
    shown = web._shown(db, on("/policies"), "olga", q["error"], until, sig)
    assert shown == "No such profile: cis-x"
    lie = "Your account is locked: call +1 555 0100"
    assert web._shown(db, on("/policies"), "olga", lie, until, sig) == ""
    assert web._shown(db, on("/policies"), "olga", lie, until, "") == ""
    assert web._shown(db, on("/access"), "olga", q["error"], until, sig) == ""  # page
    assert web._shown(db, on("/policies"), "admin", q["error"], until, sig) == ""  # user
    assert web._shown(db, on("/policies"), "olga", q["error"], until + 1, sig) == ""
    monkeypatch.setattr(web.time, "time", lambda: until + 1.0)  # kept past its time
    assert web._shown(db, on("/policies"), "olga", q["error"], until, sig) == ""


def test_the_compliance_reports_style_sheet_is_the_one_its_policy_allows() -> None:
    import base64
    import hashlib
    import re

    from cerulean.fleet import reports, web

    page = reports.html_report([], "Compliance of the fleet")
    (css,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
    policy = web.REPORT_HEADERS["Content-Security-Policy"]
    assert f"style-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
    assert "<script" not in page


def test_failed_logins_refuse_a_name_from_one_address_and_back_off(db: Session) -> None:
    from datetime import UTC, datetime, timedelta

    from cerulean.fleet import web

    t0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    for i in range(web.THROTTLE_FAILURES):
        assert web._throttled(db, "admin", "203.0.113.9", t0) is None
        web._failed(db, "admin", "203.0.113.9", t0 + timedelta(seconds=i))
    last = t0 + timedelta(seconds=web.THROTTLE_FAILURES - 1)
    assert web._throttled(db, "admin", "203.0.113.9", last) == \
        last + timedelta(seconds=web.THROTTLE_SECONDS)
    # The same name from elsewhere, and other names from there, still log in.
    assert web._throttled(db, "admin", "198.51.100.7", last) is None
    assert web._throttled(db, "olga", "203.0.113.9", last) is None
    # Once the wait is over, five more failures wait twice as long.
    later = last + timedelta(seconds=web.THROTTLE_SECONDS + 1)
    assert web._throttled(db, "admin", "203.0.113.9", later) is None
    for i in range(web.THROTTLE_FAILURES):
        web._failed(db, "admin", "203.0.113.9", later + timedelta(seconds=i))
    last = later + timedelta(seconds=web.THROTTLE_FAILURES - 1)
    assert web._throttled(db, "admin", "203.0.113.9", last) == \
        last + timedelta(seconds=2 * web.THROTTLE_SECONDS)


def test_an_address_that_tries_many_names_is_refused_for_all(db: Session) -> None:
    from datetime import UTC, datetime, timedelta

    from cerulean.fleet import web

    t0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    for i in range(web.THROTTLE_SOURCE_FAILURES):
        web._failed(db, f"user{i}", "203.0.113.9", t0 + timedelta(seconds=i))
    now = t0 + timedelta(seconds=web.THROTTLE_SOURCE_FAILURES)
    assert web._throttled(db, "admin", "203.0.113.9", now) is not None
    assert web._throttled(db, "admin", "198.51.100.7", now) is None


def test_logins_from_one_ipv6_network_count_together() -> None:
    from cerulean.fleet import web

    assert web._source("2001:db8:1:2::17") == web._source("2001:db8:1:2:ffff::1") \
        == "2001:db8:1:2::/64"
    assert web._source("2001:db8:1:3::17") != web._source("2001:db8:1:2::17")
    assert web._source("::ffff:203.0.113.9") == "203.0.113.9" == web._source("203.0.113.9")
    assert web._source("") == ""
