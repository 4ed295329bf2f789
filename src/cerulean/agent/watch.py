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
With *marks* (and CAP_SYS_ADMIN), fanotify marks on the roots' file systems
(:class:`FsMarks`) report what is made, moved in or changes mode or owner in a
directory inotify does not watch, as it happens: a user's flood of directories
no longer hides it until a rescan (directories whose paths are past PATH_MAX
are left to inotify and rescans, as before).

Its memory does not grow with what a user makes: trees are walked through
directory file descriptors, one directory level at a time (what a walk holds
grows with depth, not with the number of entries, and paths longer than
``PATH_MAX`` are walked and watched like any other), a rescan that stops at its
limit goes on where it stopped at the next, and one read takes a bounded batch
of events (the rest wait in the kernel's queue).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import math
import os
import select
import stat
import struct
import time
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import Any

SETTLE_S = 0.1  # how long a batch of events stays open for what follows
MAX_BATCH = 1024  # kernel events one read takes, at most (the rest wait in the queue)
# ... and what their paths take in memory together (cost()): each is held as text while the
# batch is described. Past it the rest of what was read waits for the next read.
MAX_BATCH_PATH_BYTES = 4 << 20
# A directory whose path is longer is neither watched nor entered (any user can nest
# directories without end, and paths are held as text: memory would grow with the
# square of the depth); counted as ENAMETOOLONG.
MAX_PATH_CHARS = 8192
MAX_PATH_BYTES = 16 << 20  # the paths of all watched directories together; past it ENOMEM
# A path past PATH_MAX is looked up one component at a time (each event on it costs as many
# system calls): such a directory with more components is counted as ENAMETOOLONG too.
LONG_PATH_PARTS = 128
PATH_MAX = 4096
RESCAN_MAX_ENTRIES = 20_000  # directory entries one rescan looks at, at most
# A walk still under way this long after it started, when events were lost again since,
# starts over from the top (reporting what changed since the first walk's losses): what
# the walk had passed is looked at again soon, rather than once it reaches the end of
# trees a user keeps growing. Each such restart doubles the time before the next, so that
# a walk always ends.
RESTART_AFTER_S = 10.0
SKIP_COST = 16  # subdirectories passed over by type alone that count as one entry looked at
# After an overflow, the entries of each watched directory a rescan looks at first; a larger
# directory (a user's flood) is left to the walk that follows.
FIRST_LOOK_ENTRIES = 4096
RESCAN_MAX_EVENTS = 5000  # changed files one rescan reports, at most (it goes on next time)
REPORTED_KEEP = 20_000  # changes a series of rescans remembers having reported
MAX_DEPTH = 100  # directory levels one walk enters (each holds two open files); deeper: ELOOP
UNWATCHED_KEEP = 1000  # unwatched directories kept by name (more are only counted)
UNWATCHED_BYTES = 1 << 20  # what their paths take in memory together, at most
CTIME_SLACK_S = 1.0  # a rescan reports what changed this long before events were lost
# What new directories already hold is examined file by file up to this many entries (and
# MOVE_IN_CHARS characters of paths) a batch; the rest is left to a rescan (what changed
# since), and the cut is counted ("E2BIG").
MOVE_IN_MAX = 10_000
MOVE_IN_CHARS = 4 << 20
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
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
ACTIONS = ((IN_CREATE, "created"), (IN_CLOSE_WRITE, "written"), (IN_ATTRIB, "attributes"),
           (IN_MOVED_TO, "moved-in"), (IN_MOVED_FROM, "moved-out"), (IN_DELETE, "deleted"))

# fanotify marks on whole file systems (they need CAP_SYS_ADMIN, and no watch per
# directory): what is made, moved in, or has its mode or owner changed in a directory
# inotify does not watch (left out at a limit, or not watched yet after an overflow) is
# reported as it happens, rather than when a rescan reaches it. Reported with the
# directory's file handle and the entry's name (FAN_REPORT_DFID_NAME, Linux 5.9).
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_REPORT_DFID_NAME = 0x0C00
FAN_MARK_ADD = 0x1
FAN_MARK_FILESYSTEM = 0x100
FAN_ATTRIB = 0x4
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_Q_OVERFLOW = 0x4000
FAN_ONDIR = 0x40000000
# Two groups a file system: what is made or changes mode or owner (files only: a flood of
# new directories, empty, costs the queue nothing), and what is moved in, directories
# too (what a directory moved in holds is described).
FAN_MASKS = (FAN_CREATE | FAN_ATTRIB, FAN_MOVED_TO | FAN_ONDIR)
FAN_INFO_DFID_NAME = 2
IN_MASK_CREATE = 0x10000000
MARKS_KNOWN = 4096  # watched directories the marks remember by handle
# What the marks see in watched directories waits for inotify (reported if it does not
# come) this long at most, MARKS_HELD paths at most taking MARKS_HELD_BYTES (cost());
# more are reported at once. As many paths inotify reported are remembered as long.
MARKS_HOLD_S = 2.0
MARKS_HELD = 8192
MARKS_HELD_BYTES = 2 << 20
FAN_READ_BYTES = 16384  # one read of a mark's queue (what it returns is all handled)
FANOTIFY_METADATA_VERSION = 3
FAN_HEADER = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
FAN_INFO = struct.Struct("=BBH")  # info_type, pad, len; then fsid, file_handle, name
FAN_ACTIONS = ((FAN_CREATE, "created"), (FAN_MOVED_TO, "moved-in"), (FAN_ATTRIB, "attributes"))
O_PATH = getattr(os, "O_PATH", 0o10000000)

GONE = ("deleted", "moved-out")  # actions after which the path no longer names the file
Event = dict[str, Any]
# (path, lstat result, whether it is in a directory new to the watch) of each entry
Walk = Generator[tuple[str, os.stat_result, bool], None, None]
# (path, lstat result (None: only counts), the time changes count from) of a rescan
Pass = Generator[tuple[str, os.stat_result | None, float], None, None]


class WatchError(OSError):
    pass


def load_libc() -> ctypes.CDLL:
    """The C library, its own handle (what is set on one does not touch the others)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


_libc = load_libc  # inotify's (tests replace it)


def open_dir(path: str) -> int:
    """A file descriptor of the directory *path* (absolute), opened one component at a
    time and never through a symbolic link: a link swapped in for a parent directory
    cannot make another directory pass for *path*. Raises OSError (ELOOP for a link)."""
    fd = os.open("/", DIR_FLAGS)
    try:
        for part in path.split("/"):
            if part:
                inner = os.open(part, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def too_long(path: str) -> bool:
    """Whether the directory *path* is past what the watch holds (MAX_PATH_CHARS) or
    looks up (LONG_PATH_PARTS components past PATH_MAX)."""
    return len(path) > MAX_PATH_CHARS or (
        len(path) >= PATH_MAX and path.count("/") > LONG_PATH_PARTS)


def cost(path: str) -> int:
    """About the bytes *path* takes in memory: a text with one character past Latin-1
    takes two or four bytes for each of its characters."""
    return len(path) if path.isascii() else 4 * len(path)


def lstat(path: str) -> os.stat_result:
    """:func:`os.lstat`, also for a path longer than ``PATH_MAX``."""
    try:
        return os.lstat(path)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
    head, _, name = path.rstrip("/").rpartition("/")
    fd = open_dir(head or "/")
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def mount_id(fd: int) -> int:
    """The mount the open file *fd* is on (-1 when /proc does not say)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("mnt_id:")), -1)
    except (OSError, ValueError, IndexError):
        return -1


