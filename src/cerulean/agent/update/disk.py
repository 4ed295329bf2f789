"""The A/B ``/usr`` slots on the host's disk: find them, write one, verify it.

The disk's GPT has two ``usr`` partitions and two ``usr-verity`` partitions
(Discoverable Partitions Specification types); the first of each pair is slot
A, the second slot B. The booted slot is the one whose data partition UUID is
named on the kernel command line (``systemd.verity_usr_data=PARTUUID=``). A
slot's partition UUIDs are its verity root hash (first and last 128 bits), so
the UKI built for a release finds exactly the slot written for it, A or B.

Partition labels say whether a slot holds something valid: ``usr-A`` /
``usr-A-verity`` when it does, ``_empty`` while it is being written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cerulean.agent.update.errors import UpdateError

# Discoverable Partitions Specification: /usr and its verity data, per architecture.
USR_TYPES = {
    "amd64": ("8484680c-9521-48c6-9c11-b0720656f69e", "77ff5f63-e7b6-4633-acf4-1565b864c0e6"),
    "arm64": ("b0e01050-ee5f-4390-949a-9101b17104e9", "6e11a4e7-fbca-4ded-b9e9-e1a512bb664e"),
}
EMPTY = "_empty"
CHUNK = 4 << 20


@dataclass(frozen=True)
class Partition:
    number: int
    node: str
    start: int  # bytes
    size: int  # bytes
    type: str
    uuid: str
    label: str


@dataclass(frozen=True)
class Slot:
    name: str  # "A" or "B"
    data: Partition
    hash: Partition

    @property
    def valid(self) -> bool:
        return self.data.label != EMPTY and self.hash.label != EMPTY


@dataclass(frozen=True)
class Layout:
    disk: str
    slots: tuple[Slot, Slot]
    booted: Slot

    @property
    def other(self) -> Slot:
        return self.slots[1] if self.booted is self.slots[0] else self.slots[0]


def read_table(disk: str) -> list[Partition]:
    r = subprocess.run(["sfdisk", "--json", disk], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise UpdateError(f"Reading the partition table of {disk} failed: {r.stderr.strip()}")
    try:
        table = json.loads(r.stdout)["partitiontable"]
        sector = int(table.get("sectorsize", 512))
        out = []
        for p in table["partitions"]:
            m = re.search(r"(\d+)$", p["node"])
            out.append(Partition(int(m[1]) if m else 0, p["node"], int(p["start"]) * sector,
                                 int(p["size"]) * sector, p["type"].lower(),
                                 p.get("uuid", "").lower(), p.get("name", "")))
        return out
    except (KeyError, ValueError, TypeError) as e:
        raise UpdateError(f"sfdisk's description of {disk} is not understood: {e}.") from e


def booted_usr_uuid(cmdline: str) -> str:
    m = re.search(r"(?:^|\s)systemd\.verity_usr_data=PARTUUID=([0-9a-fA-F-]{36})(?:\s|$)",
                  cmdline)
    if not m:
        raise UpdateError(
            "The kernel command line names no verity /usr partition: this host was not "
            "booted from a Cerulean A/B disk.")
    return m[1].lower()


def layout(disk: str, arch: str, cmdline: str) -> Layout:
    if arch not in USR_TYPES:
        raise UpdateError(f"Updates are not supported on {arch}.")
    data_type, hash_type = USR_TYPES[arch]
    parts = read_table(disk)
    datas = sorted((p for p in parts if p.type == data_type), key=lambda p: p.start)
    hashes = sorted((p for p in parts if p.type == hash_type), key=lambda p: p.start)
    if len(datas) != 2 or len(hashes) != 2:
        raise UpdateError(
            f"{disk} does not have two /usr slots with verity partitions (found "
            f"{len(datas)} and {len(hashes)}).")
    slots = (Slot("A", datas[0], hashes[0]), Slot("B", datas[1], hashes[1]))
    wanted = booted_usr_uuid(cmdline)
    booted = [s for s in slots if s.data.uuid == wanted]
    if not booted:
        raise UpdateError(f"No /usr slot on {disk} has the booted partition UUID {wanted}.")
    return Layout(disk, slots, booted[0])


def _udev_properties(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    return dict(line[2:].split("=", 1) for line in lines if line.startswith("E:") and "=" in line)


def booted_slot_name(cmdline: str, root: Path = Path("/")) -> str:
    """The booted slot ("A" or "B") from sysfs and udev's database alone: no device is
    opened, so a sandboxed service without device access can tell it too. The slots
    are the partitions of the booted one's type on its disk, in disk order."""
    wanted = booted_usr_uuid(cmdline)
    parts = []  # (disk, start, type, uuid)
    for part in sorted((root / "sys/class/block").iterdir()):
        try:
            if not (part / "partition").exists():
                continue
            dev = (part / "dev").read_text().strip()
            start = int((part / "start").read_text())
        except (OSError, ValueError):
            continue
        props = _udev_properties(root / f"run/udev/data/b{dev}")
        parts.append((part.resolve().parent.name, start,
                      props.get("ID_PART_ENTRY_TYPE", "").lower(),
                      props.get("ID_PART_ENTRY_UUID", "").lower()))
    booted = [p for p in parts if p[3] == wanted]
    if not booted:
        raise UpdateError(f"No partition with the booted /usr UUID {wanted} is known to udev.")
    disk, _, kind, _ = booted[0]
    slots = sorted(p for p in parts if p[0] == disk and p[2] == kind)
    if len(slots) != 2:
        raise UpdateError(f"The booted disk {disk} does not have two /usr slots.")
    return "A" if slots[0][3] == wanted else "B"


