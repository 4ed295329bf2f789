"""The content-addressed cache: every blob is stored under its sha256.

A blob is only ever moved into place after its size and hash were checked,
and it is checked again whenever it is read for a build, so a file altered in
the cache is noticed instead of being built into an image.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cerulean.agent.fileio import write_atomic
from cerulean.errors import CeruleanError, VerificationError

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cerulean"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Cache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else DEFAULT_CACHE
        try:
            (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CeruleanError(f"The cache directory {self.root} cannot be created: {e}.") from e

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256

    def has(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def read_verified(self, sha256: str, size: int | None, what: str) -> bytes:
        """The blob's bytes, after checking them against the expected hash and size."""
        path = self.blob_path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CeruleanError(f"{what} is not in the cache {self.root}.") from None
        if size is not None and len(data) != size:
            raise VerificationError(
                f"{what} in the cache has {len(data)} bytes instead of {size}: "
                f"the cached file {path} was altered (delete it to fetch it again)."
            )
        if hashlib.sha256(data).hexdigest() != sha256:
            raise VerificationError(
                f"{what} in the cache does not match its sha256: the cached file {path} "
                "was altered (delete it to fetch it again)."
            )
        return data

    def verify_file(self, sha256: str, size: int | None, what: str) -> Path:
        """Check the cached blob on disk (streaming) and return its path."""
        path = self.blob_path(sha256)
        if not path.is_file():
            raise CeruleanError(f"{what} is not in the cache {self.root}.")
        if size is not None and path.stat().st_size != size:
            raise VerificationError(
                f"{what} in the cache has the wrong size: the cached file {path} was altered "
                "(delete it to fetch it again)."
            )
        if sha256_file(path) != sha256:
            raise VerificationError(
                f"{what} in the cache does not match its sha256: the cached file {path} "
                "was altered (delete it to fetch it again)."
            )
        return path

    def put(self, data: bytes, sha256: str | None = None) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and digest != sha256:
            raise VerificationError("Data to be cached does not match its expected sha256.")
        path = self.blob_path(digest)
        if not path.exists():
            write_atomic(path, data)
        return digest

    def state_path(self, *parts: str) -> Path:
        """A path for mutable state (such as the last verified InRelease of a suite)."""
        p = self.root.joinpath("state", *parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def subdir(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return p
