"""The agent's audit trail: an append-only log in which every entry names the one before.

Every action of the agent (an update staged, applied or given up, a fix applied,
an alert, a policy change) is appended to ``/var/lib/cerulean/audit/audit.jsonl``
as one line of canonical JSON::

    {"action": "update.staged", "actor": "updater", "detail": {...},
     "hash": "…", "prev": "…", "seq": 7, "time": "2026-11-26T22:00:00Z"}

``hash`` is the sha256 of the entry without its ``hash`` key (canonical JSON:
sorted keys, no spaces), and ``prev`` is the hash of the entry before it (64
zeros for the first). ``audit.head`` beside the log holds the sequence number
and hash of the last entry, so that cutting entries off the end is found too.
``audit.mark`` is the high-water mark: the entry about to be written, recorded
before the entry itself, plus the entry before the oldest segment kept and the
agent's own counts (rotations, recoveries, ...). An entry only a mark names is
what a power cut left; a whole entry nothing names was not written by the agent.

The live log is archived into a segment (``audit.000000000001.jsonl``, named by
its first entry) once it reaches :data:`ROTATE_BYTES`; the chain goes on across
segments, and the oldest go beyond :data:`KEEP_SEGMENTS`. No entry is longer
than :data:`MAX_ENTRY_BYTES`: a larger detail is cut down, with a marker, before
it is written.

:func:`verify` reads the whole log and names the first entry that was edited,
removed, inserted or moved. A hash chain on the host itself stops everyone
who is not root and catches every careless edit; against root, who could
rewrite the whole chain, the head hash has to live somewhere else as well:
the agent reports it to the fleet, which keeps the heads it has seen
(:meth:`AuditLog.anchor`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from cerulean.agent.fileio import fsync_dir
from cerulean.errors import CeruleanError
from cerulean.protocol.audit import GENESIS, canonical, entry_hash

# The longest line (entry and newline) the agent writes; a larger entry has its detail cut
# down to a marker (rule, priority, the start of the message, the size and sha256 of what
# was cut) before it is written, so no entry is ever torn by its size.
MAX_ENTRY_BYTES = 64 << 10
# The live log is archived into a segment once it holds this many bytes.
ROTATE_BYTES = 8 << 20
# Archived segments kept beside the live log; the oldest beyond this are removed (the mark
# keeps the entry before the oldest one kept, so the chain still verifies).
KEEP_SEGMENTS = 8
# How much is read at a time when the end of the log is looked at (recovery, repair).
READ_CHUNK = 64 << 10
# Texts kept in a cut-down entry: the message and the other fields.
KEEP_MESSAGE = 2000
KEEP_FIELD = 200
KEEP_EVIDENCE = 32  # evidence fields an entry cut down keeps (each cut to KEEP_FIELD)
KEYS = {"seq", "time", "actor", "action", "detail", "prev", "hash"}
LONG = (-1, "")  # a last line too long to judge from the end
COUNTS = ("rotated", "pruned", "recovered", "truncated", "head-rebuilt", "mark-rebuilt",
          "rejected", "restarted", "repaired")


class AuditError(CeruleanError):
    pass


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based line of the log (0: the head or mark file)
    message: str
    file: str = ""  # the archived segment the line is in ("": the live log)


@dataclass(frozen=True)
class Verdict:
    entries: int
    head: str  # hash of the last good entry
    problems: tuple[Problem, ...]
    notes: tuple[str, ...] = ()  # what a power cut left (not a problem)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "head": self.head,
                "problems": [{"line": p.line, "message": p.message,
                              **({"file": p.file} if p.file else {})} for p in self.problems],
                "notes": list(self.notes)}


@dataclass(frozen=True)
class Notice:
    """Something the trail did to itself, written as an ``alert.RULE`` entry (so it
    reaches the fleet as an alert) and counted in the mark (so it is a metric)."""

    rule: str
    priority: str
    message: str
    evidence: Mapping[str, Any]
    count: str

    def detail(self, now: datetime | None) -> dict[str, Any]:
        return {"rule": self.rule, "priority": self.priority, "tags": ["cerulean-agent"],
                "message": self.message, "evidence": dict(self.evidence),
                "time": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _entry(raw: bytes) -> dict[str, Any] | None:
    """The entry on this line if it is one as the agent writes it (own hash included)."""
    try:
        d = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(d, dict) or set(d) != KEYS or canonical(d) + b"\n" != raw + (
            b"" if raw.endswith(b"\n") else b"\n") or d["hash"] != entry_hash(d):
        return None
    return d


def _cut(text: str, keep: int) -> str:
    """*text* cut to *keep* characters, saying how many more there were."""
    return text if len(text) <= keep else f"{text[:keep]}…[{len(text) - keep} more characters]"


def shrink(actor: str, action: str, detail: Mapping[str, Any], size: int
           ) -> tuple[str, str, dict[str, Any]]:
    """An entry of *size* bytes, too large to write, cut down to what says what it was."""
    kept: dict[str, Any] = {}
    for k in ("rule", "priority", "time", "check", "policy"):
        if isinstance(detail.get(k), str):
            kept[k] = detail[k][:KEEP_FIELD]
    msg = detail.get("message")
    if isinstance(msg, str):
        kept["message"] = _cut(msg, KEEP_MESSAGE)
    tags = detail.get("tags")
    if isinstance(tags, list):
        kept["tags"] = [str(t)[:64] for t in tags[:16]]
    evidence = detail.get("evidence")
    if isinstance(evidence, Mapping):
        # What the alert was about (the program, the file) matters most: every field is
        # kept, cut short, as long as that fits.
        kept["evidence"] = {str(k)[:KEEP_FIELD]: v if v is None or isinstance(v, bool | int | float)
                            else _cut(str(v), KEEP_FIELD)
                            for k, v in list(evidence.items())[:KEEP_EVIDENCE]}
        if len(canonical(kept)) > MAX_ENTRY_BYTES // 2:
            kept["evidence"] = {}
    elif "evidence" in detail:
        kept["evidence"] = {}
    kept["truncated"] = {"bytes": size, "limit": MAX_ENTRY_BYTES,
                         "sha256": hashlib.sha256(canonical(dict(detail))).hexdigest()}
    return actor[:KEEP_FIELD], action[:KEEP_FIELD], kept


class AuditLog:
    """The log at *path* (its head file is *path* with the suffix ``.head``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.head_path = path.with_suffix(".head")
        self.mark_path = path.with_suffix(".mark")
        self.rejected_path = path.with_suffix(".rejected")
        self._segment = re.compile(re.escape(path.stem) + r"\.(\d{12})"
                                   + re.escape(path.suffix) + "$")

    # -- files ------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """A shared hold on the trail's lock while it is read whole: an append (which
        writes its line, then the head) is never seen half done. Where the lock cannot
        be opened (no trail yet, a read-only copy), the trail is read as it is."""
        try:
            fd = os.open(self.path.with_suffix(".lock"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # never made by a reader
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def segments(self) -> list[Path]:
        """The archived segments, oldest first."""
        try:
            names = os.listdir(self.path.parent)
        except FileNotFoundError:
            return []
        return [self.path.parent / n for n in sorted(n for n in names if self._segment.match(n))]

    def files(self) -> list[Path]:
        """Every file of the trail in order: the archived segments, then the live log."""
        return [*self.segments(), self.path]

    def _head(self) -> tuple[int, str]:
        head = self._read_head()
        return head if head is not None else (0, GENESIS)

    def _read_head(self) -> tuple[int, str] | None:
        """The head file's (seq, hash); None when there is none; AuditError when damaged."""
        try:
            d = json.loads(self.head_path.read_bytes())
            seq, digest = d["seq"], d["hash"]
            if not isinstance(seq, int) or not isinstance(digest, str) or len(digest) != 64:
                raise TypeError
            return seq, digest
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"The audit trail's head file {self.head_path} is damaged; "
                             "run cerulean audit repair.") from None

    def head(self) -> tuple[int, str]:
        """The last entry's (seq, hash) as the head file records it ((0, GENESIS): none)."""
        return self._head()

    def mark(self) -> dict[str, Any]:
        """The high-water mark ({} when there is none or it cannot be read)."""
        try:
            d = json.loads(self.mark_path.read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(d, dict) or not isinstance(d.get("seq"), int) \
                or not isinstance(d.get("hash"), str):
            return {}
        return d

    def _write_json(self, path: Path, data: Mapping[str, Any]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(canonical(data) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _write_head(self, seq: int, digest: str) -> None:
        self._write_json(self.head_path, {"seq": seq, "hash": digest})

    # -- reading ----------------------------------------------------------------------------

    def _raw(self, files: list[Path] | None = None) -> Iterator[tuple[Path, int, bytes]]:
        """Every line of the trail with its file and 1-based line number, one at a time."""
        for path in self.files() if files is None else files:
            try:
                f = open(path, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                continue
            with f:
                for n, raw in enumerate(f, start=1):
                    yield path, n, raw

    def entries(self) -> Iterator[dict[str, Any]]:
        """The entries as written, oldest first, read one line at a time (unchecked; see
        :meth:`verify`)."""
        for _, _, raw in self._raw():
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            if isinstance(d, dict):
                yield d

    def entries_after(self, seq: int, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The entries after entry *seq*, at most *limit*, read one line at a time; the
        segments that end before it are not read at all. Where the sequence numbers jump
        (the live log may have been archived between listing the files and opening it)
        the files are listed again and read on from the last entry; a jump seen twice
        is real: entries removed with the oldest segments."""
        if limit is not None and limit <= 0:
            return
        count, last, retried_at = 0, seq, None
        while True:
            jump = False
            once = self._entries_after_once(last)
            try:
                for d in once:
                    if d["seq"] > last + 1 and retried_at != last:
                        jump = True
                        break
                    yield d
                    last = d["seq"]
                    count += 1
                    if limit is not None and count >= limit:
                        return
            finally:
                once.close()
            if not jump:
                return
            retried_at = last

    def _entries_after_once(self, seq: int) -> Generator[dict[str, Any], None, None]:
        files = self.files()
        firsts = [int(m.group(1)) for p in files[:-1]
                  if (m := self._segment.match(p.name)) is not None]
        try:
            with open(self.path, "rb") as f:
                live = _entry(f.readline(2 * MAX_ENTRY_BYTES))
        except FileNotFoundError:
            live = None
        firsts.append(live["seq"] if live is not None else 1 << 62)
        # The first file to read: the last whose first entry is at or before the one wanted.
        skip = max([0, *(i for i, first in enumerate(firsts) if first <= seq + 1)])
        for _, _, raw in self._raw(files[skip:]):
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            if isinstance(d, dict) and isinstance(d.get("seq"), int) and d["seq"] > seq:
                yield d

    def _last_line(self, path: Path) -> tuple[int, int, bytes | None]:
        """The file's size, where its last whole line starts, and that line (None when the
        file has no whole line, or the line is longer than any the agent writes)."""
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return 0, 0, None
        with f:
            size = os.fstat(f.fileno()).st_size
            end = _last_newline(f, size)  # just after the last whole line
            if end == 0:
                return size, 0, None
            floor = max(0, end - 1 - 2 * MAX_ENTRY_BYTES)
            start = _last_newline(f, end - 1, floor)
            if start == floor and floor > 0:
                return size, start, None
            f.seek(start)
            return size, start, f.read(end - start)

    def _last_of(self, path: Path) -> tuple[int, str] | None:
        """(seq, hash) of the file's last whole line if it is a valid entry; LONG when the
        line is longer than any the agent writes now (one written before entries were
        bounded: it cannot be judged from the end)."""
        _, start, raw = self._last_line(path)
        if raw is None:
            return LONG if start > 0 else None
        d = _entry(raw)
        return (d["seq"], d["hash"]) if d is not None else None

    def _last_entry(self) -> tuple[int, str] | None:
        """(seq, hash) of the trail's last whole line if it is a valid entry."""
        for path in reversed(self.files()):
            if _size(path):
                return self._last_of(path)
        return None

    # -- writing ----------------------------------------------------------------------------

    def append(self, actor: str, action: str, detail: Mapping[str, Any] | None = None,
               now: datetime | None = None) -> dict[str, Any]:
        """Append one entry (durably: the mark, the log and then the head are synced)."""
        with self._locked():
            mark = self.mark()
            for notice in self._recover(mark):
                self._notice(notice, mark, now)
            if _size(self.path) >= ROTATE_BYTES:
                self._rotate(mark, now)
            return self._append(actor, action, detail, now, mark)

    def repair(self, now: datetime | None = None) -> list[str]:
        """What ``cerulean audit repair`` does: finish what a power cut left, set aside a
        torn or unknown end, rebuild a damaged, missing or wrong head file from the last
        valid entry; each step is an entry, and a last one says the repair ran. Entries
        are never rewritten: an edited trail stays broken, and verify still says where."""
        with self._locked():
            mark = self.mark()
            done = self._recover(mark, force=True)
            for notice in done:
                self._notice(notice, mark, now)
            said = [n.message for n in done]
            self._notice(Notice("audit-trail-repaired", "warning",
                                "cerulean audit repair ran: " + ("; ".join(said) if said
                                                                 else "nothing to repair"),
                                {"steps": len(said)}, "repaired"), mark, now)
            return said

    def _notice(self, n: Notice, mark: dict[str, Any], now: datetime | None) -> None:
        counts = mark.setdefault("counts", {})
        counts[n.count] = int(counts.get(n.count, 0)) + 1
        self._append("audit", f"alert.{n.rule}", n.detail(now), now, mark)

    def _append(self, actor: str, action: str, detail: Mapping[str, Any] | None,
                now: datetime | None, mark: dict[str, Any]) -> dict[str, Any]:
        seq, prev = self._head()
        entry: dict[str, Any] = {
            "seq": seq + 1,
            "time": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "actor": actor, "action": action, "detail": dict(detail or {}), "prev": prev,
        }
        entry["hash"] = entry_hash(entry)
        line = canonical(entry) + b"\n"
        if len(line) > MAX_ENTRY_BYTES:
            del entry["hash"]
            entry["actor"], entry["action"], entry["detail"] = shrink(
                actor, action, entry["detail"], len(line))
            counts = mark.setdefault("counts", {})
            counts["truncated"] = int(counts.get("truncated", 0)) + 1
            entry["hash"] = entry_hash(entry)
            line = canonical(entry) + b"\n"
        # The mark first: an entry it names and the head does not is one a power cut
        # interrupted, any other is not the agent's.
        mark.update(seq=entry["seq"], hash=entry["hash"])
        self._write_json(self.mark_path, mark)
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._write_head(entry["seq"], entry["hash"])
        return entry

    def _rotate(self, mark: dict[str, Any], now: datetime | None) -> None:
        """Archive the live log as a segment; drop the oldest beyond KEEP_SEGMENTS."""
        with open(self.path, "rb") as f:
            first = _entry(f.readline(2 * MAX_ENTRY_BYTES))
        seq = first["seq"] if first is not None else self._head()[0]
        name = self.path.with_name(f"{self.path.stem}.{seq:012d}{self.path.suffix}")
        if name.exists():  # never over an archived segment
            return
        os.replace(self.path, name)
        fsync_dir(self.path.parent)
        dropped = []
        segments = self.segments()
        for old in segments[:max(0, len(segments) - KEEP_SEGMENTS)]:
            last = self._last_line(old)[2]
            d = _entry(last) if last is not None else None
            if d is not None:
                mark["base"] = {"seq": d["seq"], "hash": d["hash"]}
                self._write_json(self.mark_path, mark)
            old.unlink()
            dropped.append(old.name)
            counts = mark.setdefault("counts", {})
            counts["pruned"] = int(counts.get("pruned", 0)) + 1
        fsync_dir(self.path.parent)
        self._notice(Notice(
            "audit-trail-rotated", "info",
            f"The audit trail reached {ROTATE_BYTES} bytes: entries from {seq} on are "
            f"archived in {name.name}"
            + (f"; the oldest segments went ({', '.join(dropped)})" if dropped else "") + ".",
            {"segment": name.name, "first": seq, "removed": dropped,
             "keep": KEEP_SEGMENTS}, "rotated"), mark, now)

    def _recover(self, mark: dict[str, Any], force: bool = False) -> list[Notice]:
        """Finish what a power cut interrupted, and make sure the next entry can be written
        after the last one; says what it did.

        A power cut leaves a torn last line (no newline: cut off, whatever its size) or a
        whole last entry the mark names and the head does not yet (the head moves on to
        it). A whole entry nothing names is not the agent's: it is set aside into
        ``audit.rejected``. A damaged or missing head file is rebuilt from the last valid
        entry (*force*: also a head that names another entry than the last). A trail that
        is gone while the mark remains goes on from the mark, so the gap shows.
        """
        out: list[Notice] = []
        # 1. A torn end, of any size.
        size = _size(self.path)
        if size:
            with open(self.path, "r+b") as f:
                f.seek(size - 1)
                keep = size if f.read(1) == b"\n" else _last_newline(f, size)
                if keep < size:
                    digest = hashlib.sha256()
                    f.seek(keep)
                    with open(self.rejected_path, "ab") as rej:
                        while chunk := f.read(READ_CHUNK):
                            digest.update(chunk)
                            rej.write(chunk)
                        rej.write(b"\n")
                        rej.flush()
                        os.fsync(rej.fileno())
                    f.truncate(keep)
                    f.flush()
                    os.fsync(f.fileno())
                    out.append(Notice(
                        "audit-trail-recovered", "warning",
                        f"a torn last entry ({size - keep} bytes) was cut off and kept in "
                        f"{self.rejected_path.name}",
                        {"bytes": size - keep, "sha256": digest.hexdigest()}, "recovered"))
        # 2. The head.
        try:
            head = self._read_head()
            damaged = False
        except AuditError:
            head, damaged = None, True
        last = self._last_entry()
        if last == LONG and head is None:
            # A line written before entries were bounded: read it through (rare).
            last = None
            for _, _, raw in self._raw():
                d = _entry(raw)
                last = (d["seq"], d["hash"]) if d is not None else last
        elif last == LONG:
            return out  # nothing to judge from the end
        if head is None:
            if last is not None:
                self._write_head(*last)
                out.append(Notice(
                    "audit-head-rebuilt", "warning",
                    f"the head file was {'damaged' if damaged else 'missing'}; it was "
                    f"rebuilt from the last entry, {last[0]}",
                    {"seq": last[0], "hash": last[1],
                     "mark": {"seq": mark.get("seq"), "hash": mark.get("hash")}},
                    "head-rebuilt"))
            elif mark.get("seq"):
                self._write_head(mark["seq"], mark["hash"])
                out.append(Notice(
                    "audit-trail-restarted", "critical",
                    f"the audit trail and its head are gone, but entry {mark['seq']} had "
                    "been written: the trail was deleted; it goes on from that entry",
                    {"seq": mark["seq"], "hash": mark["hash"]}, "restarted"))
            elif damaged:
                self.head_path.unlink()
                out.append(Notice("audit-head-rebuilt", "warning",
                                  "the head file was damaged and the trail is empty; it "
                                  "starts again", {}, "head-rebuilt"))
            return out
        mseq, mhash = mark.get("seq"), mark.get("hash")
        if self.mark_path.exists() and not mark:
            out.append(Notice("audit-mark-rebuilt", "warning",
                              f"the mark {self.mark_path.name} was damaged; it is written "
                              "again with this entry", {}, "mark-rebuilt"))
        elif isinstance(mseq, int) and (mseq > head[0] + 1 or mseq < head[0]
                                        or (mseq == head[0] and mhash != head[1])):
            out.append(Notice(
                "audit-trail-cut", "critical",
                f"the head names entry {head[0]}, but the agent last wrote entry {mseq} "
                "(the mark): the trail was cut back, rewritten or written past by hand; "
                f"it goes on from entry {head[0]}",
                {"head": {"seq": head[0], "hash": head[1]},
                 "mark": {"seq": mseq, "hash": mhash}}, "restarted"))
        if last is None and head[0] > 0:
            out.append(Notice(
                "audit-trail-restarted", "critical",
                f"the audit trail is gone, but its head names entry {head[0]}: the trail "
                "was deleted; it goes on from that entry",
                {"seq": head[0], "hash": head[1]}, "restarted"))
        if last is None or last == head:
            return out
        lseq, lhash = last
        if lseq == head[0] + 1 and (mark.get("seq"), mark.get("hash")) == last \
                and self._follows(head):
            self._write_head(lseq, lhash)
            out.append(Notice(
                "audit-trail-recovered", "warning",
                f"the head moved on to entry {lseq}, written before a power cut",
                {"seq": lseq, "hash": lhash}, "recovered"))
        elif lseq > head[0]:
            moved = self._set_aside(head)
            if moved:
                out.append(Notice(
                    "audit-entry-rejected", "critical",
                    f"{moved} entr{'y' if moved == 1 else 'ies'} after entry {head[0]} "
                    f"that the agent did not write (the head and the mark name neither) "
                    f"{'was' if moved == 1 else 'were'} set aside into "
                    f"{self.rejected_path.name}",
                    {"after": head[0], "entries": moved, "last": {"seq": lseq,
                                                                  "hash": lhash}},
                    "rejected"))
            elif force:
                self._write_head(lseq, lhash)
                out.append(Notice("audit-head-rebuilt", "warning",
                                  f"the head named entry {head[0]}; it was rebuilt from "
                                  f"the last entry, {lseq}",
                                  {"before": list(head), "seq": lseq}, "head-rebuilt"))
        elif force:
            self._write_head(lseq, lhash)
            out.append(Notice("audit-head-rebuilt", "warning",
                              f"the head named entry {head[0]}, but the trail ends at "
                              f"entry {lseq}; the head was rebuilt from it",
                              {"before": list(head), "seq": lseq}, "head-rebuilt"))
        return out

    def _follows(self, head: tuple[int, str]) -> bool:
        """Whether the live log's last entry follows *head* (seq and prev)."""
        _, _, raw = self._last_line(self.path)
        d = _entry(raw) if raw is not None else None
        return d is not None and d["seq"] == head[0] + 1 and d["prev"] == head[1]

    def _set_aside(self, head: tuple[int, str]) -> int:
        """Move the live log's lines after the entry *head* names into audit.rejected;
        how many (0: that entry is not in the live log, nothing moved)."""
        segments = self.segments()
        offset = 0
        found = head == (0, GENESIS) or (bool(segments) and self._last_of(segments[-1]) == head)
        with open(self.path, "r+b") as f:
            if not found:
                for raw in f:
                    offset += len(raw)
                    d = _entry(raw)
                    if d is not None and (d["seq"], d["hash"]) == head:
                        found = True
                        break
            if not found:
                return 0
            f.seek(offset)
            moved = 0
            with open(self.rejected_path, "ab") as rej:
                for raw in f:
                    rej.write(raw)
                    moved += 1
                rej.flush()
                os.fsync(rej.fileno())
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
        return moved

    # -- for the fleet ----------------------------------------------------------------------

    def anchor(self, last: Mapping[str, Any] | None, known: str) -> dict[str, Any] | None:
        """The audit report for the fleet, or None when there is nothing new.

        *last* is the newest entry read this round (None: none), *known* the head last
        reported (``"SEQ:HASH"``, "" when none was). The report is the new head
        (``seq``, ``hash``), ``base``: this trail's entry at the known head's sequence
        number, so the fleet can check that the new head extends the head it holds, and
        ``restarted``: true when this trail no longer holds the known head (it was cut
        back, rewritten or deleted), or ``pruned`` when it was archived away."""
        kseq_text, _, khash = known.partition(":")
        kseq = int(kseq_text) if kseq_text.isdigit() else 0
        if last is not None:
            seq, digest = int(last.get("seq", 0)), str(last.get("hash", ""))
        else:
            if not kseq:
                return None
            try:
                seq, digest = self._head()
            except AuditError:
                return None
            if seq > kseq:
                return None  # the reader has not got that far yet
        if (seq, digest) == (kseq, khash):
            return None
        out: dict[str, Any] = {"seq": seq, "hash": digest}
        if not kseq:
            return out
        at = next(self.entries_after(kseq - 1, 1), None)
        if at is not None and at.get("seq") == kseq:
            out["base"] = {"seq": kseq, "hash": str(at.get("hash", ""))}
            if at.get("hash") != khash:
                out["restarted"] = True
        else:
            oldest = next(self.entries(), None)
            archived_away = (at is not None and oldest is not None
                             and oldest.get("seq") == at.get("seq"))
            if archived_away:
                out["pruned"] = True  # the fleet cannot check this head, and says so
            else:
                out["restarted"] = True
        return out

    def families(self) -> list[Any]:
        """The trail's own metrics: what it did to itself, its segments and its size."""
        from cerulean.agent.metrics import Family

        events = Family("cerulean_audit_events_total", "counter",
                        "What the audit trail did to itself: rotated, pruned (segments "
                        "removed), recovered, truncated (entries cut down), head-rebuilt, "
                        "mark-rebuilt, rejected (entries set aside), restarted (found cut "
                        "back or deleted), repaired.")
        for name, n in self.counts().items():
            events.add(n, event=name)
        segments = Family("cerulean_audit_segments", "gauge",
                          "Archived segments of the audit trail kept beside the live log.")
        size = Family("cerulean_audit_bytes", "gauge", "Bytes of the audit trail, all files.")
        files = self.files()
        segments.add(len(files) - 1)
        size.add(sum(_size(p) for p in files))
        return [events, segments, size]

    def counts(self) -> dict[str, int]:
        """How often the trail rotated, recovered, cut an entry down, ... (from the mark)."""
        raw = self.mark().get("counts", {})
        return {k: int(raw.get(k, 0)) if isinstance(raw, dict) else 0 for k in COUNTS}

    # -- checking ---------------------------------------------------------------------------

    def verify(self) -> Verdict:
        """Check every entry and the chain, across the archived segments; stops at the
        first broken link. Appends wait while it reads."""
        with self._reading():
            return self._verify()

    def _verify(self) -> Verdict:
        """Check every entry and the chain, across the archived segments; stops at the
        first broken link.

        What a power cut leaves (see :meth:`_recover`) is not a problem but a note:
        a last line without its newline that the head does not name, or a whole
        last entry the mark names, written just before the head could move on to it.
        """
        problems: list[Problem] = []
        notes: list[str] = []
        prev, seq, before = GENESIS, 0, GENESIS
        head_file = self.head_path.exists()
        try:
            head: tuple[int, str] | None = self._head()
        except (OSError, AuditError):
            head = None
            problems.append(Problem(0, f"The head file {self.head_path} is unreadable "
                                    "(cerulean audit repair rebuilds it)."))
        mark = self.mark()
        if self.mark_path.exists() and not mark:
            problems.append(Problem(0, f"The high-water mark {self.mark_path} is damaged."))
        base = mark.get("base") if isinstance(mark.get("base"), dict) else None
        segmented = bool(self.segments())
        first = True
        for path, line, raw, is_last in _with_last(self._raw()):
            if first and base:
                d0 = _entry(raw)
                if d0 is not None and d0["seq"] > 1 and d0["seq"] == base.get("seq", -1) + 1:
                    prev, seq = str(base.get("hash")), int(base["seq"])
            first = False
            p = _check_line(raw, line, seq, prev)
            if p is not None:
                if is_last and path == self.path and not raw.endswith(b"\n") \
                        and head == (seq, prev):
                    notes.append(f"Line {line} is an entry cut short by a power cut; the "
                                 "agent drops it when it next writes.")
                else:
                    where = path.name if segmented and path != self.path else ""
                    problems.append(Problem(p.line, p.message, where))
                break
            d = json.loads(raw)
            before, prev, seq = prev, d["hash"], d["seq"]
        marked = (mark.get("seq"), mark.get("hash")) == (seq, prev)
        if not problems and head is not None:
            if not head_file and seq:
                problems.append(Problem(0, f"The head file {self.head_path} is missing: it "
                                        "was deleted (cerulean audit repair rebuilds it)."))
            elif head != (seq, prev):
                head_seq, _ = head
                if head == (seq - 1, before) and marked:
                    notes.append(f"Entry {seq} was written just before a power cut; the "
                                 "head moves on to it when the agent next writes.")
                elif head == (seq - 1, before):
                    problems.append(Problem(0, f"Entry {seq} at the end of the log is named "
                                            "by neither the head nor the mark: the agent "
                                            "did not write it."))
                elif head_seq > seq:
                    problems.append(Problem(0, f"The log ends at entry {seq}, but entry "
                                            f"{head_seq} was written: entries were removed "
                                            "from its end."))
                else:
                    problems.append(Problem(0, f"The head file records entry {head_seq}, "
                                            f"but the log goes on to entry {seq}: entries "
                                            "were added by hand or the head file was "
                                            "changed."))
        if not problems and mark:
            mseq, mhash = int(mark["seq"]), str(mark["hash"])
            if mseq > seq and not (mseq == seq + 1 and head == (seq, prev)):
                what = ("The audit trail is empty" if seq == 0 else
                        f"The trail ends at entry {seq}")
                problems.append(Problem(0, f"{what}, but entry {mseq} was written (the mark "
                                        f"{self.mark_path.name} records it): the trail was "
                                        "cut back or deleted and its head rewritten."))
            elif mseq == seq and mhash != prev:
                problems.append(Problem(0, f"Entry {seq} is not the one the agent wrote (the "
                                        f"mark {self.mark_path.name} records another hash): "
                                        "the trail was rewritten."))
            elif mseq < seq:
                problems.append(Problem(0, f"The trail goes on to entry {seq}, but the agent "
                                        f"wrote no entry after {mseq} (the mark "
                                        f"{self.mark_path.name}): entries were added by "
                                        "hand."))
        elif not problems and seq:
            notes.append(f"There is no high-water mark {self.mark_path.name} yet; the agent "
                         "writes it with its next entry.")
        return Verdict(seq, prev, tuple(problems), tuple(notes))


def _with_last(it: Iterator[tuple[Path, int, bytes]]
               ) -> Iterator[tuple[Path, int, bytes, bool]]:
    """Each item, and whether it is the last."""
    prev = next(it, None)
    for item in it:
        assert prev is not None
        yield (*prev, False)
        prev = item
    if prev is not None:
        yield (*prev, True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0




def _last_newline(f: BinaryIO, end: int, floor: int = 0) -> int:
    """The offset just after the last newline before *end* (*floor* when there is none
    after it), read backwards READ_CHUNK at a time."""
    pos, step = end, 4096  # most lines are short: a small read first
    while pos > floor:
        start = max(floor, pos - step)
        f.seek(start)
        chunk = f.read(pos - start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos, step = start, min(step * 4, READ_CHUNK)
    return floor


def _check_line(raw: bytes, line: int, seq: int, prev: str) -> Problem | None:
    try:
        d = json.loads(raw)
    except ValueError:
        return Problem(line, f"Line {line} is not a valid entry (it was edited or cut).")
    if not isinstance(d, dict) or set(d) != KEYS:
        return Problem(line, f"Line {line} is not a valid entry (its fields were changed).")
    if canonical(d) + b"\n" != raw:
        return Problem(line, f"Entry {d.get('seq')} (line {line}) was edited: it is not "
                       "written as the agent writes it.")
    if d["hash"] != entry_hash(d):
        return Problem(line, f"Entry {d['seq']} (line {line}) was edited: its contents do "
                       "not match its hash.")
    if d["seq"] != seq + 1:
        if isinstance(d["seq"], int) and d["seq"] > seq + 1:
            what = (f"entries {seq + 1}..{d['seq'] - 1} are missing" if d["seq"] > seq + 2
                    else f"entry {seq + 1} is missing")
            return Problem(line, f"Line {line} holds entry {d['seq']}: {what}.")
        return Problem(line, f"Line {line} holds entry {d['seq']} after entry {seq}: "
                       "entries were moved or repeated.")
    if d["prev"] != prev:
        return Problem(line, f"Entry {d['seq']} (line {line}) does not follow entry {seq}: "
                       "an entry before it was replaced or moved.")
    return None


# Reading the trail from a cursor, a bounded batch at a time (the fleet's reports).
READ_ENTRIES = 1000  # entries one call returns at most
READ_BYTES = 4 << 20  # bytes of lines one call reads at most
MAX_LINE = 1 << 20  # a longer line is not parsed: only its ends are read (action, seq)
_ENDS = 256  # bytes kept of each end of a line longer than MAX_LINE


def read_after(path: Path, after: int, offset: int = 0, max_entries: int = READ_ENTRIES,
               max_bytes: int = READ_BYTES, max_line: int = MAX_LINE
               ) -> tuple[list[dict[str, Any]], int]:
    """The entries of the log at *path* after sequence number *after*, and the byte
    offset to start from next time; *offset* is such a hint from the last call (a wrong
    one, after the log was cut or replaced, is noticed and the log read from its start).

    At most *max_entries* entries and about *max_bytes* bytes are read; a line longer
    than *max_line* is never held in memory: it comes back as ``{"seq", "time",
    "action", "oversized": LENGTH}`` (its ends hold those keys). A last line without its
    newline is being written (or torn): it is left for the next call. Entries are not
    checked (see :meth:`AuditLog.verify`).
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return [], 0
    with f:
        size = os.fstat(f.fileno()).st_size
        if not 0 < offset <= size or not _line_starts(f, offset):
            offset = 0
        out, pos = _scan(f, offset, after, max_entries, max_bytes, max_line)
        if offset and out and int(out[0].get("seq", 0)) > after + 1:
            # The hint pointed past the cursor: the log was replaced; read it again.
            out, pos = _scan(f, 0, after, max_entries, max_bytes, max_line)
        return out, pos


def _line_starts(f: Any, offset: int) -> bool:
    f.seek(offset - 1)
    return bool(f.read(1) == b"\n")


def _scan(f: Any, offset: int, after: int, max_entries: int, max_bytes: int,
          max_line: int) -> tuple[list[dict[str, Any]], int]:
    f.seek(offset)
    out: list[dict[str, Any]] = []
    pos = offset
    read = 0
    while len(out) < max_entries and read < max_bytes:
        raw = f.readline(max_line + 1)
        if not raw.endswith(b"\n"):
            if len(raw) <= max_line:
                break  # the end, or a last line still being written
            entry, raw_len = _oversized(f, raw)
            if entry is None:
                break
        else:
            entry, raw_len = None, len(raw)
            try:
                d = json.loads(raw)
            except ValueError:
                d = None  # not an entry: skipped (verify names it)
            entry = d if isinstance(d, dict) else {}
        pos += raw_len
        seq = entry.get("seq")
        if isinstance(seq, int) and seq > after:
            out.append(entry)
            # What is held counts (entries passed over, or a line only summarised, cost
            # time, not memory).
            read += 2 * _ENDS if "oversized" in entry else raw_len
    return out, pos


def _oversized(f: Any, head: bytes) -> tuple[dict[str, Any] | None, int]:
    """The rest of a line too long to parse, read in pieces: its action (the first key
    of canonical JSON) and its seq and time (the last ones); None if it has no end yet."""
    import re

    length, tail = len(head), head[-_ENDS:]
    while True:
        chunk = f.readline(1 << 16)
        if not chunk:
            return None, 0
        length += len(chunk)
        tail = (tail + chunk)[-_ENDS:]
        if chunk.endswith(b"\n"):
            break
    action = re.match(rb'\{"action":"((?:[^"\\]|\\.){0,200})"', head)
    end = re.search(rb'"seq":(\d{1,18}),"time":"([^"]{0,40})"\}\n$', tail)
    entry: dict[str, Any] = {"oversized": length}
    if action:
        entry["action"] = action.group(1).decode("utf-8", "replace")
    if end:
        entry["seq"], entry["time"] = int(end.group(1)), end.group(2).decode("ascii", "replace")
    return entry, length
