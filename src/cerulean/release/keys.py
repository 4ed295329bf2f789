"""The update repository's private keys: where they live, how they are sealed, how they go.

Two directories, as TUF intends:

- the **online keys** (``targets``, ``snapshot``, ``timestamp``) sign every
  publication and every timestamp renewal, so they live on the publishing
  host (``releases/keys``);
- the **root keys** sign only changes of root itself (a rotation, a new
  threshold, a renewal before expiry). They are made into their own directory
  (``releases/root-keys``), meant to be moved to removable media and used on
  an offline machine for a root ceremony.

A key file is one ed25519 private key in PKCS#8 PEM, ``ROLE-KEYID.pem``, mode
0600 in a 0700 directory. It is sealed with a passphrase when one is given:

- online keys: the environment variable ``CERULEAN_KEYS_PASSPHRASE`` or the
  systemd credential ``cerulean.keys-passphrase``;
- root keys: ``CERULEAN_ROOT_KEYS_PASSPHRASE`` or the credential
  ``cerulean.root-keys-passphrase``.

Neither directory may lie inside the served repository, and nothing serves a
directory that holds a private key (:func:`keys_under`). A retired key is
destroyed (overwritten, synced and removed), or moved to an archive
directory outside the repository when asked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from securesystemslib.signer import CryptoSigner, SSlibKey

from cerulean.agent.fileio import fsync_dir, write_atomic
from cerulean.errors import CeruleanError

ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
KEY_NAME = re.compile(r"(root|targets|snapshot|timestamp)-([0-9a-f]{64})\.pem")
PASSPHRASE_ENV = {"online": "CERULEAN_KEYS_PASSPHRASE", "root": "CERULEAN_ROOT_KEYS_PASSPHRASE"}
PASSPHRASE_CREDENTIAL = {"online": "cerulean.keys-passphrase",
                         "root": "cerulean.root-keys-passphrase"}
# A key file is a few hundred bytes; a scan for keys reads no more than this of a file.
_KEY_SCAN_BYTES = 64 * 1024
_KEY_SCAN_FILES = 200_000


@dataclass(frozen=True)
class KeyFile:
    role: str
    keyid: str
    path: Path


def kind_of(role: str) -> str:
    return "root" if role == "root" else "online"


def passphrase(kind: str) -> bytes | None:
    """The passphrase that seals *kind* ("online" or "root") keys, if one is given."""
    value = os.environ.get(PASSPHRASE_ENV[kind])
    if value is None:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds:
            try:
                value = (Path(creds) / PASSPHRASE_CREDENTIAL[kind]).read_text().rstrip("\n")
            except FileNotFoundError:
                value = None
            except OSError as e:
                raise CeruleanError(f"The credential {PASSPHRASE_CREDENTIAL[kind]} cannot be "
                                    f"read: {e.strerror or e}.") from e
    if value is None:
        return None
    if not value:
        raise CeruleanError(f"The passphrase in {PASSPHRASE_ENV[kind]} (or the credential "
                            f"{PASSPHRASE_CREDENTIAL[kind]}) is empty.")
    return value.encode()


def inside(path: Path, parent: Path) -> bool:
    """Whether *path* is *parent* or lies under it, links resolved."""
    p, q = path.resolve(), parent.resolve()
    return p == q or q in p.parents


def refuse_inside_repo(keys: Path, repo: Path, what: str = "keys") -> None:
    if inside(keys, repo):
        raise CeruleanError(
            f"The {what} directory {keys} lies inside the served repository {repo}: anyone "
            "could download the private keys from it. Keep keys outside the repository.")
    if inside(repo, keys):
        raise CeruleanError(
            f"The repository {repo} lies inside the {what} directory {keys}: keep them apart.")


def generate_key(keys_dir: Path, role: str) -> tuple[SSlibKey, CryptoSigner]:
    """A new ed25519 key for *role*, written to *keys_dir* (0600) before it is used."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(keys_dir, 0o700)
    private = ed25519.Ed25519PrivateKey.generate()
    public = SSlibKey.from_crypto(private.public_key())
    secret = passphrase(kind_of(role))
    if secret is None and any(b"ENCRYPTED PRIVATE KEY" in k.path.read_bytes()
                              for k in key_files(keys_dir)):
        kind = kind_of(role)
        raise CeruleanError(
            f"The keys in {keys_dir} are sealed with a passphrase, and a new {role} key would "
            f"not be: give the passphrase in {PASSPHRASE_ENV[kind]} or the systemd "
            f"credential {PASSPHRASE_CREDENTIAL[kind]}.")
    sealing: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(secret) if secret
        else serialization.NoEncryption())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                sealing)
    write_atomic(keys_dir / f"{role}-{public.keyid}.pem", pem, 0o600, durable=True)
    return public, CryptoSigner(private, public)


