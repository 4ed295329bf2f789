"""The OCI layouts Cerulean writes, read by the real tools users read them with:
skopeo (inspect, copy) and umoci (unpack)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cerulean.build import oci
from cerulean.build.oci import Compression
from support.oci_layouts import ARCHES, MTIME, Built, build

pytestmark = pytest.mark.integration


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def built_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    yield build(tmp_path_factory.mktemp("oci"))


def skopeo_config(*args: str) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads(run(need("skopeo"), "inspect", "--config", *args))
    return cfg


def test_skopeo_inspects_layout_and_archive(built_module: Built) -> None:
    layout, archive = built_module.layout, built_module.archive
    host = skopeo_config(f"oci:{layout}:latest")
    assert host["architecture"] in ARCHES
    for arch in ARCHES:
        cfg = skopeo_config("--override-arch", arch, f"oci:{layout}:latest")
        assert cfg["architecture"] == arch
        assert skopeo_config(f"oci:{layout}:latest-{arch}")["architecture"] == arch
        cfg = skopeo_config("--override-arch", arch, f"oci-archive:{archive}:latest")
        assert cfg["architecture"] == arch
    raw = json.loads(run(need("skopeo"), "inspect", "--raw", f"oci:{layout}:latest"))
    assert raw["mediaType"] == oci.MEDIA_TYPE_INDEX
    info = json.loads(run(need("skopeo"), "inspect", f"oci-archive:{archive}:latest"))
    assert info["Digest"] == built_module.index_digest


def test_skopeo_untagged_with_single_entry_shape(tmp_path: Path) -> None:
    built = build(tmp_path, arch_refs=False)
    info = json.loads(run(need("skopeo"), "inspect", f"oci:{built.layout}"))
    assert info["Digest"] == built.index_digest
    assert json.loads(run(need("skopeo"), "inspect", f"oci-archive:{built.archive}"))


def test_skopeo_copies_one_or_all_arches(built_module: Built, tmp_path: Path) -> None:
    skopeo = need("skopeo")
    run(
        skopeo,
        "copy",
        "--override-arch",
        "arm64",
        f"oci:{built_module.layout}:latest",
        f"oci:{tmp_path / 'one'}:x",
    )
    assert skopeo_config(f"oci:{tmp_path / 'one'}:x")["architecture"] == "arm64"
    run(skopeo, "copy", "--all", f"oci:{built_module.layout}:latest", f"oci:{tmp_path / 'all'}:x")
    top = json.loads((tmp_path / "all" / "index.json").read_text())
    # --all copies the image index byte for byte, so the digest survives.
    assert top["manifests"][0]["digest"] == built_module.index_digest


@pytest.mark.parametrize("arch", ARCHES)
def test_umoci_unpacks_each_arch(built_module: Built, tmp_path: Path, arch: str) -> None:
    umoci = need("umoci")
    bundle = tmp_path / "bundle"
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    run(umoci, "unpack", *rootless, "--image", f"{built_module.layout}:latest-{arch}", str(bundle))
    rootfs = bundle / "rootfs"
    tree = built_module.trees[arch]
    for e in tree:
        path = rootfs / e.path
        st = path.lstat()
        if e.kind == "symlink":
            assert stat.S_ISLNK(st.st_mode)
            assert os.readlink(path) == e.target
            continue
        assert stat.S_IMODE(st.st_mode) == e.mode, e.path
        if e.kind == "file":
            assert stat.S_ISREG(st.st_mode)
            assert path.read_bytes() == e.data
        else:
            assert stat.S_ISDIR(st.st_mode)
        if not rootless:
            assert (st.st_uid, st.st_gid) == (e.uid, e.gid), e.path
            assert st.st_mtime == MTIME, e.path
    assert (rootfs / "usr/bin/passwd").stat().st_mode & stat.S_ISUID
    if not rootless:
        assert (rootfs / "home/nonroot/.profile").stat().st_uid == 65532
    runtime = json.loads((bundle / "config.json").read_text())
    assert runtime["process"]["args"] == ["/usr/bin/hello", "--version"]


def test_umoci_refuses_the_multi_arch_ref(built_module: Built, tmp_path: Path) -> None:
    """Documents why the per-arch refs exist: umoci 0.4 cannot pick a platform."""
    umoci = need("umoci")
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    proc = subprocess.run(
        [
            umoci,
            "unpack",
            *rootless,
            "--image",
            f"{built_module.layout}:latest",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 0:
        pytest.skip("this umoci picks a platform itself; the per-arch refs are a convenience")
    assert "ambiguous" in proc.stderr


def test_zstd_layout_with_skopeo_and_umoci(tmp_path: Path) -> None:
    """skopeo reads zstd layers; umoci 0.4.7 does not, but a skopeo re-compress fixes that."""
    skopeo, umoci = need("skopeo"), need("umoci")
    built = build(tmp_path / "z", Compression.ZSTD)
    assert skopeo_config("--override-arch", "arm64",
                         f"oci-archive:{built.archive}:latest")["architecture"] == "arm64"
    # The archive names one image, so podman load takes it without asking.
    with tarfile.open(built.archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        entries = json.loads(member.read())["manifests"]
    assert [e["annotations"]["org.opencontainers.image.ref.name"] for e in entries] == ["latest"]
    assert entries[0]["mediaType"] == "application/vnd.oci.image.index.v1+json"
    # A copy to dir: reads and verifies every blob.
    run(skopeo, "copy", f"oci:{built.layout}:latest-arm64", f"dir:{tmp_path / 'dir'}")
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    image = f"{built.layout}:latest-amd64"
    proc = subprocess.run(
        [umoci, "unpack", *rootless, "--image", image, str(tmp_path / "b1")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        assert "zstd" in proc.stderr
    gz = tmp_path / "gz"
    run(
        skopeo,
        "copy",
        "--dest-compress",
        "--dest-compress-format",
        "gzip",
        f"oci:{image}",
        f"oci:{gz}:x",
    )
    run(umoci, "unpack", *rootless, "--image", f"{gz}:x", str(tmp_path / "b2"))
    assert (tmp_path / "b2/rootfs/usr/bin/passwd").stat().st_mode & stat.S_ISUID
