"""The update repository, secured with TUF (python-tuf's Metadata API).

Layout of a repository directory (serve it as static files over HTTP(S)):

    metadata/N.root.json       every root version (clients walk the chain)
    metadata/root.json         the newest root, to bootstrap an image's trust
    metadata/N.targets.json    consistent snapshots: one file per version
    metadata/N.snapshot.json
    metadata/timestamp.json    the one file clients fetch first, rewritten last
    targets/.../SHA256.NAME    payloads and documents, named by their hash

Private keys are never in the served tree (see :mod:`cerulean.release.keys`):
the online keys (targets, snapshot, timestamp) in one directory, the root
keys in another, kept offline and used only for a root ceremony. Every change
to the repository writes new files first and replaces ``timestamp.json``
last, under a lock, so a client never sees a half-published state.

Roles and their default expiry: root 365 days, targets 90, snapshot 7,
timestamp 1 (the publisher re-signs the online roles before they expire;
root is renewed in a ceremony, :meth:`Repository.renew_root`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from cerulean.agent.fileio import write_atomic
from cerulean.errors import CeruleanError
from cerulean.protocol.update import ChannelDoc, ProtocolError, channel_path
from cerulean.release.keys import (
    ONLINE_ROLES,
    ROLES,
    KeyFile,
    generate_key,
    key_files,
    load_signer,
    refuse_inside_repo,
    retire,
)

EXPIRY = {"root": timedelta(days=365), "targets": timedelta(days=90),
          "snapshot": timedelta(days=7), "timestamp": timedelta(days=1)}
_SERIALIZER = JSONSerializer(compact=False)
TARGET_PATH = re.compile(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*")


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _check_root_threshold(threshold: int, allowed: bool) -> None:
    if threshold < 2 and not allowed:
        raise CeruleanError(
            "A root that one signature can change is forked by one stolen or retired root "
            "key: use a root threshold of at least 2 (or say --one-root-signature).")


def default_root_keys(keys: Path) -> Path:
    """Where root keys go when not named: ``root-keys`` beside the online keys."""
    return keys.parent / "root-keys"


class Repository:
    """A TUF repository on disk, its online keys and (for a root ceremony) its root keys."""

    def __init__(self, path: Path, keys: Path, root_keys: Path | None = None, *,
                 read_only: bool = False) -> None:
        self.path = path
        self.keys = keys
        self.root_keys = root_keys if root_keys is not None else default_root_keys(keys)
        self.meta = path / "metadata"
        self.targets_dir = path / "targets"
        self._lock_depth = 0
        if not read_only:
            refuse_inside_repo(keys, path)
            refuse_inside_repo(self.root_keys, path, "root keys")

    # -- creating ----------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, keys: Path, *, root_keys_dir: Path | None = None,
               root_keys: int = 3, root_threshold: int = 2, one_root_signature: bool = False,
               now: datetime | None = None) -> Repository:
        """A new repository: online keys in *keys*, root keys in *root_keys_dir*."""
        if root_threshold < 1 or root_threshold > root_keys:
            raise CeruleanError(
                f"The root threshold must be between 1 and the number of root keys "
                f"({root_keys}); got {root_threshold}.")
        _check_root_threshold(root_threshold, one_root_signature)
        repo = cls(path, keys, root_keys_dir)
        if (path / "metadata").exists():
            raise CeruleanError(f"{path} already holds an update repository.")
        for d in (keys, repo.root_keys):
            if key_files(d):
                raise CeruleanError(f"{d} already holds keys: use an empty directory.")
        if repo.root_keys.resolve() == keys.resolve():
            raise CeruleanError("The root keys need a directory of their own (they are kept "
                                "offline), not the online keys directory.")
        now = now or _now()
        root = Root(expires=now + EXPIRY["root"], consistent_snapshot=True)
        signers: dict[str, list[CryptoSigner]] = {}
        for role in ROLES:
            for _ in range(root_keys if role == "root" else 1):
                public, signer = generate_key(repo.root_keys if role == "root" else keys, role)
                root.add_key(public, role)
                signers.setdefault(role, []).append(signer)
        root.roles["root"].threshold = root_threshold
        with repo._locked():
            repo._write("root", Metadata(root), signers["root"])
            targets = Targets(expires=now + EXPIRY["targets"])
            repo._write("targets", Metadata(targets), signers["targets"])
            repo._commit(signers, now, targets.version)
        return repo

    @classmethod
    def open(cls, path: Path, keys: Path, root_keys: Path | None = None) -> Repository:
        return cls._check(cls(path, keys, root_keys))

    @classmethod
    def read_only(cls, path: Path) -> Repository:
        """The repository for reading: no keys, so nothing can be signed."""
        repo = cls(path, Path(os.devnull), Path(os.devnull), read_only=True)
        return cls._check(repo)

    @classmethod
    def _check(cls, repo: Repository) -> Repository:
        if not (repo.meta / "timestamp.json").is_file():
            raise CeruleanError(
                f"{repo.path} is not an update repository (no metadata/timestamp.json): "
                "create one with `cerulean release init`.")
        return repo

    # -- reading -----------------------------------------------------------------

    def root_version(self) -> int:
        versions = [int(p.name.split(".")[0]) for p in self.meta.glob("*.root.json")
                    if p.name.split(".")[0].isdigit()]
        if not versions:
            raise CeruleanError(f"{self.path} has no root metadata.")
        return max(versions)

    def load(self, role: str) -> Metadata:
        if role == "root":
            name = f"{self.root_version()}.root.json"
        elif role == "timestamp":
            name = "timestamp.json"
        elif role == "snapshot":
            ts: Timestamp = self.load("timestamp").signed
            name = f"{ts.snapshot_meta.version}.snapshot.json"
        else:
            snap: Snapshot = self.load("snapshot").signed
            name = f"{snap.meta['targets.json'].version}.targets.json"
        path = self.meta / name
        if not path.is_file():
            raise CeruleanError(f"The repository has no {name}.")
        try:
            return Metadata.from_bytes(path.read_bytes())
        except (OSError, ValueError) as e:
            raise CeruleanError(f"The repository's {name} cannot be read: {e}.") from e

    def targets(self) -> Targets:
        t: Targets = self.load("targets").signed
        return t

    def target_file(self, target_path: str) -> Path:
        """The local file of a published target (consistent-snapshot name)."""
        tf = self.targets().targets.get(target_path)
        if tf is None:
            raise CeruleanError(f"The repository has no target {target_path}.")
        d, _, name = target_path.rpartition("/")
        return self.targets_dir / d / f"{tf.hashes['sha256']}.{name}"

    def read_target(self, target_path: str) -> bytes:
        return self.target_file(target_path).read_bytes()

    def channel(self, name: str) -> ChannelDoc:
        path = channel_path(name)
        if path not in self.targets().targets:
            return ChannelDoc(name)
        try:
            return ChannelDoc.from_json(json.loads(self.read_target(path)))
        except (ValueError, ProtocolError) as e:
            raise CeruleanError(f"The repository's {path} is not valid: {e}") from e

    def channels(self) -> list[str]:
        names = []
        for path in self.targets().targets:
            m = re.fullmatch(r"channels/([a-z0-9-]+)\.json", path)
            if m:
                names.append(m[1])
        return sorted(names)

    # -- signing -----------------------------------------------------------------

    def signers(self, role: str, root: Root | None = None) -> list[CryptoSigner]:
        """The private keys of *role* that the current root trusts (at least its threshold)."""
        root = root or self.load("root").signed
        wanted = set(root.roles[role].keyids)
        where = self.root_keys if role == "root" else self.keys
        out = [load_signer(k.path, role) for k in key_files(where)
               if k.role == role and k.keyid in wanted]
        if len(out) < root.roles[role].threshold:
            hint = (" Root keys are kept offline: run this where they are, with --root-keys."
                    if role == "root" else "")
            raise CeruleanError(
                f"Signing {role} metadata needs {root.roles[role].threshold} of its keys, but "
                f"{where} has {len(out)}.{hint}")
        return out

    def _write(self, role: str, md: Metadata, signers: list[CryptoSigner]) -> None:
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)
        data = md.to_bytes(_SERIALIZER)
        if role == "timestamp":
            write_atomic(self.meta / "timestamp.json", data, durable=True)
            return
        write_atomic(self.meta / f"{md.signed.version}.{role}.json", data, durable=True)
        if role == "root":
            write_atomic(self.meta / "root.json", data, durable=True)

    def _commit(self, signers: dict[str, list[CryptoSigner]], now: datetime,
                targets_version: int) -> None:
        """A new snapshot naming *targets_version*, then a new timestamp (the commit point)."""
        try:
            snap: Snapshot = self.load("snapshot").signed
            snap.version += 1
        except CeruleanError:
            snap = Snapshot(expires=now + EXPIRY["snapshot"])
        snap.expires = now + EXPIRY["snapshot"]
        snap.meta["targets.json"] = MetaFile(version=targets_version)
        self._write("snapshot", Metadata(snap), signers["snapshot"])
        try:
            ts: Timestamp = self.load("timestamp").signed
            ts.version += 1
        except CeruleanError:
            ts = Timestamp(expires=now + EXPIRY["timestamp"])
        ts.expires = now + EXPIRY["timestamp"]
        ts.snapshot_meta = MetaFile(version=snap.version)
        self._write("timestamp", Metadata(ts), signers["timestamp"])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The repository's lock (one writer at a time, across processes); reentrant."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.meta.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    locked = _locked

    # -- changing ----------------------------------------------------------------

    def add_targets(self, files: dict[str, Path | bytes], *, now: datetime | None = None) -> int:
        """Add or replace targets (target path → local file or content) and commit.

        Returns the new targets version.
        """
        now = now or _now()
        with self._locked():
            root: Root = self.load("root").signed
            signers = {r: self.signers(r, root) for r in ("targets", "snapshot", "timestamp")}
            md = self.load("targets")
            targets: Targets = md.signed
            for tpath, src in files.items():
                if ".." in tpath or not TARGET_PATH.fullmatch(tpath):
                    raise CeruleanError(f"{tpath!r} is not a valid target path.")
                d, _, name = tpath.rpartition("/")
                with tempfile.NamedTemporaryFile(dir=self.path, delete=False) as tmp:
                    tmp_path = Path(tmp.name)
                try:
                    if isinstance(src, bytes):
                        tmp_path.write_bytes(src)
                    else:
                        shutil.copyfile(src, tmp_path)
                    tf = TargetFile.from_file(tpath, str(tmp_path), ["sha256"])
                    dest = self.targets_dir / d / f"{tf.hashes['sha256']}.{name}"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.chmod(tmp_path, 0o644)
                    os.replace(tmp_path, dest)
                finally:
                    tmp_path.unlink(missing_ok=True)
                targets.targets[tpath] = tf
            targets.version += 1
            targets.expires = now + EXPIRY["targets"]
            self._write("targets", md, signers["targets"])
            self._commit(signers, now, targets.version)
            return int(targets.version)

    def save_channel(self, doc: ChannelDoc, *, now: datetime | None = None) -> None:
        body = json.dumps(doc.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        self.add_targets({channel_path(doc.channel): body}, now=now)

    def _signed_by_current_keys(self, role: str, md: Metadata, root: Root) -> bool:
        from tuf.api.exceptions import UnsignedMetadataError

        try:
            root.verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError:
            return False
        return True

    def refresh(self, *, now: datetime | None = None, all_roles: bool = False) -> list[str]:
        """Re-sign the timestamp, and snapshot/targets when half their life is gone or
        when they are not signed by the keys the current root names (after a rotation).

        Returns the roles that were re-signed. Root is not among them: its keys are
        offline (see :meth:`renew_root`); :meth:`expiries` says when it is due.
        """
        now = now or _now()
        done = []
        with self._locked():
            root: Root = self.load("root").signed
            signers = {r: self.signers(r, root) for r in ONLINE_ROLES}
            md = self.load("targets")
            t: Targets = md.signed
            if all_roles or self._stale("targets", md, root, now, EXPIRY["targets"] / 2):
                t.version += 1
                t.expires = now + EXPIRY["targets"]
                self._write("targets", md, signers["targets"])
                done.append("targets")
            self._commit(signers, now, t.version)
            done += ["snapshot", "timestamp"]
        return done

    def refresh_due(self, now: datetime, margin: timedelta) -> bool:
        """Whether :meth:`refresh` has work: the timestamp expires within *margin*,
        snapshot or targets are past half their life, or an online role is not signed
        by the keys the current root names."""
        root: Root = self.load("root").signed
        return any(self._stale(role, self.load(role), root, now,
                               margin if role == "timestamp" else EXPIRY[role] / 2)
                   for role in ONLINE_ROLES)

    def _stale(self, role: str, md: Metadata, root: Root, now: datetime,
               margin: timedelta) -> bool:
        """Whether *role*'s metadata expires within *margin*, or is not signed by the keys
        the current root names for it."""
        return bool(md.signed.expires - now < margin
                    or not self._signed_by_current_keys(role, md, root))

    def expiries(self) -> dict[str, datetime]:
        """When each role's current metadata expires."""
        return {role: self.load(role).signed.expires for role in ROLES}

    # -- root ceremonies (where the root keys are) --------------------------------

    def _change_root(self, change: Callable[[Root], list[KeyFile]], *,
                     archive: Path | None, now: datetime | None,
                     online_changed: bool = False) -> list[str]:
        """Make root version N+1 with *change*, signed by a threshold of the old root's
        keys and of the new root's keys, then retire the keys *change* dropped.

        Returns what was done, one line each.
        """
        now = now or _now()
        if archive is not None:
            self._prepare_archive(archive)
        with self._locked():
            root_md = self.load("root")
            old = Metadata.from_bytes(root_md.to_bytes()).signed
            old_signers = self.signers("root", old)
            retired = change(root_md.signed)
            root: Root = root_md.signed
            root.version += 1
            root.expires = now + EXPIRY["root"]
            for role in ROLES:
                r = root.roles[role]
                if not 1 <= r.threshold <= len(r.keyids):
                    raise CeruleanError(
                        f"The {role} threshold must be between 1 and its number of keys "
                        f"({len(r.keyids)}); it would be {r.threshold}.")
            new_signers = self.signers("root", root)
            by_id = {s.public_key.keyid: s for s in old_signers + new_signers}
            self._write("root", root_md, list(by_id.values()))
            done = [f"root v{root.version} written, expires {root.expires:%Y-%m-%d}"]
            for k in retired:
                done.append(retire(k, archive, self.path))
            try:
                resigned = self.refresh(now=now)
            except CeruleanError as e:
                if not online_changed:
                    return done
                done.append(f"the online metadata still needs re-signing with the new keys "
                            f"({e}); run `cerulean release refresh` where the online keys are")
            else:
                done.append(f"re-signed {', '.join(resigned)}")
            return done

    def _prepare_archive(self, archive: Path) -> None:
        """Make sure retired keys can go to *archive* before anything is changed."""
        from cerulean.release.keys import inside

        refuse_inside_repo(archive, self.path, "archive")
        for d in (self.keys, self.root_keys):
            if inside(archive, d) or inside(d, archive):
                raise CeruleanError(f"The archive {archive} must be a directory of its own, "
                                    f"apart from the key directory {d}.")
        try:
            archive.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise CeruleanError(f"The archive {archive} cannot be made: "
                                f"{e.strerror or e}.") from e
        if not archive.is_dir() or not os.access(archive, os.W_OK):
            raise CeruleanError(f"The archive {archive} is not a writable directory.")

    def forkable_roots(self) -> list[int]:
        """Older root versions whose threshold the keys retired since can meet alone: a
        host that still trusts one of them (an image built with it, never updated) can
        be forked by whoever holds those retired keys."""
        current: Root = self.load("root").signed
        keep = set(current.roles["root"].keyids)
        out = []
        for v in range(1, int(current.version)):
            path = self.meta / f"{v}.root.json"
            try:
                old: Root = Metadata.from_bytes(path.read_bytes()).signed
            except (OSError, ValueError):
                continue
            retired = set(old.roles["root"].keyids) - keep
            if len(retired) >= old.roles["root"].threshold:
                out.append(v)
        return out

    def stray_keys(self) -> list[KeyFile]:
        """Key files here that the current root no longer names (retired but not
        destroyed, say by a power cut in a ceremony; or made by one that failed)."""
        root: Root = self.load("root").signed
        return [k for d in (self.keys, self.root_keys) for k in key_files(d)
                if k.keyid not in root.roles[k.role].keyids]

    def renew_root(self, *, now: datetime | None = None) -> list[str]:
        """A new root version with the same keys and a fresh expiry."""
        return self._change_root(lambda _root: [], archive=None, now=now)

    def rotate_key(self, role: str, keyid: str | None = None, *, archive: Path | None = None,
                   now: datetime | None = None) -> list[str]:
        """Replace one key of *role* (*keyid*), or each of its keys, by a new one.

        The number of keys and the threshold stay as they are. Root itself rotates
        one key at a time or all at once; either way the new root is signed by a
        threshold of the old keys and of the new ones. The replaced private keys
        are destroyed, or moved to *archive* (outside the repository).
        """
        if role not in ROLES:
            raise CeruleanError(f"{role!r} is not a TUF role ({', '.join(ROLES)}).")

        def change(root: Root) -> list[KeyFile]:
            ids = list(root.roles[role].keyids)
            if keyid is not None:
                match = [k for k in ids if k.startswith(keyid)]
                if len(match) != 1:
                    raise CeruleanError(
                        f"{keyid!r} names {'no' if not match else 'more than one'} {role} "
                        f"key; the {role} keys are {', '.join(k[:16] for k in ids)}.")
                ids = match
            where = self.root_keys if role == "root" else self.keys
            have = {k.keyid: k for k in key_files(where) if k.role == role}
            for old_id in ids:
                public, _signer = generate_key(where, role)
                root.revoke_key(old_id, role)
                root.add_key(public, role)
            return [have[i] for i in ids if i in have]

        return self._change_root(change, archive=archive, now=now,
                                 online_changed=role != "root")

    def set_threshold(self, role: str, threshold: int, *, add_keys: int = 0,
                      one_root_signature: bool = False,
                      now: datetime | None = None) -> list[str]:
        """Change *role*'s threshold, after adding *add_keys* new keys to it."""
        if role not in ROLES:
            raise CeruleanError(f"{role!r} is not a TUF role ({', '.join(ROLES)}).")
        if role == "root":
            _check_root_threshold(threshold, one_root_signature)
        if add_keys < 0:
            raise CeruleanError("--add-keys cannot be negative.")

        def change(root: Root) -> list[KeyFile]:
            where = self.root_keys if role == "root" else self.keys
            for _ in range(add_keys):
                public, _signer = generate_key(where, role)
                root.add_key(public, role)
            root.roles[role].threshold = threshold
            return []

        return self._change_root(change, archive=None, now=now,
                                 online_changed=role != "root")