def find_disk(partuuid: str) -> str:
    """The whole-disk device holding the partition with *partuuid*."""
    link = Path("/dev/disk/by-partuuid") / partuuid
    try:
        part = link.resolve(strict=True)
    except OSError as e:
        raise UpdateError(f"The booted /usr partition {partuuid} has no device node.") from e
    parent = (Path("/sys/class/block") / part.name).resolve().parent.name
    return f"/dev/{parent}"


def _sfdisk(disk: str, *args: str) -> None:
    r = subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", *args],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise UpdateError(f"Changing the partition table of {disk} failed: {r.stderr.strip()}")


def set_partition(disk: str, p: Partition, *, label: str | None = None,
                  part_uuid: str | None = None) -> None:
    if part_uuid is not None:
        _sfdisk(disk, "--part-uuid", disk, str(p.number), part_uuid)
    if label is not None:
        _sfdisk(disk, "--part-label", disk, str(p.number), label)


def write_stream(disk: str, p: Partition, chunks: Iterator[bytes], size: int, sha256: str,
                 progress: Callable[[int], None] | None = None) -> None:
    """Write *chunks* (exactly *size* bytes) at the start of partition *p*, then verify.

    The data is flushed to the device, dropped from the page cache and read back,
    so what is checked is what the disk holds.
    """
    if size > p.size:
        raise UpdateError(
            f"The update needs {size} bytes but partition {p.node} holds {p.size}: the slot "
            "is too small for this release.")
    h = hashlib.sha256()
    written = 0
    fd = os.open(disk, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for chunk in chunks:
            if written + len(chunk) > size:
                raise UpdateError(f"The payload for {p.node} is longer than its signed size.")
            os.pwrite(fd, chunk, p.start + written)
            h.update(chunk)
            written += len(chunk)
            if progress:
                progress(written)
        os.fsync(fd)
    finally:
        os.close(fd)
    if written != size or h.hexdigest() != sha256:
        raise UpdateError(f"The payload written to {p.node} does not match its signed hash.")
    if read_hash(disk, p, size) != sha256:
        raise UpdateError(f"{p.node} does not read back what was written to it.")


def _read(disk: str, p: Partition, size: int, *, from_media: bool = False) -> Iterator[bytes]:
    """The first *size* bytes of *p* in chunks; *from_media*: not from the page cache."""
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if from_media:
            os.posix_fadvise(fd, p.start, size, os.POSIX_FADV_DONTNEED)
        done = 0
        while done < size:
            chunk = os.pread(fd, min(CHUNK, size - done), p.start + done)
            if not chunk:
                break
            yield chunk
            done += len(chunk)
    finally:
        os.close(fd)


def read_hash(disk: str, p: Partition, size: int) -> str:
    h = hashlib.sha256()
    for chunk in _read(disk, p, size, from_media=True):
        h.update(chunk)
    return h.hexdigest()


def read_bytes_to(disk: str, p: Partition, size: int, dest: Path) -> str:
    """Copy the first *size* bytes of *p* to *dest*; returns their sha256."""
    h = hashlib.sha256()
    with dest.open("wb") as out:
        for chunk in _read(disk, p, size):
            out.write(chunk)
            h.update(chunk)
    return h.hexdigest()
