"""The file manifest: every path of an image with its type, mode, owner, size and sha256.

Later parts (the host agent's integrity checks) use it as the baseline of what
the image shipped, so nothing has to be trusted on first use.
"""

from __future__ import annotations

import hashlib
import json

from cerulean.agent.integrity import MANIFEST_VERSION
from cerulean.build.tree import Tree


def manifest_entries(tree: Tree) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for e in tree:
        item: dict[str, object] = {
            "path": "/" + e.path,
            "type": e.kind,
            "mode": f"{e.mode:04o}",
            "uid": e.uid,
            "gid": e.gid,
        }
        if e.kind == "file":
            item["size"] = e.size
            item["sha256"] = hashlib.sha256(e.data).hexdigest()
        elif e.kind == "symlink":
            item["target"] = e.target
        if e.package:
            item["package"] = e.package
        out.append(item)
    return out


def manifest_document(image: str, arch: str, version: str, source_date_epoch: int,
                      tree: Tree) -> bytes:
    doc = {
        "manifestVersion": MANIFEST_VERSION,
        "image": image,
        "arch": arch,
        "version": version,
        "sourceDateEpoch": source_date_epoch,
        "files": manifest_entries(tree),
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