def load_signer(path: Path, role: str | None = None) -> CryptoSigner:
    role = role or (m[1] if (m := KEY_NAME.fullmatch(path.name)) else "targets")
    kind = kind_of(role)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CeruleanError(f"The key {path} cannot be read: {e.strerror or e}.") from e
    sealed = b"ENCRYPTED PRIVATE KEY" in data
    secret = passphrase(kind) if sealed else None
    if sealed and secret is None:
        raise CeruleanError(
            f"The key {path} is sealed with a passphrase: give it in {PASSPHRASE_ENV[kind]} "
            f"or the systemd credential {PASSPHRASE_CREDENTIAL[kind]}.")
    try:
        private = serialization.load_pem_private_key(data, password=secret)
    except (ValueError, TypeError) as e:
        why = "the passphrase is wrong" if sealed else str(e).rstrip(".")
        raise CeruleanError(f"The key {path} cannot be opened: {why}.") from e
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise CeruleanError(f"The key {path} is not an ed25519 private key.")
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def key_files(keys_dir: Path) -> list[KeyFile]:
    out = []
    for p in sorted(keys_dir.glob("*.pem")) if keys_dir.is_dir() else []:
        if m := KEY_NAME.fullmatch(p.name):
            out.append(KeyFile(m[1], m[2], p))
    return out


def destroy(path: Path) -> None:
    """Overwrite a key file with random bytes, sync it, and remove it.

    On flash media and copy-on-write file systems the old blocks may survive;
    the root keys' removable medium is then to be wiped or destroyed as a whole.
    """
    try:
        size = path.stat().st_size
        with path.open("r+b") as f:
            f.write(os.urandom(max(size, 1)))
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
    except OSError as e:
        raise CeruleanError(f"The retired key {path} could not be destroyed: "
                            f"{e.strerror or e}.") from e
    fsync_dir(path.parent)


def retire(k: KeyFile, archive: Path | None, repo: Path) -> str:
    """Destroy a retired key, or move it into *archive* (outside the repository)."""
    if archive is None:
        destroy(k.path)
        return f"destroyed {k.path.name}"
    refuse_inside_repo(archive, repo, "archive")
    archive.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(archive, 0o700)
    write_atomic(archive / k.path.name, k.path.read_bytes(), 0o600, durable=True)
    destroy(k.path)
    return f"archived {k.path.name} in {archive}"


def _walk(top: Path) -> Iterator[Path]:
    """Every file under *top*, following links to directories (a served tree's links are
    followed by the server too), each real directory once."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def keys_under(top: Path) -> list[Path]:
    """Private keys anywhere under *top*, links followed: files named like key files, and
    files that begin with a PEM private key (a directory about to be served must have
    none). A tree too big to look through whole counts as holding keys."""
    found = []
    for n, p in enumerate(_walk(top)):
        if n >= _KEY_SCAN_FILES:
            found.append(top / f"(more than {_KEY_SCAN_FILES} files: not all were checked)")
            break
        if KEY_NAME.fullmatch(p.name):
            found.append(p)
            continue
        try:
            with p.open("rb") as f:
                head = f.read(_KEY_SCAN_BYTES)
        except OSError:
            continue
        if b"PRIVATE KEY-----" in head:
            found.append(p)
    return found


def refuse_to_serve(top: Path) -> None:
    found = keys_under(top)
    if found:
        shown = ", ".join(str(p) for p in found[:3]) + (" …" if len(found) > 3 else "")
        raise CeruleanError(
            f"{top} holds private keys ({shown}); it will not be served. Move the keys "
            "out of the repository and create new ones: these may already have leaked.")