class FsMarks:
    """fanotify marks on the file systems of *roots*, two groups (and event queues) per
    file system (FAN_MASKS), each with the roots' directories on it open (one per
    mount: a bind mount shows only part of a file system) to decode handles against.
    A file system that cannot be marked (one without file handles) is left out, and
    :attr:`failed` says why; raises WatchError when none can be (fanotify cannot
    start: no CAP_SYS_ADMIN)."""

    def __init__(self, roots: Iterable[str]) -> None:
        self._libc = libc = load_libc()
        # (fanotify fd, directories of the roots on its file system, one per mount)
        self.groups: list[tuple[int, list[int]]] = []
        self.filesystems: list[list[int]] = []  # the mounts of each (shared with groups)
        self.failed: list[str] = []  # why a file system is not marked
        self.drained = True
        by_device: dict[int, tuple[list[int], set[int]]] = {}  # -> (its mounts, their ids)
        for root in roots:
            try:
                dfd = open_dir(root)
            except OSError:
                continue  # not there (yet): the inotify watch says so
            try:
                device = os.fstat(dfd).st_dev
            except OSError:
                os.close(dfd)
                continue
            known = by_device.get(device)
            if known is not None:
                mounts, ids = known
                mount = mount_id(dfd)
                if mount not in ids:
                    mounts.append(dfd)
                    ids.add(mount)
                else:
                    os.close(dfd)
                continue
            mounts = [dfd]
            made: list[int] = []
            e = 0
            for mask in FAN_MASKS:
                fd = libc.fanotify_init(FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DFID_NAME,
                                        os.O_RDONLY)
                if fd < 0:
                    e = ctypes.get_errno()
                    for f in (*made, dfd):
                        os.close(f)
                    self.close()
                    raise WatchError(e, f"fanotify cannot start: {os.strerror(e)}")
                made.append(fd)
                if libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM,
                                      ctypes.c_uint64(mask), dfd, None) != 0:
                    e = ctypes.get_errno()
                    break
            if not e:
                self.groups += [(fd, mounts) for fd in made]  # the list is shared
                self.filesystems.append(mounts)
                by_device[device] = (mounts, {mount_id(dfd)})
                continue
            for f in (*made, dfd):
                os.close(f)
            by_device[device] = ([], {-2})  # not marked: its other roots are not opened
            self.failed.append(f"the file system of {root} cannot be marked: "
                               f"{os.strerror(e)}")
        if not self.groups and self.failed:
            raise WatchError(errno.EOPNOTSUPP, "; ".join(self.failed))

    def close(self) -> None:
        for f in (*self.filenos(), *self.mounts()):
            with contextlib.suppress(OSError):
                os.close(f)
        self.groups, self.filesystems = [], []

    def filenos(self) -> list[int]:
        return [fd for fd, _mounts in self.groups]

    def mounts(self) -> list[int]:
        """The directories handles are decoded against (open as long as the marks are)."""
        return [m for mounts in self.filesystems for m in mounts]

    def lift_mounts(self, move: Callable[[list[int]], list[int]]) -> list[int]:
        """Replace the directories' descriptors by what *move* makes of them (the same
        directories under other numbers); returns the new numbers."""
        moved = iter(move(self.mounts()))
        for mounts in self.filesystems:
            mounts[:] = [next(moved) for _m in mounts]
        return self.mounts()

    def read(self, limit: int, more: Callable[[], bool]
             ) -> Generator[tuple[int, list[int], bytes, bytes], None, None]:
        """What the queues hold: (mask, directories of the roots on that file system,
        directory's file handle, name); a queue overflow as (FAN_Q_OVERFLOW, [], b"",
        b""). Each queue is read (FAN_READ_BYTES at a time) until it is empty, *limit*
        of its events were taken, or *more* says no more; :attr:`drained` tells whether
        all were left empty. (One queue's flood leaves the others their share.)"""
        self.drained = True
        for fd, mounts in self.groups:
            taken = 0
            while True:
                if taken >= limit or not more():
                    self.drained = False
                    break
                try:
                    data = os.read(fd, FAN_READ_BYTES)
                except BlockingIOError:
                    break
                pos = 0
                while pos + FAN_HEADER.size <= len(data):
                    size, vers, _r, meta, mask, _fd, _pid = FAN_HEADER.unpack_from(data, pos)
                    if vers != FANOTIFY_METADATA_VERSION or size < meta or meta < 1:
                        break
                    record, pos = data[pos + meta:pos + size], pos + size
                    taken += 1
                    if mask & FAN_Q_OVERFLOW:
                        yield FAN_Q_OVERFLOW, [], b"", b""
                        continue
                    at = 0
                    while at + FAN_INFO.size <= len(record):
                        kind, _pad, length = FAN_INFO.unpack_from(record, at)
                        if length < FAN_INFO.size:
                            break
                        body = record[at + FAN_INFO.size:at + length]
                        at += length
                        if kind != FAN_INFO_DFID_NAME or len(body) < 16:
                            continue  # (a directory's own change: no name, nothing in it)
                        # fsid (8 bytes), struct file_handle (handle_bytes, handle_type,
                        # f_handle), the name and its NUL
                        end = 16 + struct.unpack_from("=I", body, 8)[0]
                        if end > len(body):
                            continue
                        yield mask, mounts, body[8:end], body[end:].split(b"\0", 1)[0]

    def open(self, mount: int, handle: bytes) -> int:
        """The directory *handle* names, decoded on the mount of *mount* and opened as a
        path only (needs CAP_DAC_READ_SEARCH). Raises OSError (ESTALE: it is gone)."""
        fd = self._libc.open_by_handle_at(mount, handle, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return int(fd)


class Watcher:
    """Recursive inotify watches on *roots*; :meth:`read` returns the events so far.
    Paths are strings (:attr:`paths`: watch descriptor -> directory)."""

    def __init__(self, roots: Iterable[Path | str], exclude: Iterable[Path | str] = (),
                 marks: bool | FsMarks = False) -> None:
        self._libc = _libc()
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise WatchError(e, f"inotify cannot start: {os.strerror(e)}")
        self.fd = fd
        self.paths: dict[int, str] = {}
        self._path_bytes = 0  # what the paths in self.paths take, together (cost())
        self._unwatched_bytes = 0  # and those in self.unwatched
        self._full = False  # the kernel's watch limit was reached in this batch of events
        self.roots = [str(r) for r in roots]
        self.exclude = {str(p) for p in exclude}
        self.overflowed = 0  # queue overflows (events the kernel dropped)
        self.marks_overflowed = 0  # and those of the fanotify marks' queues
        self.rescans = 0
        self.rescans_truncated = 0  # rescans that stopped at one of their limits
        self.errors: dict[str, int] = {}  # errno name -> paths it left unwatched or unread
        self.unwatched: dict[str, str] = {}  # directory -> why it is not watched
        self.unwatched_total = 0  # every time a directory could not be watched
        # A directory is watched through its open file descriptor (/proc/self/fd/N): the
        # directory that was opened, without following links, whatever its path's length.
        self._by_fd = os.path.isdir("/proc/self/fd")
        # Times compared with files' ctimes are read from the same clock: the ctime of a
        # file of its own, touched when the time is wanted (the wall clock can be set, or
        # faked, apart from the file system's). A memory file: the agent's service sees a
        # read-only file system. Without one, the wall clock.
        self._clock_fd = -1
        with contextlib.suppress(OSError, AttributeError):
            self._clock_fd = os.memfd_create("cerulean-watch-clock", os.MFD_CLOEXEC)
        self._lost_since: float | None = None  # events may be missing from then on
        self._overflow_pending = False  # the next rescan walks every root
        self._reported: set[int] = set()  # hashes of the changes rescans already reported
        # Directories of new content (moved or made in a batch) that were cut short or
        # left unwatched before what they hold was described: the next rescan reports
        # every file in them, however old its ctime (a tree moved in keeps its files').
        # (Past UNWATCHED_KEEP of them, only the ctimes tell: counted as ENOBUFS.)
        self._unseen: set[str] = set()
        # The rescan under way: what is left of its walk, and since when it reports.
        self._pass: Pass | None = None
        self._pass_since = 0.0
        self._pass_started = 0.0
        self._pass_unseen: list[str] = []  # the unseen directories it reports whole
        self._pass_roots = False  # whether it walks every root (after an overflow)
        self._restart_after = RESTART_AFTER_S
        self.rescans_restarted = 0
        self._room = MOVE_IN_MAX  # paths a batch still describes in new directories
        self._room_chars = MOVE_IN_CHARS
        self._drained_at = self._fs_now()
        self._carry: list[tuple[int, int, int, str]] = []  # read, left for the next batch
        self._added_new = False  # whether the last directory _add() watched was new to it
        self._added_wd = -1  # and its watch
        for root in self.roots:
            self._add_tree(root, keep=None)  # what is there already is no event
        # With *marks*, fanotify marks on the roots' file systems (FsMarks), if it can:
        # those given (kept open when the watch closes), or its own.
        self._marks: FsMarks | None = marks if isinstance(marks, FsMarks) else None
        self._own_marks = marks is True
        self.marks_error = "" if marks else "not asked for"
        self._marks_drained_at = self._drained_at
        # (file system, directory handle) -> its watch, for the directories the marks
        # found watched: their next events cost no look-up (MARKS_KNOWN at most).
        self._known: dict[tuple[int, bytes], int] = {}
        self._refused: dict[tuple[int, bytes], int] = {}  # found unwatchable (as many)
        self._fresh: set[int] = set()  # watches the marks set since their queues were empty
        self._marks_since = self._drained_at  # the marks' losses are since then
        # What the marks saw in directories inotify watches, held until inotify's queue
        # has been read past it: reported only if inotify did not report that path
        # (its queue overflowed, say). Path -> (when it was held, its fanotify mask).
        self._held: dict[str, tuple[float, int]] = {}
        self._held_bytes = 0
        # Paths inotify reported lately -> (when, the actions it reported).
        self._recent: dict[str, tuple[float, frozenset[str]]] = {}
        self._recent_bytes = 0
        if marks is True:
            try:
                self._marks = FsMarks(self.roots)
            except WatchError as e:
                self.marks_error = str(e.strerror or e)
        if self._marks is not None:
            self.marks_error = "; ".join(self._marks.failed)

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
        if self._marks is not None and self._own_marks:
            self._marks.close()
        self._marks = None
        if self._pass is not None:
            self._pass.close()  # closes the files it holds open
            self._pass = None
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

    def _add(self, path: str, fd: int | None = None, unseen: bool = False) -> bool:
        """Watch the directory *path* (open as *fd*, when given); False when it cannot
        be (gone, or recorded as unwatched; *unseen*: see :meth:`_blind`)."""
        if path in self.exclude:
            return False
        if len(self.paths) >= MAX_WATCHED:
            self._blind(path, errno.EMLINK, unseen)
            return False
        if self._path_bytes + cost(path) > MAX_PATH_BYTES:
            self._blind(path, errno.ENOMEM, unseen)
            return False
        if fd is not None and self._by_fd:  # what was opened: no link is followed
            wd = self._libc.inotify_add_watch(self.fd, f"/proc/self/fd/{fd}".encode(),
                                              MASK & ~IN_DONT_FOLLOW)
        else:
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if e not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                self._blind(path, e, unseen)  # gone already, or not ours to read, are not blind
            return False
        self._path_bytes += cost(path) - cost(self.paths.get(wd, ""))
        self._added_new = wd not in self.paths  # not watched before (under any name)
        self._added_wd = wd
        self.paths[wd] = path
        self._unwatch_drop(path)
        return True

    def _unwatch_drop(self, path: str) -> None:
        if self.unwatched.pop(path, None) is not None:
            self._unwatched_bytes -= cost(path)

    def _forget(self, wd: int) -> None:
        """The kernel removed watch *wd* (its directory is gone)."""
        path = self.paths.pop(wd, None)
        if path is not None:
            self._path_bytes -= cost(path)
            self._refused.clear()  # there is room again

    def _blind(self, path: str, e: int, unseen: bool = False) -> None:
        """*path* cannot be watched (error *e*): count it, keep it for rescans (a path
        longer than MAX_PATH_CHARS is only counted: it is never held, or walked). With
        *unseen*, what it holds is new and was not described: the next rescan reports
        all of it."""
        long = too_long(path)
        if path in self.unwatched:
            if unseen:
                self._mark_unseen(path)
            return  # tried again and still failing: counted already
        name = errno.errorcode.get(errno.ENAMETOOLONG if long else e, str(e))
        self.errors[name] = self.errors.get(name, 0) + 1
        self.unwatched_total += 1
        if long:
            return
        if (len(self.unwatched) < UNWATCHED_KEEP
                and self._unwatched_bytes + cost(path) <= UNWATCHED_BYTES):
            self._unwatched_bytes += cost(path)
            self.unwatched[path] = (
                "the inotify watch limit is reached (fs.inotify.max_user_watches)"
                if e == errno.ENOSPC else
                f"more than {MAX_WATCHED} directories are watched" if e == errno.EMLINK else
                f"a tree of more than {MOVE_IN_MAX} entries moved in at once"
                if e == errno.E2BIG else
                f"more than {MAX_DEPTH} directories deep in one walk" if e == errno.ELOOP
                else f"the watched directories' paths take {MAX_PATH_BYTES >> 20} MiB"
                if e == errno.ENOMEM else os.strerror(e))
            if unseen:
                self._mark_unseen(path)
        else:
            self._overflow_pending = True  # too many to keep: rescans walk every root
            if unseen:
                self._mark_unseen(path)  # counted as not kept
        if self._lost_since is None:
            self._lost_since = self._fs_now()

    def _mark_unseen(self, path: str) -> None:
        """Rescan *path* whole next time, if it is among the unwatched directories kept by
        name (their count and bytes are bounded); else count it (ENOBUFS)."""
        if path in self.unwatched and len(self._unseen) < UNWATCHED_KEEP:
            self._unseen.add(path)
        elif path not in self._unseen:
            self.errors["ENOBUFS"] = self.errors.get("ENOBUFS", 0) + 1

    def _walk(self, top: str, enter_unwatched: bool = True, unseen: bool = False,
              fresh_since: float | None = None) -> Walk:
        """Every entry below the directory *top*, depth first, as (path, lstat result),
        on *top*'s file system and without following links; each directory is watched
        as it is entered. Directories are opened relative to their parent's descriptor,
        so the walk holds two open files per level, not a list of entries, and paths
        longer than PATH_MAX are no obstacle. A directory that cannot be watched is
        entered only if *enter_unwatched*; one that cannot be opened is recorded
        (:attr:`unwatched`) and does not stop the rest. Closing the generator closes
        its files. With *unseen* (the walk describes new content), a directory it
        leaves out is marked for a rescan that reports all it holds. With *fresh_since*,
        a directory neither watched nor unwatched before, changed since then (a tree
        moved in while events were lost: its files keep their ctimes), marks what is
        below it as fresh (the third item)."""
        if too_long(top):
            self._blind(top, errno.ENAMETOOLONG)
            return
        try:
            fd = open_dir(top)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                self._unwatch_drop(top)  # gone, or no longer a directory
                self._unseen.discard(top)
            elif e.errno != errno.EACCES:
                self._blind(top, e.errno or errno.EIO, unseen)
            return
        # path, descriptor, its os.scandir(), whether it is fresh
        frames: list[tuple[str, int, Any, bool]] = []
        try:
            device = os.fstat(fd).st_dev
            if self._add(top, fd, unseen and not enter_unwatched) or enter_unwatched:
                frames.append((top, fd, os.scandir(fd), False))
                fd = -1  # the frame holds it now
        except OSError:
            pass  # gone or unreadable since it was opened
        finally:
            if fd >= 0:
                os.close(fd)
        try:
            while frames:
                path, dfd, it, fresh = frames[-1]
                try:
                    entry = next(it, None)
                except OSError:  # the directory went away while it was read
                    entry = None
                if entry is None:
                    frames.pop()
                    it.close()
                    os.close(dfd)
                    continue
                child = f"{path.rstrip('/')}/{entry.name}"
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone since it was listed
                yield child, st, fresh
                if (not stat.S_ISDIR(st.st_mode) or st.st_dev != device
                        or child in self.exclude):
                    continue
                if len(frames) >= MAX_DEPTH:
                    self._blind(child, errno.ELOOP, unseen)  # a rescan walks on from there
                    continue
                if too_long(child):
                    self._blind(child, errno.ENAMETOOLONG)
                    continue
                try:
                    cfd = os.open(entry.name, DIR_FLAGS, dir_fd=dfd)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES):
                        self._blind(child, e.errno or errno.EIO, unseen)
                    continue  # gone, swapped for a link, or not ours to read
                try:
                    known = child in self.unwatched
                    watched = self._add(child, cfd, unseen and not enter_unwatched)
                    new = self._added_new if watched else not known
                    if watched or enter_unwatched:
                        frames.append((child, cfd, os.scandir(cfd), fresh or (
                            fresh_since is not None and new
                            and st.st_ctime >= fresh_since)))
                        continue
                except OSError:
                    pass
                os.close(cfd)
        finally:
            for _path, dfd, it, _fresh in frames:
                it.close()
                os.close(dfd)

    def _add_tree(self, top: str, keep: int | None = MOVE_IN_MAX,
                  keep_chars: int = MOVE_IN_CHARS, enter_unwatched: bool = False
                  ) -> list[tuple[str, os.stat_result]]:
        """Watch *top* and every directory below it on its file system. Returns what
        is already in them (for a new directory: what was made before its watch was
        set), at most *keep* paths of *keep_chars* characters in all: past that the walk
        stops and the tree is recorded as cut short (``E2BIG``), for a rescan. With
        *keep* None (the trees watched at the start) nothing is returned and the whole
        tree is watched. A directory that
        cannot be watched is recorded (:attr:`unwatched`), and does not stop the
        others; it is entered only if *enter_unwatched* (the marks report what
        changes in it from then on)."""
        found: list[tuple[str, os.stat_result]] = []  # with what the walk saw of each
        walk = self._walk(top, enter_unwatched=enter_unwatched, unseen=keep is not None)
        try:
            for path, st, _fresh in walk:
                if keep is None:
                    continue
                if len(found) >= keep or cost(path) > keep_chars:
                    self._blind(top, errno.E2BIG, unseen=True)
                    break
                found.append((path, st))
                keep_chars -= cost(path)
        finally:
            walk.close()
        return found

    @property
    def needs_rescan(self) -> bool:
        """Events were lost (a queue overflow), directories are unwatched, or a rescan
        stopped at its limit."""
        return self._lost_since is not None or self._pass is not None

    def rescan(self, limit: int = RESCAN_MAX_ENTRIES, max_events: int | None = None,
               sink: Callable[[Event], None] | None = None) -> tuple[list[Event], bool]:
        """Walk again what events may be missing for: every root after a queue
        overflow, else the unwatched directories. Watches what is not watched yet, and
        reports a ``rescanned`` event for each file whose inode changed (``st_ctime``:
        made, written, moved, its mode changed) since events were lost, once per change.
        In a directory of new content that was never described (cut short, or left
        unwatched as it came), every file is reported, whatever its ctime.
        Each call looks at *limit* entries at most, and returns *max_events* events at
        most (:data:`RESCAN_MAX_EVENTS` by default); a walk cut short goes on from where
        it stopped at the next call. If the walk fails, the next call starts it again
        from every root. With a *sink*, each event goes to it as it is found
        (the list returned is empty, and only *max_events*, if given, bounds them).
        Returns the events and whether the walk is complete."""
        if max_events is None:
            max_events = RESCAN_MAX_EVENTS if sink is None else limit
        if (self._pass is not None and self._lost_since is not None
                and self._fs_now() - self._pass_started >= self._restart_after):
            # Lost again while a long walk goes on: start over, for all it had to report.
            self._abandon_pass(self._pass_roots)
            self._restart_after *= 2
            self.rescans_restarted += 1
        if self._pass is None:
            started = self._fs_now()
            self._pass_started = started
            self._pass_since = (self._lost_since if self._lost_since is not None
                                else started) - CTIME_SLACK_S
            # New content never described comes first, reported whole; then the roots
            # (after an overflow) or what is unwatched, for what changed since.
            unseen = [u for u in self.unwatched if u in self._unseen] + sorted(
                self._unseen.difference(self.unwatched))
            tops = [(u, -math.inf) for u in unseen] + [
                (t, self._pass_since) for t in
                (self.roots if self._overflow_pending else self.unwatched)
                if t not in self._unseen]
            self._pass_unseen = unseen
            self._pass_roots = self._overflow_pending
            # After an overflow, the files of the watched directories first, one level
            # each (the events lost were theirs; a user's flood of unwatchable
            # directories, walked next, must not come before them).
            first = list(self.paths.values()) if self._overflow_pending else []
            # What is lost from now on is for the next walk.
            self._overflow_pending = False
            self._lost_since = None
            self._pass = self._pass_walk(first, tops)
        events: list[Event] = []
        send = sink or events.append
        reported = 0
        complete = True
        kept: list[int] = []  # what this call reported (and remembers having reported)
        try:
            for looked, (path, st, since) in enumerate(self._pass, 1):
                if st is not None and not stat.S_ISDIR(st.st_mode) and st.st_ctime >= since:
                    key = change_key(path, st)
                    if key not in self._reported:
                        if len(self._reported) < REPORTED_KEEP:
                            self._reported.add(key)
                            kept.append(key)
                        send(describe(path, "rescanned", st))
                        reported += 1
                if looked >= limit or reported >= max_events:
                    complete = False
                    break
        except BaseException:
            # A walk that failed is not taken for complete: the next starts again, from
            # every root, for what changed since this one's start.
            self._abandon_pass(True)
            if sink is None:  # what it found is lost with it: to be reported again
                self._reported.difference_update(kept)
            raise
        self.rescans += 1
        if complete:
            self._refused.clear()  # room may have been made since
            self._pass = None
            self._restart_after = RESTART_AFTER_S
            self._unseen.difference_update(self._pass_unseen)
            if self.unwatched:  # still unwatched: scanned again, for what changes from now
                self._lost_since = min(self._lost_since or self._pass_started,
                                       self._pass_started)
            if self._lost_since is None:
                self._reported.clear()
        else:
            self.rescans_truncated += 1
        return events, complete

    def _abandon_pass(self, roots: bool) -> None:
        """Drop the walk under way (closing its files): the next starts over (from every
        root if *roots*), for all it had to report since its own losses."""
        if self._pass is not None:
            self._pass.close()
            self._pass = None
        self._overflow_pending = self._overflow_pending or roots
        since = self._pass_since + CTIME_SLACK_S
        self._lost_since = since if self._lost_since is None else min(self._lost_since, since)

    def _pass_walk(self, first: list[str], tops: list[tuple[str, float]]) -> Pass:
        """A rescan's walk: the files of the directories *first*, then the trees *tops*
        (each with the time changes count from), as (path, lstat result or None, since)."""
        since0 = self._pass_since
        yield from ((path, st, since0) for path, st in self._files_of(first))
        for top, since in tops:
            walk = self._walk(top, unseen=since == -math.inf, fresh_since=since)
            try:
                for path, st, fresh in walk:
                    yield path, st, -math.inf if fresh else since
            finally:
                walk.close()  # its open directories, also when this walk is closed

    def _files_of(self, dirs: list[str]) -> Generator[tuple[str, os.stat_result | None],
                                                        None, None]:
        """What is directly in each of *dirs* but directories, as (path, lstat result), at
        most FIRST_LOOK_ENTRIES entries of each;
        directories are told apart by their type without a stat, and each SKIP_COST of
        them, like each directory opened, yields ("", None), so that they count against
        a rescan's limit too."""
        skipped = 0
        for d in dirs:
            yield "", None  # each directory opened counts as an entry
            try:
                fd = open_dir(d)
            except OSError:
                continue
            try:
                with os.scandir(fd) as it:
                    for entry in itertools.islice(it, FIRST_LOOK_ENTRIES):
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                skipped += 1
                                if skipped % SKIP_COST == 0:
                                    yield "", None
                                continue
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        yield f"{d.rstrip('/')}/{entry.name}", st
            except OSError:
                pass
            finally:
                os.close(fd)

    def fileno(self) -> int:
        return int(self.fd)

    @property
    def marked(self) -> int:
        """File systems under fanotify marks."""
        return len(self._marks.filesystems) if self._marks is not None else 0

    def _fds(self) -> list[int]:
        return [self.fd, *(self._marks.filenos() if self._marks is not None else ())]

    def read(self, timeout: float = 0.0, settle: float = SETTLE_S) -> list[Event]:
        """Events that arrived, waiting up to *timeout* seconds for the first.

        Once something arrived, what follows within *settle* seconds joins the batch
        (up to :data:`MAX_BATCH` kernel events; the rest wait for the next read), so
        that a file written under a temporary name and renamed into place (how
        editors and package managers replace files) is one ``moved-in`` event for its
        final name, with ``file.renamed_from``: the temporary file's own events are
        left out. Its content and state are all at the final name, which is reported.
        """
        if (timeout and not self._carry
                and not select.select(self._fds(), [], [], timeout)[0]):
            self._drained_at = self._fs_now()  # the queue is empty: nothing was lost so far
            # What the marks held is in inotify's past now, and inotify did not report it.
            return self._release(time.monotonic(), False) if self._held else []
        drained_before = self._drained_at
        read_from = time.monotonic()  # what was held before this is in inotify's past
        raw, self._carry = self._carry, []
        spent = sum(self._cost(wd, n) for wd, _m, _c, n in raw)
        deadline = time.monotonic() + settle
        drained = False  # the queue was found empty (else MAX_BATCH was reached)
        while len(raw) < MAX_BATCH and spent <= MAX_BATCH_PATH_BYTES:
            try:
                # At most about what is left of the batch (a read shorter than one event
                # with the longest name fails).
                data = os.read(self.fd, max(4096, min(65536, (MAX_BATCH - len(raw)) * 32)))
            except BlockingIOError:
                left = deadline - time.monotonic()
                if not raw or left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    drained = True
                    break
                continue
            pos = 0
            while pos + HEADER.size <= len(data):
                wd, mask, cookie, length = HEADER.unpack_from(data, pos)
                name = data[pos + HEADER.size:pos + HEADER.size + length].rstrip(b"\0")
                pos += HEADER.size + length
                raw.append((wd, mask, cookie, os.fsdecode(name)))
                spent += self._cost(wd, raw[-1][3])
        # What the paths of the batch take is bounded: the events past it wait (their
        # names are short; their paths are made when their turn comes).
        spent = 0
        for i, (wd, _m, _c, n) in enumerate(raw):
            spent += self._cost(wd, n)
            if i and (i >= MAX_BATCH or spent > MAX_BATCH_PATH_BYTES):
                raw, self._carry = raw[:i], raw[i:]
                break
        if drained:
            self._drained_at = self._fs_now()
        lost = any(m & IN_Q_OVERFLOW for _w, m, _c, _n in raw)
        if lost:
            # The queue was empty when it was last read; what happened since may be lost.
            self._overflow_pending = True
            self._lost_since = min(drained_before, self._lost_since or drained_before)
        events = self._fold(raw)
        taken = {e["file.path"] for e in events}
        if self._marks is None:
            return events
        now = time.monotonic()
        for e in events:  # inotify's own: the marks need not report them
            path = e["file.path"]
            self._unhold(path)
            self._forget_recent(path)
            while self._recent and (len(self._recent) >= MARKS_HELD or self._recent_bytes
                                    + cost(path) > MARKS_HELD_BYTES):
                self._forget_recent(next(iter(self._recent)))  # the oldest goes
            self._recent[path] = (now, frozenset(e.get("file.actions", ())))
            self._recent_bytes += cost(path)
        marked = self._marked(taken)
        released = [e for e in self._release(read_from if drained else None, lost)
                    if e["file.path"] not in taken]
        return events + marked + released

    def _marked(self, taken: set[str]) -> list[Event]:
        """What the fanotify marks report in the watched trees' directories inotify does
        not watch (it reports those it watches), one event per path, none for the paths
        in *taken* (reported by inotify in this batch). A directory reported on that
        can be watched is watched from then on; until the marks' queues were read empty,
        its events still come from them (those queued before its watch never reach
        inotify)."""
        if self._marks is None:
            return []
        self._marks_since = self._marks_drained_at
        by_path: dict[str, Event] = {}
        spent = [0]  # what the paths of the events so far take (cost())
        for mask, mounts, handle, name in self._marks.read(
                MAX_BATCH, lambda: spent[0] <= MAX_BATCH_PATH_BYTES):
            if mask & FAN_Q_OVERFLOW:
                self.marks_overflowed += 1
                self._lose()
                continue
            if name in (b"", b"."):
                continue  # a directory's own change
            try:
                events = self._marked_events(mask, mounts, handle, os.fsdecode(name))
            except OSError as err:
                if err.errno not in (errno.ESTALE, errno.ENOENT):  # gone since
                    code = errno.errorcode.get(err.errno or 0, "EIO")
                    self.errors[code] = self.errors.get(code, 0) + 1
                continue
            for event in events:
                if event["file.path"] in taken:
                    continue
                seen = by_path.get(event["file.path"])
                if seen is None:
                    by_path[event["file.path"]] = event
                    spent[0] += cost(event["file.path"])
                else:
                    seen.update({k: v for k, v in event.items() if k != "file.actions"})
                    seen["file.actions"] += [a for a in event["file.actions"]
                                             if a not in seen["file.actions"]]
        if self._marks.drained:
            self._marks_drained_at = self._fs_now()
            self._fresh.clear()  # what was queued before their watches is read now
        return list(by_path.values())

    def _lose(self, code: str = "") -> None:
        """Events of the marks were lost (read since :attr:`_marks_since`): a rescan of
        every root looks for what changed since."""
        if code:
            self.errors[code] = self.errors.get(code, 0) + 1
        self._overflow_pending = True
        since = self._marks_since
        self._lost_since = since if self._lost_since is None else min(self._lost_since, since)

    def _marked_events(self, mask: int, mounts: list[int], handle: bytes,
                       name: str) -> list[Event]:
        """The events of one fanotify report: *name* in the directory *handle* names
        (decoded on one of *mounts*, the first that shows it in the watched trees);
        none when inotify watches that directory, or it is outside the trees or gone."""
        key = (mounts[0], handle)
        wd = self._known.get(key, -1)
        if wd in self.paths and wd not in self._fresh:
            # Watched (a watch removed is no longer in self.paths): inotify's, held.
            return self._hold(f"{self.paths[wd].rstrip('/')}/{name}", mask)
        assert self._marks is not None
        for mount in mounts:
            fd = self._marks.open(mount, handle)
            try:
                st = os.fstat(fd)
                if st.st_nlink == 0:
                    return []  # removed since
                try:
                    top = os.readlink(f"/proc/self/fd/{fd}")
                except OSError as e:
                    if e.errno == errno.ENAMETOOLONG and self._watch_of(fd) in self.paths:
                        return []  # past PATH_MAX, and inotify watches it
                    raise
                if self._inside(top):
                    return self._marked_in(mask, key, fd, st, top, name)
            finally:
                os.close(fd)
        return []  # outside the trees (or left out)

    def _marked_in(self, mask: int, key: tuple[int, bytes], fd: int, st: os.stat_result,
                   top: str, name: str) -> list[Event]:
        """The events of *name* in the directory *top* (open as *fd*, *st* its fstat),
        a directory of the watched trees."""
        try:
            now = os.lstat(top)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            # Moved or removed since its path was read: where it is, is not known.
            self._lose("ESTALE")
            return []
        wd = self._watch_of(fd)
        if wd in self.paths:  # inotify watches it (under this path or another)
            self._remember(self._known, key, wd)
            if wd not in self._fresh:
                return self._hold(f"{self.paths[wd].rstrip('/')}/{name}", mask)
        elif key not in self._refused:
            if self._add(top, fd):
                self._fresh.add(self._added_wd)
                self._remember(self._known, key, self._added_wd)
            else:  # no room (counted once): not tried again for each of its events
                self._remember(self._refused, key, 0)
        path = f"{top.rstrip('/')}/{name}"
        actions = [a for bit, a in FAN_ACTIONS if mask & bit] or ["changed"]
        try:
            found = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return [{"file.path": path, "file.action": actions[0], "file.exists": False,
                     "file.actions": actions}]
        event = describe(path, actions[0], found)
        event["file.actions"] = actions
        if self.needs_rescan and len(self._reported) < REPORTED_KEEP:
            self._reported.add(change_key(path, found))  # a rescan does not report it again
        if stat.S_ISDIR(found.st_mode) and mask & (FAN_CREATE | FAN_MOVED_TO):
            inside = self._new_dir(path, actions[0], marked=True)
            for e in inside:
                e["file.actions"] = [e["file.action"]]
            return [event, *inside]
        return [event]

    def _hold(self, path: str, mask: int) -> list[Event]:
        """Hold what the marks saw of *path*, in a directory inotify watches, until
        inotify had its turn (see :meth:`_release`); with no room (MARKS_HELD), it is
        reported now (inotify may report it too)."""
        recent = self._recent.get(path)
        if (recent is not None and recent[0] >= time.monotonic() - MARKS_HOLD_S
                and {a for bit, a in FAN_ACTIONS if mask & bit} <= recent[1]):
            return []  # inotify reported it already, all of it
        held = self._held.get(path)
        if held is not None:
            self._held[path] = (held[0], held[1] | mask)
        elif (len(self._held) < MARKS_HELD
              and self._held_bytes + cost(path) <= MARKS_HELD_BYTES):
            self._held[path] = (time.monotonic(), mask)
            self._held_bytes += cost(path)
        else:
            now = self._marked_now(path, mask)
            return [now] if now is not None else []
        return []

    def _unhold(self, path: str) -> None:
        if self._held.pop(path, None) is not None:
            self._held_bytes -= cost(path)

    def _forget_recent(self, path: str) -> None:
        if self._recent.pop(path, None) is not None:
            self._recent_bytes -= cost(path)

    def _marked_now(self, path: str, mask: int) -> Event | None:
        """The event of a held *path*; None if it is gone (a file made and removed, or
        renamed away, as editors' temporary files are: inotify reported what stands)."""
        actions = [a for bit, a in FAN_ACTIONS if mask & bit] or ["changed"]
        try:
            st = lstat(path)
        except OSError:
            return None
        event = describe(path, actions[0], st)
        event["file.actions"] = actions
        if self.needs_rescan and len(self._reported) < REPORTED_KEEP:
            self._reported.add(change_key(path, st))  # a rescan does not report it again
        return event

    def _release(self, read_from: float | None, lost: bool) -> list[Event]:
        """The held events inotify did not report: all of them after *lost* (an inotify
        overflow), those held before *read_from* (inotify's queue has been read empty
        since), and those held longer than MARKS_HOLD_S (inotify is behind)."""
        now = time.monotonic()
        out = []
        for path, (at, mask) in list(self._held.items()):
            if lost or (read_from is not None and at < read_from) or at < now - MARKS_HOLD_S:
                self._unhold(path)
                event = self._marked_now(path, mask)
                if event is not None:
                    out.append(event)
        if lost:  # what inotify reported may be all it did not lose
            self._recent.clear()
            self._recent_bytes = 0
        while self._recent:  # oldest first
            path, (at, _actions) = next(iter(self._recent.items()))
            if at >= now - MARKS_HOLD_S:
                break
            self._forget_recent(path)
        return out

    @staticmethod
    def _remember(table: dict[Any, int], key: Any, value: int) -> None:
        if len(table) >= MARKS_KNOWN:
            table.clear()
        table[key] = value

    def _watch_of(self, fd: int) -> int:
        """The watch of the directory open as *fd*, -1 if it has none (changing
        nothing)."""
        path = f"/proc/self/fd/{fd}".encode()
        wd = self._libc.inotify_add_watch(self.fd, path,
                                          (MASK & ~IN_DONT_FOLLOW) | IN_MASK_CREATE)
        if wd >= 0:  # it had none: the one just set goes
            self._libc.inotify_rm_watch(self.fd, wd)
            return -1
        if ctypes.get_errno() != errno.EEXIST:
            return -1
        # Watched: the same call without IN_MASK_CREATE names its watch (the mask is
        # the one it has).
        return int(self._libc.inotify_add_watch(self.fd, path, MASK & ~IN_DONT_FOLLOW))

    def _inside(self, path: str) -> bool:
        """Whether the directory *path* is in a watched tree, and not left out."""
        def under(top: str) -> bool:
            return path == top or path.startswith(top.rstrip("/") + "/")
        return any(map(under, self.roots)) and not any(map(under, self.exclude))

    def _cost(self, wd: int, name: str) -> int:
        """What the path of an event of *wd* for *name* takes in memory."""
        return cost(self.paths.get(wd, "")) + cost(name)

    def _path(self, wd: int, name: str) -> str | None:
        base = self.paths.get(wd)
        return f"{base.rstrip('/')}/{name}" if base is not None and name else None

    def _fold(self, raw: list[tuple[int, int, int, str]]) -> list[Event]:
        paths = [self._path(wd, n) for wd, _m, _c, n in raw]
        created: dict[str, int] = {}  # path -> where in the batch it was first made
        moved_from: dict[int, int] = {}  # cookie -> where its move-out is
        for i, ((_w, m, c, _n), path) in enumerate(zip(raw, paths, strict=True)):
            if path is not None and m & IN_CREATE and not m & IN_ISDIR:
                created.setdefault(path, i)
            elif m & IN_MOVED_FROM and c:
                moved_from[c] = i
        # A file made in this batch and then renamed onto another name was a temporary
        # file: its events up to the rename are left out. (Only those: a file of the same
        # name made after the rename is another file, and is reported.)
        temp: dict[str, str] = {}  # final name -> the temporary file renamed onto it
        skip_until: dict[str, int] = {}  # temporary name -> its last event left out
        for (_w, m, c, _n), dst in zip(raw, paths, strict=True):
            j = moved_from.get(c, -1) if m & IN_MOVED_TO and c else -1
            src = paths[j] if j >= 0 else None
            if src is not None and dst is not None and created.get(src, j) < j:
                temp[dst] = src
                skip_until[src] = max(skip_until.get(src, -1), j)
        # A path is described once the batch is read, so its events would all show its
        # final state: one event per path, with the first action (the last one that left
        # a file there, when one is there now) and every action seen.
        by_path: dict[str, Event] = {}
        # What new directories already hold is described up to MOVE_IN_MAX paths a batch.
        self._room, self._room_chars = MOVE_IN_MAX, MOVE_IN_CHARS
        self._full = False
        for k, ((wd, m, _c, n), path) in enumerate(zip(raw, paths, strict=True)):
            if path is not None and k <= skip_until.get(path, -1):
                continue
            try:
                events = self._event(wd, m, n, path)
            except OSError as err:  # this path only: the rest of the batch stands
                name = errno.errorcode.get(err.errno or 0, "EIO")
                self.errors[name] = self.errors.get(name, 0) + 1
                continue
            src = temp.get(path) if path is not None and m & IN_MOVED_TO else None
            if src is not None and events:
                events[0]["file.renamed_from"] = src
            for e in events:
                seen = by_path.get(e["file.path"])
                if seen is None:
                    by_path[e["file.path"]] = {**e, "file.actions": [e["file.action"]]}
                elif e["file.action"] not in seen["file.actions"]:
                    seen["file.actions"].append(e["file.action"])
        for e in by_path.values():
            # What is there now came last: a file deleted (or moved away) and made again in
            # one batch is reported as made, not as deleted.
            if e.get("file.exists") and e["file.action"] in GONE:
                e["file.action"] = next((a for a in reversed(e["file.actions"])
                                         if a not in GONE), e["file.action"])
        return list(by_path.values())

    def _event(self, wd: int, mask: int, name: str, path: str | None) -> list[Event]:
        """The events of one kernel event (*path*: its path, made once for the batch)."""
        if mask & IN_Q_OVERFLOW:
            self.overflowed += 1
            return [{"file.action": "overflow", "file.path": ""}]
        if mask & IN_IGNORED:
            self._forget(wd)
            return []
        if path is None:
            return []
        action = next((a for bit, a in ACTIONS if mask & bit), "changed")
        events = [describe(path, action)]
        if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            events += self._new_dir(path, action)
        return events

    def _new_dir(self, path: str, action: str, marked: bool = False) -> list[Event]:
        """A new directory: watch it, and report what appeared in it before the watch.
        Once the kernel's watch limit refused one, the others of the batch are not
        tried (a flood of new directories would cost a refused call each). With
        *marked* (the marks report what changes in it), what it holds is reported
        even where it cannot be watched."""
        if self._full and not marked:
            self._blind(path, errno.ENOSPC, unseen=True)
            return []
        refused = self.errors.get("ENOSPC", 0)
        found = self._add_tree(path, keep=self._room, keep_chars=self._room_chars,
                               enter_unwatched=marked)
        self._full = self.errors.get("ENOSPC", 0) > refused
        self._room -= len(found)
        self._room_chars -= sum(cost(p) for p, _st in found)
        return [describe(p, action, st) for p, st in found]  # no second lstat


def change_key(path: str, st: os.stat_result) -> int:
    """One change of the file *path*: what it is now, not only when it changed (a mode
    changed within the same tick of the ctime clock is another change)."""
    return hash((path, st.st_ino, st.st_ctime_ns, st.st_mode, st.st_uid, st.st_gid))


def describe(path: str | Path, action: str, st: os.stat_result | None = None) -> Event:
    """A file event: what happened to *path*, and what it is now (*st*: its lstat result,
    when it is known already)."""
    event: Event = {"file.path": str(path), "file.action": action, "file.exists": False}
    if st is None:
        try:
            st = lstat(str(path))
        except (FileNotFoundError, NotADirectoryError):
            return event
        except OSError as e:  # cannot be looked up: the event says so
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
