"""Watching directories as files change (Linux inotify, through ctypes: standard library only).

:class:`Watcher` watches directory trees (new subdirectories are added as they
appear) and turns what the kernel reports into file events for the detection
rules: ``file.path``, ``file.action`` (created, written, attributes, moved-in,
deleted), and for what still exists its type, mode, owner and the setuid and
setgid bits. Watches cover one file system each; symbolic links are never
followed.

The watch degrades without stopping and says so: a directory that cannot be
watched (the watch limit is reached, its path is too long) is counted and kept
in :attr:`Watcher.unwatched` with the reason, one path that cannot be described
never costs the other events of its batch, and after a queue overflow (or
while directories are unwatched) :meth:`Watcher.rescan` walks the trees again,
watches what is missing and reports what changed while events were lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import stat
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SETTLE_S = 0.1  # how long a batch of events stays open for what follows
RESCAN_MAX_ENTRIES = 100_000  # directory entries one rescan looks at, at most
UNWATCHED_KEEP = 1000  # unwatched directories kept by name (more are only counted)
CTIME_SLACK_S = 1.0  # a rescan reports what changed this long before events were lost
# A directory tree moved in at once is examined file by file up to this many entries; the
# rest is left to a rescan (what changed since), and the cut is counted ("E2BIG").
MOVE_IN_MAX = 10_000
# Directories watched at most: each costs the agent memory, and any user can make them.
# More are left unwatched (counted as "EMLINK") and looked into by rescans.
MAX_WATCHED = 65_536
IN_ACCESS = 0x001
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = (IN_CLOSE_WRITE | IN_ATTRIB | IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM
        | IN_DELETE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)
HEADER = struct.Struct("iIII")
ACTIONS = ((IN_CREATE, "created"), (IN_CLOSE_WRITE, "written"), (IN_ATTRIB, "attributes"),
           (IN_MOVED_TO, "moved-in"), (IN_MOVED_FROM, "moved-out"), (IN_DELETE, "deleted"))

Event = dict[str, Any]


class WatchError(OSError):
    pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Watcher:
    """Recursive inotify watches on *roots*; :meth:`read` returns the events so far."""

    def __init__(self, roots: Iterable[Path], exclude: Iterable[Path] = ()) -> None:
        self._libc = _libc()
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise WatchError(e, f"inotify cannot start: {os.strerror(e)}")
        self.fd = fd
        self.paths: dict[int, Path] = {}
        self.roots = [Path(r) for r in roots]
        self.exclude = {Path(p) for p in exclude}
        self.overflowed = 0  # queue overflows (events the kernel dropped)
        self.rescans = 0
        self.rescans_truncated = 0  # rescans that stopped at RESCAN_MAX_ENTRIES
        self.errors: dict[str, int] = {}  # errno name -> paths it left unwatched or unread
        self.unwatched: dict[Path, str] = {}  # directory -> why it is not watched
        self.unwatched_total = 0  # every time a directory could not be watched
        # Times compared with files' ctimes are read from the same clock: the ctime of a
        # file of its own, touched when the time is wanted (the wall clock can be set, or
        # faked, apart from the file system's). A memory file: the agent's service sees a
        # read-only file system. Without one, the wall clock.
        self._clock_fd = -1
        with contextlib.suppress(OSError, AttributeError):
            self._clock_fd = os.memfd_create("cerulean-watch-clock", os.MFD_CLOEXEC)
        self._lost_since: float | None = None  # events may be missing from then on
        self._overflow_pending = False  # the next rescan walks every root
        self._reported: dict[tuple[str, int], None] = {}  # what rescans already reported
        self._drained_at = self._fs_now()
        for root in self.roots:
            self._add_tree(root, keep=0)  # what is there already is no event

    def _fs_now(self) -> float:
        """Now, as the file system dates a change (a ctime)."""
        if self._clock_fd >= 0:
            try:
                os.utime(self._clock_fd)
                return os.fstat(self._clock_fd).st_ctime
            except OSError:
                pass
        return time.time()

    def close(self) -> None:
        if self._clock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._clock_fd)
            self._clock_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, path: Path) -> bool:
        """Watch *path*; False when it cannot be (gone, or recorded as unwatched)."""
        if path in self.exclude:
            return False
        if len(self.paths) >= MAX_WATCHED:
            self._blind(path, errno.EMLINK)
            return False
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if e not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                self._blind(path, e)  # gone already, or not ours to read, are not blind
            return False
        self.paths[wd] = path
        self.unwatched.pop(path, None)
        return True

    def _blind(self, path: Path, e: int) -> None:
        """*path* cannot be watched (error *e*): count it, keep it for rescans."""
        if path in self.unwatched:
            return  # tried again and still failing: counted already
        name = errno.errorcode.get(e, str(e))
        self.errors[name] = self.errors.get(name, 0) + 1
        self.unwatched_total += 1
        if len(self.unwatched) < UNWATCHED_KEEP:
            self.unwatched[path] = (
                "the inotify watch limit is reached (fs.inotify.max_user_watches)"
                if e == errno.ENOSPC else
                f"more than {MAX_WATCHED} directories are watched" if e == errno.EMLINK else
                f"a tree of more than {MOVE_IN_MAX} entries moved in at once"
                if e == errno.E2BIG else os.strerror(e))
        else:
            self._overflow_pending = True  # too many to keep: rescans walk every root
        if self._lost_since is None:
            self._lost_since = self._fs_now()

    def _add_tree(self, top: Path, keep: int | None = None) -> list[Path]:
        """Watch *top* and every directory below it on its file system; returns what is
        already in them (for a new directory: what was made before its watch was set),
        at most *keep* paths: past that the tree is recorded as cut short, for a rescan.
        A directory that cannot be watched is recorded (:attr:`unwatched`), not
        entered, and does not stop the others."""
        keep = MOVE_IN_MAX if keep is None else keep
        try:
            device = os.lstat(top).st_dev
        except FileNotFoundError:
            return []
        except OSError as e:
            self._blind(top, e.errno or errno.EIO)
            return []
        if not self._add(top):
            return []
        found: list[Path] = []
        cut = False
        for dirpath, dirnames, filenames in os.walk(top):
            entered = []
            for d in dirnames:
                p = Path(dirpath) / d
                try:
                    if os.lstat(p).st_dev != device or p in self.exclude:
                        continue
                except FileNotFoundError:
                    continue
                except OSError as e:
                    self._blind(p, e.errno or errno.EIO)
                    continue
                if len(found) < keep:
                    found.append(p)
                if self._add(p):
                    entered.append(d)
            dirnames[:] = entered
            room = keep - len(found)
            found += [Path(dirpath) / f for f in filenames[:max(room, 0)]]
            if keep and len(filenames) > room and not cut:
                cut = True
                self._blind(top, errno.E2BIG)
        return found

    @property
    def needs_rescan(self) -> bool:
        """Events were lost (a queue overflow) or directories are unwatched."""
        return self._lost_since is not None

    def rescan(self, limit: int = RESCAN_MAX_ENTRIES) -> tuple[list[Event], bool]:
        """Walk again what events may be missing for: every root after a queue
        overflow, else the unwatched directories. Watches what is not watched yet, and
        returns a ``rescanned`` event for each file whose inode changed (``st_ctime``:
        made, written, moved, its mode changed) since events were lost, once per change;
        and whether the walk was complete (it stops after *limit* entries)."""
        started = self._fs_now()
        since = (self._lost_since if self._lost_since is not None else started) \
            - CTIME_SLACK_S
        tops = list(self.roots) if self._overflow_pending else list(self.unwatched)
        events: list[Event] = []
        budget = limit
        for top in tops:
            budget = self._rescan_tree(top, since, events, budget)
            if budget <= 0:
                break
        complete = budget > 0
        self.rescans += 1
        if complete:
            self._overflow_pending = False
            self._lost_since = started if self.unwatched else None
            if self._lost_since is None:
                self._reported.clear()
        else:
            self.rescans_truncated += 1
        return events, complete

    def _rescan_tree(self, top: Path, since: float, events: list[Event], budget: int) -> int:
        try:
            device = os.lstat(top).st_dev
        except FileNotFoundError:
            self.unwatched.pop(top, None)
            return budget
        except OSError as e:
            self._blind(top, e.errno or errno.EIO)
            return budget
        stack = [top]
        while stack and budget > 0:
            d = stack.pop()
            self._add(d)  # what cannot be watched is still looked into
            try:
                with os.scandir(d) as it:
                    entries = list(it)
            except OSError:
                continue  # gone since; or unreadable, and then not watchable either
            for entry in entries:
                budget -= 1
                if budget <= 0:
                    break
                path = Path(entry.path)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if st.st_dev == device and path not in self.exclude:
                        stack.append(path)
                    continue
                key = (entry.path, st.st_ctime_ns)
                if st.st_ctime >= since and key not in self._reported:
                    if len(self._reported) < RESCAN_MAX_ENTRIES:
                        self._reported[key] = None
                    events.append(describe(path, "rescanned"))
        return budget

    def fileno(self) -> int:
        return int(self.fd)

    def read(self, timeout: float = 0.0, settle: float = SETTLE_S) -> list[Event]:
        """Events that arrived, waiting up to *timeout* seconds for the first.

        Once something arrived, what follows within *settle* seconds joins the batch,
        so that a file written under a temporary name and renamed into place (how
        editors and package managers replace files) is one ``moved-in`` event for its
        final name, with ``file.renamed_from``: the temporary file's own events are
        left out. Its content and state are all at the final name, which is reported.
        """
        if timeout and not select.select([self.fd], [], [], timeout)[0]:
            self._drained_at = self._fs_now()  # the queue is empty: nothing was lost so far
            return []
        drained_before = self._drained_at
        raw: list[tuple[int, int, int, str]] = []
        deadline = time.monotonic() + settle
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if not raw or left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    break
                continue
            pos = 0
            while pos + HEADER.size <= len(data):
                wd, mask, cookie, length = HEADER.unpack_from(data, pos)
                name = data[pos + HEADER.size:pos + HEADER.size + length].rstrip(b"\0")
                pos += HEADER.size + length
                raw.append((wd, mask, cookie, os.fsdecode(name)))
        self._drained_at = self._fs_now()
        if any(m & IN_Q_OVERFLOW for _w, m, _c, _n in raw):
            # The queue was empty when it was last read; what happened since may be lost.
            self._overflow_pending = True
            self._lost_since = min(drained_before, self._lost_since or drained_before)
        return self._fold(raw)

    def _path(self, wd: int, name: str) -> Path | None:
        base = self.paths.get(wd)
        return base / name if base is not None and name else None

    def _fold(self, raw: list[tuple[int, int, int, str]]) -> list[Event]:
        created = {self._path(wd, n) for wd, m, _c, n in raw
                   if m & IN_CREATE and not m & IN_ISDIR}
        moved_from = {c: self._path(wd, n) for wd, m, c, n in raw if m & IN_MOVED_FROM and c}
        temp: dict[Path, Path] = {}  # final name -> the temporary file renamed onto it
        for wd, m, c, n in raw:
            src = moved_from.get(c) if m & IN_MOVED_TO and c else None
            dst = self._path(wd, n)
            if src is not None and dst is not None and src in created:
                temp[dst] = src
        skip = set(temp.values())
        # A path is described once the batch is read, so its events would all show its
        # final state: one event per path, with the first action and every action seen.
        by_path: dict[str, Event] = {}
        for wd, m, _c, n in raw:
            path = self._path(wd, n)
            if path in skip:
                continue
            try:
                events = self._event(wd, m, n)
            except OSError as err:  # this path only: the rest of the batch stands
                name = errno.errorcode.get(err.errno or 0, "EIO")
                self.errors[name] = self.errors.get(name, 0) + 1
                continue
            src = temp.get(path) if path is not None and m & IN_MOVED_TO else None
            if src is not None and events:
                events[0]["file.renamed_from"] = str(src)
            for e in events:
                seen = by_path.get(e["file.path"])
                if seen is None:
                    by_path[e["file.path"]] = {**e, "file.actions": [e["file.action"]]}
                elif e["file.action"] not in seen["file.actions"]:
                    seen["file.actions"].append(e["file.action"])
        return list(by_path.values())

    def _event(self, wd: int, mask: int, name: str) -> list[Event]:
        if mask & IN_Q_OVERFLOW:
            self.overflowed += 1
            return [{"file.action": "overflow", "file.path": ""}]
        if mask & IN_IGNORED:
            self.paths.pop(wd, None)
            return []
        base = self.paths.get(wd)
        if base is None or not name:
            return []
        path = base / name
        action = next((a for bit, a in ACTIONS if mask & bit), "changed")
        events = [describe(path, action)]
        if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            # A new directory: watch it, and report what appeared in it before the watch.
            events += [describe(p, action) for p in self._add_tree(path)]
        return events


def describe(path: Path, action: str) -> Event:
    """A file event: what happened to *path*, and what it is now."""
    event: Event = {"file.path": str(path), "file.action": action, "file.exists": False}
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return event
    except OSError as e:  # a path too long to look up, say: the event says so
        event["file.error"] = e.strerror or str(e)
        return event
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) \
        else "file" if stat.S_ISREG(st.st_mode) else "other"
    event.update({"file.exists": True, "file.type": kind,
                  "file.mode": f"{stat.S_IMODE(st.st_mode):04o}", "file.uid": st.st_uid,
                  "file.gid": st.st_gid, "file.size": st.st_size,
                  "file.setuid": bool(st.st_mode & stat.S_ISUID) and kind == "file",
                  "file.setgid": bool(st.st_mode & stat.S_ISGID) and kind == "file",
                  "file.executable": bool(st.st_mode & 0o111) and kind == "file"})
    return event
