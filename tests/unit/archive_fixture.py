"""A synthetic, signed Debian archive served over local HTTP, for archive-access tests.

* ``gpg_keys`` (session): two ed25519 keys made with gpg in a temporary GNUPGHOME
  (:mod:`support.openpgp`), a "trusted" one (exported alone to a binary keyring,
  the one Cerulean is given) and an "unknown" one.
* ``archive_server``: a ThreadingHTTPServer on 127.0.0.1 serving an in-memory
  ``{path: bytes}`` map, with injectable HTTP errors and a request log.
* ``archive``: a :class:`SyntheticArchive` on that server, laid out like Debian's
  (``dists/<suite>/InRelease``, ``main/binary-amd64/Packages.xz`` and its by-hash
  copy, ``pool/main/...``), already published with a few packages.

Use them from a test module with ``from archive_fixture import ...`` (this
directory is on sys.path in pytest's default "prepend" import mode).
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cerulean.debian import fetch
from cerulean.debian.archive import ArchiveConfig
from cerulean.debian.cache import Cache
from support.debfactory import index_entry, make_deb
from support.loopback import no_proxy
from support.openpgp import GpgKeys, make_keys, stop_agent

SUITE = "testing"
ARCH = "amd64"


# --- OpenPGP keys -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gpg_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpgKeys]:
    if shutil.which("gpg") is None:
        pytest.skip("gpg is needed to sign the synthetic archive (install gnupg)")
    keys = make_keys(tmp_path_factory.mktemp("gnupg"))
    try:
        yield keys
    finally:
        stop_agent(keys.home)


# --- HTTP server ------------------------------------------------------------------------------


class ArchiveServer:
    """Serves ``files`` ({"dists/...": bytes}) at ``url``; ``faults`` queues error answers."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[int]] = {}  # path -> HTTP statuses to answer first, in order
        self.requests: list[str] = []  # every GET path, in order
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0].lstrip("/")
                with owner.lock:
                    owner.requests.append(path)
                    queue = owner.faults.get(path)
                    status = queue.pop(0) if queue else 200
                    body = owner.files.get(path)
                if status == 200 and body is None:
                    status = 404
                if status != 200:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                assert body is not None
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/debian"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def requested(self, path: str) -> int:
        """How many times *path* was asked for."""
        with self.lock:
            return self.requests.count(path)


@pytest.fixture
def archive_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ArchiveServer]:
    # httpx honours proxy variables; keep every request on the loopback server.
    no_proxy(monkeypatch)
    server = ArchiveServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(5)


class _ServerFiles:
    """``server.files`` keyed relative to the mirror URL (the server mounts it at /debian)."""

    def __init__(self, server: ArchiveServer) -> None:
        self.server = server

    def _key(self, path: str) -> str:
        return f"debian/{path}"

    def __setitem__(self, path: str, data: bytes) -> None:
        self.server.files[self._key(path)] = data

    def __getitem__(self, path: str) -> bytes:
        return self.server.files[self._key(path)]

    def __delitem__(self, path: str) -> None:
        del self.server.files[self._key(path)]

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._key(path) in self.server.files


# --- the archive ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolDeb:
    name: str
    version: str
    arch: str
    filename: str  # pool path, relative to the mirror
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)


def release_date(d: datetime) -> str:
    """A date the way Debian's Release files write it."""
    return d.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S UTC")


