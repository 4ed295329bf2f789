"""Small two-architecture OCI layouts made in process, for the unit and integration tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cerulean.build.oci import (
    Blob,
    Compression,
    ImageConfig,
    LayoutWriter,
    layer_tar,
    write_oci_archive,
)
from cerulean.build.tree import Tree

MTIME = 1_700_000_000
CREATED = datetime.fromtimestamp(MTIME, UTC)
ARCHES = ("amd64", "arm64")
LONG_DIR = "usr/share/" + "/".join(["deeply-nested-directory"] * 5)  # > 100 bytes: PAX path


def make_tree(arch: str) -> Tree:
    t = Tree()
    t.add_dir("etc", 0o755)
    t.add_file("etc/os-release", b"ID=cerulean\n", 0o644)
    t.add_file("usr/bin/hello", f"#!/bin/sh\necho hello from {arch}\n".encode(), 0o755)
    t.add_file("usr/bin/passwd", b"\x7fELF setuid stand-in", 0o4755)
    t.add_dir("tmp", 0o1777)
    t.add_dir("home/nonroot", 0o750, uid=65532, gid=65532)
    t.add_file("home/nonroot/.profile", b"export PS1='$ '\n", 0o600, uid=65532, gid=65532)
    t.add_symlink("etc/localtime", "/usr/share/zoneinfo/Etc/UTC")
    t.add_file(f"{LONG_DIR}/f\u00fcr-long-path.txt", b"long and non-ASCII name\n")
    t.add_file("usr/share/empty", b"")
    t.add_file("usr/lib/big.bin", bytes(range(256)) * 4096 + arch.encode())  # 1 MiB + a bit
    t.add_merged_usr_links()
    return t


@dataclass
class Built:
    layout: Path
    archive: Path
    index_digest: str
    trees: dict[str, Tree]


def build(
    out: Path,
    compression: Compression = Compression.GZIP,
    *,
    arch_refs: bool = True,
    cache_dir: Path | None = None,
    trees: dict[str, Tree] | None = None,
) -> Built:
    trees = trees if trees is not None else {arch: make_tree(arch) for arch in ARCHES}
    layout = out / "python.oci"
    w = LayoutWriter(layout)
    manifests: list[Blob] = []
    for arch, tree in trees.items():
        layer = w.add_layer(layer_tar(tree, MTIME), compression, cache_dir=cache_dir)
        config = ImageConfig(
            arch=arch,
            created=CREATED,
            user="65532:65532",
            env=("PATH=/usr/bin",),
            entrypoint=("/usr/bin/hello",),
            cmd=("--version",),
            labels={"org.opencontainers.image.title": "python"},
            history_comment="cerulean test image",
        )
        manifests.append(
            w.add_image([layer], config, {"org.opencontainers.image.created": "2023-11-14"})
        )
    digest = w.finish(
        manifests, "latest", {"org.opencontainers.image.title": "python"}, arch_refs=arch_refs
    )
    archive = out / "python.oci.tar"
    write_oci_archive(layout, archive, mtime=MTIME)
    return Built(layout, archive, digest, trees)


