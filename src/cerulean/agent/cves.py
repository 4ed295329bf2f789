"""Which CVEs affect this host: its installed packages against the Debian Security Tracker.

The tracker's JSON (``https://security-tracker.debian.org/tracker/data/json``,
or a copy of it) maps each *source* package to its CVEs, and each CVE to its
state per Debian release::

    {"openssl": {"CVE-2025-1234": {"description": "...",
        "releases": {"trixie": {"status": "resolved", "fixed_version": "3.5.1-1",
                                "urgency": "medium", "repositories": {...}}}}}}

A CVE affects the host when an installed package comes from that source and
its source version is older than ``fixed_version`` (status ``resolved``), or
when Debian has no fix yet (``open``, ``undetermined``). ``fixed_version`` 0
means the release was never affected. Signed packages (the kernel, GRUB, shim)
also count under the source named in their ``Built-Using`` field: the tracker
lists kernel CVEs under ``linux``, not ``linux-signed-amd64``. Versions are compared the way dpkg
compares them (:func:`compare_versions`); the agent carries its own copy of
that algorithm because it runs with the standard library only.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cerulean.agent.fileio import write_atomic

SEVERITY = {"unimportant": 0, "not yet assigned": 1, "end-of-life": 1, "low": 2, "medium": 3,
            "high": 4}


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    """dpkg's verrevcmp: non-digit runs by character order (~ first), digit runs as
    numbers."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = (a[i] > b[j]) - (a[i] < b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def _split(v: str) -> tuple[int, str, str]:
    epoch, _, rest = v.partition(":") if ":" in v else ("0", "", v)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    return int(epoch or 0), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version *a* is older than, equal to or newer than *b*."""
    ea, ua, ra = _split(a.strip())
    eb, ub, rb = _split(b.strip())
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


@dataclass(frozen=True)
class Installed:
    name: str
    version: str
    arch: str
    source: str
    source_version: str
    built_using: tuple[tuple[str, str], ...] = ()  # (source, version) from Built-Using

    def sources(self) -> list[tuple[str, str]]:
        """The sources whose CVEs apply: its own, and for a signed package (the kernel,
        GRUB, shim) the unsigned source it was built from, where the tracker lists them."""
        own = [(self.source, self.source_version)]
        return own + list(self.built_using) if "-signed" in self.source else own


# A system image's copy of dpkg's status, on its /usr: the packages of the release that
# runs. /var/lib/dpkg lives on the writable partition, which an update leaves as it was.
USR_DPKG_STATUS = "usr/lib/sysimage/dpkg/status"


def dpkg_status(root: Path = Path("/")) -> Path:
    """dpkg's status file of the running system: the /usr copy when there is one."""
    shipped = root / USR_DPKG_STATUS
    return shipped if shipped.is_file() else root / "var/lib/dpkg/status"


def installed_packages(root: Path = Path("/")) -> list[Installed]:
    """The installed packages in dpkg's status file (the distroless status.d too)."""
    texts = []
    status = dpkg_status(root)
    if status.is_file():
        texts.append(status.read_text(errors="replace"))
    status_d = root / "var/lib/dpkg/status.d"
    if status_d.is_dir():
        texts += [f.read_text(errors="replace") for f in sorted(status_d.iterdir())
                  if f.is_file() and not f.name.endswith(".md5sums")]
    out = []
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in para.splitlines():
                if line[:1] in (" ", "\t") or ":" not in line:
                    continue
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
            if "package" not in fields or "version" not in fields:
                continue
            if fields.get("status", "install ok installed").split()[-1] != "installed":
                continue
            src, _, src_ver = fields.get("source", fields["package"]).partition(" ")
            built = tuple((m[1], m[2]) for m in re.finditer(
                r"([a-z0-9][a-z0-9.+-]*)\s*\(\s*=\s*([^)\s]+)\s*\)",
                fields.get("built-using", "")))
            out.append(Installed(fields["package"], fields["version"],
                                 fields.get("architecture", ""), src,
                                 src_ver.strip("()") or fields["version"], built))
    return sorted(out, key=lambda p: (p.name, p.arch))


@dataclass(frozen=True)
class Finding:
    cve: str
    source: str
    packages: tuple[str, ...]  # the installed binaries from that source
    installed: str  # the installed source version
    status: str  # fix-available | no-fix-yet | undetermined
    fixed_version: str | None
    severity: str  # the tracker's urgency
    description: str

    def to_json(self) -> dict[str, Any]:
        return {"cve": self.cve, "source": self.source, "packages": list(self.packages),
                "installed": self.installed, "status": self.status,
                "fixed_version": self.fixed_version, "severity": self.severity,
                "description": self.description}


