"""A whole lock-and-build against a synthetic signed archive served on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cerulean.build.definition import load_definition
from cerulean.build.image import build_image
from cerulean.build.plan import ensure_lock
from cerulean.build.tree import UnsafePathError
from cerulean.debian.cache import Cache
from cerulean.errors import VerificationError

if TYPE_CHECKING:
    from archive_fixture import SyntheticArchive

pytest_plugins = ["archive_fixture"]

DEP5_MIT = (b"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
            b"Files: *\nCopyright: 2026 Test\nLicense: Expat\n")


def definition(tmp_path: Path, archive: SyntheticArchive, include: list[str]) -> Path:
    d = tmp_path / "img.toml"
    d.write_text(
        f"""
[image]
architectures = ["amd64"]
[packages]
include = {json.dumps(include)}
[archive]
mirror = "{archive.url}"
security-mirror = "{archive.url}"
suites = ["{archive.suite}"]
"""
    )
    return d


def build(tmp_path: Path, archive: SyntheticArchive, include: list[str], cache: Cache
          ) -> Path:
    defn = load_definition(definition(tmp_path, archive, include))
    lock = ensure_lock(defn, cache, keyring=archive.keyring).lock
    out = tmp_path / "out"
    build_image(defn, lock, archive.cfg, ["amd64"], out, cache, show_progress=False)
    return out


def test_lock_and_build(tmp_path: Path, archive: SyntheticArchive, archive_cache: Cache) -> None:
    archive.add("docs", "1.0", "all", files={
        "usr/share/doc/docs/copyright": DEP5_MIT,
        "usr/share/doc/docs/README": b"read me",
        "usr/share/man/man1/docs.1.gz": b"man",
        "usr/share/locale/de/LC_MESSAGES/docs.mo": b"mo",
    })
    archive.publish()
    out = build(tmp_path, archive, ["hello", "docs"], archive_cache)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["img.amd64.cdx.json", "img.amd64.files.json", "img.amd64.spdx.json",
                     "img.oci", "img.oci.tar"]
    files = {f["path"]: f for f in json.loads((out / "img.amd64.files.json").read_text())["files"]}
    assert files["/usr/bin/hello"]["package"] == "hello"
    assert files["/etc/passwd"]["type"] == "file"
    assert "/var/lib/dpkg/status.d/hello" in files
    assert "/usr/share/doc/docs/copyright" in files
    assert "/usr/share/doc/docs/README" not in files
    assert not any(p.startswith(("/usr/share/man/", "/usr/share/locale/")) for p in files)
    cdx = json.loads((out / "img.amd64.cdx.json").read_text())
    docs = next(c for c in cdx["components"] if c["name"] == "docs")
    assert [lic["license"]["id"] for lic in docs["licenses"]] == ["MIT"]
    lock = (tmp_path / "img.lock").read_text()
    assert 'name = "libgreet1"' in lock and 'source = "greet"' in lock


def test_hostile_package_fails_and_leaves_nothing(tmp_path: Path, archive: SyntheticArchive,
                                                  archive_cache: Cache) -> None:
    archive.add("evil", "1.0", "amd64", files={"usr/share/evil/cron": b"* * * * * root sh"},
                symlinks={"usr/share/evil": "/etc"})
    archive.publish()
    with pytest.raises(UnsafePathError, match=r"evil 1.0 \(amd64\) is refused"):
        build(tmp_path, archive, ["evil"], archive_cache)
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []


def test_unknown_signer_writes_no_lock(tmp_path: Path, archive: SyntheticArchive,
                                       archive_cache: Cache) -> None:
    archive.publish(signer=archive.keys.unknown)
    with pytest.raises(VerificationError, match="not a trusted Debian archive key"):
        build(tmp_path, archive, ["hello"], archive_cache)
    assert not (tmp_path / "img.lock").exists()


def cli_definition(tmp_path: Path, archive: SyntheticArchive, include: list[str]) -> Path:
    d = definition(tmp_path, archive, include)
    d.write_text(d.read_text() + f'keyring = "{archive.keyring}"\n')
    return d


def test_cli_lock_refresh_prints_changes(tmp_path: Path, archive: SyntheticArchive,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cerulean.cli import main

    d = cli_definition(tmp_path, archive, ["hello"])
    cache = str(tmp_path / "cache")
    assert main(["lock", str(d), "--cache", cache]) == 0
    assert "Wrote" in capsys.readouterr().out
    assert main(["lock", str(d), "--cache", cache]) == 0
    assert "is up to date" in capsys.readouterr().out
    archive.add("hello", "2.10-4", "amd64", "libgreet1 (>= 1.0), base-files",
                files={"usr/bin/hello": b"#!/bin/sh\necho hello again\n"})
    archive.debs = [d_ for d_ in archive.debs if (d_.name, d_.version) != ("hello", "2.10-3")]
    archive.publish()
    assert main(["lock", str(d), "--refresh", "--cache", cache]) == 0
    out = capsys.readouterr().out
    assert "amd64: ~ hello 2.10-3 -> 2.10-4 (testing)" in out
    # The lock now builds from the cache alone, without the network.
    assert main(["build", str(d), "--out", str(tmp_path / "o"), "--cache", cache]) == 0
    archive.server.httpd.shutdown()
    capsys.readouterr()
    assert main(["build", str(d), "--locked", "--offline", "--out", str(tmp_path / "o2"),
                 "--cache", cache, "--json"]) == 0
    first = json.loads((tmp_path / "o" / "img.oci" / "index.json").read_text())
    second = json.loads((tmp_path / "o2" / "img.oci" / "index.json").read_text())
    assert first == second


def test_cli_unknown_signer_is_one_sentence(tmp_path: Path, archive: SyntheticArchive,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from cerulean.cli import main

    archive.publish(signer=archive.keys.unknown)
    d = cli_definition(tmp_path, archive, ["hello"])
    rc = main(["build", str(d), "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "The signature of the InRelease file of suite 'testing' was made by a key that is " \
           "not a trusted Debian archive key." in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "img.lock").exists()