@dataclass
class SyntheticArchive:
    server: ArchiveServer
    keys: GpgKeys
    suite: str = SUITE
    debs: list[PoolDeb] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)  # time.sleep calls made by fetch
    # What the last publish() wrote:
    release_text: bytes = b""
    inrelease: bytes = b""
    packages_text: bytes = b""
    packages_xz: bytes = b""
    date: datetime | None = None

    def __post_init__(self) -> None:
        self.files = _ServerFiles(self.server)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def cfg(self) -> ArchiveConfig:
        return ArchiveConfig(mirror=self.url, security_mirror=self.url, suites=(self.suite,),
                             components=("main",))

    @property
    def keyring(self) -> Path:
        return self.keys.keyring

    def dist(self, path: str = "") -> str:
        """A path under dists/<suite>/, relative to the mirror."""
        return f"dists/{self.suite}/{path}".rstrip("/")

    @property
    def index_path(self) -> str:
        return f"main/binary-{ARCH}/Packages.xz"

    @property
    def by_hash_path(self) -> str:
        return f"main/binary-{ARCH}/by-hash/SHA256/{hashlib.sha256(self.packages_xz).hexdigest()}"

    def deb(self, name: str) -> PoolDeb:
        return next(d for d in self.debs if d.name == name)

    def add(self, name: str, version: str, arch: str = ARCH, depends: str = "",
            files: dict[str, bytes] | None = None, **kwargs: Any) -> PoolDeb:
        """Build a .deb with :func:`make_deb` and put it in the pool (publish() lists it)."""
        data = make_deb(name, version, arch, depends, files, **kwargs)
        src = str(kwargs.get("source") or name).split()[0]
        upstream = version.split(":", 1)[-1]
        prefix = src[:4] if src.startswith("lib") else src[0]
        deb = PoolDeb(name, version, arch, f"pool/main/{prefix}/{src}/{name}_{upstream}_{arch}.deb",
                      data)
        self.debs.append(deb)
        self.files[deb.filename] = data
        return deb

    def add_defaults(self) -> None:
        self.add("base-files", "13.8", "all", files={"etc/debian_version": b"13.0\n"},
                 extra_control={"Essential": "yes", "Priority": "required"})
        self.add("libgreet1", "1.2-1+b1", ARCH,
                 files={"usr/lib/x86_64-linux-gnu/libgreet.so.1": b"\x7fELF libgreet"},
                 source="greet (1.2-1)", extra_control={"Multi-Arch": "same"})
        self.add("hello", "2.10-3", ARCH, "libgreet1 (>= 1.0), base-files",
                 files={"usr/bin/hello": b"#!/bin/sh\necho hello\n"}, source="hello-src")

    def publish(
        self,
        *,
        date: datetime | None = None,
        valid_for: timedelta | None = timedelta(days=7),
        codename: str | None = None,
        signer: str | None = None,
        by_hash: bool = True,
    ) -> None:
        """Write Packages.xz (+ by-hash copy), Release and InRelease for the pool's debs."""
        self.date = date or datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
        paras = [index_entry(d.data, d.filename) for d in sorted(self.debs, key=lambda d: d.name)]
        self.packages_text = "\n".join(paras).encode()
        self.packages_xz = lzma.compress(self.packages_text, format=lzma.FORMAT_XZ)
        indexes = {
            f"main/binary-{ARCH}/Packages": self.packages_text,
            self.index_path: self.packages_xz,
        }
        for rel, data in indexes.items():
            self.files[self.dist(rel)] = data
            if by_hash:
                d = rel.rsplit("/", 1)[0]
                self.files[self.dist(f"{d}/by-hash/SHA256/{hashlib.sha256(data).hexdigest()}")] = (
                    data
                )
        lines = [
            "Origin: Cerulean Tests",
            "Label: Cerulean Tests",
            f"Suite: {codename or self.suite}",
            f"Codename: {codename or self.suite}",
            f"Date: {release_date(self.date)}",
        ]
        if valid_for is not None:
            lines.append(f"Valid-Until: {release_date(self.date + valid_for)}")
        lines += [
            f"Acquire-By-Hash: {'yes' if by_hash else 'no'}",
            "No-Support-for-Architecture-all: Packages",
            f"Architectures: {ARCH}",
            "Components: main",
            "Description: synthetic archive for Cerulean's tests",
            "MD5Sum:",
            *(f" {hashlib.md5(d).hexdigest()} {len(d):>16} {p}" for p, d in indexes.items()),
            "SHA256:",
            *(f" {hashlib.sha256(d).hexdigest()} {len(d):>16} {p}" for p, d in indexes.items()),
        ]
        self.release_text = ("\n".join(lines) + "\n").encode()
        self.inrelease = self.keys.clearsign(self.release_text, signer or self.keys.trusted)
        self.files[self.dist("Release")] = self.release_text
        self.files[self.dist("InRelease")] = self.inrelease


@pytest.fixture
def archive_cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


@pytest.fixture
def archive(
    archive_server: ArchiveServer, gpg_keys: GpgKeys, monkeypatch: pytest.MonkeyPatch
) -> SyntheticArchive:
    """A published archive with base-files (all), libgreet1 and hello; fetch never sleeps."""
    a = SyntheticArchive(archive_server, gpg_keys)
    # Retries and the by-hash fallback back off with time.sleep: record instead of waiting.
    monkeypatch.setattr(fetch, "time", SimpleNamespace(sleep=a.sleeps.append,
                                                       monotonic=time.monotonic))
    a.add_defaults()
    a.publish()
    return a
