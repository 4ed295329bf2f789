"""Tests for cerulean.build.oci: layer tars, the OCI layout, the archive, and real tools."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import zstandard

from cerulean.build import oci
from cerulean.build.oci import (
    Compression,
    ImageConfig,
    LayoutWriter,
    layer_tar,
)
from cerulean.errors import CeruleanError
from support.oci_layouts import ARCHES, CREATED, LONG_DIR, MTIME, build, make_tree


def read_blob(layout: Path, digest: str) -> bytes:
    algo, _, hexd = digest.partition(":")
    assert algo == "sha256"
    return (layout / "blobs" / "sha256" / hexd).read_bytes()


def read_json(layout: Path, digest: str) -> Any:
    return json.loads(read_blob(layout, digest))


def check_descriptor(layout: Path, desc: dict[str, Any]) -> bytes:
    """Assert the blob behind *desc* exists with the digest and size it claims."""
    data = read_blob(layout, desc["digest"])
    assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
    assert len(data) == desc["size"]
    return data


def decompress(data: bytes, media_type: str) -> bytes:
    if media_type.endswith("+gzip"):
        return gzip.decompress(data)
    if media_type.endswith("+zstd"):
        return zstandard.ZstdDecompressor().decompress(data)
    raise AssertionError(media_type)


def tar_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return tf.getmembers()


# -- determinism ----------------------------------------------------------


@pytest.mark.parametrize("compression", list(Compression))
def test_two_builds_are_identical(tmp_path: Path, compression: Compression) -> None:
    a = build(tmp_path / "a", compression)
    b = build(tmp_path / "b", compression)
    assert a.index_digest == b.index_digest
    assert a.archive.read_bytes() == b.archive.read_bytes()
    assert (a.layout / "index.json").read_bytes() == (b.layout / "index.json").read_bytes()
    assert sorted(p.name for p in (a.layout / "blobs/sha256").iterdir()) == sorted(
        p.name for p in (b.layout / "blobs/sha256").iterdir()
    )


def test_different_content_gives_different_digest(tmp_path: Path) -> None:
    a = build(tmp_path / "a")
    trees = {arch: make_tree(arch) for arch in ARCHES}
    trees["arm64"].add_file("etc/extra", b"x")
    b = build(tmp_path / "b", trees=trees)
    assert a.index_digest != b.index_digest


def test_rebuild_into_existing_layout_prunes_stale_blobs(tmp_path: Path) -> None:
    trees = {arch: make_tree(arch) for arch in ARCHES}
    trees["amd64"].add_file("etc/old-only", b"old")
    build(tmp_path / "reused", trees=trees)
    again = build(tmp_path / "reused")
    fresh = build(tmp_path / "fresh")
    assert again.index_digest == fresh.index_digest
    assert again.archive.read_bytes() == fresh.archive.read_bytes()
    assert not list((again.layout / "blobs/sha256").glob(".tmp-*"))


def test_gzip_output_does_not_depend_on_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(1 << 14) * 224  # 3.5 MiB: several slices, with matches across them
    many = oci.compress(data, Compression.GZIP, 6)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    one = oci.compress(data, Compression.GZIP, 6)
    assert many == one
    assert gzip.decompress(many) == data
    assert many[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0
    # The preset dictionary keeps matches across slice borders, so slicing costs
    # almost nothing (unprimed slices would each pay for the random block again).
    assert len(many) <= len(zlib.compress(data, 6)) * 1.01


@pytest.mark.parametrize("data", [b"", b"x", bytes(1 << 20)])
def test_gzip_edge_sizes(data: bytes) -> None:
    out = oci.compress(data, Compression.GZIP, 9)
    assert gzip.decompress(out) == data
    assert out[8] == 2  # XFL says "best compression"


def test_zstd_writes_content_size() -> None:
    data = b"cerulean " * 10_000
    out = oci.compress(data, Compression.ZSTD)
    assert zstandard.frame_content_size(out) == len(data)
    assert zstandard.ZstdDecompressor().decompress(out) == data
    assert oci.compress(data, Compression.ZSTD) == out


# -- layout structure -----------------------------------------------------


def test_layout_structure(tmp_path: Path) -> None:
    built = build(tmp_path)
    layout = built.layout
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    top = json.loads((layout / "index.json").read_text())
    assert top["schemaVersion"] == 2
    assert top["mediaType"] == oci.MEDIA_TYPE_INDEX
    refs = {d["annotations"][oci.ANNOTATION_REF_NAME]: d for d in top["manifests"]}
    assert list(refs) == ["latest", "latest-amd64", "latest-arm64"]
    assert refs["latest"]["digest"] == built.index_digest
    assert refs["latest"]["mediaType"] == oci.MEDIA_TYPE_INDEX

    index = json.loads(check_descriptor(layout, refs["latest"]))
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == oci.MEDIA_TYPE_INDEX
    assert index["annotations"] == {"org.opencontainers.image.title": "python"}
    platforms = [m["platform"] for m in index["manifests"]]
    assert platforms == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]

    seen_blobs = {built.index_digest}
    for arch, desc in zip(ARCHES, index["manifests"], strict=True):
        # The per-arch ref names the very same manifest, platform included.
        assert refs[f"latest-{arch}"]["digest"] == desc["digest"]
        assert refs[f"latest-{arch}"]["platform"] == desc["platform"]
        assert desc["mediaType"] == oci.MEDIA_TYPE_MANIFEST
        manifest = json.loads(check_descriptor(layout, desc))
        assert manifest["schemaVersion"] == 2
        assert manifest["mediaType"] == oci.MEDIA_TYPE_MANIFEST
        assert manifest["annotations"] == {"org.opencontainers.image.created": "2023-11-14"}
        assert manifest["config"]["mediaType"] == oci.MEDIA_TYPE_CONFIG
        config = json.loads(check_descriptor(layout, manifest["config"]))
        assert config["architecture"] == arch
        assert config["os"] == "linux"
        assert config.get("variant") == ("v8" if arch == "arm64" else None)
        assert config["created"] == "2023-11-14T22:13:20Z"
        assert config["config"] == {
            "User": "65532:65532",
            "WorkingDir": "/",
            "Env": ["PATH=/usr/bin"],
            "Entrypoint": ["/usr/bin/hello"],
            "Cmd": ["--version"],
            "Labels": {"org.opencontainers.image.title": "python"},
        }
        assert config["rootfs"]["type"] == "layers"
        assert len(config["history"]) == len(manifest["layers"]) == 1
        assert config["history"][0]["comment"] == "cerulean test image"
        for layer_desc, diff_id in zip(
            manifest["layers"], config["rootfs"]["diff_ids"], strict=True
        ):
            assert layer_desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
            raw = decompress(check_descriptor(layout, layer_desc), layer_desc["mediaType"])
            assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
            assert raw == layer_tar(built.trees[arch], MTIME)
            seen_blobs.add(layer_desc["digest"])
        seen_blobs |= {desc["digest"], manifest["config"]["digest"]}
    # Nothing in the layout that the index does not reach.
    on_disk = {"sha256:" + p.name for p in (layout / "blobs/sha256").iterdir()}
    assert on_disk == seen_blobs


def test_single_entry_shape_without_arch_refs(tmp_path: Path) -> None:
    built = build(tmp_path, arch_refs=False)
    top = json.loads((built.layout / "index.json").read_text())
    assert len(top["manifests"]) == 1
    assert top["manifests"][0]["annotations"] == {oci.ANNOTATION_REF_NAME: "latest"}


def test_json_is_canonical(tmp_path: Path) -> None:
    built = build(tmp_path)
    raw = (built.layout / "index.json").read_bytes()
    doc = json.loads(raw)
    assert raw == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    index = read_blob(built.layout, built.index_digest)
    assert index == json.dumps(json.loads(index), sort_keys=True, separators=(",", ":")).encode()


def test_zstd_layers_have_zstd_media_type(tmp_path: Path) -> None:
    built = build(tmp_path, Compression.ZSTD)
    index = read_json(built.layout, built.index_digest)
    manifest = read_json(built.layout, index["manifests"][0]["digest"])
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    raw = decompress(check_descriptor(built.layout, layer), layer["mediaType"])
    assert raw == layer_tar(built.trees["amd64"], MTIME)


def test_add_blob_is_idempotent(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l.oci")
    a = w.add_blob(b"hello", "text/plain")
    b = w.add_blob(b"hello", "text/plain")
    assert a == b
    assert a.digest == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert [p.name for p in (tmp_path / "l.oci/blobs/sha256").iterdir()] == [a.hex]


# -- the layer cache ------------------------------------------------------


def test_layer_cache_skips_compression(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    tar = layer_tar(make_tree("amd64"), MTIME)
    first = LayoutWriter(tmp_path / "a.oci").add_layer(tar, Compression.GZIP, cache_dir=cache)

    def no_compress(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("a warm build must not compress again")

    monkeypatch.setattr(oci, "compress", no_compress)
    second = LayoutWriter(tmp_path / "b.oci").add_layer(tar, Compression.GZIP, cache_dir=cache)
    assert first == second
    assert (tmp_path / "b.oci/blobs/sha256" / second[0].hex).is_file()
    # A different level is a different cache entry.
    with pytest.raises(AssertionError, match="warm build"):
        LayoutWriter(tmp_path / "c.oci").add_layer(tar, Compression.GZIP, 1, cache_dir=cache)


def test_damaged_cache_entry_is_a_miss(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tar = layer_tar(make_tree("arm64"), MTIME)
    blob, _ = LayoutWriter(tmp_path / "a.oci").add_layer(tar, Compression.ZSTD, cache_dir=cache)
    (cache / "blobs/sha256" / blob.hex).write_bytes(b"garbage")
    again, _ = LayoutWriter(tmp_path / "b.oci").add_layer(tar, Compression.ZSTD, cache_dir=cache)
    assert again == blob
    assert read_blob(tmp_path / "b.oci", blob.digest) == read_blob(tmp_path / "a.oci", blob.digest)


# -- tar contents ---------------------------------------------------------


def test_layer_tar_entries(tmp_path: Path) -> None:
    tree = make_tree("amd64")
    data = layer_tar(tree, MTIME)
    assert len(data) % tarfile.RECORDSIZE == 0
    members = tar_members(data)
    expected = [e.path for e in tree]
    assert [m.name for m in members] == expected
    seen: set[str] = set()
    for m, e in zip(members, tree, strict=True):
        parent = m.name.rpartition("/")[0]
        assert not parent or parent in seen, f"{m.name} comes before its directory"
        seen.add(m.name)
        assert m.mtime == MTIME
        assert (m.uname, m.gname) == ("", "")
        assert (m.uid, m.gid) == (e.uid, e.gid)
        assert m.mode == e.mode
        assert "atime" not in m.pax_headers and "ctime" not in m.pax_headers
        assert "mtime" not in m.pax_headers
        if e.kind == "dir":
            assert m.isdir()
        elif e.kind == "symlink":
            assert m.issym() and m.linkname == e.target
        else:
            assert m.isfile() and m.size == len(e.data)
    by_name = {m.name: m for m in members}
    assert by_name["usr/bin/passwd"].mode & stat.S_ISUID
    assert by_name["home/nonroot/.profile"].uid == 65532
    assert f"{LONG_DIR}/f\u00fcr-long-path.txt" in by_name
    assert b"atime=" not in data and b"ctime=" not in data
    # Raw names: relative, no "./", directories spelled with a trailing slash.
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        raw_names = [m.name for m in tf]
    assert not any(n.startswith(("./", "/")) for n in raw_names)
    headers = [data[i : i + 512] for i in range(0, len(data), 512)]
    assert any(h.startswith(b"etc/\0") for h in headers)


def test_archive_entries(tmp_path: Path) -> None:
    built = build(tmp_path)
    members = tar_members(built.archive.read_bytes())
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names[:2] == ["blobs", "blobs/sha256"]
    assert names[-2:] == ["index.json", "oci-layout"]
    for m in members:
        assert m.mtime == MTIME
        assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert m.mode == (0o755 if m.isdir() else 0o644)
        assert not ({"atime", "ctime"} & set(m.pax_headers))
    blobs = {n.rpartition("/")[2] for n in names if n.startswith("blobs/sha256/")}
    assert blobs == {p.name for p in (built.layout / "blobs/sha256").iterdir()}


# -- errors ---------------------------------------------------------------


def test_unknown_arch_is_a_user_error(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l.oci")
    with pytest.raises(CeruleanError, match="riscv64"):
        w.add_image([], ImageConfig("riscv64", CREATED), {})


def test_bad_ref_name_and_duplicate_platforms(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l.oci")
    m = w.add_image([], ImageConfig("amd64", CREATED), {})
    with pytest.raises(CeruleanError, match="ref name"):
        w.finish([m], "bad name", {})
    with pytest.raises(CeruleanError, match="distinct platform"):
        w.finish([m, m], "latest", {})


def test_refuses_non_layout_directory(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(CeruleanError, match="not an OCI layout"):
        LayoutWriter(tmp_path / "home")


def test_naive_created_is_refused(tmp_path: Path) -> None:
    w = LayoutWriter(tmp_path / "l.oci")
    with pytest.raises(ValueError, match="timezone"):
        w.add_image([], ImageConfig("amd64", datetime(2024, 1, 1)), {})
