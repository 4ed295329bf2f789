"""Disk images for atomic updates: GPT, ESP + UKIs, A/B verity /usr, growable root.

Layout (Discoverable Partitions Specification types):

====  ============  ===================================================
 #    partition     contents
====  ============  ===================================================
 1    ESP           systemd-boot and one UKI per slot (EFI/Linux/)
 2    usr-A         erofs image of /usr, read-only
 3    usr-A-verity  its dm-verity hash tree
 4    usr-B         empty until the first update (same size as A)
 5    usr-B-verity  empty
 6    root          ext4 with /etc, /var, /home...; grown on first boot
(7)   var           only when the root is read-only (system.read-only):
                    ext4 with /var, grown on first boot instead of root
====  ============  ===================================================

systemd-boot counts boots: a slot's UKI is installed as ``NAME+TRIES.efi``,
each boot attempt lowers the count, and systemd-bless-boot renames it to
``NAME.efi`` once ``boot-complete.target`` is reached.

The verity root hash is the partitions' identity: the data partition's UUID
is its first 128 bits and the hash partition's UUID its last 128 bits, and
the slot's UKI carries ``usrhash=`` on its command line, so the initrd opens
exactly the slot it was booted for. Every tool runs from the tools tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from cerulean.arch import Arch
from cerulean.build.chroot import run_in
from cerulean.errors import CeruleanError
from cerulean.protocol.update import verity_uuids

ESP_MIB = 256
MIB = 1024 * 1024


def stable_uuid(*parts: str) -> str:
    """A UUID derived from *parts*, so rebuilds get the same identifiers."""
    return str(uuid.UUID(bytes=hashlib.sha256("\0".join(parts).encode()).digest()[:16], version=4))


@dataclass(frozen=True)
class UsrImage:
    data: Path
    hash: Path
    roothash: str

    @property
    def data_uuid(self) -> str:
        return verity_uuids(self.roothash)[0]

    @property
    def hash_uuid(self) -> str:
        return verity_uuids(self.roothash)[1]


def make_usr(tools: Path, rootfs: Path, work: Path, epoch: int) -> UsrImage:
    """erofs of rootfs/usr plus its dm-verity hash tree."""
    data, hashf = work / "usr.erofs", work / "usr.verity"
    run_in(tools, ["mkfs.erofs", "-zlz4hc", f"--workers={os.cpu_count() or 2}", f"-T{epoch}",
                   "--all-time",
                   f"-U{stable_uuid('erofs', str(epoch))}", "/work/usr.erofs", "/src/usr"],
           binds={work: "/work"}, ro_binds={rootfs / "usr": "/src/usr"},
           what="Making the /usr erofs image")
    salt = hashlib.sha256(data.read_bytes()[:1 << 20] + str(epoch).encode()).hexdigest()
    run_in(tools, ["veritysetup", "format", f"--salt={salt}",
                   f"--uuid={stable_uuid('verity', salt)}",
                   "--root-hash-file=/work/usr.roothash", "/work/usr.erofs", "/work/usr.verity"],
           binds={work: "/work"}, what="Computing the /usr dm-verity hash tree")
    roothash = (work / "usr.roothash").read_text().strip()
    return UsrImage(data, hashf, roothash)


def make_uki(tools: Path, rootfs: Path, work: Path, arch: Arch, kver: str, initrd: Path,
             cmdline: str, out: Path) -> None:
    stub = rootfs / f"usr/lib/systemd/boot/efi/linux{arch.efi}.efi.stub"
    if not stub.exists():
        raise CeruleanError(
            f"The image has no EFI stub {stub.name}: add systemd-boot-efi to packages.include."
        )
    kernel = rootfs / f"boot/vmlinuz-{kver}"
    run_in(tools, ["ukify", "build", f"--efi-arch={arch.efi}", "--linux=/in/vmlinuz",
                   "--initrd=/in/initrd", f"--cmdline={cmdline}", "--os-release=@/in/os-release",
                   f"--uname={kver}", "--stub=/in/stub", f"--output=/work/{out.name}"],
           binds={work: "/work"},
           ro_binds={kernel: "/in/vmlinuz", initrd: "/in/initrd", stub: "/in/stub",
                     rootfs / "usr/lib/os-release": "/in/os-release"},
           what="Building the unified kernel image")


def make_esp(tools: Path, rootfs: Path, work: Path, arch: Arch, ukis: dict[str, Path]) -> Path:
    """A FAT32 ESP image with systemd-boot as the default loader and the slots' UKIs."""
    tree = work / "esp"
    shutil.rmtree(tree, ignore_errors=True)
    boot = rootfs / f"usr/lib/systemd/boot/efi/systemd-boot{arch.efi}.efi"
    if not boot.exists():
        raise CeruleanError(f"The image has no {boot.name}: add systemd-boot-efi to the packages.")
    for d in ("EFI/BOOT", "EFI/systemd", "EFI/Linux", "loader"):
        (tree / d).mkdir(parents=True)
    shutil.copy(boot, tree / f"EFI/BOOT/BOOT{arch.efi.upper()}.EFI")
    shutil.copy(boot, tree / f"EFI/systemd/{boot.name}")
    for name, path in ukis.items():
        shutil.copy(path, tree / "EFI/Linux" / name)
    (tree / "loader/loader.conf").write_text("timeout 0\neditor no\nconsole-mode keep\n")
    img = work / "esp.img"
    img.unlink(missing_ok=True)
    with img.open("wb") as f:
        f.truncate(ESP_MIB * MIB)
    serial = hashlib.sha256(b"".join(p.read_bytes()[:4096] for p in ukis.values())).hexdigest()[:8]
    run_in(tools, ["mkfs.vfat", "-F", "32", "-n", "ESP", "-i", serial, "/work/esp.img"],
           binds={work: "/work"}, what="Formatting the ESP")
    run_in(tools, ["sh", "-c", "mcopy -s -p -m -i /work/esp.img /work/esp/* ::/"],
           binds={work: "/work"}, env={"MTOOLS_SKIP_CHECK": "1"}, what="Filling the ESP")
    return img


