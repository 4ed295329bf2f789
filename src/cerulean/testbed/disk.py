"""A disk image as the testbed sees it before booting: format, GPT and architecture.

The format comes from ``qemu-img info``. Raw images are read directly; qcow2,
VHD and VHDX images through ``qemu-img dd``. Either way the image is only
read. The architecture comes from the Discoverable Partitions Specification
types of the root and /usr partitions (and their verity partitions), else
from the name of the default boot loader on the ESP.
"""

from __future__ import annotations

import json
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from cerulean.errors import CeruleanError
from cerulean.run import require_tool, run

# qemu-img's format names; "vpc" is what QEMU calls VHD.
FORMATS = ("raw", "qcow2", "vpc", "vhdx")

ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
DPS_ARCH = {
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "amd64",  # root-x86-64
    "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5": "amd64",  # root-x86-64-verity
    "8484680c-9521-48c6-9c11-b0720656f69e": "amd64",  # usr-x86-64
    "77ff5f63-e7b6-4633-acf4-1565b864c0e6": "amd64",  # usr-x86-64-verity
    "b921b045-1df0-41c3-af44-4c6f280d3fae": "arm64",  # root-arm64
    "df3300ce-d69f-4c92-978c-9bfb0f38d820": "arm64",  # root-arm64-verity
    "b0e01050-ee5f-4390-949a-9101b17104e9": "arm64",  # usr-arm64
    "6e11a4e7-fbca-4ded-b9e9-e1a512bb664e": "arm64",  # usr-arm64-verity
}
# FAT directory entries store 8.3 names space-padded and upper-case, so the
# default loader EFI/BOOT/BOOTX64.EFI is the 11 bytes "BOOTX64 EFI" on the ESP.
ESP_LOADERS = {b"BOOTX64 EFI": "amd64", b"BOOTAA64EFI": "arm64"}
# Directories are written right after the FATs, well inside the first MiBs.
ESP_SCAN_BYTES = 16 * 1024 * 1024
SECTOR_SIZES = (512, 4096)
_GPT_SIGNATURE = b"EFI PART"
_MAX_ENTRIES = 1024


@dataclass(frozen=True)
class DiskInfo:
    path: Path
    format: str
    virtual_size: int


@dataclass(frozen=True)
class Partition:
    number: int
    type_guid: str
    name: str
    first_lba: int
    last_lba: int
    sector_size: int

    @property
    def offset(self) -> int:
        return self.first_lba * self.sector_size

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * self.sector_size


def check_disk_path(disk: Path) -> Path:
    """*disk* made absolute, if it is an existing regular file."""
    if not disk.exists():
        raise CeruleanError(f"The disk image {disk} does not exist.")
    if not disk.is_file():
        raise CeruleanError(f"{disk} is not a disk image file.")
    return disk.resolve()


def disk_info(disk: Path) -> DiskInfo:
    """Format and virtual size of *disk*, as ``qemu-img info`` reports them."""
    path = check_disk_path(disk)
    qemu_img = require_tool("qemu-img", "qemu-utils")
    # -U: only metadata is read, so a disk that a running VM holds is fine too.
    proc = run([qemu_img, "info", "-U", "--output=json", path], check=False)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise CeruleanError(f"{disk} cannot be read as a disk image: "
                            f"{lines[-1] if lines else 'qemu-img failed'}.")
    data = json.loads(proc.stdout)
    fmt = str(data.get("format", ""))
    if fmt == "raw" and _is_fixed_vhd(path):
        # A fixed VHD has no header, only a footer, so qemu-img's probe calls it raw;
        # booted as raw, the guest would see the footer as a stray last sector.
        proc = run([qemu_img, "info", "-U", "-f", "vpc", "--output=json", path])
        data = json.loads(proc.stdout)
        fmt = "vpc"
    if fmt not in FORMATS:
        raise CeruleanError(f"{disk} is a {fmt or 'unknown'} image; the testbed boots "
                            "raw, qcow2, vpc (VHD) and vhdx disk images.")
    return DiskInfo(path, fmt, int(data.get("virtual-size", 0)))


def _is_fixed_vhd(path: Path) -> bool:
    """True when the file ends with a VHD footer (cookie "conectix")."""
    size = path.stat().st_size
    if size < 512 or size % 512:
        return False
    with path.open("rb") as f:
        f.seek(size - 512)
        return f.read(8) == b"conectix"


