"""Unpacking locked packages into a Tree, with a cache of decompressed archives.

Each .deb is checked against the lock's sha256 and size before it is read.
Its decompressed data archive is cached under its own sha256 (keyed by the
.deb's), so a warm build reads plain tar instead of running xz again; the
cached copy is verified against that hash on every read.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from io import BytesIO

from cerulean.agent.fileio import write_atomic
from cerulean.build.tree import Tree, UnsafePathError
from cerulean.debian.cache import Cache
from cerulean.debian.deb import DebError, read_deb
from cerulean.debian.lock import LockedPackage
from cerulean.errors import CeruleanError

KEPT_CONTROL_FILES = ("control", "md5sums", "conffiles", "postinst")
UNPACK_FORMAT = 2  # bump when what is kept from a .deb changes


@dataclass(frozen=True)
class Unpacked:
    package: LockedPackage
    control: dict[str, bytes]
    data_tar: bytes


def load_package(cache: Cache, p: LockedPackage) -> Unpacked:
    index = cache.subdir("unpacked") / f"{p.sha256}.json"
    if index.is_file():
        try:
            meta = json.loads(index.read_text())
            if meta.get("format") != UNPACK_FORMAT:
                raise ValueError("older unpack cache entry")
            data = cache.read_verified(meta["data_sha256"], meta["data_size"], p.label)
            control = {k: v.encode("utf-8", "surrogateescape") for k, v in meta["control"].items()}
            # The .deb itself is still what the lock pins: check it is intact.
            cache.verify_file(p.sha256, p.size, f"The package {p.label}")
            return Unpacked(p, control, data)
        except (ValueError, KeyError, CeruleanError):
            index.unlink(missing_ok=True)  # rebuild the derived cache from the .deb below
    raw = cache.read_verified(p.sha256, p.size, f"The package {p.label}")
    contents = read_deb(raw, f"The package {p.label}")
    data_sha = cache.put(contents.data_tar)
    control = {k: v for k, v in contents.control.items() if k in KEPT_CONTROL_FILES}
    meta_out = {
        "format": UNPACK_FORMAT,
        "data_sha256": data_sha,
        "data_size": len(contents.data_tar),
        "control": {k: v.decode("utf-8", "surrogateescape") for k, v in control.items()},
    }
    write_atomic(index, json.dumps(meta_out, sort_keys=True).encode())
    return Unpacked(p, control, contents.data_tar)


def unpack_into(tree: Tree, u: Unpacked) -> list[str]:
    """Add the package's files to *tree*; returns the paths it shipped, in archive order."""
    what = f"The package {u.package.label}"
    shipped: list[str] = []
    try:
        with tarfile.open(fileobj=BytesIO(u.data_tar), mode="r:") as tf:
            for m in tf:
                name = m.name
                try:
                    if m.isdir():
                        e = tree.add_dir(name, m.mode, m.uid, m.gid, package=u.package.name)
                    elif m.isreg():
                        f = tf.extractfile(m)
                        data = f.read() if f is not None else b""
                        e = tree.add_file(name, data, m.mode, m.uid, m.gid, package=u.package.name)
                    elif m.issym():
                        e = tree.add_symlink(name, m.linkname, m.uid, m.gid, package=u.package.name)
                    elif m.islnk():
                        e = tree.add_hardlink(name, m.linkname, package=u.package.name)
                    else:
                        raise UnsafePathError(
                            f"The entry {name!r} is a device or FIFO, which images do not take."
                        )
                except UnsafePathError as err:
                    raise UnsafePathError(f"{what} is refused: {err}") from None
                if e.path:
                    shipped.append(e.path)
    except tarfile.TarError as err:
        raise DebError(f"{what} has a damaged data archive ({err}).") from None
    return shipped
