"""A local, signed stand-in for trixie-security, served over HTTP on loopback.

:class:`SecurityArchive` starts as a copy of the real security suite: its
InRelease is downloaded from the security mirror the host uses (see
:func:`cerulean.debian.archive.default_archive`) and verified the way Cerulean
verifies it (Debian's archive keys, Valid-Until, the hashes of the indexes),
and the very same Packages stanzas are published again in a local suite of the
same name, signed with a test key. A pool file the local archive does not hold
is answered with a redirect to the real security mirror, so an image's lock
resolves against the local suite exactly as against the real one. On top of
that, :meth:`SecurityArchive.add_fix` publishes a "security fix": a package an
image's lock holds, repacked with a higher version and a changelog entry naming
a CVE.

An image definition uses it with, in its ``[archive]`` table::

    security-mirror = "<archive.url>"
    keyring = "<archive.keyring>"    # Debian's archive keys plus the test key

Use::

    keys = support.openpgp.make_keys(tmp / "gnupg")
    with SecurityArchive(tmp / "security", keys, cache=Cache(...)) as archive:
        ...  # lock against archive.url (trusting archive.keyring)
        archive.add_fix("less", ("amd64", "arm64"), "CVE-2026-0001", lock=vm_lock)
        ...  # `cerulean lock --refresh security` now moves less and names the CVE

Publishing is atomic for a reader: pool files and the indexes (by hash, and
never overwritten there) come first, the plain index names and Release next,
and InRelease is replaced last. The suite's Date only ever moves forward, as
Cerulean refuses Release files older than a lock's snapshot.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from debian.debian_support import Version

from cerulean.debian import KEYRING
from cerulean.debian.archive import ArchiveConfig, default_archive
from cerulean.debian.cache import Cache
from cerulean.debian.deb import ar_members, decompress, parse_control, read_deb
from cerulean.debian.fetch import Download, client, fetch_all
from cerulean.debian.lock import Lock, LockedPackage, read_lock
from cerulean.debian.release import Release, load_release
from support.debfactory import ar_archive, compress, index_entry
from support.openpgp import GpgKeys

SUITE = "trixie-security"
MAINTAINER = "Cerulean Tests <tests@example.invalid>"


def release_date(d: datetime) -> str:
    """A date the way Debian's Release files write it."""
    return d.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S UTC")


def version_newer(new: str, old: str) -> bool:
    """Whether dpkg sorts *new* after *old* (dpkg itself when there is one)."""
    dpkg = shutil.which("dpkg")
    if dpkg is not None:
        return subprocess.run([dpkg, "--compare-versions", new, "gt", old],
                              check=False).returncode == 0
    return Version(new) > Version(old)


@dataclass(frozen=True)
class Fix:
    """A package :meth:`SecurityArchive.add_fix` published."""

    name: str
    old_version: str
    version: str
    cve: str
    debs: dict[str, str]  # architecture -> pool path (an arch:all package: one file)


def _rewrite_tar(data: bytes, replace: dict[str, bytes]) -> bytes:
    """*data* (a tar) again, member for member, with the files named in *replace* changed."""
    out = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as dst:
        for m in src:
            name = m.name.removeprefix("./")
            if name in replace:
                if not m.isfile():
                    raise AssertionError(f"{m.name} is not a regular file in the package")
                body = replace[name]
                m.size = len(body)
                dst.addfile(m, io.BytesIO(body))
                seen.add(name)
            elif m.isfile():
                dst.addfile(m, src.extractfile(m))
            else:
                dst.addfile(m)
    missing = set(replace) - seen
    if missing:
        raise AssertionError(f"the package has no {', '.join(sorted(missing))}")
    return out.getvalue()


def _kind(member: str) -> str:
    """The compression suffix of a .deb member ("xz" for data.tar.xz, "" for data.tar)."""
    return member.rsplit(".", 1)[1] if member.count(".") > 1 else ""


def changelog_entry(source: str, version: str, cve: str, when: datetime) -> str:
    return (
        f"{source} ({version}) {SUITE}; urgency=high\n\n"
        f"  * Fix {cve}: a test security update, published by a local archive.\n\n"
        f" -- {MAINTAINER}  {when.astimezone(UTC).strftime('%a, %d %b %Y %H:%M:%S +0000')}\n\n"
    )


