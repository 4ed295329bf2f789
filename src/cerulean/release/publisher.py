"""The publisher: from a Debian security fix to a signed release in its channels, unattended.

It runs as a service (``cerulean publisher run``) on the host that holds the
online keys. Every ``poll`` it:

1. **Re-signs** the repository's online metadata when due (the timestamp
   lives a day; snapshot and targets are renewed at half their life), before
   anything else, so that no other failure can let hosts run into expired
   metadata.
2. **Watches** the archive: the InRelease file of every suite its images use
   (``trixie``, ``trixie-updates``, ``trixie-security``), by their sha256. A
   changed file (or the first look) marks the images that use it.
3. **Reconciles** each marked image, or one whose last attempt failed and
   whose back-off has passed, step by step, each step idempotent:

   - *lock*: ``lock --refresh security`` (only newer security-suite versions;
     ``refresh = "all"`` moves everything to the newest archive state);
   - *build*: when the lock differs from the lock of the last published
     release, ``release build`` of every architecture it owns, unless a complete
     build of exactly this lock is already there (a build is a directory
     renamed into place whole, so a restart never finds half of one);
   - *publish*: into every channel it owns that does not list the release yet,
     with deltas and the channel's waves (a publication is one commit of the
     repository, the timestamp written last).

   A restart at any point redoes only the steps not done. A failure (a mirror
   that does not answer, a build that fails) is recorded, audited and retried
   with back-off: 5 minutes, doubling up to 6 hours.

What it did is appended to its audit trail (``WORK/audit.jsonl``, hash-chained
as the agent's), its state is ``WORK/state.json`` and its metrics are written
for Prometheus' textfile collector to ``WORK/metrics.prom``: last success, last
error, time from a fix appearing in the archive (the security suite's Release
date) to its publication, metadata expiry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cerulean.agent.audit import AuditLog
from cerulean.agent.fileio import write_atomic
from cerulean.agent.metrics import Family, render
from cerulean.errors import CeruleanError
from cerulean.protocol.update import CHANNELS, is_version, parse_time, utc_iso, version_key

DEFAULT_CONFIG = Path("/etc/cerulean/publisher.toml")
DEFAULT_POLL = 600
RETRY_FIRST = 300
RETRY_MAX = 6 * 3600
TIMESTAMP_MARGIN = timedelta(hours=12)  # re-sign when the timestamp expires sooner
KEEP_BUILDS = 3  # release directories kept per image (the newest ones)
INRELEASE_MAX = 8 << 20
WATCH_DEADLINE = 120.0  # to fetch one InRelease, retries included
SIGN_EVERY = 300.0  # the re-signing thread's period, whatever a round is doing


def _expired(inrelease: bytes, now: datetime) -> str:
    """What is wrong with an (unverified) InRelease's Valid-Until, or "".

    Only an alarm: the signature is checked when the lock is refreshed."""
    from cerulean.debian.release import parse_date

    for line in inrelease[:1 << 16].decode("utf-8", "replace").splitlines():
        if line.startswith("Valid-Until:"):
            try:
                until = parse_date(line.partition(":")[2].strip(), "InRelease")
            except CeruleanError:
                return "has an unreadable Valid-Until"
            return f"expired on {until:%Y-%m-%d %H:%M} UTC" if until < now else ""
    return ""


class ConfigError(CeruleanError):
    pass


@dataclass(frozen=True)
class ImageJob:
    definition: Path
    arches: tuple[str, ...]  # empty: all of the image's
    channels: dict[str, str]  # channel -> waves ("default", "now", "H:F,...")
    refresh: str  # "security" | "all"


@dataclass(frozen=True)
class PublisherConfig:
    path: Path
    repo: Path
    keys: Path
    work: Path
    cache: Path | None
    poll: int
    level: int
    images: tuple[ImageJob, ...]

    @property
    def state_file(self) -> Path:
        return self.work / "state.json"

    @property
    def audit_file(self) -> Path:
        return self.work / "audit.jsonl"

    @property
    def metrics_file(self) -> Path:
        return self.work / "metrics.prom"

    @property
    def releases(self) -> Path:
        return self.work / "releases"


def _duration(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value[:-1].isdigit() and value[-1:] in ("s", "m", "h"):
        n = int(value[:-1]) * {"s": 1, "m": 60, "h": 3600}[value[-1]]
        if n > 0:
            return n
    raise ConfigError(f"{where} must be seconds or a duration like '10m' or '1h', "
                      f"not {value!r}.")


def load_config(path: Path) -> PublisherConfig:
    """The publisher's configuration; every mistake is one sentence naming the key."""
    from cerulean.release.publish import parse_waves

    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"The publisher configuration {path} does not exist (an example "
                          "is in docs/updates.md; `cerulean publisher install` writes one)."
                          ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"The publisher configuration {path} cannot be read: {e}.") from e
    base = path.parent

    def p(key: str, default: str | None = None) -> Path:
        value = raw.get(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: '{key}' must be a directory path.")
        return (base / value) if not value.startswith("/") else Path(value)

    known = {"repo", "keys", "work", "cache", "poll", "level", "image"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: "
                          f"{', '.join(sorted(known))}).")
    images = []
    entries = raw.get("image", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: name at least one [[image]] with a 'definition'.")
    for i, item in enumerate(entries, 1):
        where = f"{path}: [[image]] number {i}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} is not a table.")
        extra = sorted(set(item) - {"definition", "arches", "channels", "refresh"})
        if extra:
            raise ConfigError(f"{where}: unknown key {extra[0]!r}.")
        d = item.get("definition")
        if not isinstance(d, str) or not d:
            raise ConfigError(f"{where} needs 'definition', the path of an image definition.")
        arches = item.get("arches", [])
        if not isinstance(arches, list) or not all(isinstance(a, str) for a in arches):
            raise ConfigError(f"{where}: 'arches' must be a list such as [\"amd64\", \"arm64\"].")
        channels = item.get("channels", {"stable": "default"})
        if not isinstance(channels, dict) or not channels:
            raise ConfigError(f"{where}: 'channels' must be a table such as "
                              "{ stable = \"default\" }.")
        for name, waves in channels.items():
            if name not in CHANNELS:
                raise ConfigError(f"{where}: channel {name!r} is not one of "
                                  f"{', '.join(CHANNELS)}.")
            if not isinstance(waves, str):
                raise ConfigError(f"{where}: the waves of {name} must be a string.")
            try:
                parse_waves(waves)
            except CeruleanError as err:
                raise ConfigError(f"{where}: {err}") from None
        refresh = item.get("refresh", "security")
        if refresh not in ("security", "all"):
            raise ConfigError(f"{where}: 'refresh' must be \"security\" or \"all\".")
        images.append(ImageJob(base / d if not d.startswith("/") else Path(d), tuple(arches),
                               dict(channels), refresh))
    level = raw.get("level", 19)
    if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 19:
        raise ConfigError(f"{path}: 'level' must be a zstd level from 1 to 19.")
    cache = p("cache") if "cache" in raw else None
    return PublisherConfig(path, p("repo"), p("keys"), p("work", "/var/lib/cerulean-publisher"),
                           cache, _duration(raw.get("poll", DEFAULT_POLL), f"{path}: 'poll'"),
                           level, tuple(images))


# -- state ---------------------------------------------------------------------------


@dataclass
class ImageState:
    published_lock: str = ""  # sha256 of the lock of the newest published release
    version: str = ""  # that release
    built: dict[str, str] = field(default_factory=dict)  # {"lock", "version", "dir"}
    fix_date: str = ""  # Release date of the security suite that brought the pending fix
    detected: str = ""
    cves: list[str] = field(default_factory=list)
    failures: int = 0
    retry_at: str = ""
    error: str = ""
    pending: bool = True  # the archive changed since the last successful reconcile


@dataclass
class State:
    seen: dict[str, str] = field(default_factory=dict)  # InRelease URL -> sha256
    images: dict[str, ImageState] = field(default_factory=dict)
    last_success: str = ""
    last_error: str = ""
    last_error_time: str = ""
    last_check: str = ""
    published: list[dict[str, Any]] = field(default_factory=list)  # newest last, 50 kept

    def to_json(self) -> dict[str, Any]:
        # Copies taken in one step each: the signer thread saves while a round adds.
        return {"seen": dict(self.seen),
                "images": {k: dict(vars(v)) for k, v in list(self.images.items())},
                "last_success": self.last_success, "last_error": self.last_error,
                "last_error_time": self.last_error_time, "last_check": self.last_check,
                "published": self.published}


def _state_from(d: Any) -> State:
    if not isinstance(d, dict):
        raise ValueError("not an object")
    images = {}
    for name, v in dict(d.get("images", {})).items():
        st = ImageState()
        for k, default in vars(ImageState()).items():
            if k in v:
                if not isinstance(v[k], type(default)):
                    raise ValueError(f"images.{name}.{k} has the wrong type")
                setattr(st, k, v[k])
        images[str(name)] = st
    seen = dict(d.get("seen", {}))
    if not all(isinstance(k, str) and isinstance(x, str) for k, x in seen.items()):
        raise ValueError("seen has the wrong type")
    published = list(d.get("published", []))
    if not all(isinstance(x, dict) for x in published):
        raise ValueError("published has the wrong type")
    strs = {k: d.get(k, "") for k in ("last_success", "last_error", "last_error_time",
                                      "last_check")}
    if not all(isinstance(x, str) for x in strs.values()):
        raise ValueError("a time has the wrong type")
    times = [strs[k] for k in ("last_success", "last_error_time", "last_check")]
    times += [t for st in images.values() for t in (st.retry_at, st.fix_date, st.detected)]
    for e in published:
        for k in ("image", "version", "channel", "published"):
            if not isinstance(e.get(k), str):
                raise ValueError(f"a published entry has no {k}")
        times.append(e["published"])
        if not isinstance(e.get("fix_to_release_seconds", 0), int):
            raise ValueError("a published entry has a wrong fix_to_release_seconds")
    for t in times:
        if t:
            parse_time(t)  # raises ProtocolError (a ValueError)
    return State(seen, images, published=published, **strs)


def load_state(path: Path) -> tuple[State, str]:
    """The state, from the file or its backup copy; the second value says what was
    recovered ("" when the file was good)."""
    problems: list[str] = []
    for candidate in (path, path.with_name(path.name + ".bak")):
        try:
            return _state_from(json.loads(candidate.read_bytes())), (
                f"{path.name} was unreadable ({problems[0]}); recovered from its backup"
                if problems else "")
        except FileNotFoundError:
            problems.append(f"{candidate.name} is missing")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            problems.append(f"{candidate.name}: {e}")
    if all(p.endswith("is missing") for p in problems):
        return State(), ""
    return State(), f"{path.name} and its backup were unreadable ({'; '.join(problems)}); " \
                    "started afresh (the archive is looked at again and nothing published " \
                    "is published twice)"


def save_state(path: Path, state: State) -> None:
    data = json.dumps(state.to_json(), indent=1, sort_keys=True).encode() + b"\n"
    write_atomic(path, data, 0o600, durable=True)
    write_atomic(path.with_name(path.name + ".bak"), data, 0o600, durable=True)


def _same_packages(packages_json: Path, lock: Any) -> bool:
    """Whether a release's packages.json lists the lock's packages, for its arches."""
    try:
        built = json.loads(packages_json.read_bytes())
        return all({n: p.get("version") for n, p in pkgs.items()}
                   == {p.name: p.version for p in lock.packages.get(arch, [])}
                   for arch, pkgs in built.items())
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def file_sha(path: Path) -> str:
    from cerulean.debian.cache import sha256_file

    return sha256_file(path) if path.is_file() else ""


# -- the publisher -------------------------------------------------------------------


@dataclass
class Outcome:
    refreshed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # suites whose InRelease changed
    published: list[str] = field(default_factory=list)  # "IMAGE VERSION CHANNEL"
    errors: list[str] = field(default_factory=list)


class Publisher:
    def __init__(self, cfg: PublisherConfig, *, say: Callable[[str], None] = lambda _m: None,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC).replace(microsecond=0),
                 show_progress: bool = False) -> None:
        from cerulean.release.keys import refuse_inside_repo

        self.cfg = cfg
        self.say = say
        self.now = now
        self.show_progress = show_progress
        refuse_inside_repo(cfg.work, cfg.repo, "publisher's work")
        try:
            cfg.work.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise CeruleanError(f"The publisher's work directory {cfg.work} cannot be made: "
                                f"{e.strerror or e}.") from e
        self._save_lock = threading.Lock()
        self.audit = AuditLog(cfg.audit_file)
        self.state, recovered = load_state(cfg.state_file)
        if recovered:
            self.audit.append("publisher", "publisher.state-recovered", {"message": recovered})
            say(recovered)

    # -- pieces ----------------------------------------------------------------

    def _repo(self) -> Any:
        from cerulean.release.repo import Repository

        return Repository.open(self.cfg.repo, self.cfg.keys)

    def _fail(self, out: Outcome, what: str, e: Exception, image: str = "") -> None:
        # Anything but a CeruleanError is a fault of the publisher itself: it is recorded
        # and retried like any failure (the service must not die of one image's step),
        # under the exception's type, so that it is not taken for a mirror's failure.
        msg = f"{what}: {e}" if isinstance(e, CeruleanError) else \
            f"{what}: an unexpected {type(e).__name__}: {e}"
        out.errors.append(msg)
        self.state.last_error, self.state.last_error_time = msg, utc_iso(self.now())
        detail: dict[str, Any] = {"step": what, "message": str(e)}
        if image:
            st = self.state.images.setdefault(image, ImageState())
            st.failures += 1
            delay = min(RETRY_FIRST * 2 ** (st.failures - 1), RETRY_MAX)
            delay = int(delay * random.uniform(0.9, 1.1))
            st.retry_at = utc_iso(self.now() + timedelta(seconds=delay))
            st.error = msg
            detail |= {"image": image, "failures": st.failures, "retry_at": st.retry_at}
        if not isinstance(e, CeruleanError):
            # A bug, not a failure of the world: its traceback goes to the journal (or
            # the container's log), so that it can be found.
            import traceback

            print("".join(traceback.format_exception(e)).rstrip(), file=sys.stderr)
        try:
            self.audit.append("publisher", "publisher.failed", detail)
        except Exception as err:  # a full disk: the failure is in the state and the journal
            print(f"warning: the publisher's audit trail cannot be written: {err}",
                  file=sys.stderr)
        self.say(f"{msg}" + (f" (retry after {detail['retry_at']})" if image else ""))

    def refresh_metadata(self, out: Outcome) -> None:
        """Re-sign the online roles when due (always first: nothing else may block it)."""
        try:
            repo = self._repo()
            now = self.now()
            if not repo.refresh_due(now, TIMESTAMP_MARGIN):
                return
            roles = repo.refresh(now=now)
            out.refreshed = roles
            ts = repo.expiries()["timestamp"]
            self.audit.append("publisher", "metadata.refreshed",
                              {"roles": roles, "timestamp_expires": utc_iso(ts)})
            self.say(f"re-signed {', '.join(roles)}; the timestamp now expires {utc_iso(ts)}")
        except Exception as e:  # re-signing must outlive any one failure
            self._fail(out, "re-signing the repository's metadata", e)

    def _definition(self, job: ImageJob) -> Any:
        from cerulean.build.definition import load_definition

        return load_definition(job.definition)

    def watch(self, out: Outcome) -> None:
        """Fetch every suite's InRelease; mark the images whose suites changed."""
        from cerulean.build.plan import archive_for
        from cerulean.debian.fetch import client, get_bytes

        users: dict[str, list[str]] = {}
        for job in self.cfg.images:
            try:
                defn = self._definition(job)
                cfg = archive_for(defn)
            except Exception as e:  # one image's fault stops only that image
                self._fail(out, f"reading {job.definition}", e, job.definition.stem)
                continue
            for suite in cfg.suites:
                users.setdefault(f"{cfg.base_url(suite)}/dists/{suite}/InRelease",
                                 []).append(defn.name)
        self.state.last_check = utc_iso(self.now())
        failed: dict[str, CeruleanError] = {}
        with client() as http:
            for url, names in users.items():
                suite = url.split("/")[-2]
                try:
                    data = get_bytes(http, url, f"the archive's {suite} InRelease",
                                     limit=INRELEASE_MAX, deadline=WATCH_DEADLINE)
                    assert data is not None
                    frozen = _expired(data, self.now())
                    if frozen:
                        raise CeruleanError(f"The archive's {suite} InRelease {frozen}: the "
                                            "mirror seems frozen, and no fix reaches it.")
                except CeruleanError as e:
                    failed.update(dict.fromkeys(names, e))
                    continue
                digest = hashlib.sha256(data).hexdigest()
                if self.state.seen.get(url) != digest:
                    out.changed.append(suite)
                    if url in self.state.seen:
                        self.audit.append("publisher", "archive.changed",
                                          {"suite": suite, "url": url, "sha256": digest})
                        self.say(f"{suite}: the archive changed")
                    self.state.seen[url] = digest
                    for name in names:
                        self.state.images.setdefault(name, ImageState()).pending = True
        for name, err in failed.items():  # one failure per image and round
            self._fail(out, "watching the archive", err, name)

    def reconcile(self, job: ImageJob, out: Outcome) -> None:
        """Lock, build, publish one image; each step skipped when it is already done."""
        from cerulean.build.plan import archive_for, ensure_lock, refresh_security
        from cerulean.debian.cache import Cache
        from cerulean.debian.lock import read_lock
        from cerulean.release.build import build_release
        from cerulean.release.publish import parse_waves, publish, published_releases

        defn = self._definition(job)
        st = self.state.images.setdefault(defn.name, ImageState())
        cache = Cache(self.cfg.cache or self.cfg.work / "cache")
        repo = self._repo()
        # The newest release of this image in the repository, whatever this state says.
        have = [d.version for d in published_releases(repo, defn.name)]
        if not defn.lock_path.exists():
            ensure_lock(defn, cache, show_progress=self.show_progress)
        if not have and not st.published_lock:
            st.pending = True  # a first release
        elif not st.published_lock and not st.built:
            # A repository that already has releases, and no state that says what they
            # were built from (a first start, or both copies lost): the newest one's
            # packages.json, when this publisher built it, says; else the lock as it is.
            st.version = have[-1]
            st.published_lock = file_sha(defn.lock_path)
            built = self.cfg.releases / defn.name / have[-1] / "packages.json"
            if built.is_file() and not _same_packages(built, read_lock(defn.lock_path)):
                st.published_lock = "packages differ from " + have[-1]

        # 1. lock
        before = file_sha(defn.lock_path)
        changes: dict[str, Any]
        if job.refresh == "all":
            res = ensure_lock(defn, cache, refresh=True, show_progress=self.show_progress)
            changes = {"all": res.changes} if res.changes else {}
            cves: list[str] = []
        else:
            sec = refresh_security(defn, cache, show_progress=self.show_progress)
            changes = {a: [c.to_json() for c in chs] for a, chs in sec.changes.items() if chs}
            cves = sorted({c for chs in sec.changes.values() for ch in chs for c in ch.cves})
        lock_sha = file_sha(defn.lock_path)
        if lock_sha != before:
            lock = read_lock(defn.lock_path)
            dates = [lock.snapshot_date(s) for s in defn.archive_suites
                     if s.endswith("-security")]
            fix = max((d for d in dates if d), default=None)
            st.fix_date = utc_iso(fix) if fix else utc_iso(self.now())
            st.detected = utc_iso(self.now())
            st.cves = cves
            self.audit.append("publisher", "lock.refreshed",
                              {"image": defn.name, "lock": lock_sha, "cves": cves,
                               "changes": changes, "archive_date": st.fix_date})
            self.say(f"{defn.name}: lock refreshed, {len(cves)} CVEs fixed")
        if lock_sha == st.published_lock:
            st.pending = False
            return

        # 2. build (or find the complete build of this very lock)
        arches = list(job.arches) or list(defn.image_architectures)
        built = st.built
        if not (built.get("lock") == lock_sha and
                (Path(built.get("dir", "")) / "release.json").is_file()):
            # A build that finished just before a stop, before the state said so.
            found = self._finished_build(defn.name, arches, defn.lock_path)
            if found is not None:
                st.built = built = {"lock": lock_sha, "version": found.name, "dir": str(found)}
                self.save()
        if not (built.get("lock") == lock_sha and
                (Path(built.get("dir", "")) / "release.json").is_file()):
            self.say(f"{defn.name}: building a release of {', '.join(arches)}")
            res_b = build_release(defn, read_lock(defn.lock_path), archive_for(defn), arches,
                                  self.cfg.releases, cache, known_versions=have,
                                  show_progress=self.show_progress, say=self.say,
                                  level=self.cfg.level, repo=repo)
            st.built = {"lock": lock_sha, "version": res_b.doc.version, "dir": str(res_b.path)}
            self.save()
            self.audit.append("publisher", "release.built",
                              {"image": defn.name, "version": res_b.doc.version,
                               "arches": arches, "seconds": round(res_b.seconds, 1),
                               "cves": res_b.doc.cves})
        version, rdir = st.built["version"], Path(st.built["dir"])

        # 3. publish to every channel that does not list it yet
        for channel, waves in job.channels.items():
            if repo.channel(channel).find(defn.name, version):
                if not any((e.get("image"), e.get("version"), e.get("channel")) ==
                           (defn.name, version, channel) for e in self.state.published):
                    # Published just before a stop, before the state and the audit trail
                    # said so: said now.
                    recovered = {"image": defn.name, "version": version,
                                 "channel": channel, "waves": waves, "cves": st.cves,
                                 "fix_date": st.fix_date, "detected": st.detected,
                                 "recovered": True}
                    self.state.published = [*self.state.published, recovered][-50:]
                    self.audit.append("publisher", "release.published", recovered)
                    self.save()
                continue
            publish(repo, rdir, channel, parse_waves(waves), level=self.cfg.level,
                    say=self.say, now=self.now())
            now = self.now()
            entry: dict[str, Any] = {"image": defn.name, "version": version,
                                     "channel": channel, "waves": waves,
                                     "published": utc_iso(now), "cves": st.cves,
                                     "fix_date": st.fix_date, "detected": st.detected}
            if st.fix_date:
                entry["fix_to_release_seconds"] = int(
                    (now - parse_time(st.fix_date)).total_seconds())
            self.state.published = [*self.state.published, entry][-50:]
            out.published.append(f"{defn.name} {version} {channel}")
            self.audit.append("publisher", "release.published", entry)
            self.say(f"published {defn.name} {version} to {channel} ({waves} waves)")
            self.save()
        st.published_lock, st.version, st.pending = lock_sha, version, False
        st.failures, st.retry_at, st.error = 0, "", ""
        self._prune(defn.name, version)

    def _finished_build(self, image: str, arches: list[str], lock_path: Path) -> Path | None:
        """The newest complete build in WORK/releases of exactly the lock at *lock_path*."""
        from cerulean.debian.lock import read_lock

        d = self.cfg.releases / image
        if not d.is_dir():
            return None
        lock = read_lock(lock_path)
        for v in sorted((p.name for p in d.iterdir() if p.is_dir() and is_version(p.name)),
                        key=version_key, reverse=True):
            rdir = d / v
            if ((rdir / "release.json").is_file() and (rdir / "packages.json").is_file()
                    and all((rdir / a).is_dir() for a in arches)
                    and _same_packages(rdir / "packages.json", lock)):
                return rdir
        return None

    def _prune(self, image: str, keep_version: str) -> None:
        d = self.cfg.releases / image
        if not d.is_dir():
            return
        versions = sorted((p.name for p in d.iterdir() if p.is_dir() and is_version(p.name)),
                          key=version_key)
        for v in versions[:-KEEP_BUILDS]:
            if v != keep_version:
                shutil.rmtree(d / v, ignore_errors=True)

    def due(self, name: str) -> bool:
        st = self.state.images.get(name)
        if st is None:
            return True
        if st.retry_at and parse_time(st.retry_at) > self.now():
            return False
        return st.pending or st.failures > 0

    def save(self) -> None:
        with self._save_lock:
            save_state(self.cfg.state_file, self.state)

    def run_once(self, *, force: bool = False) -> Outcome:
        """One round: re-sign, watch, reconcile what changed. Never raises for one part."""
        out = Outcome()
        self.refresh_metadata(out)
        try:
            self.watch(out)
        except Exception as e:  # see _fail
            self._fail(out, "watching the archive", e)
        self.save()
        for job in self.cfg.images:
            name = job.definition.stem
            try:
                name = self._definition(job).name
                if not (force or self.due(name)):
                    continue
                self.reconcile(job, out)
            except Exception as e:  # see _fail
                self._fail(out, f"releasing {name}", e, name)
            self.save()
        if not out.errors:
            self.state.last_success = utc_iso(self.now())
        self.save()
        self.write_metrics()
        return out

    @contextlib.contextmanager
    def only_one(self) -> Iterator[None]:
        """Hold the work directory's lock: two publishers on one state would each
        overwrite what the other recorded, and build the same release twice."""
        import fcntl

        with open(self.cfg.work / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CeruleanError(f"Another publisher runs on {self.cfg.work}; stop it "
                                    "first.") from None
            yield

    def _signer(self, stop: threading.Event) -> None:
        """Re-sign when due, every SIGN_EVERY, even while a round is stuck or building."""
        while not stop.wait(SIGN_EVERY):
            try:
                self.refresh_metadata(Outcome())
                self.save()
            except Exception as e:  # a full disk, a bug: never the end of the re-signing
                with contextlib.suppress(Exception):
                    self._fail(Outcome(), "re-signing (the signer thread)", e)

    def _clean_stale(self) -> None:
        """Builds cut short by a stop (hidden directories beside the releases): with this
        publisher the only one on its work directory, none of them is in progress."""
        if not self.cfg.releases.is_dir():
            return
        for image in self.cfg.releases.iterdir():
            if image.is_dir():
                for d in image.iterdir():
                    if d.name.startswith(".") and d.is_dir() and not d.is_symlink():
                        shutil.rmtree(d, ignore_errors=True)

    def run_forever(self, stop: threading.Event) -> None:
        with self.only_one():
            self._clean_stale()
            self.audit.append("publisher", "publisher.started",
                              {"config": str(self.cfg.path), "poll": self.cfg.poll,
                               "images": [str(j.definition) for j in self.cfg.images]})
            signer = threading.Thread(target=self._signer, args=(stop,), name="signer",
                                      daemon=True)
            signer.start()
            try:
                while not stop.is_set():
                    started = time.monotonic()
                    self.run_once()
                    stop.wait(max(5.0, self.cfg.poll - (time.monotonic() - started)))
            finally:
                stop.set()

    # -- what people see ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = self.state.to_json()
        out.pop("seen")
        try:
            exp = self._repo().expiries()
            out["expires"] = {k: utc_iso(t) for k, t in exp.items()}
        except CeruleanError as e:
            out["expires"] = {}
            out["repository_error"] = str(e)
        return out

    def families(self) -> list[Family]:
        def ts(value: str) -> float | None:
            return parse_time(value).timestamp() if value else None

        fams = [
            Family("cerulean_publisher_last_success_timestamp_seconds", "gauge",
                   "When a round last finished without an error."),
            Family("cerulean_publisher_last_error_timestamp_seconds", "gauge",
                   "When a round last met an error."),
            Family("cerulean_publisher_last_check_timestamp_seconds", "gauge",
                   "When the archive was last looked at."),
            Family("cerulean_publisher_fix_to_release_seconds", "gauge",
                   "Time from a fix appearing in the archive to its release in a channel."),
            Family("cerulean_publisher_release_info", "gauge",
                   "The newest published release of each image."),
            Family("cerulean_publisher_failures", "gauge",
                   "Failed attempts in a row, per image."),
            Family("cerulean_publisher_metadata_expires_timestamp_seconds", "gauge",
                   "When each role's signed metadata expires."),
        ]
        for f, v in zip(fams[:3], (self.state.last_success, self.state.last_error_time,
                                   self.state.last_check), strict=True):
            if (t := ts(v)) is not None:
                f.add(t)
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for e in self.state.published:
            latest[(str(e.get("image")), str(e.get("channel")))] = e
        for (image, channel), e in sorted(latest.items()):
            if "fix_to_release_seconds" in e:
                fams[3].add(float(e["fix_to_release_seconds"]), image=image, channel=channel)
        for name, st in sorted(self.state.images.items()):
            if st.version:
                fams[4].add(1, image=name, version=st.version)
            fams[5].add(st.failures, image=name)
        try:
            for role, t in self._repo().expiries().items():
                fams[6].add(t.timestamp(), role=role)
        except CeruleanError:
            pass
        return fams

    def write_metrics(self) -> None:
        write_atomic(self.cfg.metrics_file, render(self.families()).encode(), 0o644)