TRACKER_CACHE = Path("/var/cache/cerulean/security-tracker.json")
MAX_TRACKER = 1 << 30  # the whole tracker is a few hundred MiB at most


class TrackerError(Exception):
    pass


def fetch_tracker(url: str, cache: Path = TRACKER_CACHE, max_age: float = 6 * 3600,
                  say: Callable[[str], None] = lambda _m: None,
                  clock: Callable[[], float] = time.time) -> Path:
    """The tracker's JSON from *url*, kept in *cache*: fetched again when the copy is older
    than *max_age* seconds (and then only if the server has a newer one, by ETag). Only
    HTTPS, or plain HTTP to this machine. A failed fetch falls back to the cached copy."""
    parts = urllib.parse.urlsplit(url)
    local = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and local):
        raise TrackerError(f"{url} is not an https:// URL (the tracker's data is not signed: "
                           "only TLS vouches for it).")
    meta_path = cache.with_name(cache.name + ".meta")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    if cache.exists() and meta.get("url") == url and clock() - meta.get("fetched", 0) < max_age:
        return cache
    request = urllib.request.Request(url, headers={"User-Agent": "cerulean-agent"})
    if cache.exists() and meta.get("url") == url and meta.get("etag"):
        request.add_header("If-None-Match", meta["etag"])
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            data = r.read(MAX_TRACKER + 1)
            etag = r.headers.get("ETag", "")
        if len(data) > MAX_TRACKER:
            raise TrackerError(f"{url} sent more than {MAX_TRACKER >> 20} MiB.")
        json.loads(data)  # only a whole, valid document replaces the cached one
    except urllib.error.HTTPError as e:
        if e.code == 304:
            meta["fetched"] = clock()
            write_atomic(meta_path, json.dumps(meta).encode())
            return cache
        return _cached_or_fail(cache, meta, url, f"the server answered {e.code} {e.reason}", say)
    except (OSError, ValueError) as e:
        return _cached_or_fail(cache, meta, url, str(getattr(e, "reason", e)), say)
    write_atomic(cache, data)
    write_atomic(meta_path, json.dumps({"url": url, "etag": etag, "fetched": clock()}).encode())
    return cache


def _cached_or_fail(cache: Path, meta: Mapping[str, Any], url: str, why: str,
                    say: Callable[[str], None]) -> Path:
    if cache.exists() and meta.get("url") == url:
        say(f"warning: {url} could not be fetched ({why}); using the copy of "
            f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(meta.get('fetched', 0)))} UTC")
        return cache
    raise TrackerError(f"{url} could not be fetched: {why}.")


def load_tracker(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not the Security Tracker's JSON (not an object).")
    return data


def affecting(packages: Iterable[Installed], tracker: Mapping[str, Any],
              release: str = "trixie", skipped: list[str] | None = None) -> list[Finding]:
    """The CVEs that affect *packages* on *release*, worst first. A record that cannot be
    judged (a version that is not a Debian version, such as a bad epoch) is left out and
    named in *skipped*, instead of ending the whole report."""
    by_source: dict[tuple[str, str], list[str]] = {}
    for p in packages:
        for src in p.sources():
            by_source.setdefault(src, []).append(p.name)
    out = []
    for (source, version), names in sorted(by_source.items()):
        cves = tracker.get(source)
        if not isinstance(cves, dict):
            continue
        for cve, entry in cves.items():
            rel = (entry.get("releases") or {}).get(release) if isinstance(entry, dict) else None
            if not isinstance(rel, dict):
                continue
            status, fixed = rel.get("status"), rel.get("fixed_version")
            if status == "resolved":
                try:
                    if not fixed or fixed == "0" or compare_versions(version, fixed) >= 0:
                        continue
                except (ValueError, TypeError, AttributeError):
                    if skipped is not None:
                        skipped.append(f"{str(cve)[:40]} of {source}: cannot compare "
                                       f"{version[:40]!r} with {str(fixed)[:40]!r}")
                    continue
                state = "fix-available"
            elif status == "open":
                state = "no-fix-yet"
            elif status == "undetermined":
                state = "undetermined"
            else:
                continue
            out.append(Finding(cve, source, tuple(sorted(names)), version, state,
                               fixed if state == "fix-available" else None,
                               str(rel.get("urgency", "not yet assigned")),
                               str(entry.get("description", ""))[:300]))
    out.sort(key=lambda f: (-SEVERITY.get(f.severity.rstrip("*"), 1), f.status != "fix-available",
                            f.source, f.cve))
    return out
