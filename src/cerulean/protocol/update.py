"""What the update repository says and how a host reads it (standard library only).

The release side (:mod:`cerulean.release`) writes these documents as TUF
targets; the on-host updater (:mod:`cerulean.agent.update`) reads them after
python-tuf has verified them. Two documents:

``releases/IMAGE/VERSION/release.json`` (:class:`ReleaseDoc`)
    one release of one image: per architecture the payload files (full, and
    deltas against earlier releases), the verity root hash, the UKI, and the
    package changes with the CVEs they fix.

``channels/CHANNEL.json`` (:class:`ChannelDoc`)
    which releases a channel offers, each with its wave schedule and state
    (``active``, ``paused`` or ``withdrawn``).

Versions are ``MAJOR.YYYYMMDD.N`` and compare as tuples of integers.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

CHANNELS = ("stable", "lts", "preview")
STATES = ("active", "paused", "withdrawn")
SCHEMA = 1

# The default rollout: a few hosts first, everyone after three days.
DEFAULT_WAVES: tuple[tuple[int, float], ...] = (
    (0, 0.01), (4 * 3600, 0.05), (24 * 3600, 0.25), (48 * 3600, 0.5), (72 * 3600, 1.0),
)

_VERSION = re.compile(r"^(\d+)\.(\d{8})\.(\d+)$")


class ProtocolError(ValueError):
    """A document does not follow the schema (its message is one sentence)."""


def parse_version(text: str) -> tuple[int, int, int]:
    m = _VERSION.match(text)
    if not m:
        raise ProtocolError(f"{text!r} is not a release version (MAJOR.YYYYMMDD.N).")
    return int(m[1]), int(m[2]), int(m[3])


def is_version(text: str) -> bool:
    return _VERSION.match(text) is not None


def version_key(text: str) -> tuple[int, int, int]:
    return parse_version(text)


def utc_iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"{text!r} is not a UTC time (YYYY-MM-DDTHH:MM:SSZ).") from e


def _get(d: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise ProtocolError(f"{where} has no {key!r}.")
    v = d[key]
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ProtocolError(f"{where}: {key!r} must be a {kind.__name__}.")
    return v


# -- release.json --------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """One file a host downloads: *path* is the TUF target path."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> Payload:
        return cls(_get(d, "path", str, where), _get(d, "size", int, where),
                   _get(d, "sha256", str, where))


@dataclass(frozen=True)
class Delta:
    """A zstd ``--patch-from`` payload that turns *base* (an earlier release's part) into this."""

    payload: Payload
    base_size: int
    base_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {**self.payload.to_json(), "base_size": self.base_size,
                "base_sha256": self.base_sha256}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> Delta:
        return cls(Payload.from_json(d, where), _get(d, "base_size", int, where),
                   _get(d, "base_sha256", str, where))


@dataclass(frozen=True)
class Part:
    """One part written to a host (the /usr image, its hash tree, the UKI).

    *size* and *sha256* describe the uncompressed bytes as written; *full* is
    the zstd-compressed payload; *deltas* map an earlier version to a zstd
    ``--patch-from`` payload made against that version's same part.
    """

    size: int
    sha256: str
    full: Payload
    deltas: dict[str, Delta] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "full": self.full.to_json(),
                "deltas": {v: p.to_json() for v, p in sorted(self.deltas.items())}}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> Part:
        deltas = _get(d, "deltas", dict, where) if "deltas" in d else {}
        return cls(_get(d, "size", int, where), _get(d, "sha256", str, where),
                   Payload.from_json(_get(d, "full", dict, where), where),
                   {str(v): Delta.from_json(p, where) for v, p in deltas.items()})


PARTS = ("usr", "verity", "uki")


@dataclass(frozen=True)
class ArchRelease:
    roothash: str
    parts: dict[str, Part]

    def to_json(self) -> dict[str, Any]:
        return {"roothash": self.roothash,
                "parts": {k: self.parts[k].to_json() for k in PARTS}}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> ArchRelease:
        roothash = _get(d, "roothash", str, where)
        if not re.fullmatch(r"[0-9a-f]{64}", roothash):
            raise ProtocolError(f"{where}: roothash must be 64 hex digits.")
        parts = _get(d, "parts", dict, where)
        missing = [k for k in PARTS if k not in parts]
        if missing:
            raise ProtocolError(f"{where} lacks the part(s) {', '.join(missing)}.")
        return cls(roothash, {k: Part.from_json(parts[k], f"{where} {k}") for k in PARTS})


@dataclass(frozen=True)
class PackageChange:
    name: str
    old: str | None
    new: str | None
    cves: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "old": self.old, "new": self.new, "cves": list(self.cves)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PackageChange:
        return cls(str(d.get("name", "")), d.get("old"), d.get("new"),
                   tuple(str(c) for c in d.get("cves", [])))


