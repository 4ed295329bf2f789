"""The outbox: reports for the fleet server, kept on disk until the server has them.

Every report (inventory, alerts, compliance results, metrics, audit heads) is
put into a SQLite database first and sent from there, so a report survives a
restart of the agent, a reboot and a network outage, and is delivered at least
once. Each carries an ID made on the host (``host-id:epoch:sequence``; the
epoch is drawn when the database is made, so a lost database cannot reuse an
ID), and the server drops the copies a lost acknowledgement sends it twice.

The database has a size limit, counted on disk (the database and its WAL):
report bodies may fill half of it, the rest is for SQLite's own pages, and a
checkpoint and an incremental vacuum give freed space back. When a new report
would pass it, the oldest reports of the least important kind go first
(metrics before inventory before alerts and audit heads); each report dropped
that way is counted, and the count travels with the next batch so the fleet
sees that something was lost.

The outbox looks after itself: a database SQLite calls corrupt is moved aside
(``outbox.db.corrupt``) and made again, its notes (the cursors of what was
queued) restored from the copy kept beside it; a full disk drops the oldest
reports, or refuses the new one, and counts it, and the outbox works again as
soon as there is room. :attr:`Outbox.events` says what happened, for the
caller to write to the audit trail.
"""

from __future__ import annotations

import contextlib
import json
import os
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
DEFAULT_LIMIT = 32 << 20  # bytes on disk: the database and its WAL together
# Report bodies may use 1/CONTENT_SHARE of the limit; the rest is for SQLite's pages,
# indexes and the WAL between checkpoints.
CONTENT_SHARE = 2
# The smallest limit the on-disk check applies (an empty database with its WAL takes a
# few pages; a smaller limit still bounds the report bodies).
MIN_DISK_LIMIT = 128 << 10
# What one delivery batch carries at most (the server reads a batch into memory).
MAX_BATCH_BYTES = 4 << 20
MAX_BACKOFF = 600.0
MAX_REFUSALS = 5  # a report the server refuses this many times is given up (and counted)
CORRUPT_SUFFIX = ".corrupt"  # where a corrupt database is moved
NOTES_SUFFIX = ".notes.json"  # the notes (cursors), kept beside the database
# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF).
SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB = 10, 11, 13, 26
# Reports a full disk kept out of the database, by its path, until the database can
# count them (a full disk cannot take the count either).
UNCOUNTED: dict[str, int] = {}

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


