"""Cerulean's own packages for container images (cerulean.build.cerulean_deb)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import subprocess
import zipfile
from pathlib import Path

import pytest

from cerulean.build import cerulean_deb as cd
from cerulean.build.definition import DefinitionError, load_definition
from cerulean.debian.cache import Cache
from cerulean.debian.deb import read_deb
from cerulean.debian.lock import Lock, LockedPackage
from cerulean.errors import CeruleanError


def fields(deb: bytes) -> dict[str, str]:
    text = read_deb(deb, "test").control["control"].decode()
    return dict(line.split(": ", 1) for line in text.splitlines() if line[:1] != " ")


def paths(deb: bytes) -> set[str]:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(read_deb(deb, "test").data_tar)) as tf:
        return {m.name.removeprefix("./") for m in tf if m.isfile()}


def test_debian_order_of_a_python_pre_release() -> None:
    assert cd._deb_version("1.9.dev24") == "1.9~dev24"
    assert cd._deb_version("2.0rc1") == "2.0~rc1"
    assert cd._deb_version("1.9") == "1.9"
    r = subprocess.run(["dpkg", "--compare-versions", cd._deb_version("1.9.dev24"), "lt", "1.9"])
    assert r.returncode == 0


def test_the_cerulean_package_holds_the_whole_tool_and_is_reproducible() -> None:
    ver, deb = cd.cerulean_deb()
    assert cd.cerulean_deb() == (ver, deb)
    f = fields(deb)
    assert (f["Package"], f["Version"], f["Architecture"]) == ("cerulean", ver, "all")
    assert "python3-pysat" in f["Depends"] and "gpgv" in f["Depends"]
    have = paths(deb)
    for p in ("usr/bin/cerulean", "usr/lib/python3/dist-packages/cerulean/cli/publisher.py",
              "usr/lib/python3/dist-packages/cerulean/release/publisher.py",
              "usr/lib/python3/dist-packages/cerulean/debian/keys/debian-archive-keyring.gpg",
              "usr/share/cerulean/images/tools.toml", "usr/share/cerulean/images/tools.lock"):
        assert p in have, p
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in have)


def fake_wheel(members: dict[str, bytes]) -> bytes:
    """The same bytes for the same members: each entry is dated, not stamped with the
    time it was made (a zip dates to 2 s, so two copies made across a tick differed)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def pin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> cd.Wheel:
    wheel = cd.Wheel("python_sat-0-cp313-cp313-linux_x86_64.whl",
                     hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setitem(cd.PYSAT_WHEELS, "amd64", wheel)
    return wheel


GOOD = {"pysat/__init__.py": b"", "pysat/solvers.py": b"# solvers\n",
        "pysolvers.cpython-313-x86_64-linux-gnu.so": b"\x7fELF",
        "python_sat-1.dist-info/METADATA": b"Name: python-sat\nHome-page: https://example.org\n",
        "python_sat-1.dist-info/licenses/LICENSE.txt": b"MIT License\n",
        "python_sat-1.data/scripts/rc2.py": b"#!python\n"}


def test_the_wheel_is_repacked_from_the_cache(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    data = fake_wheel(GOOD)
    pin(monkeypatch, data)
    cache.put(data)
    _, deb, home = cd.pysat_deb("amd64", cache)
    f = fields(deb)
    assert (f["Package"], f["Architecture"], f["Source"]) == ("python3-pysat", "amd64",
                                                              "python-sat")
    assert "python3 (<< 3.14)" in f["Depends"] and home == "https://example.org"
    got = paths(deb)
    assert "usr/lib/python3/dist-packages/pysat/solvers.py" in got
    assert "usr/lib/python3/dist-packages/pysolvers.cpython-313-x86_64-linux-gnu.so" in got
    assert "usr/share/doc/python3-pysat/copyright" in got
    assert not any(".data/" in p for p in got)  # the duplicate example scripts


def test_a_wheel_member_that_escapes_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    data = fake_wheel({**GOOD, "../../etc/cron.d/x": b"* * * * * root sh\n"})
    pin(monkeypatch, data)
    cache.put(data)
    with pytest.raises(CeruleanError, match="unsafe member name"):
        cd.pysat_deb("amd64", cache)


def test_a_wheel_brought_by_hand_must_match_the_pin(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    wheel = pin(monkeypatch, fake_wheel(GOOD))
    (cache.root / "wheels").mkdir()
    (cache.root / "wheels" / wheel.filename).write_bytes(fake_wheel({"pysat/x.py": b"evil"}))
    with pytest.raises(CeruleanError, match="is not the pinned wheel"):
        cd.pysat_deb("amd64", cache)
    (cache.root / "wheels" / wheel.filename).write_bytes(fake_wheel(GOOD))
    assert cd.pysat_deb("amd64", cache)[0] == cd._deb_version(cd.PYSAT_VERSION)


def test_a_download_that_fails_says_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    pin(monkeypatch, fake_wheel(GOOD))

    def fail(argv: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        assert "--only-binary=:all:" in argv and "--no-deps" in argv
        return subprocess.CompletedProcess(argv, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(cd.subprocess, "run", fail)
    with pytest.raises(CeruleanError, match=r"No matching distribution\)\. Copy that file"):
        cd.pysat_deb("amd64", Cache(tmp_path / "cache"))


def lock_with(*names: str) -> Lock:
    pkgs = tuple(LockedPackage(n, "1", "amd64", n, "1", "0" * 64, 1, "trixie", "") for n in names)
    return Lock(inputs="", snapshot=(), packages={"amd64": pkgs})


def test_the_lock_must_hold_the_wheels_python() -> None:
    cd.check_python(lock_with("python3", "python3.13-minimal"), "amd64")
    with pytest.raises(CeruleanError, match=r"needs Python 3\.13.*has python3\.12"):
        cd.check_python(lock_with("python3", "python3.12"), "amd64")


def test_the_setting_is_for_container_images(tmp_path: Path) -> None:
    d = tmp_path / "pub.toml"
    d.write_text('[packages]\ninclude = ["libc6"]\ncerulean = true\n')
    defn = load_definition(d)
    assert "gpgv" in defn.extra_requests
    assert defn.resolution_inputs()["cerulean"] == list(cd.CERULEAN_DEPENDS)
    d.write_text('[image]\nkind = "system"\n[packages]\ninclude = ["libc6"]\ncerulean = true\n')
    with pytest.raises(DefinitionError, match="container images only"):
        load_definition(d)


def test_pip_fetching_another_file_is_refused(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    pin(monkeypatch, fake_wheel(GOOD))

    def other(argv: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        dest = Path(argv[argv.index("--dest") + 1])
        (dest / "python_sat-9-cp313-cp313-linux_x86_64.whl").write_bytes(b"PK")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(cd.subprocess, "run", other)
    with pytest.raises(CeruleanError, match=r"pip fetched python_sat-9-.* instead of the pinned"):
        cd.pysat_deb("amd64", Cache(tmp_path / "cache"))


@pytest.mark.parametrize(("member", "why"), [
    ("cerulean/cli/publisher.py", "unexpected member"),  # would replace Cerulean's own
    ("zzz-hook.pth", "unexpected member"),  # run by Python at every start
    ("pysat/solvers.py", "twice"),
])
def test_the_wheel_may_hold_only_what_python_sat_holds(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path, member: str,
                                                       why: str) -> None:
    cache = Cache(tmp_path / "cache")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in GOOD.items():
            z.writestr(name, data)
        with pytest.warns(UserWarning) if member in GOOD else contextlib.nullcontext():
            z.writestr(member, b"import os\n")
    data = buf.getvalue()
    pin(monkeypatch, data)
    cache.put(data)
    with pytest.raises(CeruleanError, match=why):
        cd.pysat_deb("amd64", cache)


def test_a_wheel_that_is_no_zip_is_one_sentence(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    pin(monkeypatch, b"not a zip")
    cache.put(b"not a zip")
    with pytest.raises(CeruleanError, match="not a valid zip file"):
        cd.pysat_deb("amd64", cache)


def test_an_altered_cached_wheel_is_said_and_fetched_again(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    cache = Cache(tmp_path / "cache")
    good = fake_wheel(GOOD)
    wheel = pin(monkeypatch, good)
    cache.blob_path(wheel.sha256).parent.mkdir(parents=True, exist_ok=True)
    cache.blob_path(wheel.sha256).write_bytes(b"x" * len(good))  # altered in place
    (cache.root / "wheels").mkdir()
    (cache.root / "wheels" / wheel.filename).write_bytes(good)
    assert cd.pysat_deb("amd64", cache)[0]
    assert "was altered" in capsys.readouterr().err
    assert cache.blob_path(wheel.sha256).read_bytes() == good


def test_untracked_files_and_links_stay_out_of_the_package(tmp_path: Path) -> None:
    junk = [cd.SRC / "cli" / "publisher.py~", cd.SRC / "cli" / ".publisher.py.swp",
            cd.SRC / "untracked_module.py"]
    link = cd.SRC / "leak.txt"
    try:
        for f in junk:
            f.write_text("junk\n")
        link.symlink_to("/etc/hostname")
        have = cd.cerulean_contents()
    finally:
        for f in [*junk, link]:
            f.unlink(missing_ok=True)
    names = {p.rsplit("/", 1)[-1] for p in have}
    assert not names & {"publisher.py~", ".publisher.py.swp", "untracked_module.py",
                        "leak.txt"}
    assert "usr/lib/python3/dist-packages/cerulean/cli/publisher.py" in have
