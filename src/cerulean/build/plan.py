"""Locking an image definition: resolve its packages against the archive.

``ensure_lock`` is what ``cerulean lock`` and ``cerulean build`` share: it
reads the lock next to the definition, checks it still matches, and resolves
afresh (newest archive state) when asked to or when there is none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cerulean.build.definition import ImageDefinition
from cerulean.debian.archive import ArchiveConfig, default_archive
from cerulean.debian.cache import Cache
from cerulean.debian.fetch import Download
from cerulean.debian.lock import (
    Lock,
    diff_locks,
    inputs_hash,
    make_lock,
    read_lock,
    write_lock,
)
from cerulean.debian.packages import Package, load_packages
from cerulean.debian.release import Release, load_release
from cerulean.errors import CeruleanError
from cerulean.protocol.update import PackageChange


def archive_for(defn: ImageDefinition) -> ArchiveConfig:
    return default_archive(
        defn.archive_mirror or None,
        defn.archive_security_mirror or None,
        defn.archive_suites,
        defn.archive_components,
    )


@dataclass(frozen=True)
class LockResult:
    lock: Lock
    changes: list[str]  # what changed against the previous lock ("" if none)
    written: bool  # whether the lock file was (re)written
    previous: Lock | None


def lock_matches(defn: ImageDefinition, lock: Lock) -> bool:
    return lock.inputs == inputs_hash(defn.resolution_inputs())


def resolve_lock(
    defn: ImageDefinition,
    cache: Cache,
    *,
    previous: Lock | None = None,
    offline: bool = False,
    keyring: Path | None = None,
    show_progress: bool = False,
    keep: Callable[[str, Package], bool] | None = None,
) -> Lock:
    """Resolve every architecture of *defn* against the newest verified archive state.

    *keep* (architecture, package) narrows what the resolver may choose from.
    """
    from cerulean.debian.fetch import client
    from cerulean.debian.resolve import Universe, resolve

    cfg = archive_for(defn)
    keyring = keyring or defn.keyring
    releases: list[Release] = []
    if offline:
        releases = [
            load_release(cfg, s, cache, keyring, http=None,
                         not_before=previous.snapshot_date(s) if previous else None)
            for s in cfg.suites
        ]
    else:
        with client() as http:
            for s in cfg.suites:
                releases.append(
                    load_release(cfg, s, cache, keyring, http=http,
                                 not_before=previous.snapshot_date(s) if previous else None)
                )
    resolved: dict[str, list[Package]] = {}
    for arch in defn.image_architectures:
        universe: list[Package] = []
        for r in releases:
            if arch not in r.architectures:
                raise CeruleanError(f"Suite '{r.suite}' has no packages for {arch}.")
            universe += load_packages(cfg, r, arch, cache, offline=offline,
                                      show_progress=show_progress)
        if keep is not None:
            universe = [p for p in universe if keep(arch, p)]
        u = Universe.build(universe, arch, cfg.suites)
        # "{arch}" in a package name stands for the architecture (linux-image-cloud-{arch}).
        requests = [r.replace("{arch}", arch) for r in defn.packages_include]
        requests += [d for d in defn.extra_requests if d not in requests]
        if defn.is_system:
            # A bootable system starts from Debian's Essential set, as debootstrap does.
            requests += sorted(
                {p.name for ps in u.by_name.values() for p in ps if p.essential}
                - set(requests) - set(defn.packages_exclude)
            )
        resolved[arch] = resolve(u, requests, defn.packages_exclude)
    return make_lock(inputs_hash(defn.resolution_inputs()), releases, resolved)


def ensure_lock(
    defn: ImageDefinition,
    cache: Cache,
    *,
    refresh: bool = False,
    locked: bool = False,
    offline: bool = False,
    keyring: Path | None = None,
    show_progress: bool = False,
) -> LockResult:
    path = defn.lock_path
    previous = read_lock(path) if path.exists() else None
    if locked:
        if previous is None:
            raise CeruleanError(f"--locked was given but {path} does not exist.")
        if not lock_matches(defn, previous):
            raise CeruleanError(
                f"The lock {path} no longer matches {defn.path} (its packages, suites or "
                "architectures changed): run `cerulean lock` to update it."
            )
        return LockResult(previous, [], False, previous)
    if previous is not None and not refresh and lock_matches(defn, previous):
        return LockResult(previous, [], False, previous)
    new = resolve_lock(defn, cache, previous=previous, offline=offline, keyring=keyring,
                       show_progress=show_progress)
    changes = diff_locks(previous, new)
    write_lock(path, new)
    return LockResult(new, changes, True, previous)


@dataclass(frozen=True)
class SecurityRefresh:
    lock: Lock
    previous: Lock
    changes: dict[str, list[PackageChange]]  # per architecture
    written: bool


def refresh_security(defn: ImageDefinition, cache: Cache, *, offline: bool = False,
                     keyring: Path | None = None, show_progress: bool = False) -> SecurityRefresh:
    """Move the lock to the newest security updates, and nothing else.

    The definition is resolved again, but each locked package may only stay at
    its locked version or move to a version from the security suite; packages
    the new versions need for the first time (a new kernel ABI package) may come
    from anywhere, and packages nothing needs any more drop out. The CVE IDs
    come from the new packages' Debian changelogs.
    """
    from cerulean.debian.changelog import package_changes
    from cerulean.debian.fetch import fetch_all

    path = defn.lock_path
    if not path.exists():
        raise CeruleanError(f"{path} does not exist: run `cerulean lock {defn.path}` first.")
    old = read_lock(path)
    if not lock_matches(defn, old):
        raise CeruleanError(f"The lock {path} no longer matches {defn.path}: run "
                            "`cerulean lock --refresh` for a full refresh.")
    security = {s for s in defn.archive_suites if s.endswith("-security")}
    if not security:
        raise CeruleanError(f"{defn.path} uses no security suite (archive.suites).")
    locked = {arch: {p.name: p.version for p in pkgs} for arch, pkgs in old.packages.items()}

    def keep(arch: str, p: Package) -> bool:
        was = locked[arch].get(p.name)
        return was is None or p.version == was or p.suite in security

    try:
        new = resolve_lock(defn, cache, previous=old, offline=offline, keyring=keyring,
                           show_progress=show_progress, keep=keep)
    except CeruleanError as e:
        raise CeruleanError(
            f"The security updates cannot be applied to this lock alone ({e}) Run "
            f"`cerulean lock --refresh {defn.path}` for a full refresh.") from e
    fetch_all(cache, lock_downloads_of(defn, new), offline=offline,
              show_progress=show_progress)
    changes = {arch: package_changes({p.name: p for p in old.packages[arch]},
                                     new.packages[arch], cache) for arch in new.packages}
    written = any(changes.values())
    if written:
        write_lock(path, new)
    return SecurityRefresh(new if written else old, old, changes, written)


def lock_downloads_of(defn: ImageDefinition, lock: Lock) -> list[Download]:
    from cerulean.build.image import lock_downloads

    return lock_downloads(archive_for(defn), lock, list(lock.packages))