def _code(e: sqlite3.Error) -> int:
    return int(getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF


def _corrupt(e: sqlite3.Error) -> bool:
    if _code(e) in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return True
    text = str(e).lower()
    return "malformed" in text or "not a database" in text


def _full(e: sqlite3.Error) -> bool:
    return _code(e) in (SQLITE_FULL, SQLITE_IOERR) or "full" in str(e).lower()


class Outbox:
    def __init__(self, path: Path, host_id: str, limit: int = DEFAULT_LIMIT,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.path, self.host_id, self.limit, self.clock = path, host_id, limit, clock
        self.rng = rng or random.Random()
        self.events: list[str] = []  # what the outbox did to look after itself
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._open()
        except sqlite3.Error as e:
            if not _corrupt(e):
                raise OutboxError(f"The outbox {path} cannot be opened: {e}.") from e
            self._recreate(e)

    def _open(self) -> None:
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            # Before the first table: deleted reports give their pages back to the disk.
            self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            page = int(self.db.execute("PRAGMA page_size").fetchone()[0])
            wal = max(MIN_DISK_LIMIT, self.limit) // 4
            self.db.execute(f"PRAGMA journal_size_limit={wal}")
            self.db.execute(f"PRAGMA wal_autocheckpoint={max(8, wal // page)}")
            self.db.executescript(SCHEMA)
            if int(self.db.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
                # A database made before: now it can shrink (when the disk has room for
                # the copy VACUUM makes; else another time).
                with contextlib.suppress(sqlite3.OperationalError):
                    self.db.execute("VACUUM")
            self.db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('epoch', ?)",
                            (secrets.token_hex(8),))
            self.epoch = str(self.db.execute("SELECT value FROM meta WHERE name = 'epoch'")
                             .fetchone()[0])
            self.db.execute("SELECT COUNT(*), SUM(LENGTH(body)) FROM message").fetchone()
        except BaseException:
            self.db.close()
            raise

    def _recreate(self, why: sqlite3.Error) -> None:
        """Move the corrupt database aside (one copy is kept, for a post-mortem) and start
        a new one with a new epoch; its notes come from the copy beside it."""
        with contextlib.suppress(sqlite3.Error):
            self.db.close()
        aside = self.path.with_name(self.path.name + CORRUPT_SUFFIX)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise OutboxError(f"The outbox {self.path} is corrupt and cannot be moved "
                              f"aside: {e.strerror or e}.") from e
        try:
            self._open()
            notes = self._saved_notes()
            with self._tx() as db:
                db.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                               sorted(notes.items()))
                self._count(db, "recovered", 1)
        except sqlite3.Error as e:
            raise OutboxError(f"The outbox {self.path} was corrupt and cannot be made "
                              f"again: {e}.") from e
        self.events.append(f"the outbox database was corrupt ({why}); it was moved to "
                           f"{aside.name} and made again, and the reports in it are lost")

    def recover(self, e: sqlite3.Error) -> bool:
        """Make the database again if *e* says it is corrupt; False if it does not."""
        if not _corrupt(e):
            return False
        self._recreate(e)
        return True

    def _saved_notes(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.with_name(self.path.name + NOTES_SUFFIX).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): str(v) for k, v in data.items() if k != "epoch"}

    def save_notes(self) -> None:
        """Copy the notes beside the database (best effort: a full disk keeps the old
        copy), so a corrupt database does not send everything again."""
        try:
            notes = dict(self.db.execute("SELECT name, value FROM meta WHERE name != "
                                         "'epoch'").fetchall())
            path = self.path.with_name(self.path.name + NOTES_SUFFIX)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(notes, sort_keys=True))
            os.replace(tmp, path)
        except (OSError, sqlite3.Error):
            pass

    def close(self) -> None:
        self.save_notes()
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _count(self, db: sqlite3.Connection, name: str, add: int = 0) -> int:
        if add:
            db.execute("INSERT INTO counter (name, value) VALUES (?, ?) ON CONFLICT(name) "
                       "DO UPDATE SET value = value + excluded.value", (name, add))
        row = db.execute("SELECT value FROM counter WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def count(self, name: str, add: int = 0) -> int:
        """A counter kept in the outbox (dropped, truncated, recovered, ...)."""
        if not add:
            return self._count(self.db, name)
        with self._tx() as db:
            return self._count(db, name, add)

    def counters(self) -> dict[str, int]:
        rows = self.db.execute("SELECT name, value FROM counter").fetchall()
        out = {str(k): int(v) for k, v in rows}
        if UNCOUNTED.get(str(self.path)):
            out["dropped"] = out.get("dropped", 0) + UNCOUNTED[str(self.path)]
        return out

    def get(self, name: str, default: str = "") -> str:
        """A note kept beside the reports (what was last queued, for instance)."""
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return str(row[0]) if row else default

    def set_notes(self, notes: dict[str, str]) -> None:
        """Keep *notes* without a report (a cursor moving past what cannot be sent)."""
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                           sorted(notes.items()))

    def max_report(self) -> int:
        """The largest report body this outbox takes, in bytes."""
        from cerulean.protocol.fleet import MAX_REPORT_BYTES

        return min(self.limit // 4, MAX_REPORT_BYTES)

    def put(self, kind: str, body: dict[str, Any], notes: dict[str, str] | None = None) -> int:
        """Keep one report, and *notes* in the same transaction (so a cursor moves exactly
        when the report is queued); returns its sequence number (0: it was dropped, as the
        outbox is full of more important ones, or the disk is full)."""
        if kind not in PRIORITY:
            raise OutboxError(f"Unknown report kind {kind!r}; known: {', '.join(PRIORITY)}.")
        data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if len(data) > self.max_report():
            raise OutboxError(f"A {kind} report of {len(data)} bytes is larger than a quarter "
                              f"of the outbox ({self.limit} bytes) or than a report may be.")
        try:
            seq = self._put(kind, data, notes)
        except sqlite3.Error as e:
            if self.recover(e):
                return self._put(kind, data, notes)
            if not _full(e):
                raise
            # The disk is full: make room among the oldest reports that matter no more
            # than this one, and try once more; else this one is refused.
            try:
                self._drop_oldest(PRIORITY[kind], len(data) * 2)
                seq = self._put(kind, data, notes)
            except sqlite3.Error:
                key = str(self.path)
                UNCOUNTED[key] = UNCOUNTED.get(key, 0) + 1
                self.events.append(f"the disk is full: a new {kind} report was dropped")
                return 0
        self._settle_uncounted()
        self._fit_disk()
        return seq

    def _put(self, kind: str, data: bytes, notes: dict[str, str] | None) -> int:
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                           sorted((notes or {}).items()))
            if not self._make_room(db, len(data), PRIORITY[kind]):
                self._count(db, "dropped", 1)  # the new one is the least important
                return 0
            cur = db.execute("INSERT INTO message (kind, priority, created, body) "
                             "VALUES (?, ?, ?, ?)", (kind, PRIORITY[kind], self.clock(), data))
            return int(cur.lastrowid or 0)

    def _settle_uncounted(self) -> None:
        """Count what a full disk dropped, now that the database takes writes again."""
        n = UNCOUNTED.pop(str(self.path), 0)
        if n:
            try:
                self.count("dropped", n)
                self.count("dropped-disk-full", n)
            except sqlite3.Error:
                UNCOUNTED[str(self.path)] = UNCOUNTED.get(str(self.path), 0) + n

    def _drop_oldest(self, priority: int, need: int) -> int:
        """Delete the oldest reports of *priority* or less until *need* bytes are freed;
        returns how many went."""
        victims, freed = [], 0
        for seq, size in self.db.execute("SELECT seq, LENGTH(body) FROM message WHERE "
                                         "priority <= ? ORDER BY priority, seq", (priority,)):
            if freed >= need:
                break
            victims.append(seq)
            freed += int(size)
        if victims:
            with self._tx() as db:
                db.executemany("DELETE FROM message WHERE seq = ?", [(v,) for v in victims])
                self._count(db, "dropped", len(victims))
        return len(victims)

    def disk_bytes(self) -> int:
        """The outbox's size on disk: the database and its WAL."""
        total = 0
        for name in (str(self.path), f"{self.path}-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(name).st_size
        return total

    def _shrink(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.execute("PRAGMA incremental_vacuum")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _fit_disk(self) -> None:
        """Keep the files within the limit: checkpoint and vacuum first, then drop the
        oldest of the least important reports."""
        bound = max(self.limit, MIN_DISK_LIMIT)
        if self.disk_bytes() <= bound:
            return
        self._shrink()
        while self.disk_bytes() > bound and self._drop_oldest(max(PRIORITY.values()),
                                                              self.disk_bytes() - bound):
            self._shrink()

    def _used(self, db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM message")
                   .fetchone()[0])

    def _make_room(self, db: sqlite3.Connection, need: int, priority: int) -> bool:
        """Drop the oldest reports less important than, or as important as, the new one
        until it fits; False (nothing dropped) when only more important ones would go."""
        budget = self.limit // CONTENT_SHARE
        used = self._used(db)
        victims = []
        for seq, size in db.execute("SELECT seq, LENGTH(body) FROM message WHERE priority <= ? "
                                    "ORDER BY priority, seq", (priority,)):
            if used + need <= budget:
                break
            victims.append(seq)
            used -= int(size)
        if used + need > budget:
            return False
        db.executemany("DELETE FROM message WHERE seq = ?", [(v,) for v in victims])
        self._count(db, "dropped", len(victims))
        return True

    def pending(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM message").fetchone()[0])

    def used_bytes(self) -> int:
        return self._used(self.db)

    def dropped(self) -> int:
        return self._count(self.db, "dropped") + UNCOUNTED.get(str(self.path), 0)

    def due(self, limit: int = 100, max_bytes: int = MAX_BATCH_BYTES) -> list[Message]:
        """The reports due now, oldest first: at most *limit* of them and *max_bytes* of
        bodies (always at least one)."""
        out: list[Message] = []
        size = 0
        for seq, kind, created, length in self.db.execute(
                "SELECT seq, kind, created, LENGTH(body) FROM message WHERE next_try <= ? "
                "ORDER BY seq LIMIT ?", (self.clock(), limit)).fetchall():
            if out and size + int(length) > max_bytes:
                break
            size += int(length)
            row = self.db.execute("SELECT body, attempts FROM message WHERE seq = ?",
                                  (seq,)).fetchone()
            if row is not None:
                out.append(Message(f"{self.host_id}:{self.epoch}:{seq}", seq, kind, created,
                                   json.loads(row[0]), int(row[1])))
        return out

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
        failed). A *send* that raises OSError fails the whole batch; one that raises
        CeruleanError (the server refused it) is tried again report by report."""
        from cerulean.errors import CeruleanError

        delivered = failed = 0
        try:
            while True:
                msgs = self.due(batch)
                if not msgs:
                    return delivered, failed
                try:
                    acked = send(msgs, self.dropped())
                except OSError:
                    acked = set()
                except CeruleanError:
                    # The server answered, and refused the batch: one report in it may be
                    # what it cannot take. They go one by one, so the others are not held
                    # back with it; one refused MAX_REFUSALS times is given up and counted.
                    acked = set()
                    for m in msgs:
                        try:
                            acked |= send([m], self.dropped())
                        except OSError:
                            break  # the network now: the rest wait for the next round
                        except CeruleanError:
                            if m.attempts + 1 >= MAX_REFUSALS:
                                acked.add(m.id)
                                self.count("unsendable", 1)
                ok = [m.seq for m in msgs if m.id in acked]
                bad = [m.seq for m in msgs if m.id not in acked]
                self.acknowledge(ok)
                self.failed(bad)
                delivered += len(ok)
                failed += len(bad)
                if bad:
                    return delivered, failed
        except sqlite3.Error as e:
            if not self.recover(e):
                raise
            return delivered, failed
        finally:
            if delivered:
                self._fit_disk()


def families(path: Path) -> list[Any]:
    """The outbox at *path* as metrics (none when there is none, or it cannot be read):
    reports waiting, bytes on disk, and its counters (``dropped``, ``dropped-disk-full``,
    ``truncated``, ``unsendable``, ``recovered``) as ``cerulean_fleet_outbox_*_total``."""
    from cerulean.agent.metrics import Family

    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            pending = int(db.execute("SELECT COUNT(*) FROM message").fetchone()[0])
            counters = dict(db.execute("SELECT name, value FROM counter").fetchall())
        finally:
            db.close()
    except sqlite3.Error:
        return []
    if UNCOUNTED.get(str(path)):
        counters["dropped"] = counters.get("dropped", 0) + UNCOUNTED[str(path)]
    size = 0
    for name in (str(path), f"{path}-wal"):
        with contextlib.suppress(OSError):
            size += os.stat(name).st_size
    out = [Family("cerulean_fleet_outbox_reports", "gauge",
                  "Reports waiting in the outbox for the fleet server."),
           Family("cerulean_fleet_outbox_bytes", "gauge",
                  "The outbox's size on disk (database and WAL).")]
    out[0].add(pending)
    out[1].add(size)
    for name, value in sorted(counters.items()):
        fam = Family(f"cerulean_fleet_outbox_{str(name).replace('-', '_')}_total", "counter",
                     f"Reports the outbox counted as {name} (it looked after itself).")
        fam.add(int(value))
        out.append(fam)
    return out
