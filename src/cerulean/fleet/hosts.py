"""Host identity: enrollment tokens, enrollment, certificate renewal and revocation.

An enrollment token names the group (and labels) its hosts join, when it
expires and how many hosts may use it. Enrolling spends one use, makes the
host's ID and signs the host's own key for a few hours; the agent renews at
half that time over mTLS with a new key. Revoking a host revokes all its
certificates: its next call is refused even though the TLS handshake, which
cannot know, let it in. An enrolled host that enrolls again (new token, e.g.
after a reinstall) becomes a new host; the old record stays, marked by its
last-seen time, until someone deletes it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cerulean.errors import CeruleanError
from cerulean.fleet.auth import audit, new_secret, same_secret
from cerulean.fleet.ca import CAError, FleetCA
from cerulean.fleet.db import Certificate, EnrollmentToken, Host
from cerulean.protocol.fleet import ENROLL_TOKEN, HOSTNAME, EnrollRequest, EnrollResponse

GROUP_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")
LABEL_KEYS = ("environment", "region", "site", "provider", "role", "owner")
ENVIRONMENTS = ("cloud", "on-prem", "edge")


class Refused(CeruleanError):
    """A request that is understood but not allowed (HTTP 401/403)."""


class Invalid(CeruleanError):
    """A request that cannot be understood (HTTP 422)."""


def check_group(group: str) -> str:
    if not group or len(group) > 64 or not set(group) <= GROUP_CHARS:
        raise Invalid(f"{group!r} is not a group name: use 1 to 64 of a-z, 0-9, '-' and '_'.")
    return group


def check_labels(labels: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in labels.items():
        if k not in LABEL_KEYS:
            raise Invalid(f"{k!r} is not a label; labels: {', '.join(LABEL_KEYS)}.")
        if not isinstance(v, str) or not 0 < len(v) <= 64:
            raise Invalid(f"Label {k!r} must be a text of 1 to 64 characters.")
        if k == "environment" and v not in ENVIRONMENTS:
            raise Invalid(f"'environment' must be one of {', '.join(ENVIRONMENTS)}, not {v!r}.")
        out[k] = v
    return out


@dataclass(frozen=True)
class NewToken:
    token: str
    id: str
    expires_at: datetime


def create_enrollment_token(s: Session, actor: str, group: str, labels: dict[str, Any],
                            uses: int, lifetime: timedelta) -> NewToken:
    check_group(group)
    labels = check_labels(labels)
    if not 1 <= uses <= 100000:
        raise Invalid("A token's uses must be between 1 and 100000.")
    if not timedelta(minutes=1) <= lifetime <= timedelta(days=365):
        raise Invalid("A token must be valid for between one minute and 365 days.")
    tid, secret, digest = new_secret()
    expires = datetime.now(UTC) + lifetime
    s.add(EnrollmentToken(id=tid, secret_hash=digest, group=group, labels=labels,
                          uses_left=uses, expires_at=expires, created_by=actor))
    audit(s, actor, "enrollment-token.created",
          {"token": tid, "group": group, "labels": labels, "uses": uses,
           "expires": expires.isoformat()})
    return NewToken(f"cet_{tid}_{secret}", tid, expires)


def enroll_command(public_url: str, token: str, ca_sha256: str) -> str:
    """The command that enrolls a host with *token*."""
    return (f"cerulean agent enroll --server {public_url or 'https://FLEET:8443'} "
            f"--token {token} --ca-sha256 {ca_sha256}")


def revoke_enrollment_token(s: Session, actor: str, tid: str) -> None:
    row = s.get(EnrollmentToken, tid)
    if row is None:
        raise Invalid(f"There is no enrollment token {tid!r}.")
    row.revoked = True
    audit(s, actor, "enrollment-token.revoked", {"token": tid})


def _issue(s: Session, ca: FleetCA, host: Host, csr: str, lifetime: timedelta,
           now: datetime) -> tuple[str, datetime, datetime]:
    try:
        issued = ca.issue_host(csr, host.id, lifetime, now)
    except CAError as e:
        raise Invalid(str(e)) from e
    s.add(Certificate(serial=issued.serial, host_id=host.id, not_before=issued.not_before,
                      not_after=issued.not_after))
    renew = now + (issued.not_after - now) / 2
    return issued.pem, issued.not_after, renew


def enroll(s: Session, ca: FleetCA, req: EnrollRequest, lifetime: timedelta,
           now: datetime | None = None) -> EnrollResponse:
    now = now or datetime.now(UTC)
    m = ENROLL_TOKEN.match(req.token)
    refused = Refused("The enrollment token is not valid, has expired, was revoked or has "
                      "been used up.")
    if not m:
        raise refused
    q = select(EnrollmentToken).where(EnrollmentToken.id == m[1]).with_for_update()
    token = s.execute(q).scalar()
    if (token is None or token.revoked or not same_secret(m[2], token.secret_hash)
            or token.expires_at <= now):
        raise refused
    # Spend the use only if it is still there: two hosts racing for the last use cannot
    # both get it, on either database.
    spent = s.execute(update(EnrollmentToken)
                      .where(EnrollmentToken.id == token.id, EnrollmentToken.uses_left > 0)
                      .values(uses_left=EnrollmentToken.uses_left - 1,
                              used=EnrollmentToken.used + 1))
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        raise refused
    if not HOSTNAME.match(req.hostname):
        raise Invalid(f"{req.hostname[:80]!r} is not a host name.")
    if len(req.machine_id) > 64:
        raise Invalid("The machine ID is longer than 64 characters.")
    host = Host(id=str(uuid.uuid4()), hostname=req.hostname, machine_id=req.machine_id,
                group=token.group, labels=dict(token.labels), enrolled_at=now)
    s.add(host)
    s.flush()
    pem, not_after, renew = _issue(s, ca, host, req.csr, lifetime, now)
    audit(s, f"enroll:{token.id}", "host.enrolled",
          {"host": host.id, "hostname": host.hostname, "group": host.group})
    return EnrollResponse(host.id, pem, ca.pem, not_after.isoformat(), renew.isoformat())


def renew(s: Session, ca: FleetCA, host: Host, csr: str, lifetime: timedelta,
          now: datetime | None = None) -> EnrollResponse:
    now = now or datetime.now(UTC)
    pem, not_after, renew_at = _issue(s, ca, host, csr, lifetime, now)
    return EnrollResponse(host.id, pem, ca.pem, not_after.isoformat(), renew_at.isoformat())


def authenticate_host(s: Session, serial: str, common_name: str) -> Host:
    """The host a client certificate (already checked by TLS) belongs to, if it still may
    call: the certificate was issued here, to that host, and neither is revoked."""
    # One query for both (this runs on every host call).
    row = s.execute(select(Certificate.host_id, Certificate.revoked_at, Host)
                    .outerjoin(Host, Host.id == Certificate.host_id)
                    .where(Certificate.serial == serial)).first()
    if row is None or row[0] != common_name:
        raise Refused("This client certificate was not issued by this fleet.")
    if row[1] is not None:
        raise Refused("This host's certificate has been revoked.")
    host: Host | None = row[2]
    if host is None or host.revoked:
        raise Refused("This host has been revoked; enroll it again with a new token.")
    return host


def revoke_host(s: Session, actor: str, host_id: str, now: datetime | None = None) -> None:
    host = s.get(Host, host_id)
    if host is None:
        raise Invalid(f"There is no host {host_id!r}.")
    host.revoked = True
    s.execute(update(Certificate).where(Certificate.host_id == host_id,
                                        Certificate.revoked_at.is_(None))
              .values(revoked_at=now or datetime.now(UTC)))
    audit(s, actor, "host.revoked", {"host": host_id, "hostname": host.hostname})
