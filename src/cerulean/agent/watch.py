"""Watching directories as files change (Linux inotify, through ctypes: standard library only).

:class:`Watcher` watches directory trees (new subdirectories are added as they
appear) and turns what the kernel reports into file events for the detection
rules: ``file.path``, ``file.action`` (created, written, attributes, moved-in,
deleted), and for what still exists its type, mode, owner and the setuid and
setgid bits. Watches cover one file system each; symbolic links are never
followed.
"""

from __future__ import annotations

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
        self.exclude = {Path(p) for p in exclude}
        self.overflowed = 0
        for root in roots:
            self._add_tree(Path(root))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, path: Path) -> None:
        if path in self.exclude:
            return
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if e in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                return  # gone already, or not ours to read
            raise WatchError(e, f"Cannot watch {path}: {os.strerror(e)}"
                             + (" (raise fs.inotify.max_user_watches)" if e == errno.ENOSPC
                                else ""))
        self.paths[wd] = path

    def _add_tree(self, top: Path) -> list[Path]:
        """Watch *top* and every directory below it on its file system; returns what is
        already in them (for a new directory: what was made before its watch was set)."""
        try:
            device = os.lstat(top).st_dev
        except FileNotFoundError:
            return []
        self._add(top)
        found = []
        for dirpath, dirnames, filenames in os.walk(top):
            keep = []
            for d in dirnames:
                p = Path(dirpath) / d
                try:
                    if os.lstat(p).st_dev != device or p in self.exclude:
                        continue
                except FileNotFoundError:
                    continue
                self._add(p)
                keep.append(d)
                found.append(p)
            dirnames[:] = keep
            found += [Path(dirpath) / f for f in filenames]
        return found

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
            return []
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
            events = self._event(wd, m, n)
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
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) \
        else "file" if stat.S_ISREG(st.st_mode) else "other"
    event.update({"file.exists": True, "file.type": kind,
                  "file.mode": f"{stat.S_IMODE(st.st_mode):04o}", "file.uid": st.st_uid,
                  "file.gid": st.st_gid, "file.size": st.st_size,
                  "file.setuid": bool(st.st_mode & stat.S_ISUID) and kind == "file",
                  "file.setgid": bool(st.st_mode & stat.S_ISGID) and kind == "file",
                  "file.executable": bool(st.st_mode & 0o111) and kind == "file"})
    return event