def root_size(tree: Path) -> int:
    """Bytes for the root partition: its files plus a third for metadata and growth room.

    It is grown to the whole disk on first boot; this is only the image's size.
    """
    total = 0
    count = 0
    for dirpath, dirs, names in os.walk(tree):
        for n in names + dirs:
            count += 1
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            total += (st.st_size + 4095) // 4096 * 4096
    wanted = total * 4 // 3 + count * 256 + 64 * MIB
    return (wanted + MIB - 1) // MIB * MIB


def repart_config(work: Path, arch: Arch, usr: UsrImage, slot_bytes: int, root_uuid: str,
                  root_bytes: int, var: tuple[str, int] | None = None) -> Path:
    """systemd-repart definitions for the whole disk.

    *var* is (partition UUID, bytes) for images whose root is read-only: /var then
    gets its own partition, filled from /src/var, after the root partition.
    """
    d = work / "repart.d"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    hash_bytes = usr.hash.stat().st_size
    # The B slot's hash partition holds the hash tree of a full slot (about 1/120 of it).
    b_hash = max(hash_bytes, slot_bytes // 100)
    b_hash = (b_hash + MIB - 1) // MIB * MIB
    defs = {
        "00-esp": "Type=esp\nCopyBlocks=/work/esp.img\n",
        "10-usr-a": f"Type=usr-{arch.gpt}\nLabel=usr-A\nUUID={usr.data_uuid}\n"
                    f"CopyBlocks=/work/usr.erofs\nSizeMinBytes={slot_bytes}\n"
                    f"SizeMaxBytes={slot_bytes}\nReadOnly=yes\n",
        "11-usr-a-verity": f"Type=usr-{arch.gpt}-verity\nLabel=usr-A-verity\n"
                           f"UUID={usr.hash_uuid}\nCopyBlocks=/work/usr.verity\n"
                           f"SizeMinBytes={b_hash}\nSizeMaxBytes={b_hash}\nReadOnly=yes\n",
        "12-usr-b": f"Type=usr-{arch.gpt}\nLabel=_empty\nSizeMinBytes={slot_bytes}\n"
                    f"SizeMaxBytes={slot_bytes}\n",
        "13-usr-b-verity": f"Type=usr-{arch.gpt}-verity\nLabel=_empty\nSizeMinBytes={b_hash}\n"
                           f"SizeMaxBytes={b_hash}\n",
        "20-root": f"Type=root-{arch.gpt}\nLabel=root\nUUID={root_uuid}\nFormat=ext4\n"
                   f"CopyFiles=/src/root:/\nSizeMinBytes={root_bytes}\n"
                   f"SizeMaxBytes={root_bytes}\n",
    }
    if var is not None:
        # The root partition is marked read-only and is not grown; /var is.
        defs["20-root"] += "ReadOnly=yes\nGrowFileSystem=no\n"
        var_uuid, var_bytes = var
        defs["30-var"] = (f"Type=var\nLabel=var\nUUID={var_uuid}\nFormat=ext4\n"
                          f"CopyFiles=/src/var:/\nSizeMinBytes={var_bytes}\n"
                          f"SizeMaxBytes={var_bytes}\n")
    for name, body in defs.items():
        (d / f"{name}.conf").write_text("[Partition]\n" + body)
    return d


def assemble(tools: Path, work: Path, root_tree: Path, seed: str, out: Path,
             var_tree: Path | None = None) -> None:
    out.unlink(missing_ok=True)
    trees = {root_tree: "/src/root", **({var_tree: "/src/var"} if var_tree else {})}
    run_in(tools, ["systemd-repart", "--empty=create", "--size=auto", "--offline=yes",
                   "--dry-run=no", f"--seed={seed}", "--definitions=/work/repart.d",
                   "--json=off", "--no-pager", f"/work/{out.name}"],
           binds={work: "/work"}, ro_binds=trees,
           env={"SYSTEMD_LOG_LEVEL": "warning"}, what="Assembling the disk with systemd-repart")


def align_to_mib(tools: Path, work: Path, raw: Path) -> None:
    """Pad the disk to a whole number of MiB (Azure requires it) and move the backup GPT."""
    size = raw.stat().st_size
    if size % MIB == 0:
        return
    with raw.open("r+b") as f:
        f.truncate((size + MIB - 1) // MIB * MIB)
    run_in(tools, ["sfdisk", "--relocate", "gpt-bak-std", f"/work/{raw.name}"],
           binds={work: "/work"}, what="Moving the backup GPT to the end of the disk")


def convert(tools: Path, work: Path, raw: Path, fmt: str, out: Path) -> None:
    if fmt == "raw":
        raw.rename(out)
        return
    opts = {
        "qcow2": ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
        # Azure wants fixed VHDs whose virtual size is a whole number of MiB.
        "vhd": ["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
        "vhdx": ["-O", "vhdx", "-o", "subformat=dynamic"],
    }[fmt]
    run_in(tools, ["qemu-img", "convert", "-f", "raw", *opts, f"/work/{raw.name}",
                   f"/work/{out.name}"], binds={work: "/work"},
           what=f"Converting the disk to {fmt}")