@dataclass(frozen=True)
class ReleaseDoc:
    image: str
    version: str
    created: str
    previous: str | None
    arches: dict[str, ArchRelease]
    changes: tuple[PackageChange, ...] = ()

    @property
    def cves(self) -> list[str]:
        return sorted({c for ch in self.changes for c in ch.cves})

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "image": self.image, "version": self.version,
                "created": self.created, "previous": self.previous,
                "arches": {a: r.to_json() for a, r in sorted(self.arches.items())},
                "changes": [c.to_json() for c in self.changes]}

    @classmethod
    def from_json(cls, d: Any) -> ReleaseDoc:
        if not isinstance(d, dict):
            raise ProtocolError("release.json is not a JSON object.")
        where = "release.json"
        version = _get(d, "version", str, where)
        parse_version(version)
        arches = _get(d, "arches", dict, where)
        prev = d.get("previous")
        return cls(
            _get(d, "image", str, where), version, _get(d, "created", str, where),
            prev if isinstance(prev, str) else None,
            {str(a): ArchRelease.from_json(r, f"{where} {a}") for a, r in arches.items()},
            tuple(PackageChange.from_json(c) for c in d.get("changes", [])
                  if isinstance(c, dict)),
        )


def verity_uuids(roothash: str) -> tuple[str, str]:
    """The partition UUIDs of a /usr slot: the first and the last 128 bits of its verity
    root hash (data, hash tree), as systemd's usrhash= finds them."""
    return str(uuid.UUID(roothash[:32])), str(uuid.UUID(roothash[32:64]))


def release_path(image: str, version: str) -> str:
    return f"releases/{image}/{version}/release.json"


def packages_path(image: str, version: str) -> str:
    """The target path of a release's packages.json (every package it holds)."""
    return f"releases/{image}/{version}/packages.json"


def channel_path(channel: str) -> str:
    return f"channels/{channel}.json"


# -- channels/CHANNEL.json -------------------------------------------------------


@dataclass
class ChannelEntry:
    """One release in a channel. *published* moves forward by the time spent paused."""

    image: str
    version: str
    published: str
    waves: list[tuple[int, float]]
    state: str = "active"
    paused_at: str | None = None

    def fraction(self, now: datetime) -> float:
        """The share of hosts (0..1) this release is offered to at *now*."""
        if self.state != "active":
            return 0.0
        elapsed = (now - parse_time(self.published)).total_seconds()
        share = 0.0
        for offset, frac in self.waves:
            if elapsed >= offset:
                share = max(share, frac)
        return share

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"image": self.image, "version": self.version,
                             "published": self.published, "state": self.state,
                             "waves": [[o, f] for o, f in self.waves]}
        if self.paused_at:
            d["paused_at"] = self.paused_at
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> ChannelEntry:
        if not isinstance(d, dict):
            raise ProtocolError(f"{where} is not a JSON object.")
        state = _get(d, "state", str, where)
        if state not in STATES:
            raise ProtocolError(f"{where}: state {state!r} is not one of {', '.join(STATES)}.")
        waves = []
        for w in _get(d, "waves", list, where):
            if (not isinstance(w, list) or len(w) != 2 or not isinstance(w[0], int)
                    or not isinstance(w[1], int | float) or not 0 <= w[1] <= 1 or w[0] < 0):
                raise ProtocolError(f"{where}: each wave is [seconds >= 0, fraction 0..1].")
            waves.append((int(w[0]), float(w[1])))
        version = _get(d, "version", str, where)
        parse_version(version)
        published = _get(d, "published", str, where)
        parse_time(published)
        paused = d.get("paused_at")
        return cls(_get(d, "image", str, where), version, published, waves, state,
                   paused if isinstance(paused, str) else None)


@dataclass
class ChannelDoc:
    channel: str
    entries: list[ChannelEntry] = field(default_factory=list)

    def find(self, image: str, version: str) -> ChannelEntry | None:
        for e in self.entries:
            if e.image == image and e.version == version:
                return e
        return None

    def to_json(self) -> dict[str, Any]:
        ordered = sorted(self.entries, key=lambda e: (e.image, version_key(e.version)))
        return {"schema": SCHEMA, "channel": self.channel,
                "releases": [e.to_json() for e in ordered]}

    @classmethod
    def from_json(cls, d: Any) -> ChannelDoc:
        if not isinstance(d, dict):
            raise ProtocolError("The channel document is not a JSON object.")
        name = _get(d, "channel", str, "The channel document")
        entries = [ChannelEntry.from_json(e, f"channel {name} release #{i + 1}")
                   for i, e in enumerate(_get(d, "releases", list, "The channel document"))]
        return cls(name, entries)


@dataclass(frozen=True)
class Offer:
    entry: ChannelEntry | None
    reason: str


def choose(doc: ChannelDoc, image: str, current: str, seed: float, now: datetime,
           skip: frozenset[str] = frozenset(), only: str = "") -> Offer:
    """The release a host on *current* should move to, or why none.

    The newest active release newer than *current* whose wave has reached the
    host's *seed*, and not in *skip* (releases that failed on this host); with
    *only* (a fleet rollout's target), that release or none.
    """
    mine = [e for e in doc.entries if e.image == image and (not only or e.version == only)]
    if only and not mine:
        return Offer(None, f"the target {only} is not a {image} release in {doc.channel}")
    newer = sorted((e for e in mine if version_key(e.version) > version_key(current)),
                   key=lambda e: version_key(e.version), reverse=True)
    if not newer:
        return Offer(None, f"{current} is the newest {image} release in {doc.channel}")
    reasons = []
    for e in newer:
        if e.version in skip:
            reasons.append(f"{e.version} failed on this host before")
        elif e.state != "active":
            reasons.append(f"{e.version} is {e.state}")
        elif seed >= e.fraction(now):
            reasons.append(f"{e.version} has not reached this host's wave yet "
                           f"({e.fraction(now):.0%} of hosts so far)")
        else:
            return Offer(e, f"{e.version} is offered")
    return Offer(None, "; ".join(reasons))
