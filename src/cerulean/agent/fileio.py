"""Writing a file whole or not at all: a temporary file next to it, then a rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644, durable: bool = False) -> None:
    """Write *data* to *path* through a new temporary file in the same directory (made
    with O_EXCL, so never through a link) and a rename: readers see the old file or the
    new one, never half of it. *durable* also syncs the data to disk before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(d: Path) -> None:
    """Sync directory *d*, so that a rename or a new file in it survives a power cut."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
