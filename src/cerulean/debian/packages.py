"""Packages indexes: fetched by hash, checked against the signed Release, parsed.

Parsing splits paragraphs directly (python-debian's deb822 is ten times slower
on an index of 70,000 packages); relation fields are kept as text and parsed
with python-debian only for the packages the resolver actually visits.
"""

from __future__ import annotations

import gzip
import lzma
from dataclasses import dataclass

from cerulean.debian.archive import ArchiveConfig
from cerulean.debian.cache import Cache
from cerulean.debian.fetch import Download, fetch_all
from cerulean.debian.release import IndexFile, Release
from cerulean.errors import CeruleanError


@dataclass(frozen=True, slots=True)
class Package:
    """One binary package as an index lists it."""

    name: str
    version: str
    arch: str
    suite: str
    base_url: str
    filename: str
    sha256: str
    size: int
    source: str
    source_version: str
    depends: str = ""
    pre_depends: str = ""
    provides: str = ""
    conflicts: str = ""
    breaks: str = ""
    multi_arch: str = "no"
    essential: bool = False
    priority: str = "optional"
    section: str = ""

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.filename}"

    @property
    def label(self) -> str:
        return f"{self.name} {self.version} ({self.arch})"

    def download(self) -> Download:
        return Download(self.url, self.sha256, self.size, self.label)


def parse_index(data: bytes, suite: str, base_url: str) -> list[Package]:
    out: list[Package] = []
    for para in data.split(b"\n\n"):
        if not para.strip():
            continue
        f: dict[str, str] = {}
        key = ""
        for raw in para.decode("utf-8", errors="replace").split("\n"):
            if not raw:
                continue
            if raw[0] in " \t":
                if key in ("Depends", "Pre-Depends", "Provides", "Conflicts", "Breaks"):
                    f[key] += " " + raw.strip()
                continue
            key, _, value = raw.partition(":")
            f[key] = value.strip()
        try:
            name, version, arch = f["Package"], f["Version"], f["Architecture"]
            filename, sha256, size = f["Filename"], f["SHA256"], int(f["Size"])
        except (KeyError, ValueError):
            continue  # an incomplete record cannot be installed or verified
        source, source_version = name, version
        if "Source" in f:
            src = f["Source"].split()
            source = src[0]
            if len(src) > 1:
                source_version = src[1].strip("()")
        out.append(
            Package(
                name=name,
                version=version,
                arch=arch,
                suite=suite,
                base_url=base_url,
                filename=filename,
                sha256=sha256,
                size=size,
                source=source,
                source_version=source_version,
                depends=f.get("Depends", ""),
                pre_depends=f.get("Pre-Depends", ""),
                provides=f.get("Provides", ""),
                conflicts=f.get("Conflicts", ""),
                breaks=f.get("Breaks", ""),
                multi_arch=f.get("Multi-Arch", "no"),
                essential=f.get("Essential", "no") == "yes",
                priority=f.get("Priority", "optional"),
                section=f.get("Section", ""),
            )
        )
    return out


def _pick_index(release: Release, component: str, arch: str) -> IndexFile | None:
    for ext in (".xz", ".gz", ""):
        f = release.files.get(f"{component}/binary-{arch}/Packages{ext}")
        if f is not None:
            return f
    return None


def _decompress(data: bytes, path: str) -> bytes:
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    return data


def load_packages(
    cfg: ArchiveConfig,
    release: Release,
    arch: str,
    cache: Cache,
    *,
    offline: bool = False,
    show_progress: bool = False,
) -> list[Package]:
    """Every package of *release* installable on *arch* (including arch:all)."""
    result: list[Package] = []
    seen: set[tuple[str, str, str]] = set()
    for comp in cfg.components:
        idx = _pick_index(release, comp, arch)
        if idx is None:
            raise CeruleanError(
                f"Suite '{release.suite}' has no Packages index for {comp}/{arch}."
            )
        pkgs = _load_index(release, idx, cache, offline=offline, show_progress=show_progress)
        # Debian lists arch:all packages in every binary-<arch> index; read binary-all
        # only from an archive that does not.
        if not any(p.arch == "all" for p in pkgs):
            all_idx = _pick_index(release, comp, "all")
            if all_idx is not None:
                pkgs += _load_index(
                    release, all_idx, cache, offline=offline, show_progress=show_progress
                )
        for p in pkgs:
            k = (p.name, p.version, p.arch)
            if k not in seen and p.arch in (arch, "all"):
                seen.add(k)
                result.append(p)
    return result


def _load_index(
    release: Release, idx: IndexFile, cache: Cache, *, offline: bool, show_progress: bool
) -> list[Package]:
    base = f"{release.base_url}/dists/{release.suite}"
    what = f"the {idx.path} index of '{release.suite}'"
    plain = f"{base}/{idx.path}"
    if release.acquire_by_hash:
        d = idx.path.rsplit("/", 1)[0]
        dl = Download(f"{base}/{d}/by-hash/SHA256/{idx.sha256}", idx.sha256, idx.size, what, plain)
    else:
        dl = Download(plain, idx.sha256, idx.size, what)
    fetch_all(cache, [dl], offline=offline, show_progress=show_progress)
    raw = cache.read_verified(idx.sha256, idx.size, what)
    return parse_index(_decompress(raw, idx.path), release.suite, release.base_url)
