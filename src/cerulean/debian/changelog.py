"""Package changes between two locks, and the CVEs each change fixes.

The CVE IDs come from the Debian changelogs of the new packages (the
``changelog.Debian.gz`` every binary package carries, ``changelog.gz`` for a
native package, or that of another binary of the same source when its doc
directory is shared): every entry newer than the old version is searched for
``CVE-YYYY-NNNN``. The signed kernels are native packages (linux-signed-amd64)
whose changelog repeats the kernel's own entries, CVE IDs included.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from collections.abc import Iterable, Mapping

from debian.changelog import Changelog
from debian.debian_support import Version

from cerulean.debian.cache import Cache
from cerulean.debian.deb import DebError, read_deb
from cerulean.debian.lock import LockedPackage
from cerulean.protocol.update import PackageChange

CVE = re.compile(r"\bCVE-\d{4}-\d{4,}\b")


def changelog_of(pkg: LockedPackage, cache: Cache) -> str | None:
    """The Debian changelog inside *pkg*'s .deb (None if it has none of its own)."""
    try:
        data = cache.read_verified(pkg.sha256, pkg.size, pkg.label)
        deb = read_deb(data, pkg.label)
    except (DebError, OSError):
        return None
    doc = f"usr/share/doc/{pkg.name}/"
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(deb.data_tar)) as tf:
            for m in tf:
                name = m.name.removeprefix("./")
                if name in (doc + "changelog.Debian.gz", doc + "changelog.gz") and m.isfile():
                    f = tf.extractfile(m)
                    if f is not None:
                        found[name.rsplit("/", 1)[1]] = f.read()
        # A non-native package's changelog.gz is the upstream one: Debian's comes first.
        log = found.get("changelog.Debian.gz") or found.get("changelog.gz")
        return gzip.decompress(log).decode("utf-8", errors="replace") if log else None
    except (tarfile.TarError, OSError, EOFError):
        return None


def cves_between(changelog: str, old: str, new: str) -> list[str]:
    """CVE IDs in the changelog entries newer than *old*, up to and including *new*."""
    found: set[str] = set()
    try:
        cl = Changelog(changelog, strict=False)
    except Exception:  # python-debian raises several kinds on odd changelogs
        return []
    lo, hi = Version(old), Version(new)
    for block in cl:
        if block.version is None:
            continue
        v = Version(str(block.version))
        if v <= lo:
            break
        if v <= hi:
            found.update(CVE.findall("\n".join(block.changes())))
    return sorted(found, key=lambda c: (int(c.split("-")[1]), int(c.split("-")[2])))


def package_changes(old: Mapping[str, LockedPackage], new: Iterable[LockedPackage],
                    cache: Cache | None) -> list[PackageChange]:
    """Added, removed and changed packages, each change with the CVEs it fixes."""
    new_by_name = {p.name: p for p in new}
    by_source: dict[str, list[LockedPackage]] = {}
    for p in new_by_name.values():
        by_source.setdefault(p.source, []).append(p)
    source_cves: dict[tuple[str, str, str], list[str]] = {}

    def cves(p: LockedPackage, old_p: LockedPackage) -> list[str]:
        key = (p.source, old_p.source_version, p.source_version)
        if key not in source_cves:
            found: list[str] = []
            if cache is not None and old_p.source_version != p.source_version:
                # The package's own changelog first, then its siblings' (shared doc dirs).
                for cand in sorted(by_source[p.source], key=lambda c: c.name != p.name):
                    text = changelog_of(cand, cache)
                    if text is not None:
                        found = cves_between(text, old_p.source_version, p.source_version)
                        break
            source_cves[key] = found
        return source_cves[key]

    # A package that is new under this name may replace one of the same source (a
    # kernel's ABI package): its CVEs count from that source's old version.
    old_by_source = {p.source: p for p in old.values()}
    out = []
    for name in sorted(set(old) | set(new_by_name)):
        o, n = old.get(name), new_by_name.get(name)
        if o is not None and n is not None and o.version == n.version:
            continue
        base = o if o is not None else (old_by_source.get(n.source) if n is not None else None)
        out.append(PackageChange(name, o.version if o else None, n.version if n else None,
                                 tuple(cves(n, base)) if (base and n) else ()))
    return out
