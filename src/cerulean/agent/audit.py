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

:func:`verify` reads the whole log and names the first entry that was edited,
removed, inserted or moved. A hash chain on the host itself stops everyone
who is not root and catches every careless edit; against root, who could
rewrite the whole chain, the head hash has to live somewhere else as well:
the agent reports it to the fleet, which keeps the heads it has seen.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cerulean.errors import CeruleanError
from cerulean.protocol.audit import GENESIS, canonical, entry_hash

TAIL = 1 << 16  # how much of the log's end a recovery reads
KEYS = {"seq", "time", "actor", "action", "detail", "prev", "hash"}


class AuditError(CeruleanError):
    pass


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based line of the log (0: the head file)
    message: str


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
                "problems": [{"line": p.line, "message": p.message} for p in self.problems],
                "notes": list(self.notes)}


class AuditLog:
    """The log at *path* (its head file is *path* with the suffix ``.head``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.head_path = path.with_suffix(".head")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _head(self) -> tuple[int, str]:
        try:
            d = json.loads(self.head_path.read_bytes())
            return int(d["seq"]), str(d["hash"])
        except FileNotFoundError:
            return 0, GENESIS
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"The audit trail's head file {self.head_path} is damaged; "
                             "run cerulean audit verify.") from None

    def append(self, actor: str, action: str, detail: Mapping[str, Any] | None = None,
               now: datetime | None = None) -> dict[str, Any]:
        """Append one entry (durably: the log and then the head are synced)."""
        with self._locked():
            recovered = self._recover()
            if recovered:
                self._append("audit", "audit.recovered", {"message": recovered}, now)
            return self._append(actor, action, detail, now)

    def _recover(self) -> str:
        """Finish what a power cut interrupted; says what it did ("" if nothing).

        The log is synced before the head, so a cut can leave a torn last line
        (the entry was never complete: it is cut off) or a whole last entry the
        head does not name yet (the head moves on to it). Anything else is left
        for :meth:`verify` to report.
        """
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return ""
        with open(self.path, "r+b") as f:
            f.seek(max(0, size - TAIL))
            tail = f.read()
            done = []
            if tail and not tail.endswith(b"\n"):
                keep = tail.rfind(b"\n") + 1
                if keep == 0 and size > TAIL:
                    return ""  # a line longer than TAIL: not ours to judge
                f.truncate(size - (len(tail) - keep))
                f.flush()
                os.fsync(f.fileno())
                done.append(f"a torn last entry ({len(tail) - keep} bytes) was cut off")
                tail = tail[:keep]
        lines = tail.splitlines(keepends=True)
        seq, prev = self._head()
        if lines:
            try:
                last = json.loads(lines[-1])
            except ValueError:
                last = None
            if (isinstance(last, dict) and last.get("seq") == seq + 1
                    and last.get("prev") == prev and _check_line(lines[-1], 0, seq, prev)
                    is None):
                self._write_head(last["seq"], last["hash"])
                done.append(f"the head moved on to entry {last['seq']}, written before "
                            "the cut")
        return "; ".join(done)

    def _write_head(self, seq: int, digest: str) -> None:
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(canonical({"seq": seq, "hash": digest}) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.head_path)

    def _append(self, actor: str, action: str, detail: Mapping[str, Any] | None,
                now: datetime | None) -> dict[str, Any]:
        seq, prev = self._head()
        entry: dict[str, Any] = {
            "seq": seq + 1,
            "time": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "actor": actor, "action": action, "detail": dict(detail or {}), "prev": prev,
        }
        entry["hash"] = entry_hash(entry)
        with open(self.path, "ab") as f:
            f.write(canonical(entry) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._write_head(entry["seq"], entry["hash"])
        return entry

    def _lines(self) -> list[bytes]:
        try:
            return self.path.read_bytes().splitlines(keepends=True)
        except FileNotFoundError:
            return []

    def entries(self) -> Iterator[dict[str, Any]]:
        """The entries as written (unchecked; see :meth:`verify`)."""
        for raw in self._lines():
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            if isinstance(d, dict):
                yield d

    def verify(self) -> Verdict:
        """Check every entry and the chain; stops at the first broken link.

        What a power cut leaves (see :meth:`_recover`) is not a problem but a note:
        a last line without its newline that the head does not name, or a whole
        last entry written just before the head could move on to it.
        """
        problems: list[Problem] = []
        notes: list[str] = []
        lines = self._lines()
        prev, seq, before = GENESIS, 0, GENESIS
        try:
            head: tuple[int, str] | None = self._head()
        except (OSError, AuditError):
            head = None
            problems.append(Problem(0, f"The head file {self.head_path} is unreadable."))
        for line, raw in enumerate(lines, start=1):
            p = _check_line(raw, line, seq, prev)
            if p is not None:
                if line == len(lines) and not raw.endswith(b"\n") and head == (seq, prev):
                    notes.append(f"Line {line} is an entry cut short by a power cut; the "
                                 "agent drops it when it next writes.")
                else:
                    problems.append(p)
                break
            d = json.loads(raw)
            before, prev, seq = prev, d["hash"], d["seq"]
        if not problems and head is not None and head != (seq, prev):
            head_seq, _ = head
            if head == (seq - 1, before):
                notes.append(f"Entry {seq} was written just before a power cut; the head "
                             "moves on to it when the agent next writes.")
            elif head_seq > seq:
                problems.append(Problem(0, f"The log ends at entry {seq}, but entry "
                                        f"{head_seq} was written: entries were removed "
                                        "from its end."))
            else:
                problems.append(Problem(0, f"The head file records entry {head_seq}, but "
                                        f"the log goes on to entry {seq}: entries were "
                                        "added by hand or the head file was changed."))
        return Verdict(seq, prev, tuple(problems), tuple(notes))


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
