"""An in-memory filesystem tree: the rootfs an image is composed into.

Packages are unpacked into a :class:`Tree` rather than onto the host's disk.
Paths are normalised when they enter, and the tree never follows a symlink
while adding entries, so no package can write outside the image: an entry
whose parent is a symlink planted by an earlier entry is refused, as are
absolute paths and ``..``. Readers that need symlink semantics (chroot-style,
never leaving the root) use :meth:`Tree.resolve`.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

from cerulean.errors import CeruleanError

Kind = Literal["file", "dir", "symlink"]

# Top-level directories that are symlinks into /usr on a merged-/usr system.
MERGED_USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class UnsafePathError(CeruleanError):
    """An archive entry tried to escape the rootfs or go through a planted symlink."""


@dataclass
class Entry:
    """One filesystem object. ``path`` is relative to the root, without a leading slash."""

    path: str
    kind: Kind
    mode: int = 0o644  # permission bits, including setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    data: bytes = b""  # file contents
    target: str = ""  # symlink target, exactly as stored
    package: str | None = None  # the package that shipped it, if any

    @property
    def size(self) -> int:
        return len(self.data) if self.kind == "file" else 0

    @property
    def st_mode(self) -> int:
        type_bits = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}
        return type_bits[self.kind] | self.mode


def normalize(path: str) -> str:
    """Return *path* as a clean relative path, or raise UnsafePathError.

    Leading ``./`` is accepted (that is how .deb data archives spell paths);
    absolute paths and any ``..`` component are refused.
    """
    if "\x00" in path:
        raise UnsafePathError(f"The path {path!r} contains a NUL byte.")
    p = path
    while p.startswith("./"):
        p = p[2:]
    if p in (".", ""):
        return ""
    if p.startswith("/"):
        raise UnsafePathError(f"The absolute path {path!r} is not allowed in a package.")
    parts = [c for c in p.split("/") if c not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(f"The path {path!r} climbs out with '..'.")
    return "/".join(parts)


def merge_usr(path: str) -> str:
    """Map ``bin/x``, ``lib/x``... onto ``usr/bin/x``... (merged /usr)."""
    head, _, rest = path.partition("/")
    if head in MERGED_USR_LINKS:
        return f"usr/{head}/{rest}" if rest else f"usr/{head}"
    return path


@dataclass
class Tree:
    """A rootfs held in memory, keyed by normalised relative path."""

    entries: dict[str, Entry] = field(default_factory=dict)
    merged_usr: bool = True

    def __post_init__(self) -> None:
        if "" not in self.entries:
            self.entries[""] = Entry("", "dir", 0o755)

    # -- adding -----------------------------------------------------------

    def _place(self, path: str, *, canonical: bool = True) -> str:
        p = normalize(path)
        if self.merged_usr and canonical:
            p = merge_usr(p)
        self._check_parents(p)
        return p

    def _check_parents(self, p: str) -> None:
        """Refuse a path whose parent is a symlink (or a file) in the tree."""
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            e = self.entries.get(parent)
            if e is None:
                continue
            if e.kind == "symlink":
                raise UnsafePathError(
                    f"The path '/{p}' goes through the symlink '/{parent}' planted earlier."
                )
            if e.kind != "dir":
                raise UnsafePathError(f"The path '/{p}' goes through the file '/{parent}'.")

    def _ensure_parents(self, p: str, package: str | None) -> None:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = Entry(parent, "dir", 0o755, package=package)

    def _put(self, entry: Entry) -> Entry:
        old = self.entries.get(entry.path)
        if (
            old is not None
            and old.kind == "dir"
            and entry.kind != "dir"
            and any(k.startswith(entry.path + "/") for k in self.entries)
        ):
            raise UnsafePathError(
                    f"The path '/{entry.path}' would replace a non-empty directory."
                )
        if old is not None and old.kind == "dir" and entry.kind == "dir":
            # A directory shipped again keeps its first owner but takes new metadata.
            entry = replace(entry, package=old.package or entry.package)
        self._ensure_parents(entry.path, entry.package)
        self.entries[entry.path] = entry
        return entry

    def add_file(
        self,
        path: str,
        data: bytes,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        package: str | None = None,
    ) -> Entry:
        p = self._place(path)
        if not p:
            raise UnsafePathError("A file cannot replace the root directory.")
        return self._put(Entry(p, "file", mode & 0o7777, uid, gid, data=data, package=package))

    def add_dir(
        self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0, package: str | None = None
    ) -> Entry:
        p = self._place(path)
        return self._put(Entry(p, "dir", mode & 0o7777, uid, gid, package=package))

    def add_symlink(
        self,
        path: str,
        target: str,
        uid: int = 0,
        gid: int = 0,
        package: str | None = None,
        *,
        canonical: bool = True,
    ) -> Entry:
        top = normalize(path)
        if self.merged_usr and top in MERGED_USR_LINKS:
            # The merged-/usr links themselves (base-files ships them): keep them at the
            # top level, and only the way merged /usr defines them.
            if target.strip("/") != f"usr/{top}":
                raise UnsafePathError(f"The symlink '/{top}' must point to usr/{top}.")
            e = Entry(top, "symlink", 0o777, uid, gid, target=f"usr/{top}", package=package)
            self.entries[top] = e
            return e
        p = self._place(path, canonical=canonical)
        if not p:
            raise UnsafePathError("A symlink cannot replace the root directory.")
        if "\x00" in target or not target:
            raise UnsafePathError(f"The symlink '/{p}' has an invalid target.")
        return self._put(Entry(p, "symlink", 0o777, uid, gid, target=target, package=package))

    def add_hardlink(self, path: str, link_to: str, package: str | None = None) -> Entry:
        """A hard link becomes an independent copy of an earlier regular file."""
        src = self._place(link_to)
        e = self.entries.get(src)
        if e is None or e.kind != "file":
            raise UnsafePathError(f"The hard link '{path}' points to '{link_to}', not a file.")
        return self.add_file(path, e.data, e.mode, e.uid, e.gid, package=package)

    def add_merged_usr_links(self) -> None:
        """Create /bin -> usr/bin and friends (only those whose usr/ dir exists)."""
        for name in MERGED_USR_LINKS:
            if f"usr/{name}" in self.entries and name not in self.entries:
                self.entries[name] = Entry(name, "symlink", 0o777, target=f"usr/{name}")

    # -- reading ----------------------------------------------------------

    def get(self, path: str) -> Entry | None:
        return self.entries.get(normalize(path.lstrip("/")))

    def __contains__(self, path: str) -> bool:
        return self.get(path) is not None

    def resolve(self, path: str, *, max_links: int = 40) -> str | None:
        """Follow symlinks inside the tree (chroot semantics); None if dangling."""
        parts = [c for c in path.strip("/").split("/") if c not in ("", ".")]
        resolved: list[str] = []
        links = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            cur = "/".join([*resolved, part])
            if (
                self.merged_usr
                and not resolved
                and part in MERGED_USR_LINKS
                and cur not in self.entries
                and f"usr/{part}" in self.entries
            ):
                resolved = ["usr", part]
                continue
            e = self.entries.get(cur)
            if e is None:
                return None
            if e.kind == "symlink":
                links += 1
                if links > max_links:
                    return None
                t = e.target
                if t.startswith("/"):
                    resolved = []
                parts = [c for c in t.split("/") if c not in ("", ".")] + parts
                continue
            resolved.append(part)
        return "/".join(resolved)

    def read(self, path: str) -> bytes | None:
        """Contents of the regular file at *path* (following symlinks), or None."""
        r = self.resolve(path)
        if r is None:
            return None
        e = self.entries.get(r)
        return e.data if e is not None and e.kind == "file" else None

    def listdir(self, path: str) -> list[str]:
        """Names directly inside directory *path* (after resolving it), sorted."""
        r = self.resolve(path)
        if r is None:
            return []
        prefix = f"{r}/" if r else ""
        names = {k[len(prefix) :].split("/", 1)[0] for k in self.entries if k.startswith(prefix)}
        names.discard("")
        return sorted(names)

    def remove(self, path: str) -> int:
        """Remove *path* and everything below it; returns how many entries went."""
        p = normalize(path.lstrip("/"))
        doomed = [k for k in self.entries if k == p or k.startswith(p + "/")] if p else []
        for k in doomed:
            del self.entries[k]
        return len(doomed)

    def __iter__(self) -> Iterator[Entry]:
        """Entries in sorted path order (the root directory excluded)."""
        for k in sorted(self.entries):
            if k:
                yield self.entries[k]

    def files(self) -> Iterator[Entry]:
        return (e for e in self if e.kind == "file")

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries.values())
