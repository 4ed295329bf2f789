"""The outbox: reports for the fleet server, kept on disk until the server has them.

Every report (inventory, alerts, compliance results, metrics, audit heads) is
put into a SQLite database first and sent from there, so a report survives a
restart of the agent, a reboot and a network outage, and is delivered at least
once. Each carries an ID made on the host (``host-id:epoch:sequence``; the
epoch is drawn when the database is made, so a lost database cannot reuse an
ID), and the server drops the copies a lost acknowledgement sends it twice.

The database has a size limit. When a new report would pass it, the oldest
reports of the least important kind go first (metrics before inventory before
alerts and audit heads); each report dropped that way is counted, and the count
travels with the next batch so the fleet sees that something was lost.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Lower goes first when space runs out (the kinds are cerulean.protocol.fleet.REPORT_KINDS).
PRIORITY = {"metrics": 0, "inventory": 1, "compliance": 2, "alert": 3, "audit": 3}
DEFAULT_LIMIT = 32 << 20
MAX_BACKOFF = 600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created REAL NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS message_due ON message (next_try, seq);
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Message:
    id: str  # host-id:epoch:seq, unique for ever
    seq: int
    kind: str
    created: float
    body: dict[str, Any]
    attempts: int


class OutboxError(Exception):
    pass


class Outbox:
    def __init__(self, path: Path, host_id: str, limit: int = DEFAULT_LIMIT,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.path, self.host_id, self.limit, self.clock = path, host_id, limit, clock
        self.rng = rng or random.Random()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('epoch', ?)",
                        (secrets.token_hex(8),))
        self.epoch = str(self.db.execute("SELECT value FROM meta WHERE name = 'epoch'")
                         .fetchone()[0])

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _count(self, db: sqlite3.Connection, name: str, add: int = 0) -> int:
        if add:
            db.execute("INSERT INTO counter (name, value) VALUES (?, ?) ON CONFLICT(name) "
                       "DO UPDATE SET value = value + excluded.value", (name, add))
        row = db.execute("SELECT value FROM counter WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def get(self, name: str, default: str = "") -> str:
        """A note kept beside the reports (what was last queued, for instance)."""
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return str(row[0]) if row else default

    def put(self, kind: str, body: dict[str, Any], notes: dict[str, str] | None = None) -> int:
        """Keep one report, and *notes* in the same transaction (so a cursor moves exactly
        when the report is queued); returns its sequence number (0: it was dropped, as the
        outbox is full of more important ones)."""
        if kind not in PRIORITY:
            raise OutboxError(f"Unknown report kind {kind!r}; known: {', '.join(PRIORITY)}.")
        data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if len(data) > self.limit // 4:
            raise OutboxError(f"A {kind} report of {len(data)} bytes is larger than a quarter "
                              f"of the outbox ({self.limit} bytes).")
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                           sorted((notes or {}).items()))
            if not self._make_room(db, len(data), PRIORITY[kind]):
                self._count(db, "dropped", 1)  # the new one is the least important
                return 0
            cur = db.execute("INSERT INTO message (kind, priority, created, body) "
                             "VALUES (?, ?, ?, ?)", (kind, PRIORITY[kind], self.clock(), data))
            return int(cur.lastrowid or 0)

    def _used(self, db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM message")
                   .fetchone()[0])

    def _make_room(self, db: sqlite3.Connection, need: int, priority: int) -> bool:
        """Drop the oldest reports less important than, or as important as, the new one
        until it fits; False (nothing dropped) when only more important ones would go."""
        used = self._used(db)
        victims = []
        for seq, size in db.execute("SELECT seq, LENGTH(body) FROM message WHERE priority <= ? "
                                    "ORDER BY priority, seq", (priority,)):
            if used + need <= self.limit:
                break
            victims.append(seq)
            used -= int(size)
        if used + need > self.limit:
            return False
        db.executemany("DELETE FROM message WHERE seq = ?", [(v,) for v in victims])
        self._count(db, "dropped", len(victims))
        return True

    def pending(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM message").fetchone()[0])

    def used_bytes(self) -> int:
        return self._used(self.db)

    def dropped(self) -> int:
        return self._count(self.db, "dropped")

    def due(self, limit: int = 100) -> list[Message]:
        rows = self.db.execute(
            "SELECT seq, kind, created, body, attempts FROM message WHERE next_try <= ? "
            "ORDER BY seq LIMIT ?", (self.clock(), limit)).fetchall()
        return [Message(f"{self.host_id}:{self.epoch}:{seq}", seq, kind, created,
                        json.loads(body),
                        attempts) for seq, kind, created, body, attempts in rows]

    def acknowledge(self, seqs: Iterable[int]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM message WHERE seq = ?", [(s,) for s in seqs])

    def failed(self, seqs: Iterable[int]) -> None:
        """These were not delivered: try again later, backing off (with jitter)."""
        now = self.clock()
        with self._tx() as db:
            for s in seqs:
                row = db.execute("SELECT attempts FROM message WHERE seq = ?", (s,)).fetchone()
                if row is None:
                    continue
                attempts = int(row[0]) + 1
                delay = min(MAX_BACKOFF, 5.0 * 2 ** (attempts - 1))
                delay *= 0.5 + self.rng.random() / 2
                db.execute("UPDATE message SET attempts = ?, next_try = ? WHERE seq = ?",
                           (attempts, now + delay, s))

    def deliver(self, send: Callable[[list[Message], int], set[str]],
                batch: int = 100) -> tuple[int, int]:
        """Send what is due in batches; *send* gets the messages and the count of reports
        dropped so far, and returns the IDs the server acknowledged. Returns (delivered,
        failed). A *send* that raises OSError fails the whole batch."""
        delivered = failed = 0
        while True:
            msgs = self.due(batch)
            if not msgs:
                return delivered, failed
            try:
                acked = send(msgs, self.dropped())
            except OSError:
                acked = set()
            ok = [m.seq for m in msgs if m.id in acked]
            bad = [m.seq for m in msgs if m.id not in acked]
            self.acknowledge(ok)
            self.failed(bad)
            delivered += len(ok)
            failed += len(bad)
            if bad:
                return delivered, failed
