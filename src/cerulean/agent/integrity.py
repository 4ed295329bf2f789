"""File integrity: what the host's files are now, against what they should be.

A baseline maps absolute paths to :class:`FileState`. On a Cerulean image it
comes from the file manifest written at build time (the format of
:mod:`cerulean.build.manifest`), so nothing is trusted on first use; on another
Debian or Ubuntu server it is the first scan, and reports say so. :func:`scan`
reads the current state of the watched directories and :func:`compare` lists
every change with the path, what changed, the old and new hash, owner and mode,
and the package the file belongs to.

Only ``lstat`` and regular-file reads are used: symbolic links are recorded,
never followed, and a scan never leaves the file system it started on. A file is
opened with ``O_NOFOLLOW | O_NONBLOCK`` and only hashed when the opened descriptor is
a regular file, so a file swapped for a link or a FIFO between the listing and the
read is recorded as what it is now, and never hangs the scan. A path that cannot be
read is a :class:`Problem` of the scan, never the end of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}
# How a scan opens a file: never through a link, never waiting on a FIFO or a device,
# never becoming a terminal's.
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# The paths a scan could not read that its audit entry and alert name (the count is whole).
MAX_PROBLEMS_LISTED = 20


@dataclass(frozen=True)
class Problem:
    """A path a scan could not read (its state is unknown, not changed)."""

    path: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "error": self.error}


def _error(e: OSError) -> str:
    return e.strerror or str(e)


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


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, CHUNK):
        h.update(chunk)
    return h.hexdigest()


def state_of(root: Path, path: str, st: os.stat_result | None = None,
             packages: Mapping[str, str] | None = None) -> FileState | None:
    """The state of *path* (absolute on the host) under *root*; None if it is gone. A file
    is hashed only when what was opened (no-follow, non-blocking) is a regular file;
    otherwise its real type is recorded. Raises OSError when it cannot be read."""
    real = os.path.join(root, path.lstrip("/"))
    try:
        st = st or os.lstat(real)
        kind = KINDS.get(stat.S_IFMT(st.st_mode), "other")
        size = digest = target = None
        if kind == "file":
            try:
                fd = os.open(real, OPEN_FLAGS)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                st = os.lstat(real)  # swapped for a link since it was listed
                kind = KINDS.get(stat.S_IFMT(st.st_mode), "other")
                fd = -1
            if fd >= 0:
                try:
                    st = os.fstat(fd)  # what was opened, not what was listed
                    kind = KINDS.get(stat.S_IFMT(st.st_mode), "other")
                    if kind == "file":
                        size, digest = st.st_size, _sha256_fd(fd)
                finally:
                    os.close(fd)
        if kind == "symlink":
            target = os.readlink(real)
    except FileNotFoundError:
        return None
    return FileState(path, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, digest,
                     target, (packages or {}).get(path))


def _walk(root: Path, top: str, exclude: Sequence[str], problems: list[Problem]
          ) -> Iterator[tuple[str, os.stat_result]]:
    real_top = os.path.join(root, top.lstrip("/"))
    try:
        st = os.lstat(real_top)
    except FileNotFoundError:
        return
    except OSError as e:
        problems.append(Problem(top, _error(e)))
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
        except (FileNotFoundError, NotADirectoryError):  # gone, or replaced, since listed
            continue
        except OSError as e:
            problems.append(Problem(path, _error(e)))
            continue
        for item in items:
            child = f"{path.rstrip('/')}/{item.name}"
            if _below(child, exclude):
                continue
            try:
                cst = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                problems.append(Problem(child, _error(e)))
                continue
            yield child, cst
            if stat.S_ISDIR(cst.st_mode) and cst.st_dev == device:
                stack.append((child, item.path))


def scan(root: Path, dirs: Sequence[str], exclude: Sequence[str] = (),
         packages: Mapping[str, str] | None = None,
         problems: list[Problem] | None = None) -> dict[str, FileState]:
    """The current state of everything below *dirs* (absolute host paths). A path that
    cannot be read goes to *problems* and the scan goes on."""
    out: dict[str, FileState] = {}
    problems = [] if problems is None else problems
    for top in dirs:
        for path, st in _walk(root, top, exclude, problems):
            try:
                s = state_of(root, path, st, packages)
            except OSError as e:  # unreadable, I/O error, a component swapped: this path only
                problems.append(Problem(path, _error(e)))
                continue
            if s is not None:
                out[path] = s
    return out


def compare(baseline: Mapping[str, FileState], current: Mapping[str, FileState],
            unknown: Sequence[str] = ()) -> list[Change]:
    """Every difference, sorted by path. Package names come from either side. Paths at or
    below *unknown* (what a scan could not read) are not called removed."""
    changes = []
    for path in sorted(set(baseline) | set(current)):
        old, new = baseline.get(path), current.get(path)
        if old is None:
            changes.append(Change(path, ("added",), None, new))
            continue
        if new is None:
            if not (unknown and _below(path, unknown)):
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


# -- the host's baseline ---------------------------------------------------------------

IMAGE_MANIFEST = "usr/lib/cerulean/files.json"  # on /usr: covered by dm-verity
FIRST_SCAN = "var/lib/cerulean/agent/integrity-baseline.json"
WATCHED = ("/etc",)
MANIFEST_VERSION = 1


def manifest_json(states: Mapping[str, FileState], **head: Any) -> bytes:
    """*states* in the file manifest's format (sorted, no times: reproducible)."""
    doc = {"manifestVersion": MANIFEST_VERSION, **head,
           "files": [states[p].to_json() for p in sorted(states)]}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def image_manifest(rootfs: Path, dirs: Sequence[str] = WATCHED, **head: Any) -> bytes:
    """The manifest a system image ships of its writable directories (*dirs*)."""
    return manifest_json(scan(rootfs, dirs, packages=dpkg_owners(rootfs)),
                         dirs=list(dirs), **head)


