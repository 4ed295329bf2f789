"""File integrity: what the host's files are now, against what they should be.

A baseline maps absolute paths to :class:`FileState`. On a Cerulean image it
comes from the file manifest written at build time (the format of
:mod:`cerulean.build.manifest`), so nothing is trusted on first use; on another
Debian or Ubuntu server it is the first scan, and reports say so. :func:`scan`
reads the current state of the watched directories and :func:`compare` lists
every change with the path, what changed, the old and new hash, owner and mode,
and the package the file belongs to.

Only ``lstat`` and regular-file reads are used: symbolic links are recorded,
never followed, and a scan never leaves the file system it started on.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}


@dataclass(frozen=True)
class FileState:
    path: str  # absolute, as on the host
    kind: str  # file | dir | symlink | other
    mode: int  # permission bits, with setuid/setgid/sticky
    uid: int
    gid: int
    size: int | None = None  # files
    sha256: str | None = None  # files
    target: str | None = None  # symlinks
    package: str | None = None  # from the manifest or dpkg

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "type": self.kind, "mode": f"{self.mode:04o}",
                             "uid": self.uid, "gid": self.gid}
        for k in ("size", "sha256", "target", "package"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


@dataclass(frozen=True)
class Change:
    path: str
    what: tuple[str, ...]  # added | removed | type | content | mode | owner | target
    old: FileState | None
    new: FileState | None

    @property
    def package(self) -> str | None:
        return (self.old.package if self.old else None) or (self.new.package if self.new
                                                            else None)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "what": list(self.what), "package": self.package,
                "old": self.old.to_json() if self.old else None,
                "new": self.new.to_json() if self.new else None}


def from_manifest(entries: Iterable[Mapping[str, Any]], under: Sequence[str] = ()
                  ) -> dict[str, FileState]:
    """A baseline from manifest entries (only those below *under*, if given)."""
    out = {}
    for e in entries:
        path = str(e["path"])
        if under and not _below(path, under):
            continue
        out[path] = FileState(path, str(e["type"]), int(str(e["mode"]), 8), int(e["uid"]),
                              int(e["gid"]), e.get("size"), e.get("sha256"), e.get("target"),
                              e.get("package"))
    return out


def _below(path: str, dirs: Sequence[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in chunks (a UKI is tens of MiB)."""
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def state_of(root: Path, path: str, st: os.stat_result | None = None,
             packages: Mapping[str, str] | None = None) -> FileState | None:
    """The state of *path* (absolute on the host) under *root*; None if it is gone."""
    real = os.path.join(root, path.lstrip("/"))
    try:
        st = st or os.lstat(real)
        kind = KINDS.get(stat.S_IFMT(st.st_mode), "other")
        size = digest = target = None
        if kind == "file":
            size, digest = st.st_size, file_sha256(real)
        elif kind == "symlink":
            target = os.readlink(real)
    except FileNotFoundError:
        return None
    return FileState(path, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, digest,
                     target, (packages or {}).get(path))


def _walk(root: Path, top: str, exclude: Sequence[str]) -> Iterator[tuple[str, os.stat_result]]:
    real_top = os.path.join(root, top.lstrip("/"))
    try:
        st = os.lstat(real_top)
    except FileNotFoundError:
        return
    yield top, st
    if not stat.S_ISDIR(st.st_mode):
        return
    device = st.st_dev
    stack = [(top.rstrip("/") or "/", real_top)]
    while stack:
        path, real = stack.pop()
        try:
            with os.scandir(real) as it:
                items = sorted(it, key=lambda e: e.name)
        except (PermissionError, FileNotFoundError, NotADirectoryError):
            continue
        for item in items:
            child = f"{path.rstrip('/')}/{item.name}"
            if _below(child, exclude):
                continue
            try:
                cst = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield child, cst
            if stat.S_ISDIR(cst.st_mode) and cst.st_dev == device:
                stack.append((child, item.path))


def scan(root: Path, dirs: Sequence[str], exclude: Sequence[str] = (),
         packages: Mapping[str, str] | None = None) -> dict[str, FileState]:
    """The current state of everything below *dirs* (absolute host paths)."""
    out: dict[str, FileState] = {}
    for top in dirs:
        for path, st in _walk(root, top, exclude):
            s = state_of(root, path, st, packages)
            if s is not None:
                out[path] = s
    return out


def compare(baseline: Mapping[str, FileState], current: Mapping[str, FileState]
            ) -> list[Change]:
    """Every difference, sorted by path. Package names come from either side."""
    changes = []
    for path in sorted(set(baseline) | set(current)):
        old, new = baseline.get(path), current.get(path)
        if old is None:
            changes.append(Change(path, ("added",), None, new))
            continue
        if new is None:
            changes.append(Change(path, ("removed",), old, None))
            continue
        what = []
        if old.kind != new.kind:
            what.append("type")
        elif old.kind == "file" and (old.sha256 != new.sha256 or old.size != new.size):
            what.append("content")
        elif old.kind == "symlink" and old.target != new.target:
            what.append("target")
        if old.mode != new.mode:
            what.append("mode")
        if (old.uid, old.gid) != (new.uid, new.gid):
            what.append("owner")
        if what:
            changes.append(Change(path, tuple(what), old, new))
    return changes


def dpkg_owners(root: Path) -> dict[str, str]:
    """Path -> package, from dpkg's file lists (empty where there is no dpkg database)."""
    out: dict[str, str] = {}
    info = root / "var/lib/dpkg/info"
    try:
        lists = sorted(info.glob("*.list"))
    except OSError:
        return out
    for f in lists:
        pkg = f.name[:-5].split(":", 1)[0]
        try:
            for line in f.read_text(errors="replace").splitlines():
                if line and line != "/.":
                    out.setdefault(line, pkg)
        except OSError:
            continue
    return out