def repack(deb: bytes, pkg: LockedPackage, version: str, cve: str, when: datetime) -> bytes:
    """*deb* (the package *pkg*) as *version*, with a changelog entry naming *cve* on top.

    The entry goes into changelog.Debian.gz, or changelog.gz in a native package.

    Every other file, mode and owner stays as it was; md5sums follows the new
    changelog, and both archive members keep their compression.
    """
    members = ar_members(deb, pkg.label)
    cname = next(n for n in members if n.startswith("control.tar"))
    dname = next(n for n in members if n.startswith("data.tar"))
    control_tar = decompress(cname, members[cname], pkg.label)
    data_tar = decompress(dname, members[dname], pkg.label)
    # Debian's changelog (changelog.gz in a native package), as Cerulean reads it.
    logs: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data_tar)) as tf:
        for m in tf:
            name = m.name.removeprefix("./")
            if name.startswith(f"usr/share/doc/{pkg.name}/changelog") and m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                logs[name] = f.read()
    doc = next((d for d in (f"usr/share/doc/{pkg.name}/changelog.Debian.gz",
                            f"usr/share/doc/{pkg.name}/changelog.gz") if d in logs), "")
    if not doc:
        raise AssertionError(f"{pkg.label} has no changelog of its own: pick another package")
    old_log = gzip.decompress(logs[doc]).decode()
    new_log = gzip.compress(
        (changelog_entry(pkg.source, version, cve, when) + old_log).encode(), mtime=0)
    control_files = read_deb(deb, pkg.label).control
    control = parse_control(control_files["control"])
    md5sums = control_files["md5sums"].decode()
    control["Version"] = version
    # The binary's version is the new source version (a binNMU suffix goes with it).
    if pkg.source != pkg.name:
        control["Source"] = pkg.source
    else:
        control.pop("Source", None)
    control_text = "".join(f"{k}: {v}\n" for k, v in control.items()).encode()
    new_sum = hashlib.md5(new_log).hexdigest()
    md5_lines = [f"{new_sum}  {doc}" if line.endswith(f"  {doc}") else line
                 for line in md5sums.splitlines()]
    control_tar = _rewrite_tar(control_tar, {
        "control": control_text, "md5sums": ("\n".join(md5_lines) + "\n").encode()})
    data_tar = _rewrite_tar(data_tar, {doc: new_log})
    return ar_archive([
        ("debian-binary", members["debian-binary"]),
        (cname, compress(control_tar, _kind(cname))),
        (dname, compress(data_tar, _kind(dname))),
    ])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    archive: SecurityArchive


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        a = self.server.archive
        path = self.path.split("?", 1)[0]
        with a.lock:
            a.requests.append(path)
        local = a.root / path.lstrip("/")
        if path.startswith("/pool/") and ".." not in path and not local.is_file():
            # Everything the local suite did not add comes from the real security mirror.
            self.send_response(302)
            self.send_header("Location", f"{a.upstream.security_mirror}{path}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class SecurityArchive:
    """A copy of the real trixie-security suite on 127.0.0.1, signed with *keys*.

    *directory* gets ``archive/`` (what is served: ``dists/``, ``pool/``) and
    ``keyring.gpg`` (Debian's archive keys plus the test key). *cache* holds
    the real suite's downloads (its indexes, the packages :meth:`add_fix`
    repacks); *upstream* is where the real archive is (default: the host's).
    """

    def __init__(self, directory: Path, keys: GpgKeys, *, cache: Cache | None = None,
                 arches: Sequence[str] = ("amd64", "arm64"),
                 upstream: ArchiveConfig | None = None) -> None:
        self.dir = Path(directory)
        self.root = self.dir / "archive"
        self.keys = keys
        self.cache = cache or Cache(self.dir / "cache")
        self.arches = tuple(arches)
        self.upstream = upstream or default_archive()
        self.keyring = self.dir / "keyring.gpg"
        self.lock = threading.Lock()  # guards requests and publishing
        self.requests: list[str] = []
        self.fixes: list[Fix] = []
        self.date: datetime | None = None
        self.real: Release | None = None
        self._indexes: dict[str, bytes] = {}  # arch -> the real suite's stanzas
        self._added: dict[str, list[str]] = {}  # arch -> the stanzas add_fix published
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise AssertionError("the archive is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def dist(self, path: str = "") -> Path:
        return self.root / "dists" / SUITE / path

    def start(self) -> SecurityArchive:
        """Copy the real suite's indexes, publish them signed, and serve."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.keyring.write_bytes(KEYRING.read_bytes() + self.keys.keyring.read_bytes())
        self._mirror_real_suite()
        self.publish()
        handler = _make_handler(self.root)
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.archive = self
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(5)
            self._httpd = None

    def __enter__(self) -> SecurityArchive:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _mirror_real_suite(self) -> None:
        """Download and verify the real suite's InRelease and Packages indexes."""
        with client() as http:
            real = load_release(self.upstream, SUITE, self.cache, KEYRING, http=http)
        missing = [a for a in self.arches if a not in real.architectures]
        if missing:
            raise AssertionError(f"the real {SUITE} has no {', '.join(missing)}")
        downloads: dict[str, Download] = {}
        base = f"{real.base_url}/dists/{SUITE}"
        # Debian lists arch:all packages in each binary-<arch> index too (Cerulean reads
        # binary-all only when they do not), so binary-all is left out.
        for arch in self.arches:
            path = f"main/binary-{arch}/Packages.xz"
            idx = real.files.get(path)
            if idx is None:
                raise AssertionError(f"the real {SUITE} lists no {path}")
            plain = f"{base}/{path}"
            url = (f"{base}/main/binary-{arch}/by-hash/SHA256/{idx.sha256}"
                   if real.acquire_by_hash else plain)
            downloads[arch] = Download(url, idx.sha256, idx.size, f"{SUITE} {path}", plain)
        fetch_all(self.cache, list(downloads.values()), show_progress=False)
        for arch, d in downloads.items():
            text = lzma.decompress(self.cache.read_verified(d.sha256, d.size, d.what))
            self._indexes[arch] = text.rstrip(b"\n") + b"\n" if text.strip() else b""
            self._added[arch] = []
        self.real = real

    # --- publishing ---------------------------------------------------------------------------

    def _write(self, path: Path, data: bytes) -> None:
        """*data* at *path*, replacing what was there in one step."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.new")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def publish(self, *, signer: str | None = None,
                valid_for: timedelta = timedelta(days=7)) -> None:
        """Write the indexes, Release and InRelease (signed by *signer*, default the test key).

        The Date is now, and always later than the last one published.
        """
        assert self.real is not None
        with self.lock:
            now = datetime.now(UTC).replace(microsecond=0)
            if self.date is not None and now <= self.date:
                now = self.date + timedelta(seconds=1)
            self.date = now
            files: dict[str, bytes] = {}
            for arch, real in self._indexes.items():
                added = "\n".join(self._added[arch]).encode()
                text = real + (b"\n" if real and added else b"") + added
                files[f"main/binary-{arch}/Packages"] = text
                files[f"main/binary-{arch}/Packages.xz"] = lzma.compress(
                    text, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)
            for rel, data in files.items():
                d = rel.rsplit("/", 1)[0]
                by_hash = self.dist(f"{d}/by-hash/SHA256/{hashlib.sha256(data).hexdigest()}")
                if not by_hash.exists():
                    self._write(by_hash, data)
            for rel, data in files.items():
                self._write(self.dist(rel), data)
            r = self.real
            lines = [
                "Origin: Debian",
                "Label: Debian-Security",
                f"Suite: {r.suite_name or SUITE}",
                f"Version: {r.version}",
                f"Codename: {r.codename}",
                f"Date: {release_date(now)}",
                f"Valid-Until: {release_date(now + valid_for)}",
                "Acquire-By-Hash: yes",
                f"Architectures: {' '.join(self.arches)}",
                "Components: main",
                f"Description: local test copy of {SUITE} (from {release_date(r.date)})",
                "SHA256:",
                *(f" {hashlib.sha256(d).hexdigest()} {len(d):>16} {p}"
                  for p, d in sorted(files.items())),
            ]
            release = ("\n".join(lines) + "\n").encode()
            self._write(self.dist("Release"), release)
            self._write(self.dist("InRelease"),
                        self.keys.clearsign(release, signer or self.keys.trusted))

    # --- security fixes -----------------------------------------------------------------------

    def add_fix(self, package: str, arches: Iterable[str], cve: str, *,
                lock: Lock | Path, suffix: str = "+deb13u99") -> Fix:
        """Publish *package* of *lock* again with a higher version that fixes *cve*.

        For each of *arches* the locked .deb is fetched (checked against the
        lock's sha256) and repacked as ``<source version><suffix>``, its
        changelog.Debian.gz getting an entry on top that names *cve*. An
        arch:all package becomes one file, listed for every architecture.
        The suite is then published again (a new Date, InRelease last).
        """
        if isinstance(lock, Path):
            lock = read_lock(lock)
        arches = tuple(arches)
        locked: dict[str, LockedPackage] = {}
        for arch in arches:
            p = next((p for p in lock.packages.get(arch, ()) if p.name == package), None)
            if p is None:
                raise AssertionError(f"the lock has no {package} for {arch}")
            locked[arch] = p
        versions = {p.version for p in locked.values()}
        if len(versions) != 1:
            raise AssertionError(f"{package} is locked at different versions: {versions}")
        first = next(iter(locked.values()))
        version = first.source_version + suffix
        if not version_newer(version, first.version):
            raise AssertionError(f"{version} does not sort after {first.version}")
        fetch_all(self.cache, [
            Download(f"{self.upstream.base_url(p.suite)}/{p.filename}", p.sha256, p.size,
                     p.label) for p in locked.values()], show_progress=False)
        when = datetime.now(UTC).replace(microsecond=0)
        src = first.source
        prefix = src[:4] if src.startswith("lib") else src[0]
        upstream_version = version.split(":", 1)[-1]
        debs: dict[str, str] = {}
        stanzas: dict[str, str] = {}
        for arch, p in locked.items():
            pool = f"pool/updates/main/{prefix}/{src}/{p.name}_{upstream_version}_{p.arch}.deb"
            if pool not in stanzas:
                old = self.cache.read_verified(p.sha256, p.size, p.label)
                new = repack(old, p, version, cve, when)
                self._write(self.root / pool, new)
                stanzas[pool] = index_entry(new, pool)
            debs[arch] = pool
        with self.lock:
            for arch, pool in debs.items():
                self._added[arch].append(stanzas[pool])
        self.publish()
        fix = Fix(package, first.version, version, cve, debs)
        self.fixes.append(fix)
        return fix


def _make_handler(root: Path) -> type[_Handler]:
    class Handler(_Handler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

    return Handler
