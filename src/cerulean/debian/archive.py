"""Which archive to use: mirror URLs, suites and components.

The default mirror is the one the host's apt already uses (read from
``/etc/apt/sources.list`` and ``/etc/apt/sources.list.d``), so Cerulean talks
to the same Debian mirror, proxy or cache as the machine it runs on. It can be
set explicitly in an image definition's ``[archive]`` table or with the
``CERULEAN_MIRROR`` and ``CERULEAN_SECURITY_MIRROR`` environment variables.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cerulean.errors import CeruleanError

DEFAULT_SUITES = ("trixie", "trixie-updates", "trixie-security")
DEFAULT_COMPONENTS = ("main",)
APT_SOURCES = Path("/etc/apt")


@dataclass(frozen=True)
class ArchiveConfig:
    mirror: str  # base URL of the Debian archive (the directory holding dists/ and pool/)
    security_mirror: str  # base URL of the security archive
    suites: tuple[str, ...] = DEFAULT_SUITES
    components: tuple[str, ...] = DEFAULT_COMPONENTS

    def base_url(self, suite: str) -> str:
        """The mirror that serves *suite* (security suites live in their own archive)."""
        return self.security_mirror if suite.endswith("-security") else self.mirror


def _sources_entries(root: Path) -> list[tuple[str, list[str]]]:
    """(URI, suites) pairs from the one-line and deb822 apt source files under *root*."""
    found: list[tuple[str, list[str]]] = []
    files: list[Path] = []
    if (root / "sources.list").is_file():
        files.append(root / "sources.list")
    d = root / "sources.list.d"
    if d.is_dir():
        files.extend(sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources")))
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    found.append((uri, fields.get("suites", "").split()))
        else:
            for line in text.splitlines():
                # "deb [options] URI suite components..."
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    found.append((words[1], [words[2]]))
    return found


def host_mirrors(root: Path = APT_SOURCES) -> tuple[str | None, str | None]:
    """The (archive, security archive) URLs the host's apt uses, if any."""
    mirror = security = None
    for uri, suites in _sources_entries(root):
        uri = uri.rstrip("/")
        if not uri.startswith(("http://", "https://", "file:/")):
            continue
        if uri.rsplit("/", 1)[-1].startswith("ubuntu"):
            continue  # Ubuntu's archive and security archive are not Debian's
        if any(s.endswith("-security") or s.endswith("/updates") for s in suites):
            security = security or uri
        elif uri.endswith("/debian"):
            mirror = mirror or uri
    if mirror and not security:
        base = mirror.rsplit("/", 1)[0]
        security = f"{base}/debian-security"
    return mirror, security


def default_archive(
    mirror: str | None = None,
    security_mirror: str | None = None,
    suites: tuple[str, ...] = DEFAULT_SUITES,
    components: tuple[str, ...] = DEFAULT_COMPONENTS,
) -> ArchiveConfig:
    """Archive settings from arguments, then environment, then the host's apt sources."""
    host_m, host_s = host_mirrors(APT_SOURCES)
    m = mirror or os.environ.get("CERULEAN_MIRROR") or host_m
    s = security_mirror or os.environ.get("CERULEAN_SECURITY_MIRROR") or host_s
    if not m:
        raise CeruleanError(
            "No Debian mirror is configured: this host's apt sources name none (an Ubuntu "
            "archive is not a Debian mirror), so set CERULEAN_MIRROR to a Debian mirror's URL "
            "(the directory that holds dists/ and pool/) or 'mirror' in the image's [archive] "
            "table."
        )
    if not s:
        s = m.rstrip("/").rsplit("/", 1)[0] + "/debian-security"
    return ArchiveConfig(m.rstrip("/"), s.rstrip("/"), suites, components)
