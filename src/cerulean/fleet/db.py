"""The fleet's database: tables (SQLAlchemy 2), engines for SQLite and PostgreSQL, migrations.

SQLite (one file in the data directory) is the default; a PostgreSQL URL lets
several stateless API servers share one database. The schema is created and
moved forward only by the Alembic migrations in ``cerulean/fleet/migrations``
(:func:`migrate`), never by ``create_all``, so a server started on an older
database upgrades it the same way on both engines.

Times are stored as timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from cerulean.errors import CeruleanError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_POOL = 8
POSTGRES_POOL = 40


class FleetDBError(CeruleanError):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A UTC time that comes back timezone-aware from SQLite too (which keeps none)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(),
                                                     dict[str, Any]: JSON}


class Host(Base):
    __tablename__ = "host"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(253), index=True)
    machine_id: Mapped[str] = mapped_column(String(64), default="")
    group: Mapped[str] = mapped_column(String(64), index=True)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(default=None)
    # From the newest inventory report (inventory_at: its time on the host's clock).
    inventory_at: Mapped[float] = mapped_column(Float, default=0.0)
    os_release: Mapped[dict[str, Any]] = mapped_column(default=dict)
    arch: Mapped[str] = mapped_column(String(16), default="")
    kernel: Mapped[str] = mapped_column(String(128), default="")
    update: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    cves: Mapped[dict[str, Any]] = mapped_column(default=dict)
    package_count: Mapped[int] = mapped_column(default=0)
    reports: Mapped[int] = mapped_column(BigInteger, default=0)
    dropped: Mapped[int] = mapped_column(BigInteger, default=0)
    audit_head: Mapped[dict[str, Any]] = mapped_column(default=dict)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Certificate(Base):
    __tablename__ = "certificate"
    serial: Mapped[str] = mapped_column(String(40), primary_key=True)  # hex
    host_id: Mapped[str] = mapped_column(ForeignKey("host.id", ondelete="CASCADE"), index=True)
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_token"
    id: Mapped[str] = mapped_column(String(8), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    group: Mapped[str] = mapped_column(String(64))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    uses_left: Mapped[int] = mapped_column(Integer)
    used: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(64))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class User(Base):
    __tablename__ = "user_account"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiToken(Base):
    __tablename__ = "api_token"
    id: Mapped[str] = mapped_column(String(8), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    user: Mapped[str] = mapped_column(ForeignKey("user_account.name", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class ReceivedReport(Base):
    """Every report a host sent, once: its ID is the primary key (with the host), so a
    report sent again is recognised and not counted twice."""

    __tablename__ = "report"
    host_id: Mapped[str] = mapped_column(ForeignKey("host.id", ondelete="CASCADE"),
                                         primary_key=True)
    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    created: Mapped[float] = mapped_column(Float)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (Index("report_received", "received_at"),)


class Package(Base):
    __tablename__ = "package"
    host_id: Mapped[str] = mapped_column(ForeignKey("host.id", ondelete="CASCADE"),
                                         primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    arch: Mapped[str] = mapped_column(String(16), primary_key=True)
    version: Mapped[str] = mapped_column(String(128))
    __table_args__ = (Index("package_name", "name"),)


class Alert(Base):
    __tablename__ = "alert"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("host.id", ondelete="CASCADE"), index=True)
    report_id: Mapped[str] = mapped_column(String(120))
    rule: Mapped[str] = mapped_column(String(128), index=True)
    severity: Mapped[str] = mapped_column(String(16))
    summary: Mapped[str] = mapped_column(Text, default="")
    time: Mapped[datetime]
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="open")


class ComplianceResult(Base):
    __tablename__ = "compliance"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("host.id", ondelete="CASCADE"))
    profile: Mapped[str] = mapped_column(String(128))
    time: Mapped[datetime]
    score: Mapped[float] = mapped_column(Float)
    passed: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    notapplicable: Mapped[int] = mapped_column(Integer, default=0)
    mode: Mapped[str] = mapped_column(String(16), default="audit")
    failures: Mapped[dict[str, Any]] = mapped_column(default=dict)  # check id → evidence
    __table_args__ = (Index("compliance_host_profile_time", "host_id", "profile", "time"),)


class AuditEntry(Base):
    """The admin audit log: appended to, never changed (hash chain, as on hosts)."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    time: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class Rollout(Base):
    """A release (or a channel) rolled out to one group, wave by wave."""

    __tablename__ = "rollout"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    group: Mapped[str] = mapped_column(String(64), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(32), default="")  # "": the channel's newest
    waves: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"percent": [10, 50, 100]}
    wave: Mapped[int] = mapped_column(Integer, default=0)  # index of the open wave
    wave_started_at: Mapped[datetime] = mapped_column(default=utcnow)
    soak_minutes: Mapped[int] = mapped_column(Integer, default=30)
    max_failure_percent: Mapped[float] = mapped_column(Float, default=10.0)
    window: Mapped[str] = mapped_column(String(200), default="")
    state: Mapped[str] = mapped_column(String(16), default="running")
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    evaluated_at: Mapped[datetime | None] = mapped_column(default=None)


class GroupPolicy(Base):
    """The compliance profiles a group's hosts run, and in which mode."""

    __tablename__ = "group_policy"
    group: Mapped[str] = mapped_column(String(64), primary_key=True)
    profiles: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"profiles": [...]}
    mode: Mapped[str] = mapped_column(String(16))
    updated_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class LoginFailure(Base):
    """A failed dashboard login, kept for the throttle (every replica counts them all)."""
    __tablename__ = "login_failure"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    time: Mapped[datetime]
    # The client's address ("" before it was kept).
    source: Mapped[str] = mapped_column(String(64), index=True, default="",
                                        server_default="")


class Setting(Base):
    __tablename__ = "setting"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    # One writer at a time from the start of a transaction: a deferred transaction that
    # reads and then writes can fail on a busy database however long it waits. Work that
    # only reads (the server's gate) says so and does not wait for the writers.
    if conn.get_execution_options().get("cerulean_read_only"):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    # A request holds its connection from its first query to its commit, across several
    # of the server's worker threads; the server runs as many threads as the pool has
    # connections (FleetState.threads), so no thread waits for a connection that only a
    # thread-starved request could give back.
    if url.startswith("sqlite"):
        # SQLite has one writer at a time: a few connections, not dozens polling its lock.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30,
                                                  "isolation_level": None},
                               pool_size=SQLITE_POOL, max_overflow=0, pool_timeout=60)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if url.startswith(("postgresql", "postgres")):
        url = url.replace("postgres://", "postgresql://", 1)
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        return create_engine(url, pool_size=POSTGRES_POOL, max_overflow=0,
                             pool_pre_ping=True, pool_timeout=60)
    raise FleetDBError(f"{url!r} is not a database URL: use sqlite:///PATH or "
                       "postgresql://USER@HOST/DB.")


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest migration."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
