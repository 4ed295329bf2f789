"""What hosts report, stored once: inventory, alerts, compliance results, metrics, audit heads.

A batch is one transaction. Each report's ID goes into the ``report`` table
first (insert-or-ignore), and only a report inserted now is applied, so a
batch sent again after a lost acknowledgement changes nothing and counts
nothing twice. IDs are acknowledged only after the commit: what the agent
forgets, the server has.

Reports are applied in the order the host made them; an inventory or metrics
report older than the one already applied is kept as received but does not
overwrite the newer state. An audit head that does not extend the one the
fleet holds (it goes backwards, changes at the same sequence number, comes from
a chain without the known entry, or the host says its trail restarted) means
the host's audit trail was rewritten: it is refused and raises a critical alert
of its own.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, delete, insert, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cerulean.fleet.db import Alert, ComplianceResult, Host, Package, ReceivedReport
from cerulean.protocol.fleet import (
    HOSTNAME,
    MAX_BATCH,
    PRIORITIES,
    REPORT_ID,
    REPORT_KINDS,
    Rejected,
    Report,
    ReportAck,
    ReportBatch,
)


class BadReport(ValueError):
    pass


SERVER_RULES = "fleet."  # the prefix of the alerts the server raises itself


def _looks_like_servers(rule: str) -> bool:
    """Whether *rule* would pass for one of the server's own alerts: it starts with
    "fleet" once case, compatibility forms (full-width letters, say) and invisible or
    punctuation characters are set aside."""
    folded = unicodedata.normalize("NFKC", rule).casefold()
    return "".join(ch for ch in folded if ch.isalnum()).startswith("fleet")


MAX_TIME = 95_617_584_000  # 5000-01-01 UTC: later "times" are no times a host keeps


def _time(value: Any, fallback: float) -> datetime:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < MAX_TIME:
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return t if t.tzinfo else t.replace(tzinfo=UTC)
        except ValueError:
            pass
    return datetime.fromtimestamp(fallback, UTC)


def _str(body: dict[str, Any], key: str, limit: int, default: str | None = None) -> str:
    v = body.get(key, default)
    if not isinstance(v, str) or len(v) > limit:
        raise BadReport(f"'{key}' must be a text of at most {limit} characters")
    return v


def bad_text(value: Any) -> str | None:
    """Why *value* (a report's body, as JSON gave it) cannot be stored, or None: a text
    holding NUL, which PostgreSQL refuses in text and JSON, half of a UTF-16
    surrogate pair (JSON's ``\\ud800``), which is no Unicode text at all, or a number
    that is not finite (``NaN``, ``Infinity``, ``1e999``: Python's JSON reads them, no
    database's JSON holds them)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, list):
            stack += v
        elif isinstance(v, float):
            if not math.isfinite(v):
                return "a number is not finite (NaN or infinity)"
        elif isinstance(v, str):
            if "\0" in v:
                return "a text holds a NUL character"
            try:
                v.encode()
            except UnicodeEncodeError:
                return "a text holds a lone UTF-16 surrogate (not Unicode text)"
    return None


def _dict(body: dict[str, Any], key: str) -> dict[str, Any]:
    v = body.get(key, {})
    if not isinstance(v, dict):
        raise BadReport(f"'{key}' must be an object")
    return v


def _count(body: dict[str, Any], key: str) -> int:
    v = body.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 31:
        raise BadReport(f"'{key}' must be a count")
    return v


def _update(body: dict[str, Any]) -> dict[str, Any]:
    """The updater's state as the host reports it (fleetlink.update_state): the fields a
    rollout and the host pages read are checked; a frozen or refused repository shows as
    ``last.result`` (``refused``, ``unreachable``)."""
    u = _dict(body, "update")
    for key in ("image", "version", "channel", "target", "staged", "slot"):
        v = u.get(key)
        if v is not None and (not isinstance(v, str) or len(v) > 128):
            raise BadReport(f"'update.{key}' must be a text of at most 128 characters")
    if "hold" in u and not isinstance(u["hold"], bool):
        raise BadReport("'update.hold' must be true or false")
    last = u.get("last")
    if last is not None and not (isinstance(last, dict) and all(
            isinstance(k, str) and isinstance(v, str) and len(v) <= 4000
            for k, v in last.items())):
        raise BadReport("'update.last' must be an object of texts (time, result, message)")
    failed = u.get("failed_releases", {})
    if not (isinstance(failed, dict) and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 128 and len(v) <= 4000
            for k, v in failed.items())):
        raise BadReport("'update.failed_releases' must map versions to reasons")
    return u


UNNEST_PACKAGES = text(
    "INSERT INTO package (host_id, name, arch, version) SELECT :host, n, a, v FROM "
    "unnest(CAST(:names AS text[]), CAST(:archs AS text[]), CAST(:versions AS text[])) "
    "AS u(n, a, v)")


def apply_inventory(s: Session, host: Host, r: Report) -> None:
    b = r.body
    packages = b.get("packages", [])
    if not isinstance(packages, list) or not all(
            isinstance(p, list) and len(p) == 3 and all(isinstance(x, str) and 0 < len(x) <= 128
                                                        for x in p) for p in packages):
        raise BadReport("'packages' must be a list of [name, version, architecture]")
    hostname = _str(b, "hostname", 253, host.hostname)
    if hostname != host.hostname and not HOSTNAME.match(hostname):
        # What enrollment takes, nothing else: no spaces, markup or look-alike letters.
        raise BadReport("'hostname' is not a host name (letters, digits, dots and hyphens)")
    fields = {"hostname": hostname,
              "arch": _str(b, "arch", 16, ""), "kernel": _str(b, "kernel", 128, ""),
              "os_release": _dict(b, "os_release"), "update": _update(b),
              "cves": _dict(b, "cves")}
    if r.created < host.inventory_at:
        return  # an older inventory than the one shown
    for k, v in fields.items():
        setattr(host, k, v)
    host.inventory_at = r.created
    new = {(p[0], p[2]): p[1] for p in packages}
    host.package_count = len(new)
    # Only what changed is written: most inventories repeat most of the last one. (On the
    # session's connection, past the ORM's bulk machinery: a host has hundreds of rows.)
    conn = s.connection()
    table = Package.__table__
    assert isinstance(table, Table)
    old = {(r.name, r.arch): r.version for r in conn.execute(
        select(table.c.name, table.c.arch, table.c.version).where(table.c.host_id == host.id))}
    gone = [k for k, v in old.items() if new.get(k) != v]
    for i in range(0, len(gone), 500):
        conn.execute(delete(table).where(
            table.c.host_id == host.id,
            tuple_(table.c.name, table.c.arch).in_(gone[i:i + 500])))
    added = [(n, a, v) for (n, a), v in new.items() if old.get((n, a)) != v]
    if added and conn.dialect.name == "postgresql":
        # One statement with three arrays: far cheaper than a row at a time.
        names, archs, versions = (list(x) for x in zip(*added, strict=True))
        conn.execute(UNNEST_PACKAGES, {"host": host.id, "names": names, "archs": archs,
                                       "versions": versions})
    elif added:
        conn.execute(insert(table), [{"host_id": host.id, "name": n, "arch": a, "version": v}
                                     for n, a, v in added])


def apply_alert(s: Session, host: Host, r: Report) -> None:
    b = r.body
    severity = _str(b, "priority", 16, "warning")
    if severity not in PRIORITIES:
        raise BadReport(f"'priority' must be one of {', '.join(PRIORITIES)}")
    rule = _str(b, "rule", 128)
    if _looks_like_servers(rule):
        raise BadReport(f"rule names starting {SERVER_RULES!r} are the fleet's own")
    s.add(Alert(host_id=host.id, report_id=r.id, rule=rule,
                severity=severity, summary=_str(b, "message", 2000, ""),
                time=_time(b.get("time"), r.created), evidence=_dict(b, "evidence")))


def apply_compliance(s: Session, host: Host, r: Report) -> None:
    b = r.body
    score = b.get("score")
    if not isinstance(score, int | float) or isinstance(score, bool) or not 0 <= score <= 100:
        raise BadReport("'score' must be a percentage")
    s.add(ComplianceResult(
        host_id=host.id, profile=_str(b, "profile", 128), time=_time(b.get("time"), r.created),
        score=float(score), passed=_count(b, "passed"), failed=_count(b, "failed"),
        errors=_count(b, "errors"), notapplicable=_count(b, "notapplicable"),
        mode=_str(b, "mode", 16, "audit"), failures=_dict(b, "failures")))


def apply_metrics(s: Session, host: Host, r: Report) -> None:
    values = {k: v for k, v in r.body.items()
              if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)}
    if len(values) != len(r.body):
        raise BadReport("metrics must be numbers")
    if r.created >= float(host.metrics.get("_time", 0)):
        host.metrics = {**values, "_time": r.created}


def _audit_head(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    v = body.get(key)
    if v is None:
        return None
    if not (isinstance(v, dict) and isinstance(v.get("seq"), int)
            and not isinstance(v["seq"], bool) and 0 <= v["seq"] < 1 << 62
            and isinstance(v.get("hash"), str) and len(v["hash"]) <= 64):
        raise BadReport(f"'{key}' must be an audit-trail head {{seq, hash}}")
    return {"seq": v["seq"], "hash": v["hash"]}


def _extends(known: dict[str, Any], seq: int, digest: str, base: dict[str, Any] | None,
             restarted: bool) -> bool:
    """Whether a reported head extends the *known* one, as far as the report shows: its
    sequence number does not go back, it is the same entry at the same number, and the
    host's entry at the known number (``base``) is the known one."""
    kseq, khash = int(known.get("seq", 0)), known.get("hash")
    if restarted or seq < kseq:
        return False
    if seq == kseq:
        return khash in (None, digest)
    if base is None or base["seq"] != kseq:
        # Only an agent that never sent one (an older agent) may go on without proof; one
        # that did and stops is not believed.
        return not known.get("based")
    return khash is None or base["hash"] == khash


def apply_audit(s: Session, host: Host, r: Report) -> None:
    """A new head of the host's audit trail. One that does not extend the head the fleet
    holds (it goes back, changes at the same number, its chain does not hold the known
    entry, or the host says its trail restarted) is refused: the known head stays, the
    refused one is kept beside it (``refused``) and raises a critical alert, once per
    rewrite: the rewritten chain going on is followed there without another alert, and
    a head that does not extend it either is a new rewrite."""
    seq, digest = _count(r.body, "seq"), _str(r.body, "hash", 64)
    base = _audit_head(r.body, "base")
    restarted, pruned = r.body.get("restarted", False), r.body.get("pruned", False)
    if not isinstance(restarted, bool) or not isinstance(pruned, bool):
        raise BadReport("'restarted' and 'pruned' must be true or false")
    old = host.audit_head
    new = {"seq": seq, "hash": digest, "time": r.created}
    refused = old.get("refused")
    current = refused if isinstance(refused, dict) else old
    if not restarted and seq < int(current.get("seq", 0)) \
            and r.created < float(current.get("time", 0)):
        return  # made before the head the fleet holds, delivered late (a retry): not news
    if isinstance(refused, dict):
        # The host is on a rewritten chain already refused: it is followed there, so that
        # another rewrite is found too.
        if _extends(refused, seq, digest, base, restarted):
            host.audit_head = {**old, "refused": {
                **new, "based": bool(base is not None or refused.get("based"))}}
            return
    elif pruned and not restarted and seq > int(old.get("seq", 0)):
        # The host's trail no longer holds the head the fleet knows (its oldest segments
        # were removed, the fleet having been out of touch that long): the new head cannot
        # be checked against it. Taken, and said.
        s.add(Alert(host_id=host.id, report_id=r.id, rule="fleet.audit-trail-unchecked",
                    severity="warning",
                    summary=f"The host's audit trail no longer holds entry {old.get('seq')}, "
                            f"the head the fleet holds; the new head {seq} cannot be checked "
                            "against it.",
                    time=datetime.fromtimestamp(r.created, UTC),
                    evidence={"before": {k: v for k, v in old.items() if k != "refused"},
                              "after": {"seq": seq, "hash": digest}}))
        host.audit_head = {**new, "based": bool(old.get("based"))}
        return
    elif _extends(old, seq, digest, base, restarted):
        host.audit_head = {**new, "based": bool(base is not None or old.get("based"))}
        return
    old_seq = int(old.get("seq", 0))
    known = int(current.get("seq", 0))
    why = ("the host reports that its trail no longer holds the head it reported before"
           if restarted else
           f"its entry {known} is not the one it reported before" if seq > known else
           f"it went from entry {known} to {seq}" if seq < known else
           f"entry {seq} changed")
    s.add(Alert(host_id=host.id, report_id=r.id, rule="fleet.audit-trail-rewritten",
                severity="critical",
                summary=f"The host's audit trail was rewritten or replaced: {why}. The fleet "
                        f"keeps entry {old_seq} as the head and refuses the new one.",
                time=datetime.fromtimestamp(r.created, UTC),
                evidence={"before": {k: v for k, v in old.items() if k != "refused"},
                          "after": {"seq": seq, "hash": digest}, "base": base,
                          "restarted": restarted}))
    host.audit_head = {**old, "refused": {**new, "based": bool(current.get("based"))}}


APPLY: dict[str, Callable[[Session, Host, Report], None]] = {
    "inventory": apply_inventory, "alert": apply_alert, "compliance": apply_compliance,
    "metrics": apply_metrics, "audit": apply_audit}
assert set(APPLY) == set(REPORT_KINDS)


def _insert_ignore(s: Session, rows: list[dict[str, Any]]) -> set[str]:
    """Insert the report IDs not yet stored; returns those inserted now."""
    if s.get_bind().dialect.name == "postgresql":
        stmt: Any = postgresql.insert(ReceivedReport).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(ReceivedReport).on_conflict_do_nothing()
    # Parameters apart from the statement: it is compiled once and cached, whatever the
    # number of rows.
    # (On the session's connection, past the ORM's bulk machinery.)
    return set(s.connection().execute(stmt.returning(ReceivedReport.id), rows).scalars())


def ingest(s: Session, host: Host, batch: ReportBatch,
           now: datetime | None = None) -> ReportAck:
    now = now or datetime.now(UTC)
    if len(batch.reports) > MAX_BATCH:
        raise BadReport(f"A batch holds at most {MAX_BATCH} reports.")
    if not 0 <= batch.dropped < 2**63:
        raise BadReport("'dropped' must be a count of reports (0 to 2**63 - 1).")
    rejected: list[Rejected] = []
    good: dict[str, Report] = {}
    for r in batch.reports:
        if not REPORT_ID.match(r.id):
            rejected.append(Rejected(r.id[:120], "the ID is not host:epoch:sequence"))
        elif r.kind not in REPORT_KINDS:
            rejected.append(Rejected(r.id, f"unknown kind {r.kind[:20]!r}"))
        elif not 0 < r.created < MAX_TIME:
            rejected.append(Rejected(r.id, "'created' is not a time (seconds since 1970, "
                                           "before the year 5000)"))
        elif (why := bad_text(r.body)) is not None:
            rejected.append(Rejected(r.id, why))
        else:
            good.setdefault(r.id, r)
    new: set[str] = set()
    if good:
        new = _insert_ignore(s, [{"host_id": host.id, "id": r.id, "kind": r.kind,
                                  "created": r.created, "received_at": now}
                                 for r in good.values()])
    for r in sorted((good[i] for i in new), key=lambda r: r.created):
        try:
            # Each apply_* checks everything before it changes anything, so a bad report
            # leaves no trace but its ID (no savepoint needed).
            APPLY[r.kind](s, host, r)
        except BadReport as e:
            rejected.append(Rejected(r.id, str(e)))
    bad = {x.id for x in rejected}
    host.reports += len(new - bad)
    host.dropped = max(host.dropped, batch.dropped)
    host.last_seen = now
    return ReportAck([i for i in good if i not in bad], rejected, len(good) - len(new))
