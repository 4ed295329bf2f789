"""The update repository, secured with TUF (python-tuf's Metadata API).

Layout of a repository directory (serve it as static files over HTTP(S)):

    metadata/N.root.json       every root version (clients walk the chain)
    metadata/root.json         the newest root, to bootstrap an image's trust
    metadata/N.targets.json    consistent snapshots: one file per version
    metadata/N.snapshot.json
    metadata/timestamp.json    the one file clients fetch first, rewritten last
    targets/.../SHA256.NAME    payloads and documents, named by their hash

Private keys live in a separate directory (never served), one PEM file per
key, ``ROLE-KEYID.pem``, mode 0600. Every change to the repository writes new
files first and replaces ``timestamp.json`` last, under a lock, so a client
never sees a half-published state.

Roles and their default expiry: root 365 days, targets 90, snapshot 7,
timestamp 1 (re-sign it with ``cerulean release refresh`` from a timer).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from securesystemslib.signer import CryptoSigner, SSlibKey
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

ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY = {"root": timedelta(days=365), "targets": timedelta(days=90),
          "snapshot": timedelta(days=7), "timestamp": timedelta(days=1)}
_SERIALIZER = JSONSerializer(compact=False)
TARGET_PATH = re.compile(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*")


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class KeyFile:
    role: str
    keyid: str
    path: Path


def generate_key(keys_dir: Path, role: str) -> tuple[SSlibKey, CryptoSigner]:
    """A new ed25519 key for *role*, written to *keys_dir* (0600) before it is used."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(keys_dir, 0o700)
    private = ed25519.Ed25519PrivateKey.generate()
    public = SSlibKey.from_crypto(private.public_key())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    write_atomic(keys_dir / f"{role}-{public.keyid}.pem", pem, 0o600, durable=True)
    return public, CryptoSigner(private, public)


def load_signer(path: Path) -> CryptoSigner:
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise CeruleanError(f"The key {path} cannot be read: {e}.") from e
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise CeruleanError(f"The key {path} is not an ed25519 private key.")
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def key_files(keys_dir: Path) -> list[KeyFile]:
    out = []
    for p in sorted(keys_dir.glob("*.pem")) if keys_dir.is_dir() else []:
        m = re.fullmatch(r"(root|targets|snapshot|timestamp)-([0-9a-f]{64})\.pem", p.name)
        if m:
            out.append(KeyFile(m[1], m[2], p))
    return out


class Repository:
    """A TUF repository on disk and the keys that sign it."""

    def __init__(self, path: Path, keys: Path) -> None:
        self.path = path
        self.keys = keys
        self.meta = path / "metadata"
        self.targets_dir = path / "targets"

    # -- creating ----------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, keys: Path, *, root_keys: int = 1, root_threshold: int = 1,
               now: datetime | None = None) -> Repository:
        if root_threshold < 1 or root_threshold > root_keys:
            raise CeruleanError(
                f"The root threshold must be between 1 and the number of root keys "
                f"({root_keys}); got {root_threshold}.")
        if (path / "metadata").exists():
            raise CeruleanError(f"{path} already holds an update repository.")
        if key_files(keys):
            raise CeruleanError(f"{keys} already holds keys: use an empty directory.")
        now = now or _now()
        repo = cls(path, keys)
        root = Root(expires=now + EXPIRY["root"], consistent_snapshot=True)
        signers: dict[str, list[CryptoSigner]] = {}
        for role in ROLES:
            for _ in range(root_keys if role == "root" else 1):
                public, signer = generate_key(keys, role)
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
    def open(cls, path: Path, keys: Path) -> Repository:
        repo = cls(path, keys)
        if not (repo.meta / "timestamp.json").is_file():
            raise CeruleanError(
                f"{path} is not an update repository (no metadata/timestamp.json): "
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
        out = [load_signer(k.path) for k in key_files(self.keys)
               if k.role == role and k.keyid in wanted]
        if len(out) < root.roles[role].threshold:
            raise CeruleanError(
                f"Signing {role} metadata needs {root.roles[role].threshold} of its keys, but "
                f"{self.keys} has {len(out)}.")
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
        self.meta.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

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

    def refresh(self, *, now: datetime | None = None, all_roles: bool = False) -> list[str]:
        """Re-sign the timestamp, and snapshot/targets when half their life is gone.

        Returns the roles that were re-signed.
        """
        now = now or _now()
        done = []
        with self._locked():
            root: Root = self.load("root").signed
            signers = {r: self.signers(r, root) for r in ("targets", "snapshot", "timestamp")}
            md = self.load("targets")
            t: Targets = md.signed
            if all_roles or t.expires - now < EXPIRY["targets"] / 2:
                t.version += 1
                t.expires = now + EXPIRY["targets"]
                self._write("targets", md, signers["targets"])
                done.append("targets")
            self._commit(signers, now, t.version)
            done += ["snapshot", "timestamp"]
        return done

    def rotate_key(self, role: str, *, now: datetime | None = None) -> str:
        """Replace *role*'s keys with one new key; returns the new key ID.

        A new root version lists the new key and drops the old ones. It is
        signed by the old root keys (so clients can verify the step) and, when
        root itself rotates, by the new one too. The role's metadata is then
        re-signed with the new key; the old private keys move to
        ``KEYS/retired/``.
        """
        if role not in ROLES:
            raise CeruleanError(f"{role!r} is not a TUF role ({', '.join(ROLES)}).")
        now = now or _now()
        with self._locked():
            root_md = self.load("root")
            root: Root = root_md.signed
            old_root_signers = self.signers("root", root)
            old_ids = list(root.roles[role].keyids)
            public, signer = generate_key(self.keys, role)
            for keyid in old_ids:
                root.revoke_key(keyid, role)
            root.add_key(public, role)
            root.roles[role].threshold = 1
            root.version += 1
            root.expires = now + EXPIRY["root"]
            root_signers = old_root_signers + ([signer] if role == "root" else [])
            self._write("root", root_md, root_signers)
            retired = self.keys / "retired"
            retired.mkdir(mode=0o700, exist_ok=True)
            for k in key_files(self.keys):
                if k.role == role and k.keyid in old_ids:
                    os.replace(k.path, retired / k.path.name)
            signers = {r: self.signers(r, root) for r in ("targets", "snapshot", "timestamp")}
            md = self.load("targets")
            t: Targets = md.signed
            t.version += 1
            t.expires = now + EXPIRY["targets"]
            self._write("targets", md, signers["targets"])
            self._commit(signers, now, t.version)
            return str(public.keyid)
