"""Hermetic tests of archive access against a synthetic signed Debian archive.

Everything runs against :mod:`archive_fixture`: a gpg-signed archive served by a
local HTTP server, so signatures, hashes, retries, the by-hash fallback, the
cache, offline use and lockfiles are exercised end to end without the internet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cerulean.build.definition import load_definition
from cerulean.build.plan import ensure_lock
from cerulean.debian import archive as archive_module
from cerulean.debian import fetch
from cerulean.debian.archive import host_mirrors
from cerulean.debian.cache import Cache
from cerulean.debian.deb import read_deb
from cerulean.debian.fetch import client, fetch_all
from cerulean.debian.lock import (
    LOCK_VERSION,
    diff_locks,
    dump_lock,
    inputs_hash,
    make_lock,
    read_lock,
    write_lock,
)
from cerulean.debian.packages import Package, load_packages
from cerulean.debian.release import IndexFile, Release, load_release
from cerulean.errors import CeruleanError, NetworkError, VerificationError
from support.debfactory import make_deb

if TYPE_CHECKING:
    from archive_fixture import SyntheticArchive

# The fixtures (gpg_keys, archive_server, archive, archive_cache) live in archive_fixture.py.
pytest_plugins = ["archive_fixture"]

SUITE = "testing"  # the suite the synthetic archive publishes

INPUTS = inputs_hash({"include": ["hello"], "suites": [SUITE]})


# --- helpers ----------------------------------------------------------------------------------


def online_release(
    a: SyntheticArchive, c: Cache, not_before: datetime | None = None
) -> Release:
    with client() as http:
        return load_release(a.cfg, SUITE, c, a.keyring, http=http, not_before=not_before)


def online_packages(a: SyntheticArchive, c: Cache) -> tuple[Release, dict[str, Package]]:
    rel = online_release(a, c)
    pkgs = load_packages(a.cfg, rel, "amd64", c)
    return rel, {p.name: p for p in pkgs}


def saved_inreleases(c: Cache) -> list[Path]:
    """The verified InRelease files the cache keeps for offline use."""
    return sorted((c.root / "state").rglob("InRelease"))


def blob_dir_entries(c: Cache) -> list[str]:
    return sorted(p.name for p in (c.root / "blobs" / "sha256").iterdir())


def one_sentence(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


# --- 1. happy path ----------------------------------------------------------------------------


def test_release_packages_and_debs_verify_and_land_in_the_cache(
    archive: SyntheticArchive, archive_cache: Cache
) -> None:
    rel = online_release(archive, archive_cache)
    assert rel.suite == rel.codename == SUITE
    assert rel.date == archive.date
    assert rel.valid_until == archive.date + timedelta(days=7)
    assert rel.sha256 == hashlib.sha256(archive.inrelease).hexdigest()
    assert rel.base_url == archive.url
    assert rel.acquire_by_hash and rel.no_arch_all_index
    assert rel.architectures == ("amd64",) and rel.components == ("main",)
    xz = archive.packages_xz
    assert rel.files[archive.index_path] == IndexFile(
        archive.index_path, hashlib.sha256(xz).hexdigest(), len(xz)
    )
    assert rel.source_date_epoch == int(archive.date.timestamp())
    saved = saved_inreleases(archive_cache)
    assert len(saved) == 1 and saved[0].read_bytes() == archive.inrelease

    pkgs = {p.name: p for p in load_packages(archive.cfg, rel, "amd64", archive_cache)}
    assert set(pkgs) == {"base-files", "libgreet1", "hello"}
    # The index came by hash (Acquire-By-Hash: yes), never by its plain, mutable path.
    assert archive.server.requested(f"debian/{archive.dist(archive.by_hash_path)}") == 1
    assert archive.server.requested(f"debian/{archive.dist(archive.index_path)}") == 0
    assert archive_cache.has(rel.files[archive.index_path].sha256)

    hello, deb = pkgs["hello"], archive.deb("hello")
    assert (hello.version, hello.arch, hello.suite) == ("2.10-3", "amd64", SUITE)
    assert (hello.source, hello.source_version) == ("hello-src", "2.10-3")
    assert hello.depends == "libgreet1 (>= 1.0), base-files"
    assert (hello.sha256, hello.size, hello.filename) == (deb.sha256, deb.size, deb.filename)
    assert hello.url == f"{archive.url}/{deb.filename}"
    lib = pkgs["libgreet1"]
    assert (lib.version, lib.source, lib.source_version) == ("1.2-1+b1", "greet", "1.2-1")
    assert lib.multi_arch == "same" and lib.depends == ""
    base = pkgs["base-files"]
    assert (base.arch, base.essential, base.priority) == ("all", True, "required")

    fetch_all(archive_cache, [p.download() for p in pkgs.values()], show_progress=False)
    for d in archive.debs:
        assert archive_cache.blob_path(d.sha256).is_file()  # content-addressed: under its sha256
        data = archive_cache.read_verified(d.sha256, d.size, d.name)
        assert data == d.data
    cached = archive_cache.read_verified(deb.sha256, deb.size, "hello")
    assert b"echo hello" in read_deb(cached, "hello").data_tar
    assert not [n for n in blob_dir_entries(archive_cache) if n.startswith(".")]

    # Everything is cached: a second fetch asks the server for nothing.
    before = len(archive.server.requests)
    fetch_all(archive_cache, [p.download() for p in pkgs.values()], show_progress=False)
    assert len(archive.server.requests) == before


# --- 2-4. signatures --------------------------------------------------------------------------


def test_unsigned_inrelease_is_refused(archive: SyntheticArchive, archive_cache: Cache) -> None:
    archive.files[archive.dist("InRelease")] = archive.release_text
    with pytest.raises(VerificationError, match=r"suite 'testing' is not signed") as e:
        online_release(archive, archive_cache)
    one_sentence(e)
    assert saved_inreleases(archive_cache) == []


def test_inrelease_signed_by_an_unknown_key_is_refused(
    archive: SyntheticArchive, archive_cache: Cache
) -> None:
    archive.publish(signer=archive.keys.unknown)
    with pytest.raises(VerificationError, match=r"suite 'testing'.*not a trusted") as e:
        online_release(archive, archive_cache)
    one_sentence(e)
    assert saved_inreleases(archive_cache) == []


def test_inrelease_altered_after_signing_is_refused(
    archive: SyntheticArchive, archive_cache: Cache
) -> None:
    lines = archive.inrelease.split(b"\n")
    i = next(n for n, line in enumerate(lines) if line.startswith(b"Date: "))
    date_line = lines[i]
    assert date_line.endswith(b" UTC")
    digit = date_line[-5:-4]  # the last digit of the seconds
    lines[i] = date_line[:-5] + (b"1" if digit == b"0" else b"0") + date_line[-4:]
    tampered = b"\n".join(lines)
    assert tampered != archive.inrelease
    archive.files[archive.dist("InRelease")] = tampered
    with pytest.raises(VerificationError, match=r"suite 'testing' has a bad signature") as e:
        online_release(archive, archive_cache)
    one_sentence(e)
    assert saved_inreleases(archive_cache) == []


def test_text_outside_the_signed_part_is_never_parsed(
    archive: SyntheticArchive, archive_cache: Cache
) -> None:
    # Unsigned lines after the signature must not smuggle in fields ...
    smuggled = b"\nCodename: evil\nSHA256:\n 00 1 main/binary-amd64/Packages.xz\n"
    archive.files[archive.dist("InRelease")] = archive.inrelease + smuggled
    rel = online_release(archive, archive_cache)
    assert rel.codename == SUITE
    assert rel.files[archive.index_path].sha256 == hashlib.sha256(archive.packages_xz).hexdigest()
    # ... and unsigned lines before it make the file count as unsigned.
    archive.files[archive.dist("InRelease")] = smuggled + archive.inrelease
    with pytest.raises(VerificationError, match=r"not signed"):
        online_release(archive, archive_cache)


def test_inrelease_of_another_suite_is_refused(
    archive: SyntheticArchive, archive_cache: Cache
) -> None:
    archive.publish(codename="oldstable")
    with pytest.raises(VerificationError, match=r"suite 'testing' is for 'oldstable'"):
        online_release(archive, archive_cache)


# --- 5-6. freshness ---------------------------------------------------------------------------


def test_release_older_than_the_lock_snapshot_is_refused(
    archive: SyntheticArchive, archive_cache: Cache
) -> None:
    assert archive.date is not None
    # The very snapshot the lock recorded is fine ...
    online_release(archive, archive_cache, not_before=archive.date)
    # ... an older one is a rollback.
    saved = saved_inreleases(archive_cache)[0]
    saved.unlink()
    with pytest.raises(VerificationError, match=r"older than .* stale metadata") as e:
        online_release(archive, archive_cache, not_before=archive.date + timedelta(days=1))
    msg = one_sentence(e)
    assert "suite 'testing'" in msg
    assert saved_inreleases(archive_cache) == []


def test_expired_release_is_refused(archive: SyntheticArchive, archive_cache: Cache) -> None:
    archive.publish(date=datetime.now(UTC) - timedelta(days=10), valid_for=timedelta(days=1))
    with pytest.raises(VerificationError, match=r"suite 'testing' expired on") as e:
        online_release(archive, archive_cache)
    one_sentence(e)
    assert saved_inreleases(archive_cache) == []


def test_release_without_valid_until_does_not_expire(
    archive: SyntheticArchive, archive_cache: Cache
) -> None:
    archive.publish(date=datetime.now(UTC) - timedelta(days=400), valid_for=None)
    rel = online_release(archive, archive_cache)
    assert rel.valid_until is None


# --- 7-9. indexes and packages ----------------------------------------------------------------


@pytest.mark.parametrize("by_hash_missing", [False, True], ids=["by-hash", "plain-fallback"])
@pytest.mark.parametrize("same_size", [False, True], ids=["other-size", "same-size"])
def test_index_not_matching_the_release_is_refused(
    archive: SyntheticArchive, archive_cache: Cache, same_size: bool, by_hash_missing: bool
) -> None:
    rel = online_release(archive, archive_cache)
    idx = rel.files[archive.index_path]
    if same_size:
        bad = bytearray(archive.packages_xz)
        bad[len(bad) // 2] ^= 0xFF
        evil = bytes(bad)
    else:
        extra = b"\nPackage: evil\nVersion: 1\nArchitecture: amd64\nFilename: pool/evil.deb\n"
        evil = lzma.compress(archive.packages_text + extra + b"Size: 1\nSHA256: 00\n")
    assert evil != archive.packages_xz and (len(evil) == idx.size) == same_size
    archive.files[archive.dist(archive.index_path)] = evil
    if by_hash_missing:
        del archive.files[archive.dist(archive.by_hash_path)]
    else:
        archive.files[archive.dist(archive.by_hash_path)] = evil
    with pytest.raises(VerificationError, match=r"binary-amd64/Packages\.xz index of 'testing'"):
        load_packages(archive.cfg, rel, "amd64", archive_cache)
    assert not archive_cache.has(idx.sha256)
    assert not archive_cache.has(hashlib.sha256(evil).hexdigest())
    assert blob_dir_entries(archive_cache) == []  # and no temporary file left behind


@pytest.mark.parametrize("tamper", ["other-package", "appended", "truncated"])
def test_deb_not_matching_its_index_is_refused(
    archive: SyntheticArchive, archive_cache: Cache, tamper: str
) -> None:
    _, pkgs = online_packages(archive, archive_cache)
    hello = pkgs["hello"]
    good = archive.deb("hello").data
    evil = {
        "other-package": make_deb("hello", "2.10-3", "amd64", "libgreet1 (>= 1.0), base-files",
                                  {"usr/bin/hello": b"#!/bin/sh\nrm -rf /\n"}, source="hello-src"),
        "appended": good + b"\n",
        "truncated": good[:-1],
    }[tamper]
    assert evil != good
    archive.files[hello.filename] = evil
    blobs_before = blob_dir_entries(archive_cache)  # the index
    with pytest.raises(VerificationError, match=r"hello 2\.10-3 \(amd64\).*does not match") as e:
        fetch_all(archive_cache, [hello.download()], show_progress=False)
    one_sentence(e)
    assert not archive_cache.has(hello.sha256)
    assert not archive_cache.has(hashlib.sha256(evil).hexdigest())
    assert blob_dir_entries(archive_cache) == blobs_before  # no blob and no temporary file
    # A mismatch is not retried into acceptance.
    assert archive.server.requested(f"debian/{hello.filename}") == 1


def test_by_hash_404_falls_back_to_the_plain_path(
    archive: SyntheticArchive, archive_cache: Cache
) -> None:
    del archive.files[archive.dist(archive.by_hash_path)]
    _, pkgs = online_packages(archive, archive_cache)
    assert set(pkgs) == {"base-files", "libgreet1", "hello"}
    assert archive.server.requested(f"debian/{archive.dist(archive.by_hash_path)}") == 1
    assert archive.server.requested(f"debian/{archive.dist(archive.index_path)}") == 1


def test_archive_without_by_hash_uses_the_plain_path(
    archive: SyntheticArchive, archive_cache: Cache
) -> None:
    archive.publish(by_hash=False)
    rel, pkgs = online_packages(archive, archive_cache)
    assert not rel.acquire_by_hash
    assert "hello" in pkgs
    assert archive.server.requested(f"debian/{archive.dist(archive.index_path)}") == 1
    assert not [r for r in archive.server.requests if "/by-hash/" in r]


# --- 10. retries ------------------------------------------------------------------------------


def test_transient_errors_are_retried(archive: SyntheticArchive, archive_cache: Cache) -> None:
    inrelease = f"debian/{archive.dist('InRelease')}"
    deb = archive.deb("hello")
    archive.server.faults[inrelease] = [503, 503]
    rel = online_release(archive, archive_cache)
    assert archive.server.requested(inrelease) == 3
    assert archive.sleeps == [0.5, 1.0]  # exponential backoff

    pkgs = {p.name: p for p in load_packages(archive.cfg, rel, "amd64", archive_cache)}
    archive.server.faults[f"debian/{deb.filename}"] = [503, 502]
    archive.sleeps.clear()
    fetch_all(archive_cache, [pkgs["hello"].download()], show_progress=False)
    assert archive.server.requested(f"debian/{deb.filename}") == 3
    assert archive.sleeps == [0.5, 1.0]
    assert archive_cache.read_verified(deb.sha256, deb.size, "hello") == deb.data
    assert not [n for n in blob_dir_entries(archive_cache) if n.startswith(".")]


def test_persistent_errors_give_up_after_the_retries(
    archive: SyntheticArchive, archive_cache: Cache
) -> None:
    _, pkgs = online_packages(archive, archive_cache)
    deb = archive.deb("hello")
    archive.server.faults[f"debian/{deb.filename}"] = [503] * 10
    with pytest.raises(NetworkError, match=r"hello 2\.10-3 \(amd64\).*HTTP 503") as e:
        fetch_all(archive_cache, [pkgs["hello"].download()], show_progress=False)
    one_sentence(e)
    assert archive.server.requested(f"debian/{deb.filename}") == fetch.RETRIES
    assert not archive_cache.has(deb.sha256)
    assert not [n for n in blob_dir_entries(archive_cache) if n.startswith(".")]


def test_missing_file_is_not_retried(archive: SyntheticArchive, archive_cache: Cache) -> None:
    _, pkgs = online_packages(archive, archive_cache)
    deb = archive.deb("hello")
    del archive.files[deb.filename]
    with pytest.raises(NetworkError, match=r"HTTP 404"):
        fetch_all(archive_cache, [pkgs["hello"].download()], show_progress=False)
    assert archive.server.requested(f"debian/{deb.filename}") == 1


# --- 11. offline ------------------------------------------------------------------------------


def test_offline_works_from_the_cache_and_names_what_is_missing(
    archive: SyntheticArchive, archive_cache: Cache
) -> None:
    with pytest.raises(CeruleanError, match=r"--offline .* suite 'testing'"):
        load_release(archive.cfg, SUITE, archive_cache, archive.keyring, http=None)

    rel, pkgs = online_packages(archive, archive_cache)
    fetch_all(archive_cache, [pkgs["hello"].download()], show_progress=False)
    requests = len(archive.server.requests)

    off = load_release(archive.cfg, SUITE, archive_cache, archive.keyring, http=None)
    assert off == rel
    off_pkgs = load_packages(archive.cfg, off, "amd64", archive_cache, offline=True)
    assert {p.name: p for p in off_pkgs} == pkgs
    fetch_all(archive_cache, [pkgs["hello"].download()], offline=True, show_progress=False)
    with pytest.raises(CeruleanError, match=r"--offline") as e:
        fetch_all(archive_cache, [p.download() for p in pkgs.values()], offline=True,
                  show_progress=False)
    msg = one_sentence(e)
    assert "2 package(s)" in msg and "libgreet1 1.2-1+b1 (amd64)" in msg
    assert "hello" not in msg
    assert len(archive.server.requests) == requests  # offline never touched the network

    # The saved InRelease is verified again before it is trusted offline.
    saved = saved_inreleases(archive_cache)[0]
    saved.write_bytes(saved.read_bytes().replace(b"Components: main", b"Components: mainx"))
    with pytest.raises(VerificationError, match=r"bad signature"):
        load_release(archive.cfg, SUITE, archive_cache, archive.keyring, http=None)


# --- 12. cache integrity ----------------------------------------------------------------------


@pytest.mark.parametrize("alter", ["flip-byte", "append"])
def test_altered_cache_blob_is_refused(
    archive: SyntheticArchive, archive_cache: Cache, alter: str
) -> None:
    _, pkgs = online_packages(archive, archive_cache)
    fetch_all(archive_cache, [pkgs["hello"].download()], show_progress=False)
    deb = archive.deb("hello")
    path = archive_cache.blob_path(deb.sha256)
    data = bytearray(path.read_bytes())
    if alter == "flip-byte":
        data[-10] ^= 0x01
    else:
        data += b"x"
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"altered \(delete it to fetch it again\)") as e:
        archive_cache.read_verified(deb.sha256, deb.size, "hello")
    assert str(path) in one_sentence(e)
    with pytest.raises(VerificationError, match=r"delete it"):
        archive_cache.verify_file(deb.sha256, deb.size, "hello")


# --- 13. lockfiles ----------------------------------------------------------------------------


def test_lock_round_trip(archive: SyntheticArchive, archive_cache: Cache, tmp_path: Path) -> None:
    archive.add("lib+plus", "1:2.0~rc1-1", "amd64", source="plus-src (1:2.0~rc1-1)",
                depends='x "quoted"')
    archive.publish()
    rel, pkgs = online_packages(archive, archive_cache)
    resolved = {"amd64": list(pkgs.values()), "arm64": [pkgs["base-files"]]}
    lock = make_lock(INPUTS, [rel], resolved)
    path = tmp_path / "img.lock"
    write_lock(path, lock)
    back = read_lock(path)
    assert back == lock
    assert back.inputs == INPUTS
    assert back.arches == ("amd64", "arm64")
    assert back.snapshot_date(SUITE) == rel.date
    assert back.snapshot[0].inrelease_sha256 == rel.sha256
    assert back.source_date_epoch == rel.source_date_epoch
    plus = next(p for p in back.packages["amd64"] if p.name == "lib+plus")
    assert (plus.version, plus.source, plus.source_version) == (
        "1:2.0~rc1-1", "plus-src", "1:2.0~rc1-1")
    assert plus.sha256 == archive.deb("lib+plus").sha256
    assert plus.filename == archive.deb("lib+plus").filename
    assert dump_lock(back) == path.read_text()
    assert f"version = {LOCK_VERSION}\n" in path.read_text()


def test_diff_locks(archive: SyntheticArchive, archive_cache: Cache) -> None:
    rel, pkgs = online_packages(archive, archive_cache)
    old = make_lock(INPUTS, [rel], {"amd64": list(pkgs.values())})
    newer = dataclasses.replace(pkgs["hello"], version="2.10-4")
    added = dataclasses.replace(pkgs["base-files"], name="tzdata", version="2025b-1")
    new = make_lock(INPUTS, [rel], {"amd64": [pkgs["base-files"], newer, added]})
    assert diff_locks(old, new) == [
        "amd64: ~ hello 2.10-3 -> 2.10-4 (testing)",
        "amd64: - libgreet1 1.2-1+b1",
        "amd64: + tzdata 2025b-1 (testing)",
    ]
    assert diff_locks(old, old) == []
    assert diff_locks(None, old) == [
        "amd64: + base-files 13.8 (testing)",
        "amd64: + hello 2.10-3 (testing)",
        "amd64: + libgreet1 1.2-1+b1 (testing)",
    ]


def _lock_text() -> str:
    when = datetime(2025, 11, 1, 8, 0, tzinfo=UTC)
    pkg = Package("hello", "1.0", "amd64", SUITE, "http://m/debian", "pool/h/hello.deb",
                  "ab" * 32, 10, "hello", "1.0")
    rel = Release(SUITE, SUITE, "", when, None, "cd" * 32, "http://m/debian", True, ("amd64",),
                  ("main",), True)
    return dump_lock(make_lock(INPUTS, [rel], {"amd64": [pkg]}))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("version = 1\n", "version = 99\n"), r"version 99.*reads version 1"),
        (lambda t: t.replace("version = 1\n", ""), r"version None"),
        (lambda t: t.replace('sha256 = "abab', 'checksum = "abab'), r"missing the field 'sha256'"),
        (lambda t: "\n".join(x for x in t.split("\n") if not x.startswith("inputs")),
         r"missing the field 'inputs'"),
        (lambda t: t.replace("date = 2025", 'suitedate = 2025'), r"missing the field 'date'"),
        (lambda t: t.replace("size = 10", 'size = "ten"'), r"invalid"),
        (lambda t: t.replace("[[snapshot]]", "[[snapshot"), r"not valid TOML"),
    ],
    ids=["wrong-version", "no-version", "no-sha256", "no-inputs", "no-date", "bad-size",
         "bad-toml"],
)
def test_bad_lockfile_gives_one_clear_error(
    tmp_path: Path, edit: Callable[[str], str], expected: str
) -> None:
    text = _lock_text()
    path = tmp_path / "img.lock"
    path.write_text(text)
    assert read_lock(path).packages["amd64"][0].name == "hello"  # the unedited lock is fine
    changed = edit(text)
    assert changed != text
    path.write_text(changed)
    with pytest.raises(CeruleanError, match=expected) as e:
        read_lock(path)
    assert type(e.value) is CeruleanError
    assert str(path) in one_sentence(e)


def test_missing_lockfile(tmp_path: Path) -> None:
    with pytest.raises(CeruleanError, match=r"does not exist \(run `cerulean lock`\)"):
        read_lock(tmp_path / "nope.lock")


# --- ensure_lock ------------------------------------------------------------------------------


def _definition(path: Path, url: str, include: list[str]) -> Path:
    path.write_text(
        "[image]\n"
        'architectures = ["amd64"]\n'
        "[packages]\n"
        f"include = {json.dumps(include)}\n"
        "[archive]\n"
        f'mirror = "{url}"\n'
        f'security-mirror = "{url}"\n'
        f'suites = ["{SUITE}"]\n'
        'components = ["main"]\n'
    )
    return path


def test_ensure_lock_locks_then_refuses_a_changed_definition(
    archive: SyntheticArchive, archive_cache: Cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CERULEAN_MIRROR", raising=False)
    monkeypatch.delenv("CERULEAN_SECURITY_MIRROR", raising=False)
    toml = _definition(tmp_path / "app.toml", archive.url, ["hello"])
    defn = load_definition(toml)
    first = ensure_lock(defn, archive_cache, keyring=archive.keyring)
    assert first.written and first.previous is None
    assert defn.lock_path.is_file()
    locked = {p.name: p for p in first.lock.packages["amd64"]}
    assert set(locked) == {"hello", "libgreet1", "base-files"}
    assert locked["hello"].sha256 == archive.deb("hello").sha256
    assert "amd64: + hello 2.10-3 (testing)" in first.changes
    assert read_lock(defn.lock_path) == first.lock

    # --locked with an unchanged definition uses the lock as it is, without the network.
    requests = len(archive.server.requests)
    again = ensure_lock(defn, archive_cache, locked=True, keyring=archive.keyring)
    assert again.lock == first.lock and not again.written
    assert len(archive.server.requests) == requests

    # The definition's inputs change: --locked refuses instead of resolving anew.
    lock_text = defn.lock_path.read_text()
    changed = load_definition(_definition(toml, archive.url, ["hello", "base-files"]))
    with pytest.raises(CeruleanError, match=r"no longer matches .*app\.toml") as e:
        ensure_lock(changed, archive_cache, locked=True, keyring=archive.keyring)
    one_sentence(e)
    assert defn.lock_path.read_text() == lock_text
    assert len(archive.server.requests) == requests


def test_ensure_lock_refresh_refuses_a_mirror_older_than_the_lock(
    archive: SyntheticArchive, archive_cache: Cache, tmp_path: Path
) -> None:
    defn = load_definition(_definition(tmp_path / "app.toml", archive.url, ["hello"]))
    first = ensure_lock(defn, archive_cache, keyring=archive.keyring)
    assert archive.date is not None
    archive.publish(date=archive.date - timedelta(days=2))  # a mirror serving stale metadata
    with pytest.raises(VerificationError, match=r"older than"):
        ensure_lock(defn, archive_cache, refresh=True, keyring=archive.keyring)
    assert read_lock(defn.lock_path) == first.lock


# --- 14. host mirrors -------------------------------------------------------------------------


DEB822 = """\
# Debian sources, deb822 style
Types: deb deb-src
URIs: http://deb.example.invalid/debian/
Suites: trixie trixie-updates
Components: main contrib
Signed-By: -----BEGIN PGP PUBLIC KEY BLOCK-----
 Comment: an inline key: its continuation lines hold colons
 .
 mDMEZ...
 -----END PGP PUBLIC KEY BLOCK-----

