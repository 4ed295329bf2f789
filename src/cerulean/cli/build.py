"""``cerulean build``: build an image definition into OCI images, SBOMs and manifests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cerulean.cli.common import add_cache_options, find_definition, open_cache, parse_arches

if TYPE_CHECKING:
    from rich.console import Console

    from cerulean.build.definition import ImageDefinition
    from cerulean.debian.cache import Cache
    from cerulean.debian.lock import Lock


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "build",
        help="build an image (OCI layout and archive, SBOMs, file manifest)",
        description=(
            "Build an image definition for one or more architectures. Packages come from "
            "the lock next to the definition (written first if missing or outdated; "
            "--locked refuses instead). Outputs go to --out: NAME.oci/ (OCI layout), "
            "NAME.oci.tar (oci-archive), NAME.ARCH.spdx.json and .cdx.json (SBOMs) and "
            "NAME.ARCH.files.json (file manifest)."
        ),
    )
    p.add_argument("definition", help="images/NAME.toml, or a built-in image name")
    p.add_argument("--arch", help="comma-separated architectures (default: all of the image's)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory (default: out)")
    p.add_argument("--locked", action="store_true",
                   help="build exactly the lock; fail if it is missing or outdated")
    p.add_argument("--format", choices=("raw", "qcow2", "vhd", "vhdx"),
                   help="disk image format for system images (default: the definition's)")
    p.add_argument("--compression", choices=("gzip", "zstd"),
                   help="layer compression (default: the definition's, usually gzip)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_cache_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cerulean.build.image import build_image
    from cerulean.build.plan import archive_for, ensure_lock

    defn = find_definition(args.definition)
    arches = parse_arches(args.arch, defn)
    cache = open_cache(args)
    con = Console(stderr=True, highlight=False, soft_wrap=True)
    lr = ensure_lock(defn, cache, locked=args.locked, offline=args.offline,
                     show_progress=not args.json)
    if lr.written:
        con.print(f"Wrote {defn.lock_path}.")
    if defn.is_system:
        return _run_system(args, defn, lr.lock, arches, cache, con)
    res = build_image(defn, lr.lock, archive_for(defn), arches, args.out, cache,
                      offline=args.offline, show_progress=not args.json,
                      compression=args.compression)
    if args.json:
        print(json.dumps({
            "image": res.image, "version": res.version, "index": res.index_digest,
            "layout": str(res.layout), "archive": str(res.archive),
            "outputs": [str(p) for p in res.outputs], "seconds": round(res.seconds, 3),
            "arches": [vars(a) for a in res.arches],
        }, indent=2))
        return 0
    con.print(f"[bold]Built {res.image} {res.version}[/] in {res.seconds:.2f} s "
              f"(index {res.index_digest})")
    for a in res.arches:
        con.print(f"  {a.arch}: {a.packages} packages, {a.files} files, "
                  f"{a.size / 1048576:.1f} MiB, manifest {a.manifest_digest}")
    con.print(f"  layout:  {res.layout}\n  archive: {res.archive}")
    for p in res.outputs[2:]:
        con.print(f"  {p}")
    con.print(f"Inspect it with: skopeo inspect oci:{res.layout}:latest")
    return 0


def _run_system(args: argparse.Namespace, defn: ImageDefinition, lock: Lock,
                arches: tuple[str, ...], cache: Cache, con: Console) -> int:
    from cerulean.build.plan import archive_for
    from cerulean.build.system_image import build_system_image

    def say(msg: str) -> None:
        if not args.json:
            con.print(f"[dim]{msg}[/]")

    res = build_system_image(defn, lock, archive_for(defn), arches, args.out, cache,
                             fmt=args.format, offline=args.offline,
                             show_progress=not args.json, say=say)
    if args.json:
        print(json.dumps({
            "image": res.image, "version": res.version, "seconds": round(res.seconds, 1),
            "disks": [{"arch": d.arch, "path": str(d.path), "bytes": d.size,
                       "usr_bytes": d.usr_bytes, "usrhash": d.roothash,
                       "seconds": round(d.seconds, 1), "rootfs_cached": d.rootfs_cached}
                      for d in res.disks],
        }, indent=2))
        return 0
    con.print(f"[bold]Built {res.image} {res.version}[/] in {res.seconds:.1f} s")
    for d in res.disks:
        con.print(f"  {d.arch}: {d.path} ({d.size / 1048576:.0f} MiB, /usr "
                  f"{d.usr_bytes / 1048576:.0f} MiB, usrhash {d.roothash[:16]}…)")
    con.print(f"Boot it with: cerulean boot {res.disks[0].path}   "
              f"or test it: cerulean test {res.disks[0].path}")
    return 0
