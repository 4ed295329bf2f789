"""Build real images from the Debian archive and check them with real tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

RunCli = Callable[..., int]

pytestmark = pytest.mark.integration

PY_CHECK = "import ssl, sqlite3, json, zlib; print(ssl.OPENSSL_VERSION)"


def sh(*args: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    argv = [str(a) for a in args]
    argv[0] = shutil.which(argv[0]) or argv[0]  # found on our PATH, not the chroot's
    return subprocess.run(argv, capture_output=True, text=True,
                          check=False, **kw)  # type: ignore[call-overload]


def test_index_has_two_manifests(python_build: Path) -> None:
    layout = python_build / "python.oci"
    top = json.loads((layout / "index.json").read_text())
    refs = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in top["manifests"]}
    assert set(refs) == {"latest", "latest-amd64", "latest-arm64"}
    idx_desc = refs["latest"]
    assert idx_desc["mediaType"] == "application/vnd.oci.image.index.v1+json"
    blob = layout / "blobs" / "sha256" / idx_desc["digest"].split(":")[1]
    index = json.loads(blob.read_text())
    arches = sorted(m["platform"]["architecture"] for m in index["manifests"])
    assert arches == ["amd64", "arm64"]


def test_skopeo_reads_layout_and_archive(python_build: Path, root_user: None) -> None:
    r = sh("skopeo", "inspect", f"oci:{python_build / 'python.oci'}:latest")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["Architecture"] == "amd64"
    assert info["Labels"]["org.opencontainers.image.title"] == "python"
    r = sh("skopeo", "inspect", "--override-arch", "arm64",
           f"oci-archive:{python_build / 'python.oci.tar'}:latest")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["Architecture"] == "arm64"
    r = sh("skopeo", "inspect", "--config", f"oci:{python_build / 'python.oci'}:latest-amd64")
    cfg = json.loads(r.stdout)["config"]
    assert cfg["User"] == "65532"
    assert cfg["Entrypoint"] == ["/usr/bin/python3"]


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_python_runs_in_unpacked_rootfs(python_build: Path, root_user: None, arch: str,
                                        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    bundle = tmp_path / "bundle"
    r = sh("umoci", "unpack", "--image", f"{python_build / 'python.oci'}:latest-{arch}", bundle)
    assert r.returncode == 0, r.stderr
    rootfs = bundle / "rootfs"
    if arch == "arm64":
        request.getfixturevalue("binfmt_aarch64")
    r = sh("chroot", rootfs, "/usr/bin/python3", "-c", PY_CHECK, env={"PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OpenSSL 3."), r.stdout
    # No shell in the python image, and the passwd file knows the default users.
    assert not (rootfs / "usr/bin/sh").exists() and not (rootfs / "usr/bin/bash").exists()
    passwd = (rootfs / "etc/passwd").read_text()
    assert "nonroot:x:65532:65532:" in passwd
    osr = (rootfs / "usr/lib/os-release").read_text()
    assert 'ID="cerulean"' in osr and 'ID_LIKE="debian"' in osr
    assert (rootfs / "etc/ssl/certs/ca-certificates.crt").stat().st_size > 100_000
    assert (rootfs / "var/lib/dpkg/status.d/python3.13-minimal").is_file()
    # HTTPS works against the generated bundle (verification only, no network).
    r = sh("chroot", rootfs, "/usr/bin/python3", "-c",
           "import ssl; c = ssl.create_default_context(); "
           "print(len(c.get_ca_certs()) + c.cert_store_stats()['x509_ca'])",
           env={"PATH": "/usr/bin", "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"})
    assert r.returncode == 0 and int(r.stdout) > 100, (r.stdout, r.stderr)


def test_sboms_and_manifest(python_build: Path) -> None:
    for arch in ("amd64", "arm64"):
        spdx = json.loads((python_build / f"python.{arch}.spdx.json").read_text())
        assert spdx["spdxVersion"] == "SPDX-2.3"
        purls = [r["referenceLocator"] for p in spdx["packages"]
                 for r in p.get("externalRefs", [])]
        assert any(p.startswith("pkg:deb/debian/python3.13-minimal@") for p in purls)
        cdx = json.loads((python_build / f"python.{arch}.cdx.json").read_text())
        assert cdx["specVersion"] == "1.6"
        libc = next(c for c in cdx["components"] if c["name"] == "libc6")
        assert f"arch={arch}" in libc["purl"]
        files = json.loads((python_build / f"python.{arch}.files.json").read_text())
        py = next(f for f in files["files"] if f["path"] == "/usr/bin/python3.13")
        assert py["package"] == "python3.13-minimal" and len(py["sha256"]) == 64
        assert py["mode"] == "0755"


def test_same_lock_builds_identical_digests(images: Path, cache_dir: Path, run_cli: RunCli,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    """Same lock, different caches, output dirs, working dirs and times: same digest."""
    digests = []
    for n in range(2):
        work = tmp_path / f"work{n}"
        work.mkdir()
        cache = tmp_path / f"cache{n}"
        shutil.copytree(cache_dir, cache) if n else None
        old = Path.cwd()
        os.chdir(work)
        try:
            rc = run_cli("build", images / "base.toml", "--out", work / "o", "--cache", cache,
                         "--json")
        finally:
            os.chdir(old)
        assert rc == 0
        digests.append(json.loads(capsys.readouterr().out)["index"])
    assert digests[0] == digests[1]


def test_tampered_deb_in_cache_fails_without_output(images: Path, cache_dir: Path,
                                                    run_cli: RunCli, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    assert run_cli("lock", images / "static.toml", "--cache", cache) == 0
    lock_text = (images / "static.lock").read_text()
    sha = lock_text.split('name = "tzdata"')[1].split('sha256 = "')[1].split('"')[0]
    assert run_cli("build", images / "static.toml", "--out", tmp_path / "warm",
                   "--cache", cache) == 0
    deb = cache / "blobs" / "sha256" / sha
    data = bytearray(deb.read_bytes())
    data[-100] ^= 0xFF
    deb.write_bytes(bytes(data))
    capsys.readouterr()
    out = tmp_path / "out"
    rc = run_cli("build", images / "static.toml", "--out", out, "--cache", cache, "--offline")
    err = capsys.readouterr().err
    assert rc == 1
    assert "tzdata" in err and "altered" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_static_image_is_small(images: Path, cache_dir: Path, run_cli: RunCli, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert run_cli("build", images / "static.toml", "--out", tmp_path, "--cache", cache_dir,
                   "--json") == 0
    res = json.loads(capsys.readouterr().out)
    for a in res["arches"]:
        assert a["size"] < 3 * 1024 * 1024, a


def test_core_image_has_working_dpkg_and_apt(images: Path, cache_dir: Path, run_cli: RunCli,
                                             tmp_path: Path, root_user: None) -> None:
    assert run_cli("build", images / "core.toml", "--arch", "amd64", "--out", tmp_path / "o",
                   "--cache", cache_dir) == 0
    bundle = tmp_path / "bundle"
    r = sh("umoci", "unpack", "--image", f"{tmp_path / 'o' / 'core.oci'}:latest-amd64", bundle)
    assert r.returncode == 0, r.stderr
    rootfs = bundle / "rootfs"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    r = sh("chroot", rootfs, "/bin/bash", "-c", "dpkg -l | grep -c '^ii'", env=env)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 50
    r = sh("chroot", rootfs, "dpkg", "--verify", "coreutils", env=env)
    assert r.returncode == 0 and r.stdout == "", (r.stdout, r.stderr)
    r = sh("chroot", rootfs, "apt-cache", "policy", "bash", env=env)
    assert r.returncode == 0 and "Installed:" in r.stdout, (r.stdout, r.stderr)
    r = sh("chroot", rootfs, "ldconfig", "-p", env=env)
    assert r.returncode == 0 and "libc.so.6" in r.stdout, r.stderr