@dataclass(frozen=True)
class Baseline:
    files: dict[str, FileState]
    source: str  # "image manifest" | "first scan"
    dirs: tuple[str, ...]
    made: str = ""  # when the first scan was made (ISO 8601)


def load_baseline(root: Path = Path("/"), now: str = "",
                  problems: list[Problem] | None = None) -> Baseline:
    """The image's manifest of its writable directories when there is one (nothing
    trusted on first use); elsewhere the first scan, made now if there is none yet (what
    it could not read goes to *problems*)."""
    for rel, source in ((IMAGE_MANIFEST, "image manifest"), (FIRST_SCAN, "first scan")):
        try:
            doc = json.loads((root / rel).read_bytes())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise IntegrityError(f"The integrity baseline /{rel} cannot be read: {e}.") from None
        dirs = tuple(doc.get("dirs") or WATCHED)
        return Baseline(from_manifest(doc.get("files", []), dirs), source, dirs,
                        str(doc.get("made", "")))
    files = scan(root, WATCHED, packages=dpkg_owners(root), problems=problems)
    from cerulean.agent.fileio import write_atomic

    write_atomic(root / FIRST_SCAN, manifest_json(files, dirs=list(WATCHED), made=now),
                 mode=0o600, durable=True)
    return Baseline(files, "first scan", WATCHED, now)


class IntegrityError(Exception):
    pass


