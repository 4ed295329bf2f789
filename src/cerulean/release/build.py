"""``cerulean release build``: a system image definition → a versioned release.

A release directory ``OUT/IMAGE/VERSION/`` holds:

    release.json        the document hosts read (payloads, root hashes, changes, CVEs)
    NOTES.md            the release notes for people
    packages.json       per architecture, every package and version (the next
                        release's notes are computed against it)
    ARCH/usr.erofs.zst  the /usr image, its verity hash tree and the UKI,
    ARCH/usr.verity.zst each zstd-compressed: the full payloads
    ARCH/uki.efi.zst
    IMAGE-ARCH.FORMAT   with --disk: a disk image of this release, to install hosts

Versions are ``MAJOR.YYYYMMDD.N``: the image's major version, the date of the
lock's archive snapshot, and a counter that makes every build of the same day
newer than the last one found in OUT (or in the repository, when given).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cerulean.build.definition import ImageDefinition
from cerulean.build.system_image import build_system_image
from cerulean.debian.archive import ArchiveConfig
from cerulean.debian.cache import Cache, sha256_file
from cerulean.debian.changelog import package_changes
from cerulean.debian.lock import Lock, LockedPackage
from cerulean.errors import CeruleanError
from cerulean.protocol.update import (
    ArchRelease,
    PackageChange,
    Part,
    Payload,
    ReleaseDoc,
    is_version,
    packages_path,
    parse_version,
    utc_iso,
    version_key,
)
from cerulean.release.notes import notes_markdown
from cerulean.release.publish import ZSTD_WINDOW, run_zstd

if TYPE_CHECKING:
    from cerulean.release.repo import Repository

FULL_LEVEL = 19
PART_FILES = {"usr": "usr.erofs", "verity": "usr.verity", "uki": "uki.efi"}


@dataclass
class ReleaseBuild:
    path: Path
    doc: ReleaseDoc
    disks: list[Path]
    seconds: float


def existing_versions(out_root: Path, image: str) -> list[str]:
    d = out_root / image
    return sorted((p.name for p in d.iterdir() if p.is_dir() and is_version(p.name)
                   and (p / "release.json").is_file()) if d.is_dir() else [], key=version_key)


def next_version(defn: ImageDefinition, lock: Lock, known: Sequence[str]) -> str:
    day = f"{datetime.fromtimestamp(lock.source_date_epoch, UTC):%Y%m%d}"
    major = int(defn.image_version) if defn.image_version.isdigit() else 0
    same = [parse_version(v)[2] for v in known if parse_version(v)[:2] == (major, int(day))]
    newest = max(known, key=version_key) if known else None
    candidate = f"{major}.{day}.{max(same) + 1 if same else 0}"
    if newest and version_key(candidate) <= version_key(newest):
        # The lock is older than the newest release: continue after it instead.
        m, d, n = parse_version(newest)
        candidate = f"{m}.{d}.{n + 1}"
    return candidate


def lock_packages(lock: Lock, arch: str) -> dict[str, LockedPackage]:
    return {p.name: p for p in lock.packages[arch]}


def _previous_packages(prev_dir: Path | None, repo: Repository | None = None, image: str = "",
                       previous: str | None = None) -> dict[str, dict[str, LockedPackage]]:
    """The previous release's packages: from its directory here, else from the repository
    it was published to (built elsewhere, or by another publisher)."""
    raw: Any = None
    if prev_dir is not None and (prev_dir / "packages.json").is_file():
        raw = json.loads((prev_dir / "packages.json").read_bytes())
    elif repo is not None and previous and \
            packages_path(image, previous) in repo.targets().targets:
        raw = json.loads(repo.read_target(packages_path(image, previous)))
    if not isinstance(raw, dict):
        return {}
    try:
        return {arch: {n: LockedPackage(**fields) for n, fields in pkgs.items()}
                for arch, pkgs in raw.items()}
    except (TypeError, AttributeError) as e:
        raise CeruleanError(f"The packages.json of {image} {previous} is not valid: {e}.") from e


def compress(src: Path, dest: Path, level: int = FULL_LEVEL) -> None:
    run_zstd([f"-{level}", f"--long={ZSTD_WINDOW}", "-T0", str(src), "-o", str(dest)],
             f"Compressing {src.name}")


def pack_payload(src: Path, dest: Path, image: str, version: str, arch: str,
                 say: Callable[[str], None] = lambda _m: None,
                 level: int = FULL_LEVEL) -> ArchRelease:
    """Compress one architecture's parts (usr.erofs, usr.verity, uki.efi, usrhash in *src*)
    into *dest* as full payloads, and describe them."""
    parts = {}
    dest.mkdir(parents=True, exist_ok=True)
    for part, fname in PART_FILES.items():
        raw = src / fname
        packed = dest / f"{fname}.zst"
        say(f"{arch}: compressing {fname}")
        compress(raw, packed, level)
        parts[part] = Part(raw.stat().st_size, sha256_file(raw), Payload(
            f"releases/{image}/{version}/{arch}/{fname}.zst", packed.stat().st_size,
            sha256_file(packed)))
    return ArchRelease((src / "usrhash").read_text().strip(), parts)


def build_release(defn: ImageDefinition, lock: Lock, cfg: ArchiveConfig, arches: Sequence[str],
                  out_root: Path, cache: Cache, *, version: str | None = None,
                  known_versions: Sequence[str] = (), disk_format: str | None = None,
                  offline: bool = False, show_progress: bool = True,
                  say: Callable[[str], None] = lambda _m: None,
                  level: int = FULL_LEVEL, repo: Repository | None = None) -> ReleaseBuild:
    if not defn.is_system:
        raise CeruleanError(f"{defn.path} is not a system image: only those have releases.")
    started = datetime.now(UTC)
    known = sorted({*existing_versions(out_root, defn.name), *known_versions}, key=version_key)
    if version is None:
        version = next_version(defn, lock, known)
    else:
        parse_version(version)
        if version in known:
            raise CeruleanError(f"{defn.name} {version} already exists; releases never change.")
    older = [v for v in known if version_key(v) < version_key(version)]
    previous = older[-1] if older else None
    prev_dir = out_root / defn.name / previous if previous else None
    dest = out_root / defn.name / version
    if dest.exists():
        raise CeruleanError(f"{dest} already exists.")
    (out_root / defn.name).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{version}.", dir=out_root / defn.name) as tmp_s:
        tmp = Path(tmp_s)
        stage = tmp / "release"
        payload = tmp / "payload"
        res = build_system_image(defn, lock, cfg, arches, stage, cache, fmt=disk_format,
                                 offline=offline, show_progress=show_progress, say=say,
                                 version=version, payload_dir=payload,
                                 disk_image=disk_format is not None)
        arch_docs = {arch: pack_payload(payload / arch, stage / arch, defn.name, version, arch,
                                        say, level) for arch in arches}
        old_pkgs = _previous_packages(prev_dir, repo, defn.name, previous)
        changes: dict[str, list[PackageChange]] = {}
        for arch in arches:
            changes[arch] = package_changes(old_pkgs.get(arch, {}), lock.packages[arch], cache) \
                if old_pkgs else []
        # The document lists the changes of the first architecture (they are the same
        # packages on each); NOTES.md has them all.
        first = changes[arches[0]] if arches else []
        doc = ReleaseDoc(defn.name, version, utc_iso(started), previous, arch_docs,
                         tuple(first))
        (stage / "release.json").write_text(json.dumps(doc.to_json(), indent=2) + "\n")
        (stage / "NOTES.md").write_text(notes_markdown(defn.name, version, previous, changes))
        (stage / "packages.json").write_text(json.dumps(
            {a: {p.name: vars(p) for p in lock.packages[a]} for a in arches},
            indent=1, sort_keys=True) + "\n")
        stage.rename(dest)
    disks = [dest / d.path.name for d in res.disks if d.path is not None]
    return ReleaseBuild(dest, doc, disks, (datetime.now(UTC) - started).total_seconds())

