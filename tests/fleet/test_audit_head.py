"""The fleet as the audit trail's anchor outside the host: a head that does not extend the
one the fleet holds is refused and raises a critical alert (sqlite only, no server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from cerulean.agent.audit import AuditLog
from cerulean.fleet import hosts as hostsvc
from cerulean.fleet.ca import FleetCA
from cerulean.fleet.db import Alert, Host, make_engine, migrate, sessions
from cerulean.fleet.ingest import ingest
from cerulean.protocol.fleet import EnrollRequest, Report, ReportBatch

A, B, C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrate(engine)
    with sessions(engine).begin() as s:
        yield s
    engine.dispose()


@pytest.fixture
def host(db: Session, tmp_path: Path) -> Host:
    ca = FleetCA.create(tmp_path / "ca")
    t = hostsvc.create_enrollment_token(db, "ann", "web", {}, 1, timedelta(hours=1))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h")]))
           .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
           .public_bytes(serialization.Encoding.PEM).decode())
    resp = hostsvc.enroll(db, ca, EnrollRequest(t.token, csr, "web-1"), timedelta(hours=4))
    h = db.get(Host, resp.host_id)
    assert h is not None
    return h


class Sender:
    def __init__(self, db: Session, host: Host) -> None:
        self.db, self.host, self.n = db, host, 0

    def __call__(self, body: dict[str, object]) -> list[str]:
        """Send one audit report; the rules of the alerts it raised."""
        self.n += 1
        before = len(self.alerts())
        ack = ingest(self.db, self.host, ReportBatch(
            [Report(f"h:ab:{self.n}", "audit", float(self.n), body)], 0))
        assert not ack.rejected, ack.rejected
        return self.alerts()[before:]

    def alerts(self) -> list[str]:
        return [a.rule for a in self.db.execute(select(Alert).order_by(Alert.id)).scalars()]


def test_a_head_that_extends_the_known_one_is_taken(db: Session, host: Host) -> None:
    send = Sender(db, host)
    assert send({"seq": 10, "hash": A}) == []
    assert send({"seq": 12, "hash": B, "base": {"seq": 10, "hash": A}}) == []
    assert host.audit_head["seq"] == 12 and host.audit_head["hash"] == B


@pytest.mark.parametrize("body", [
    {"seq": 4, "hash": C},  # goes back
    {"seq": 10, "hash": C},  # the same number, another entry
    {"seq": 12, "hash": C, "base": {"seq": 10, "hash": B}},  # a chain without the known one
    {"seq": 12, "hash": C, "restarted": True},  # the host says so
])
def test_a_head_that_does_not_extend_the_known_one_is_refused(
        db: Session, host: Host, body: dict[str, object]) -> None:
    send = Sender(db, host)
    send({"seq": 10, "hash": A})
    assert send(body) == ["fleet.audit-trail-rewritten"]
    assert host.audit_head["seq"] == 10 and host.audit_head["hash"] == A
    assert host.audit_head["refused"]["hash"] == C
    alert = db.execute(select(Alert)).scalars().one()
    assert alert.severity == "critical" and "refuses the new one" in alert.summary
    # The rewritten chain going on is not alerted again; a second rewrite is.
    seq = int(body["seq"])  # type: ignore[call-overload]
    assert send({"seq": seq + 1, "hash": B, "base": {"seq": seq, "hash": C}}) == []
    assert host.audit_head["hash"] == A and host.audit_head["refused"]["seq"] == seq + 1
    assert send({"seq": seq + 2, "hash": A, "base": {"seq": seq + 1, "hash": C}}) == [
        "fleet.audit-trail-rewritten"]


def test_a_head_delivered_late_is_not_a_rewrite(db: Session, host: Host) -> None:
    """The outbox retries a report that failed while newer ones go: an older head that
    arrives after a newer one is not news."""
    ingest(db, host, ReportBatch([Report("h:ab:2", "audit", 2.0, {"seq": 12, "hash": B})], 0))
    ingest(db, host, ReportBatch([Report("h:ab:1", "audit", 1.0, {"seq": 10, "hash": A})], 0))
    assert db.execute(select(Alert)).first() is None and host.audit_head["seq"] == 12


def test_a_bad_base_is_rejected(db: Session, host: Host) -> None:
    ack = ingest(db, host, ReportBatch([Report("h:ab:1", "audit", 1.0, {
        "seq": 3, "hash": A, "base": {"seq": "x"}})], 0))
    assert "'base' must be an audit-trail head" in ack.rejected[0].reason


def test_a_trail_cut_back_on_the_host_is_refused_by_the_fleet(
        db: Session, host: Host, tmp_path: Path) -> None:
    """The host's side and the fleet's: what AuditLog.anchor reports after a rollback."""
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        log.append("guard", "alert.x", {"n": i})
    send = Sender(db, host)
    entries = list(log.entries())
    known = ""
    report = log.anchor(entries[-1], known)
    assert report is not None and send(report) == []
    known = f"{report['seq']}:{report['hash']}"
    # Cut back to 3 entries and the head rewritten to match; then two new entries.
    kept = log.path.read_bytes().splitlines(keepends=True)[:3]
    log.path.write_bytes(b"".join(kept))
    log.head_path.write_text(json.dumps({"seq": 3, "hash": entries[2]["hash"]}))
    log.mark_path.unlink()  # the attacker knows about the mark too
    log.append("guard", "alert.y", {})
    log.append("guard", "alert.y", {})
    report = log.anchor(list(log.entries())[-1], known)
    assert report is not None and report["seq"] == 5 and report.get("restarted") is True
    assert send(report) == ["fleet.audit-trail-rewritten"]
    assert host.audit_head["hash"] == entries[-1]["hash"]


def test_a_host_that_proved_its_chain_must_go_on_proving_it(db: Session, host: Host) -> None:
    """A rewritten trail that starts past the known head sends no base: once the host has
    shown it sends one, a head without it is not believed."""
    send = Sender(db, host)
    send({"seq": 10, "hash": A})
    assert send({"seq": 12, "hash": B, "base": {"seq": 10, "hash": A}}) == []
    assert send({"seq": 20, "hash": C}) == ["fleet.audit-trail-rewritten"]
    assert send({"seq": 21, "hash": A, "base": {"seq": 19, "hash": C}}) == [
        "fleet.audit-trail-rewritten"]  # a base, but not at the known head
    assert host.audit_head["seq"] == 12


def test_a_head_past_a_pruned_one_is_taken_and_said(db: Session, host: Host) -> None:
    send = Sender(db, host)
    send({"seq": 10, "hash": A})
    send({"seq": 12, "hash": B, "base": {"seq": 10, "hash": A}})
    assert send({"seq": 90_000, "hash": C, "pruned": True}) == ["fleet.audit-trail-unchecked"]
    assert host.audit_head["seq"] == 90_000 and "refused" not in host.audit_head
    alert = db.execute(select(Alert)).scalars().one()
    assert alert.severity == "warning"