def usr_verity(run: Any = subprocess.run) -> str:
    """The dm-verity state of /usr: verified, corrupted (a block failed its hash), or
    none (no verity /usr here) / unknown (its state cannot be read)."""
    try:
        r = run(["dmsetup", "status", "usr"], capture_output=True, text=True, check=False,
                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    words = r.stdout.split()
    if r.returncode != 0 or len(words) < 3:
        return "none" if "does not exist" in r.stderr else "unknown"
    if words[2] != "verity":
        return "none"
    return {"V": "verified", "C": "corrupted"}.get(words[3] if len(words) > 3 else "",
                                                   "unknown")


REPORTED = "var/lib/cerulean/agent/integrity-reported.json"
MAX_ENTRIES = 50  # audit entries per scan; past that, one entry counts the rest


def _key(c: Change) -> str:
    n = c.new
    return "|".join([c.path, ",".join(c.what), *(
        [] if n is None else [n.kind, n.sha256 or "", n.target or "", f"{n.mode:o}",
                              f"{n.uid}:{n.gid}"])])


def since_baseline(root: Path = Path("/"), now: str = "",
                   problems: list[Problem] | None = None) -> tuple[Baseline, list[Change]]:
    """The baseline (see :func:`load_baseline`) and every change since it, from a full
    scan of its directories. Paths the scan could not read go to *problems*; they are
    not reported as changed."""
    problems = [] if problems is None else problems
    base = load_baseline(root, now, problems)
    current = scan(root, base.dirs, packages=dpkg_owners(root), problems=problems)
    return base, compare(base.files, current, [p.path for p in problems])


# What the last periodic scan found (for metrics, and to alert on new unreadable paths once).
SCAN_STATE = "var/lib/cerulean/agent/integrity-scan.json"


def _problems_key(problems: Sequence[Problem]) -> str:
    return hashlib.sha256("\n".join(sorted(f"{p.path}\0{p.error}" for p in problems))
                          .encode()).hexdigest()


def periodic_scan(root: Path, audit: Any, now: str = "",
                  clock: Any = None) -> tuple[int, int]:
    """One full scan against the baseline; each change not reported before (in that
    state) goes to the audit trail as ``integrity.change``. Paths it could not read are
    counted, never the end of the scan: when they differ from the last scan's, an
    ``alert.integrity-scan-incomplete`` entry (an alert: it reaches the fleet) names the
    first MAX_PROBLEMS_LISTED. Returns (changes, new)."""
    import time

    from cerulean.agent.fileio import write_atomic

    problems: list[Problem] = []
    base, changes = since_baseline(root, now, problems)
    try:
        changes += boot_changes(root).changes
    except (OSError, IntegrityError) as e:  # the ESP unreadable: /etc's changes still count
        audit.append("integrity", "integrity.boot-unreadable", {"error": str(e)})
    path = root / REPORTED
    try:
        seen = set(json.loads(path.read_bytes()))
    except (OSError, ValueError, TypeError):
        seen = set()
    fresh = [c for c in changes if _key(c) not in seen]
    for c in fresh[:MAX_ENTRIES]:
        audit.append("integrity", "integrity.change", {**c.to_json(), "baseline": base.source})
    if len(fresh) > MAX_ENTRIES:
        audit.append("integrity", "integrity.changes",
                     {"more": len(fresh) - MAX_ENTRIES, "baseline": base.source,
                      "message": f"{len(fresh) - MAX_ENTRIES} more changes; "
                                 "run 'cerulean integrity check' for all of them"})
    write_atomic(path, json.dumps(sorted(_key(c) for c in changes)).encode(), mode=0o600)
    when = (clock or time.time)()
    state_path = root / SCAN_STATE
    try:
        last = json.loads(state_path.read_bytes())
        last_key = str(last.get("problems-key", "")) if isinstance(last, dict) else ""
    except (OSError, ValueError):
        last_key = ""
    key = _problems_key(problems) if problems else ""
    if problems and key != last_key:
        first = problems[0]
        audit.append("integrity", "alert.integrity-scan-incomplete", {
            "rule": "integrity-scan-incomplete", "priority": "warning",
            "tags": ["agent-health", "integrity"],
            "message": f"the integrity scan could not read {len(problems)} "
                       f"path{'s' if len(problems) != 1 else ''} (first: {first.path}: "
                       f"{first.error}); their state is unknown",
            "time": when,
            "evidence": {"errors": len(problems),
                         "paths": [p.to_json() for p in problems[:MAX_PROBLEMS_LISTED]]}})
    write_atomic(state_path, json.dumps({
        "time": when, "changes": len(changes), "new": len(fresh), "errors": len(problems),
        "problems-key": key}).encode(), mode=0o600)
    return len(changes), len(fresh)


def metric_families(root: Path = Path("/")) -> list[Any]:
    """The last periodic scan: cerulean_integrity_scan_errors (paths it could not read),
    cerulean_integrity_changes, cerulean_integrity_last_scan_timestamp_seconds."""
    from cerulean.agent.metrics import Family

    errors = Family("cerulean_integrity_scan_errors", "gauge",
                    "Paths the last integrity scan could not read (their state is unknown).")
    changes = Family("cerulean_integrity_changes", "gauge",
                     "Changes since the baseline at the last integrity scan.")
    when = Family("cerulean_integrity_last_scan_timestamp_seconds", "gauge",
                  "When the last integrity scan ended.")
    try:
        doc = json.loads((root / SCAN_STATE).read_bytes())
        errors.add(float(doc["errors"]))
        changes.add(float(doc["changes"]))
        when.add(float(doc["time"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return [errors, changes, when]


# -- the boot chain on the EFI system partition ---------------------------------------------
#
# The ESP holds what runs before dm-verity can check anything: systemd-boot and the UKIs.
# Its manifest is written when the image is built, once the ESP is complete, and lives on
# the root file system (a UKI carries /usr's root hash, so /usr cannot list the UKI). UKIs
# are known by content, not by name: boot counting renames them (cerulean_V+3.efi, then
# cerulean_V.efi), and the updater adds each UKI it installed after checking it against
# the release's signed hash.

BOOT_MANIFEST = "var/lib/cerulean/boot-manifest.json"
# Written by systemd and systemd-boot as the machine boots; not code that runs.
BOOT_VOLATILE = ("loader/random-seed", "loader/entries.srel")
ESP_CANDIDATES = ("/efi", "/boot", "/boot/efi")


def _is_uki(rel: str) -> bool:
    return rel.lower().startswith("efi/linux/") and rel.lower().endswith(".efi")


def esp_files(esp: Path) -> dict[str, tuple[int, str]]:
    """ESP-relative path → (size, sha256) of every regular file on the ESP."""
    out: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(esp):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not stat.S_ISREG(os.lstat(p).st_mode):
                continue
            fd = os.open(p, OPEN_FLAGS)  # what is there now: no link, no waiting on a FIFO
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    out[p.relative_to(esp).as_posix()] = (st.st_size, _sha256_fd(fd))
            finally:
                os.close(fd)
    return out


def boot_manifest(esp: Path, version: str) -> bytes:
    """The manifest of a freshly built ESP tree: its files, and its UKIs by content."""
    files = esp_files(esp)
    doc = {"manifestVersion": MANIFEST_VERSION,
           "files": {rel: {"size": s, "sha256": h} for rel, (s, h) in files.items()
                     if not _is_uki(rel) and rel not in BOOT_VOLATILE},
           "ukis": {h: version for rel, (_s, h) in files.items() if _is_uki(rel)}}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def record_uki(root: Path, version: str, sha256: str) -> bool:
    """Add a UKI the updater installed (checked against its signed hash) to the boot
    manifest; False where there is no manifest (not a Cerulean image)."""
    path = root / BOOT_MANIFEST
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return False
    doc.setdefault("ukis", {})[sha256] = version
    from cerulean.agent.fileio import write_atomic

    write_atomic(path, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n",
                 mode=0o644, durable=True)
    return True


def find_esp(root: Path = Path("/")) -> Path | None:
    """Where the ESP is mounted (host path), or None; an automount is triggered by looking."""
    for cand in ESP_CANDIDATES:
        try:
            os.listdir(root / cand.lstrip("/"))  # mounts an automounted ESP
        except OSError:
            continue
    try:
        mounts = (root / "proc/mounts").read_text().splitlines()
    except OSError:
        return None
    found = {f[1]: f[2] for f in (m.split() for m in mounts) if len(f) > 2}
    for cand in ESP_CANDIDATES:
        if found.get(cand) == "vfat":
            return Path(cand)
    return None


@dataclass(frozen=True)
class BootCheck:
    esp: str | None  # where it is mounted; None when it was not found
    manifest: bool  # whether this host has a boot manifest (Cerulean images do)
    changes: tuple[Change, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"esp": self.esp, "manifest": self.manifest,
                "changes": [c.to_json() for c in self.changes]}


def _esp_state(path: str, size: int | None, sha256: str | None) -> FileState:
    return FileState(path, "file", 0, 0, 0, size, sha256)


def boot_changes(root: Path = Path("/"), esp: Path | None = None) -> BootCheck:
    """The ESP against the boot manifest: files added, removed or changed, and UKIs whose
    content is no release's this host built or installed (``unknown-uki``)."""
    try:
        doc = json.loads((root / BOOT_MANIFEST).read_bytes())
    except FileNotFoundError:
        return BootCheck(None, False)
    except ValueError as e:
        raise IntegrityError(f"/{BOOT_MANIFEST} is not a boot manifest ({e}).") from None
    esp = esp or find_esp(root)
    if esp is None:
        return BootCheck(None, True)
    now = esp_files(root / str(esp).lstrip("/"))
    known: Mapping[str, Any] = doc.get("files", {})
    ukis: Mapping[str, str] = doc.get("ukis", {})
    changes = []
    for rel, (size, digest) in now.items():
        path = f"{str(esp).rstrip('/')}/{rel}"
        new = _esp_state(path, size, digest)
        if rel in BOOT_VOLATILE:
            continue
        if _is_uki(rel):
            if digest not in ukis:
                changes.append(Change(path, ("unknown-uki",), None, new))
        elif rel not in known:
            changes.append(Change(path, ("added",), None, new))
        elif known[rel].get("sha256") != digest:
            old = _esp_state(path, known[rel].get("size"), known[rel].get("sha256"))
            changes.append(Change(path, ("content",), old, new))
    for rel, entry in known.items():
        if rel not in now:
            path = f"{str(esp).rstrip('/')}/{rel}"
            changes.append(Change(path, ("removed",),
                                  _esp_state(path, entry.get("size"), entry.get("sha256")), None))
    return BootCheck(str(esp), True, tuple(changes))
