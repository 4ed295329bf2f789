"""`cerulean lock --refresh security` against a local stand-in for trixie-security.

The vm image's definition is copied with its security mirror pointed at a
:class:`~support.security_archive.SecurityArchive` (a signed copy of the real
suite on loopback) and its keyring at Debian's keys plus the test key. Once
the lock is current, publishing a fixed package must move exactly that package
and name the CVE its changelog gives; an InRelease signed by a key the keyring
does not hold must be refused.

The test cache starts with hard links to the blobs of the shared download cache
(when there is one on the same file system), so packages and indexes that were
downloaded before are not downloaded again; everything else is fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cerulean.debian.cache import DEFAULT_CACHE, Cache
from cerulean.debian.lock import read_lock
from support.loopback import no_proxy
from support.openpgp import GpgKeys, make_keys, stop_agent
from support.security_archive import SecurityArchive

pytestmark = pytest.mark.integration

RunCli = Callable[..., int]
ROOT = Path(__file__).resolve().parents[2]
ARCHES = ("amd64", "arm64")
PACKAGE = "less"  # in the vm image, and nothing there pins its version
CVE = "CVE-2026-99999"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpgKeys]:
    if shutil.which("gpg") is None:
        pytest.skip("gpg is needed to sign the local archive (install gnupg)")
    k = make_keys(tmp_path_factory.mktemp("gnupg"))
    try:
        yield k
    finally:
        stop_agent(k.home)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    """This module's cache, seeded with hard links to the shared cache's blobs."""
    c = Cache(tmp_path_factory.mktemp("secarchive-cache"))
    shared = DEFAULT_CACHE / "blobs" / "sha256"
    if shared.is_dir():
        for blob in shared.iterdir():
            if len(blob.name) != 64:
                continue  # a download in progress
            try:
                os.link(blob, c.blob_path(blob.name))
            except OSError:
                break  # another file system: download instead
    return c


@pytest.fixture
def archive(tmp_path: Path, keys: GpgKeys, cache: Cache,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[SecurityArchive]:
    with SecurityArchive(tmp_path / "security", keys, cache=cache, arches=ARCHES) as a:
        # The local suite is on loopback: no proxy in between.
        no_proxy(monkeypatch)
        yield a


def vm_copy(d: Path, archive: SecurityArchive) -> Path:
    """images/vm.toml and its lock in *d*, the security suite read from *archive*."""
    d.mkdir()
    text = (ROOT / "images" / "vm.toml").read_text()
    assert "[archive]" not in text
    text += (f'\n[archive]\nsecurity-mirror = "{archive.url}"\n'
             f'keyring = "{archive.keyring}"\n')
    (d / "vm.toml").write_text(text)
    shutil.copy(ROOT / "images" / "vm.lock", d / "vm.lock")
    return d / "vm.toml"


def test_local_fix_moves_only_that_package(archive: SecurityArchive, cache: Cache,
                                           tmp_path: Path, run_cli: RunCli,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    defn = vm_copy(tmp_path / "images", archive)
    lock = defn.with_suffix(".lock")
    refresh = ("lock", "--refresh", "security", defn, "--cache", cache.root)
    # The committed lock may predate the real suite's newest updates: catch up first.
    assert run_cli(*refresh) == 0
    capsys.readouterr()
    assert run_cli(*refresh) == 0
    assert "no newer security updates" in capsys.readouterr().out
    before = read_lock(lock)

    fix = archive.add_fix(PACKAGE, ARCHES, CVE, lock=before)
    assert run_cli(*refresh, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["written"] is True
    assert out["cves"] == [CVE]
    assert out["changes"] == {
        arch: [{"name": PACKAGE, "old": fix.old_version, "new": fix.version, "cves": [CVE]}]
        for arch in ARCHES
    }
    after = read_lock(lock)
    for arch in ARCHES:
        old = {p.name: p for p in before.packages[arch]}
        new = {p.name: p for p in after.packages[arch]}
        assert set(new) == set(old)
        assert {n for n in new if new[n] != old[n]} == {PACKAGE}
        p = new[PACKAGE]
        assert (p.version, p.suite, p.filename) == (fix.version, "trixie-security",
                                                    fix.debs[arch])
        assert p.sha256 == hashlib.sha256((archive.root / p.filename).read_bytes()).hexdigest()
    assert after.snapshot_date("trixie-security") == archive.date
    # The fix is in the lock now: nothing more to move.
    assert run_cli(*refresh) == 0
    assert "no newer security updates" in capsys.readouterr().out


def test_inrelease_from_unknown_key_is_refused(archive: SecurityArchive, cache: Cache,
                                               keys: GpgKeys, tmp_path: Path, run_cli: RunCli,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    defn = vm_copy(tmp_path / "images", archive)
    lock = defn.with_suffix(".lock")
    committed = lock.read_bytes()
    archive.publish(signer=keys.unknown)
    capsys.readouterr()
    assert run_cli("lock", "--refresh", "security", defn, "--cache", cache.root) == 1
    err = capsys.readouterr().err
    assert "InRelease file of suite 'trixie-security'" in err
    assert "not a trusted Debian archive key" in err
    assert lock.read_bytes() == committed
