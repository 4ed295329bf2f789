"""The boot entries on the ESP: one UKI per release, with systemd-boot's boot counting.

A release's UKI is ``EFI/Linux/cerulean_VERSION+TRIES.efi``. systemd-boot
boots the newest entry that still has tries, renaming it to
``cerulean_VERSION+LEFT-DONE.efi`` on each attempt; systemd-bless-boot renames
it to ``cerulean_VERSION.efi`` once ``boot-complete.target`` is reached (the
health check is part of it), or to ``+0-DONE`` when the boot is declared bad.
An entry with no tries left sorts after every other, so the previous release
boots instead.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cerulean.agent.fileio import fsync_dir
from cerulean.agent.integrity import file_sha256
from cerulean.agent.update.errors import UpdateError

ENTRY = re.compile(
    r"^cerulean_(?P<version>\d+\.\d{8}\.\d+)(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.efi$")
PARTIAL_SUFFIX = ".partial"
# A staged release whose rollout is paused: its entry, under a name the boot loader
# ignores, until the release is resumed (or withdrawn).
PAUSED_SUFFIX = ".paused"


@dataclass(frozen=True)
class Entry:
    path: Path
    version: str
    left: int | None  # None: not counted (good)
    done: int

    @property
    def good(self) -> bool:
        return self.left is None

    @property
    def exhausted(self) -> bool:
        return self.left == 0


def entry_name(version: str, tries: int) -> str:
    return f"cerulean_{version}" + (f"+{tries}" if tries else "") + ".efi"


def entries(esp: Path) -> list[Entry]:
    out = []
    d = esp / "EFI/Linux"
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        m = ENTRY.match(p.name)
        if m:
            out.append(Entry(p, m["version"], int(m["left"]) if m["left"] else None,
                             int(m["done"] or 0)))
    return out


def find_esp() -> Path:
    r = subprocess.run(["bootctl", "--print-esp-path"], capture_output=True, text=True,
                       check=False)
    path = r.stdout.strip()
    if r.returncode != 0 or not path:
        raise UpdateError(f"The EFI system partition cannot be found: {r.stderr.strip()}")
    return Path(path)


def matches(path: Path, size: int, sha256: str) -> bool:
    """Whether *path* holds exactly *size* bytes with this *sha256* (False if unreadable)."""
    try:
        return path.stat().st_size == size and file_sha256(path) == sha256
    except OSError:
        return False




def _rename(src: Path, dst: Path) -> None:
    """Rename *src* to *dst* so that a power cut leaves one or the other, whole.

    On FAT a rename writes a new directory entry with no size and no first
    cluster; the file's own metadata fills them in only when the file itself is
    written back. Syncing the directory alone can therefore leave an empty file
    under the new name, so the file is synced after the rename as well.
    """
    os.replace(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(dst.parent)


def install(esp: Path, version: str, tries: int, chunks: Iterator[bytes],
            check: Callable[[Path], None]) -> Path:
    """Write a UKI under a name systemd-boot ignores, check it, then rename it into place."""
    d = esp / "EFI/Linux"
    d.mkdir(parents=True, exist_ok=True)
    final = d / entry_name(version, tries)
    tmp = d / (f"cerulean_{version}.efi" + PARTIAL_SUFFIX)
    with tmp.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    try:
        check(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _rename(tmp, final)
    return final


def remove(entry_path: Path) -> None:
    entry_path.unlink(missing_ok=True)
    fsync_dir(entry_path.parent)


def clean_partials(esp: Path) -> None:
    """Remove half-written entries and entries set aside (see :func:`pause`)."""
    d = esp / "EFI/Linux"
    for suffix in (PARTIAL_SUFFIX, PAUSED_SUFFIX):
        for p in d.glob("*" + suffix) if d.is_dir() else []:
            p.unlink(missing_ok=True)


def paused(esp: Path, version: str) -> list[Path]:
    """The entries of *version* set aside by :func:`pause`."""
    d = esp / "EFI/Linux"
    return [p for p in (sorted(d.glob(f"cerulean_{version}*.efi{PAUSED_SUFFIX}"))
                        if d.is_dir() else [])
            if (m := ENTRY.match(p.name.removesuffix(PAUSED_SUFFIX)))
            and m["version"] == version]


def pause(e: Entry) -> Path:
    """Set *e* aside: the boot loader no longer sees it, its tries are kept in its name."""
    new = e.path.with_name(e.path.name + PAUSED_SUFFIX)
    _rename(e.path, new)
    return new


def resume(path: Path) -> Path:
    """Put an entry set aside by :func:`pause` back in place."""
    new = path.with_name(path.name.removesuffix(PAUSED_SUFFIX))
    _rename(path, new)
    return new


def mark_bad(e: Entry) -> Path:
    """Leave *e* no tries, so systemd-boot prefers any other entry."""
    # As systemd-bless-boot does: no tries left, the count of tries made kept.
    new = e.path.with_name(f"cerulean_{e.version}+0" + (f"-{e.done}" if e.done else "") + ".efi")
    _rename(e.path, new)
    return new


def bless_status() -> str:
    """systemd-bless-boot's view of this boot: good, bad, indeterminate or clean."""
    r = subprocess.run(["/usr/lib/systemd/systemd-bless-boot", "status"], capture_output=True,
                       text=True, check=False)
    return r.stdout.strip() or "unknown"


def bless(verdict: str) -> None:
    r = subprocess.run(["/usr/lib/systemd/systemd-bless-boot", verdict], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        raise UpdateError(f"systemd-bless-boot {verdict} failed: {r.stderr.strip()}")
