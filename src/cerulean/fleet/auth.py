"""Who is calling: people and scripts (API tokens, passwords, roles) and the admin audit log.

- **Roles**: ``auditor`` reads everything; ``operator`` also enrolls, revokes and
  rolls out; ``admin`` also manages users and tokens. A higher role can do all a
  lower one can.
- **Secrets at rest**: API and enrollment tokens are 32 random bytes, kept as
  their SHA-256 (a slow hash adds nothing against a guess of 256 bits);
  passwords, chosen by people, are kept as scrypt hashes.
- **Audit log**: every change made by a person or a script appends an entry
  whose hash covers the one before (:mod:`cerulean.protocol.audit`), and the
  database refuses to change or delete a row of it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from cerulean.errors import CeruleanError
from cerulean.fleet.db import ApiToken, AuditEntry, User
from cerulean.protocol.audit import GENESIS, entry_hash
from cerulean.protocol.fleet import API_TOKEN

ROLES = ("auditor", "operator", "admin")
USERNAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-@")


class AuthError(CeruleanError):
    pass


@dataclass(frozen=True)
class Principal:
    name: str  # user name, or "host:<id>" / "enroll:<token id>"
    role: str

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def new_secret() -> tuple[str, str, str]:
    """(public ID, secret, SHA-256 of the secret) for a new token."""
    secret = secrets.token_urlsafe(32)
    return secrets.token_hex(4), secret, hash_secret(secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_secret(secret: str, digest: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), digest)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    n, r, p = 1 << 14, 8, 1
    dk = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${dk.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        algo, n, r, p, salt, dk = stored.split("$")
        if algo != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(dk) // 2)
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), dk)


def check_username(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= USERNAME_CHARS:
        raise AuthError(f"{name!r} is not a user name: use 1 to 64 of a-z, 0-9, '.', '_', "
                        "'-' and '@'.")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AuthError(f"{role!r} is not a role; roles: {', '.join(ROLES)}.")
    return role


def token_principal(s: Session, token: str, now: datetime | None = None) -> Principal | None:
    """The user an API token speaks for, or None if it is not a valid, current token."""
    m = API_TOKEN.match(token)
    if not m:
        return None
    row = s.get(ApiToken, m[1])
    if row is None or row.revoked or not same_secret(m[2], row.secret_hash):
        return None
    if row.expires_at is not None and row.expires_at <= (now or datetime.now(UTC)):
        return None
    user = s.get(User, row.user)
    if user is None or user.disabled:
        return None
    # A token never has more rights than its user has now.
    role = row.role if ROLES.index(row.role) <= ROLES.index(user.role) else user.role
    return Principal(user.name, role)


def create_token(s: Session, user: str, role: str, description: str = "",
                 expires_at: datetime | None = None) -> str:
    account = s.get(User, user)
    if account is None:
        raise AuthError(f"There is no user {user!r}.")
    check_role(role)
    if ROLES.index(role) > ROLES.index(account.role):
        raise AuthError(f"{user} is {account.role}: a token cannot be given the {role} role.")
    tid, secret, digest = new_secret()
    s.add(ApiToken(id=tid, secret_hash=digest, user=user, role=role, description=description,
                   expires_at=expires_at))
    return f"cat_{tid}_{secret}"


class UserExists(AuthError):
    pass


MIN_PASSWORD = 12


def add_user(s: Session, actor: str, name: str, role: str, password: str = "") -> User:
    """A new user (with a password: one who can log in to the dashboard), in the audit
    log as made by *actor*."""
    check_username(name)
    check_role(role)
    if password and len(password) < MIN_PASSWORD:
        raise AuthError(f"A password needs at least {MIN_PASSWORD} characters.")
    if s.get(User, name) is not None:
        raise UserExists(f"There is already a user {name!r}.")
    user = User(name=name, role=role, password_hash=hash_password(password) if password else "",
                created_at=datetime.now(UTC), disabled=False)
    s.add(user)
    s.flush()
    audit(s, actor, "user.created", {"user": name, "role": role})
    return user


def issue_token(s: Session, actor: str, user: str, role: str, description: str = "",
                days: float | None = None) -> str:
    """A new API token for *user* (shown once), in the audit log as made by *actor*."""
    if days is not None and not 0 < days <= 3650:
        raise AuthError("'days' must be more than 0 and at most 3650.")
    expires = datetime.now(UTC) + timedelta(days=days) if days else None
    token = create_token(s, user, role, description[:200], expires)
    audit(s, actor, "api-token.created", {"user": user, "role": role,
                                          "token": token.split("_")[1]})
    return token


def audit(s: Session, actor: str, action: str, detail: Mapping[str, Any] | None = None) -> None:
    """Append one entry to the admin audit log, in the caller's transaction."""
    if s.get_bind().dialect.name == "postgresql":
        # Appends queue up here, so that two transactions never take the same number.
        s.execute(text("SELECT pg_advisory_xact_lock(7238001)"))
    last = s.execute(select(AuditEntry).order_by(AuditEntry.seq.desc()).limit(1)).scalar()
    entry: dict[str, Any] = {
        "seq": (last.seq + 1) if last else 1,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": actor, "action": action, "detail": dict(detail or {}),
        "prev": last.hash if last else GENESIS,
    }
    entry["hash"] = entry_hash(entry)
    s.add(AuditEntry(**entry))
    s.flush()


def verify_audit(s: Session) -> tuple[int, str | None]:
    """(entries checked, the first problem or None)."""
    prev, n = GENESIS, 0
    for row in s.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars():
        n += 1
        entry = {"seq": row.seq, "time": row.time, "actor": row.actor, "action": row.action,
                 "detail": row.detail, "prev": row.prev}
        if row.seq != n:
            return n, f"entry {n} is missing (the next is {row.seq})"
        if row.prev != prev:
            return n, f"entry {n} does not follow entry {n - 1}"
        if entry_hash(entry) != row.hash:
            return n, f"entry {n} was changed"
        prev = row.hash
    return n, None