class DiskReader:
    """Reads byte ranges of a disk image's guest-visible contents."""

    def __init__(self, path: Path, fmt: str, size: int | None = None) -> None:
        self.path, self.format = path, fmt
        self.size = path.stat().st_size if size is None and fmt == "raw" else size

    def read(self, offset: int, size: int) -> bytes:
        """Up to *size* bytes at *offset*; fewer at the end of the disk."""
        if self.size is not None:
            size = max(0, min(size, self.size - offset))
        if size <= 0:
            return b""
        if self.format == "raw":
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.read(size)
        return self._read_converted(offset, size)

    def _read_converted(self, offset: int, size: int) -> bytes:
        start = offset // 512 * 512
        end = -(-(offset + size) // 512) * 512
        bs = 4096 if start % 4096 == 0 and end % 4096 == 0 else 512
        qemu_img = require_tool("qemu-img", "qemu-utils")
        with tempfile.TemporaryDirectory(prefix="cerulean-disk-") as tmp:
            out = Path(tmp) / "range.raw"
            # qemu-img dd counts "count" from the start of the disk, not from
            # "skip" (unlike dd(1)), so it is the end block of the range.
            run([qemu_img, "dd", "-U", "-f", self.format, "-O", "raw", f"bs={bs}",
                 f"skip={start // bs}", f"count={end // bs}", f"if={self.path}", f"of={out}"])
            data = out.read_bytes()
        return data[offset - start:offset - start + size]


def read_gpt(reader: DiskReader) -> list[Partition]:
    """The used entries of the disk's primary GPT; a CeruleanError if it has none."""
    head = reader.read(0, 2 * max(SECTOR_SIZES))
    for ss in SECTOR_SIZES:
        header = head[ss:ss + 92]
        if len(header) == 92 and header.startswith(_GPT_SIGNATURE):
            return _parse_entries(reader, header, ss)
    raise CeruleanError(f"{reader.path} is not a bootable disk image: it has no GPT "
                        "partition table.")


def _parse_entries(reader: DiskReader, header: bytes, ss: int) -> list[Partition]:
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if not 0 < count <= _MAX_ENTRIES or entry_size < 128 or entry_size % 8:
        raise CeruleanError(f"{reader.path} has a damaged GPT header "
                            f"({count} entries of {entry_size} bytes).")
    table = reader.read(entries_lba * ss, count * entry_size)
    parts = []
    for i in range(len(table) // entry_size):
        e = table[i * entry_size:(i + 1) * entry_size]
        type_guid = uuid.UUID(bytes_le=e[:16])
        if type_guid.int == 0:
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        name = e[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(Partition(i + 1, str(type_guid), name, first, last, ss))
    return parts


def arch_from_partitions(reader: DiskReader, parts: list[Partition]) -> str | None:
    """amd64/arm64 from partition types, else from the ESP's boot loader; None if unknown."""
    found = {DPS_ARCH[p.type_guid] for p in parts if p.type_guid in DPS_ARCH}
    if len(found) > 1:
        return None
    if found:
        return found.pop()
    for esp in (p for p in parts if p.type_guid == ESP_TYPE):
        data = reader.read(esp.offset, min(esp.size, ESP_SCAN_BYTES))
        loaders = {arch for name, arch in ESP_LOADERS.items() if name in data}
        if len(loaders) == 1:
            return loaders.pop()
    return None


def inspect_disk(disk: Path, fmt: str | None = None
                 ) -> tuple[DiskInfo, list[Partition], str | None]:
    """Format, partitions and (if recognisable) architecture of *disk*."""
    if fmt is None:
        info = disk_info(disk)
    else:
        path = check_disk_path(disk)
        info = DiskInfo(path, fmt, path.stat().st_size if fmt == "raw" else 0)
    reader = DiskReader(info.path, info.format, info.virtual_size or None)
    parts = read_gpt(reader)
    return info, parts, arch_from_partitions(reader, parts)


def detect_arch(disk: Path, fmt: str | None = None) -> str:
    """"amd64" or "arm64" for *disk* (format from ``qemu-img info`` unless *fmt* is given)."""
    _, _, arch = inspect_disk(disk, fmt)
    if arch is None:
        raise CeruleanError(
            f"Cannot tell the architecture of {disk} from its partition types or its ESP's "
            "EFI/BOOT/BOOT*.EFI loader; pass --arch amd64 or --arch arm64."
        )
    return arch