Types: deb
URIs: http://security.example.invalid/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

ONE_LINE = """\
# the local mirror
deb-src http://src.example.invalid/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg arch=amd64] \
http://mirror.example.invalid/debian/ trixie main # trailing comment
deb cdrom:[Debian GNU/Linux 13]/ trixie main
"""


def _apt_root(tmp_path: Path, sources_list: str | None, parts: dict[str, str]) -> Path:
    root = tmp_path / "etc" / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    if sources_list is not None:
        (root / "sources.list").write_text(sources_list)
    for name, text in parts.items():
        (root / "sources.list.d" / name).write_text(text)
    return root


DISABLED = """\
Enabled: no
Types: deb
URIs: http://disabled.example.invalid/debian
Suites: trixie
Components: main
"""


def test_host_mirrors_from_deb822_sources(tmp_path: Path) -> None:
    # a-off.sources is read first, but its only stanza is disabled.
    root = _apt_root(tmp_path, None, {"a-off.sources": DISABLED, "debian.sources": DEB822})
    assert host_mirrors(root) == (
        "http://deb.example.invalid/debian",
        "http://security.example.invalid/debian-security",
    )


def test_host_mirrors_from_one_line_sources_with_options(tmp_path: Path) -> None:
    root = _apt_root(tmp_path, ONE_LINE, {})
    # No security source: it is assumed next to the mirror.
    assert host_mirrors(root) == (
        "http://mirror.example.invalid/debian",
        "http://mirror.example.invalid/debian-security",
    )


