"""Publishing a built release into the TUF repository, and managing its rollout.

A release directory (from ``cerulean release build``) holds ``release.json``
and, per architecture, the zstd-compressed full payloads. Publishing adds
them as targets, makes delta payloads against the newest earlier releases of
the same image already in the repository (zstd ``--patch-from``: a host on
that release downloads only what changed), and adds the release to a
channel with its wave schedule, all in one commit of the repository.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from cerulean.debian.cache import sha256_file
from cerulean.errors import CeruleanError
from cerulean.protocol.update import (
    CHANNELS,
    DEFAULT_WAVES,
    ChannelDoc,
    ChannelEntry,
    Delta,
    Part,
    Payload,
    ProtocolError,
    ReleaseDoc,
    channel_path,
    packages_path,
    parse_time,
    release_path,
    utc_iso,
    version_key,
)
from cerulean.release.repo import Repository

DELTA_BASES = 2  # deltas from this many earlier releases
DELTA_LEVEL = 19
# A delta is only worth offering when it is clearly smaller than the full payload.
DELTA_MAX_SHARE = 0.8
ZSTD_WINDOW = 31  # --long: the window must cover a whole /usr image


def parse_waves(text: str) -> list[tuple[int, float]]:
    """``default``, ``now`` (everyone at once) or ``HOURS:FRACTION,...`` (e.g. ``0:0.1,24:1``)."""
    if text == "default":
        return list(DEFAULT_WAVES)
    if text == "now":
        return [(0, 1.0)]
    out = []
    for item in text.split(","):
        h, sep, f = item.partition(":")
        try:
            hours, frac = float(h), float(f)
        except ValueError:
            hours, frac = -1.0, -1.0
        if not sep or hours < 0 or not 0 < frac <= 1:
            raise CeruleanError(
                f"--waves {text!r} is not 'default', 'now' or HOURS:FRACTION pairs like "
                "'0:0.05,24:0.5,48:1'.")
        out.append((int(hours * 3600), frac))
    if not out or max(f for _, f in out) < 1.0:
        raise CeruleanError(f"--waves {text!r} never reaches every host (no fraction 1).")
    return sorted(out)


def read_release_dir(path: Path) -> ReleaseDoc:
    try:
        return ReleaseDoc.from_json(json.loads((path / "release.json").read_bytes()))
    except FileNotFoundError:
        raise CeruleanError(
            f"{path} is not a release (no release.json): make one with "
            "`cerulean release build`.") from None
    except (ValueError, ProtocolError) as e:
        raise CeruleanError(f"{path}/release.json is not valid: {e}") from e


def local_payload(release_dir: Path, p: Payload) -> Path:
    """The file in a release directory for the target path *p.path*."""
    _, _, rest = p.path.partition("/")  # releases/IMAGE/VERSION/ARCH/NAME
    arch_name = "/".join(rest.split("/")[2:])
    return release_dir / arch_name


def run_zstd(args: list[str], what: str) -> None:
    """zstd with *args* (quiet, overwriting); a failure is one sentence about *what*."""
    from cerulean.run import require_tool

    r = subprocess.run([require_tool("zstd"), "-q", "-f", *args], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        raise CeruleanError(f"{what} failed: {r.stderr.strip()}")


def published_releases(repo: Repository, image: str) -> list[ReleaseDoc]:
    out = []
    prefix = f"releases/{image}/"
    for path in repo.targets().targets:
        if path.startswith(prefix) and path.endswith("/release.json"):
            out.append(ReleaseDoc.from_json(json.loads(repo.read_target(path))))
    return sorted(out, key=lambda d: version_key(d.version))


def make_deltas(repo: Repository, doc: ReleaseDoc, release_dir: Path, work: Path,
                say: Callable[[str], None],
                level: int = DELTA_LEVEL) -> tuple[ReleaseDoc, dict[str, Path]]:
    """Delta payloads from the newest earlier releases; returns the new doc and its files."""
    files: dict[str, Path] = {}
    earlier = [d for d in published_releases(repo, doc.image)
               if version_key(d.version) < version_key(doc.version)][-DELTA_BASES:]
    arches = dict(doc.arches)
    for prev in earlier:
        for arch, ar in doc.arches.items():
            if arch not in prev.arches:
                continue
            parts = dict(arches[arch].parts)
            for name, part in ar.parts.items():
                old = prev.arches[arch].parts[name]
                base = work / f"{arch}-{name}-{prev.version}"
                new = work / f"{arch}-{name}-new"
                run_zstd(["-d", f"--long={ZSTD_WINDOW}", str(repo.target_file(old.full.path)),
                       "-o", str(base)], f"Unpacking {prev.version}'s {name}")
                run_zstd(["-d", f"--long={ZSTD_WINDOW}", str(local_payload(release_dir, part.full)),
                       "-o", str(new)], f"Unpacking the {name} payload")
                out = work / f"{arch}-{name}.from-{prev.version}.zst"
                say(f"{arch}: delta of {name} from {prev.version}")
                run_zstd([f"-{level}", f"--long={ZSTD_WINDOW}", "-T0",
                       f"--patch-from={base}", str(new), "-o", str(out)],
                      f"Making the {name} delta from {prev.version}")
                base.unlink()
                new.unlink()
                size = out.stat().st_size
                if size > part.full.size * DELTA_MAX_SHARE:
                    say(f"{arch}: the {name} delta from {prev.version} saves too little; "
                        "hosts download the full payload")
                    out.unlink()
                    continue
                target = (f"releases/{doc.image}/{doc.version}/{arch}/"
                          f"{name}.from-{prev.version}.zst")
                sha = sha256_file(out)
                deltas = {**parts[name].deltas,
                          prev.version: Delta(Payload(target, size, sha), old.size, old.sha256)}
                parts[name] = Part(part.size, part.sha256, part.full, deltas)
                files[target] = out
            arches[arch] = replace(arches[arch], parts=parts)
    return replace(doc, arches=arches), files


def publish(repo: Repository, release_dir: Path, channel: str, waves: list[tuple[int, float]],
            *, deltas: bool = True, now: datetime | None = None,
            say: Callable[[str], None] = lambda _m: None,
            level: int = DELTA_LEVEL) -> ReleaseDoc:
    if channel not in CHANNELS:
        raise CeruleanError(f"--channel {channel!r} is not one of {', '.join(CHANNELS)}.")
    now = now or datetime.now(UTC).replace(microsecond=0)
    doc = read_release_dir(release_dir)
    # One publication at a time, from reading the channel to committing it: two
    # concurrent runs would otherwise each add their entry to the same old channel
    # document, and the second commit would drop the first one's entry.
    with repo.locked():
        return _publish_locked(repo, release_dir, doc, channel, waves, deltas, now, say, level)


def _publish_locked(repo: Repository, release_dir: Path, doc: ReleaseDoc, channel: str,
                    waves: list[tuple[int, float]], deltas: bool, now: datetime,
                    say: Callable[[str], None], level: int) -> ReleaseDoc:
    chan = repo.channel(channel)
    if chan.find(doc.image, doc.version):
        raise CeruleanError(f"{doc.image} {doc.version} is already in the {channel} channel.")
    files: dict[str, Path | bytes] = {}
    rpath = release_path(doc.image, doc.version)
    if rpath in repo.targets().targets:
        # Already published to another channel: same payloads, same document.
        doc = ReleaseDoc.from_json(json.loads(repo.read_target(rpath)))
    else:
        for ar in doc.arches.values():
            for part in ar.parts.values():
                src = local_payload(release_dir, part.full)
                if not src.is_file() or src.stat().st_size != part.full.size:
                    raise CeruleanError(f"{src} is missing or not the size release.json says.")
                files[part.full.path] = src
        if (release_dir / "packages.json").is_file():
            # Every package of the release: the next build's notes compare against it,
            # wherever that build runs.
            files[packages_path(doc.image, doc.version)] = release_dir / "packages.json"
        with tempfile.TemporaryDirectory(prefix=".publish.", dir=repo.path) as tmp:
            if deltas:
                doc, delta_files = make_deltas(repo, doc, release_dir, Path(tmp), say, level)
                files.update(delta_files)
            files[rpath] = json.dumps(doc.to_json(), indent=2).encode() + b"\n"
            return _commit(repo, doc, chan, channel, waves, files, now)
    return _commit(repo, doc, chan, channel, waves, files, now)


def _commit(repo: Repository, doc: ReleaseDoc, chan: ChannelDoc, channel: str,
            waves: list[tuple[int, float]], files: dict[str, Path | bytes],
            now: datetime) -> ReleaseDoc:
    chan.entries.append(ChannelEntry(doc.image, doc.version, utc_iso(now), waves))
    files[channel_path(channel)] = json.dumps(chan.to_json(), indent=2,
                                              sort_keys=True).encode() + b"\n"
    repo.add_targets(files, now=now)
    return doc


def set_state(repo: Repository, channel: str, image: str, version: str, state: str,
              *, now: datetime | None = None) -> str:
    """Pause, resume or withdraw a release in a channel; returns what was done."""
    now = now or datetime.now(UTC).replace(microsecond=0)
    with repo.locked():
        return _set_state_locked(repo, channel, image, version, state, now)


def _set_state_locked(repo: Repository, channel: str, image: str, version: str, state: str,
                      now: datetime) -> str:
    chan = repo.channel(channel)
    e = chan.find(image, version)
    if e is None:
        raise CeruleanError(f"{image} {version} is not in the {channel} channel.")
    if e.state == "withdrawn":
        raise CeruleanError(f"{image} {version} was withdrawn from {channel}; publish a new "
                            "release instead.")
    if state == "paused":
        if e.state == "paused":
            return f"{image} {version} is already paused in {channel}."
        e.state, e.paused_at = "paused", utc_iso(now)
    elif state == "active":
        if e.state != "paused":
            return f"{image} {version} is not paused in {channel}."
        # The waves continue where they stopped: the pause does not count.
        assert e.paused_at is not None
        e.published = utc_iso(parse_time(e.published) + (now - parse_time(e.paused_at)))
        e.state, e.paused_at = "active", None
    elif state == "withdrawn":
        e.state, e.paused_at = "withdrawn", None
    else:  # pragma: no cover - the CLI only passes the states above
        raise AssertionError(state)
    repo.save_channel(chan, now=now)
    return f"{image} {version} is now {e.state} in {channel}."
