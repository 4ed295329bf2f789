"""Signed Release metadata of a suite: download, verify, parse.

An InRelease is accepted only when a Debian archive key signed it (see
:mod:`cerulean.debian.signature`), it has not passed its Valid-Until, and it
is not older than the snapshot a lockfile already recorded (a mirror serving
stale metadata could otherwise roll packages back to vulnerable versions).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cerulean.agent.fileio import write_atomic
from cerulean.debian.archive import ArchiveConfig
from cerulean.debian.cache import Cache
from cerulean.debian.fetch import get_bytes
from cerulean.debian.signature import verify_clearsigned
from cerulean.errors import CeruleanError, VerificationError

if TYPE_CHECKING:
    import httpx


@dataclass(frozen=True)
class IndexFile:
    path: str  # relative to dists/<suite>/, e.g. "main/binary-amd64/Packages.xz"
    sha256: str
    size: int


@dataclass(frozen=True)
class Release:
    suite: str  # the name it was asked by (codename-based, e.g. "trixie-security")
    codename: str
    version: str
    date: datetime
    valid_until: datetime | None
    sha256: str  # of the InRelease file as downloaded
    base_url: str
    acquire_by_hash: bool
    architectures: tuple[str, ...]
    components: tuple[str, ...]
    no_arch_all_index: bool  # arch:all packages are listed in binary-<arch> indexes too
    suite_name: str = ""  # the Release's own Suite field (e.g. "stable")
    files: dict[str, IndexFile] = field(default_factory=dict)

    @property
    def source_date_epoch(self) -> int:
        return int(self.date.timestamp())


def parse_date(value: str, what: str) -> datetime:
    try:
        d = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        raise CeruleanError(f"{what} has an unreadable date {value!r}.") from None
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def parse_release(text: str, suite: str, sha256: str, base_url: str) -> Release:
    fields: dict[str, str] = {}
    files: dict[str, IndexFile] = {}
    current = ""
    for line in text.splitlines():
        if not line.strip():
            continue
        if line[0] in " \t":
            if current == "SHA256":
                parts = line.split()
                if len(parts) == 3:
                    files[parts[2]] = IndexFile(parts[2], parts[0], int(parts[1]))
            continue
        key, _, value = line.partition(":")
        current = key
        fields[key] = value.strip()
    what = f"The Release file of '{suite}'"
    if "Date" not in fields:
        raise VerificationError(f"{what} has no Date field.")
    if not files:
        raise VerificationError(f"{what} lists no SHA256 hashes.")
    return Release(
        suite=suite,
        codename=fields.get("Codename", suite),
        suite_name=fields.get("Suite", ""),
        version=fields.get("Version", ""),
        date=parse_date(fields["Date"], what),
        valid_until=parse_date(fields["Valid-Until"], what) if "Valid-Until" in fields else None,
        sha256=sha256,
        base_url=base_url,
        acquire_by_hash=fields.get("Acquire-By-Hash", "no").lower() == "yes",
        architectures=tuple(fields.get("Architectures", "").split()),
        components=tuple(fields.get("Components", "").split()),
        no_arch_all_index="Packages" in fields.get("No-Support-for-Architecture-all", ""),
        files=files,
    )


def _state_name(base_url: str) -> str:
    return hashlib.sha256(base_url.encode()).hexdigest()[:16]


def load_release(
    cfg: ArchiveConfig,
    suite: str,
    cache: Cache,
    keyring: Path,
    *,
    http: httpx.Client | None,
    not_before: datetime | None = None,
    now: datetime | None = None,
) -> Release:
    """The verified Release of *suite*: downloaded, or the last one verified when offline."""
    base = cfg.base_url(suite)
    state = cache.state_path("dists", _state_name(base), suite, "InRelease")
    if http is None:
        if not state.is_file():
            raise CeruleanError(
                f"--offline was given but the cache has no Release file of suite '{suite}'."
            )
        data = state.read_bytes()
    else:
        url = f"{base}/dists/{suite}/InRelease"
        got = get_bytes(http, url, f"the InRelease file of '{suite}'")
        assert got is not None
        data = got
    verified = verify_clearsigned(data, keyring, f"the InRelease file of suite '{suite}'")
    rel = parse_release(
        verified.content.decode("utf-8", errors="replace"),
        suite,
        hashlib.sha256(data).hexdigest(),
        base,
    )
    names = {rel.codename, rel.suite_name}
    if not any(suite == n or suite.startswith(f"{n}-") for n in names if n):
        raise VerificationError(
            f"The InRelease file of suite '{suite}' is for '{rel.codename}' instead."
        )
    now = now or datetime.now(UTC)
    if rel.valid_until is not None and rel.valid_until < now and http is not None:
        raise VerificationError(
            f"The Release file of suite '{suite}' expired on {rel.valid_until:%Y-%m-%d %H:%M} UTC."
        )
    if not_before is not None and rel.date < not_before:
        raise VerificationError(
            f"The Release file of suite '{suite}' is dated {rel.date:%Y-%m-%d %H:%M} UTC, "
            f"older than the {not_before:%Y-%m-%d %H:%M} UTC the lock records: the mirror "
            "serves stale metadata."
        )
    if http is not None:
        write_atomic(state, data)
    return rel