def test_host_mirrors_first_source_wins(tmp_path: Path) -> None:
    root = _apt_root(tmp_path, ONE_LINE, {
        "debian.sources": DEB822,
        "z-more.list": "deb http://other.example.invalid/debian-security trixie-security main\n"
                       "deb http://other.example.invalid/debian trixie main\n",
        "notes.txt": "deb http://ignored.example.invalid/debian trixie main\n",
    })
    # sources.list is read before sources.list.d/, whose files are read in name order.
    assert host_mirrors(root) == (
        "http://mirror.example.invalid/debian",
        "http://security.example.invalid/debian-security",
    )


UBUNTU_DEB822 = """\
Types: deb
URIs: http://archive.example.invalid/ubuntu/
Suites: noble noble-updates noble-backports
Components: main restricted universe multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg

Types: deb
URIs: http://security.example.invalid/ubuntu/
Suites: noble-security
Components: main restricted universe multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
"""

UBUNTU_ONE_LINE = """\
deb http://archive.example.invalid/ubuntu jammy main restricted
deb http://archive.example.invalid/ubuntu jammy-updates main restricted
deb http://security.example.invalid/ubuntu jammy-security main restricted
deb http://ports.example.invalid/ubuntu-ports jammy-security main
"""


def test_an_ubuntu_host_names_no_debian_mirror(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Ubuntu's archives are not taken for Debian's: not the main one, and not its security
    archive either (which would otherwise look like a "-security" suite)."""
    for name, text in (("deb822", {"ubuntu.sources": UBUNTU_DEB822}),
                       ("one-line", {"ubuntu.list": UBUNTU_ONE_LINE})):
        root = _apt_root(tmp_path / name, None, text)
        assert host_mirrors(root) == (None, None), name
    monkeypatch.setattr(archive_module, "APT_SOURCES", root)
    monkeypatch.delenv("CERULEAN_MIRROR", raising=False)
    monkeypatch.delenv("CERULEAN_SECURITY_MIRROR", raising=False)
    with pytest.raises(CeruleanError, match=r"an Ubuntu archive is not a Debian mirror.*"
                                            r"set CERULEAN_MIRROR"):
        archive_module.default_archive()
    # With a Debian mirror named, an Ubuntu host builds from it.
    monkeypatch.setenv("CERULEAN_MIRROR", "http://mirror.example.invalid/debian")
    cfg = archive_module.default_archive()
    assert (cfg.mirror, cfg.security_mirror) == ("http://mirror.example.invalid/debian",
                                                 "http://mirror.example.invalid/debian-security")


def test_host_mirrors_none_configured(tmp_path: Path) -> None:
    assert host_mirrors(_apt_root(tmp_path, "# nothing\n", {})) == (None, None)
    assert host_mirrors(tmp_path / "missing") == (None, None)
