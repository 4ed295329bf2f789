"""Building a system definition into bootable disk images, one per architecture.

The steps, in order, for each architecture (read ``build_system_image``):
``tools_tree`` → ``cached_rootfs`` → ``configure`` → ``make_initrd`` →
``make_usr`` → ``make_uki`` → ``make_esp`` → ``assemble`` → ``convert``.
Work happens in a temporary directory inside the output directory; only a
finished disk image is moved to ``NAME-ARCH.FORMAT``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cerulean import arch as arches
from cerulean.agent import integrity
from cerulean.arch import host_arch
from cerulean.build import disk, lean, sysconfig
from cerulean.build.agent import install_agent
from cerulean.build.chroot import run_in
from cerulean.build.definition import BUILTIN_IMAGES, ImageDefinition, images_dir, load_definition
from cerulean.build.image import lock_downloads
from cerulean.build.plan import archive_for, ensure_lock
from cerulean.build.system import (
    Progress,
    cached_rootfs,
    installed_versions,
    overlay,
    rootfs_key,
)
from cerulean.debian.archive import ArchiveConfig
from cerulean.debian.cache import Cache
from cerulean.debian.fetch import fetch_all
from cerulean.debian.lock import Lock
from cerulean.errors import CeruleanError

EXTENSIONS = {"raw": "raw", "qcow2": "qcow2", "vhd": "vhd", "vhdx": "vhdx"}
INITRD_DRIVERS = ("erofs dm-verity dm-mod virtio_blk virtio_scsi virtio_pci virtio_net sd_mod "
                  "nvme ext4 vfat ahci xhci_pci hv_storvsc hv_vmbus")


@dataclass
class DiskResult:
    arch: str
    path: Path | None  # None when only the update payload was made
    size: int
    usr_bytes: int
    roothash: str
    seconds: float
    rootfs_cached: bool


@dataclass
class SystemBuildResult:
    image: str
    version: str
    disks: list[DiskResult] = field(default_factory=list)
    seconds: float = 0.0


def tools_tree(cache: Cache, say: Callable[[str], None], offline: bool) -> Path:
    """The host-architecture tools tree, composed from images/tools.toml (cached): a
    checkout's, else the built-in one (a publisher's working directory may hold an
    images/ directory of its own definitions without it)."""
    local = images_dir() / "tools.toml"
    defn = load_definition(local if local.is_file() else BUILTIN_IMAGES / "tools.toml")
    lock = ensure_lock(defn, cache, offline=offline).lock
    arch = host_arch()
    if arch is None or arch not in lock.packages:
        raise CeruleanError(
            f"The tools lock has no packages for this host ({platform.machine()}).")
    fetch_all(cache, lock_downloads(archive_for(defn), lock, [arch]), offline=offline)
    say("preparing the tools tree")
    root, _ = cached_rootfs(arch, lock.packages[arch], cache, say)
    return root


INITRD_FORMAT = 6  # bump when what goes into the initrd changes
# Exactly these dracut modules (and what they need), not dracut's default set: the initrd
# opens the verity /usr, grows the root partition and mounts both. dracut-systemd keeps
# rd.shell=0 and rd.emergency=reboot working (a failed boot reboots, so boot counting can
# fall back).
INITRD_MODULES = ("systemd", "systemd-initrd", "systemd-veritysetup", "systemd-repart", "dm",
                  "dracut-systemd", "base")
# A drop-in for the initrd's veritysetup unit (build/files/initrd-usr-check.conf): a /usr
# that fails verification fails the boot at once (it reads a block with dd).
USR_CHECK = "initrd-usr-check.conf"
USR_CHECK_AT = "/usr/lib/systemd/system/systemd-veritysetup@usr.service.d/50-cerulean-check.conf"


def kernel_modules(rootfs: Path, kver: str) -> set[str]:
    """The names of the modules *kver* has, loadable or built in ('-' read as '_')."""
    names = set()
    base = rootfs / "usr/lib/modules" / kver
    for index in ("modules.dep", "modules.builtin"):
        path = base / index
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                name = line.split(":", 1)[0].rsplit("/", 1)[-1].split(".ko", 1)[0]
                names.add(name.replace("-", "_"))
    return names


def dracut_argv(defn: ImageDefinition, kver: str, available: set[str] | None = None
                ) -> list[str]:
    """dracut's command line for *defn*: its modules and, if the definition lists them,
    only the kernel drivers it boots with (else every storage driver). Drivers the
    kernel does not have (*available*; e.g. VMware's on arm64) are left out."""
    modules = [*INITRD_MODULES, *defn.system_initrd_modules]
    drivers: list[str] = []
    if defn.system_initrd_drivers:
        missing = set(missing_drivers(defn, available))
        wanted = [d for d in defn.system_initrd_drivers if d not in missing]
        if not wanted:
            raise CeruleanError(
                f"None of system.initrd-drivers is a module of kernel {kver} "
                f"({', '.join(defn.system_initrd_drivers)}): the initrd could not open a "
                "disk. Check the names against the kernel's modules.dep.")
        drivers = ["--drivers", " ".join(wanted)]
    else:
        modules.append("kernel-modules")
        drivers = ["--add-drivers", INITRD_DRIVERS]
    return ["dracut", "--force", "--no-hostonly", "--reproducible", "--modules",
            " ".join(modules), *drivers, "--omit", "plymouth network",
            "--include", f"/work/{USR_CHECK}", USR_CHECK_AT, "--install", "dd",
            "--compress=zstd", "/work/initrd.img", kver]


# dracut's own zstd arguments (dracut.sh), run by the tools tree's zstd on
# the archive dracut wrote uncompressed: under emulation the target's zstd took two
# minutes of an arm64 build. Multi-threaded zstd writes the same bytes whatever the
# number of threads.
ZSTD = ("zstd", "-15", "-q", "-T0")
# dracut puts CPU microcode in an uncompressed archive in front of the compressed one;
# an image that has microcode packages keeps dracut's own compression.
EARLY_CPIO = b"early_cpio"


def compress_natively(argv: list[str]) -> list[str]:
    """*argv* (from :func:`dracut_argv`) writing an uncompressed archive."""
    return ["--no-compress" if a == "--compress=zstd" else a for a in argv]


def _check_initrd(archive: Path, output: str) -> None:
    """dracut only logs a file it could not include: the uncompressed *archive* (cpio
    names are plain text) must hold the /usr check and the dd it runs."""
    data = archive.read_bytes()
    for name in (USR_CHECK_AT, "/usr/bin/dd"):
        if name.lstrip("/").encode() + b"\0" not in data:
            said = [line.strip() for line in output.splitlines() if "error" in line.lower()][-2:]
            raise CeruleanError(f"dracut left {name} out of the initrd: "
                                f"{' | '.join(said) or 'it gave no error'}.")


def missing_drivers(defn: ImageDefinition, available: set[str] | None) -> list[str]:
    """The drivers of ``system.initrd-drivers`` that the kernel (*available*) lacks."""
    if available is None:
        return []
    return [d for d in defn.system_initrd_drivers if d.replace("-", "_") not in available]


def make_initrd(rootfs: Path, work: Path, kver: str, defn: ImageDefinition, cache: Cache,
                rootfs_id: str, progress: Progress | None = None,
                tools: Path | None = None) -> Path:
    """The initrd, built by dracut inside the image (cached: dracut takes ~10 s, minutes
    under emulation) and compressed by the *tools* tree's zstd if given.

    It does not depend on the release version: dracut copies os-release into the
    initrd, so it runs on one without IMAGE_VERSION, and the releases of one package
    set share an initrd. (The UKI's own os-release section names the version.)
    """
    available = kernel_modules(rootfs, kver)
    argv = dracut_argv(defn, kver, available)
    if (missing := missing_drivers(defn, available)) and progress:
        # One definition serves both architectures (arm64 has no VMware driver), so a
        # name the kernel lacks is said, not an error (unless none is left).
        progress(f"initrd: kernel {kver} has no {', '.join(missing)}; left out")
    # Everything the initrd is made from: the packages, dracut's arguments, the files
    # Cerulean adds to the image, and the image's identity (os-release, host name).
    # (and the zstd that compresses it: another version may write other bytes).
    zstd = ["zstd", installed_versions(tools).get("zstd", ""), *ZSTD] if tools else []
    key = hashlib.sha256("\0".join([
        f"initrd-v{INITRD_FORMAT}", rootfs_id, *argv, sysconfig.files_digest(), defn.name,
        defn.image_version, defn.system_hostname, *zstd,
    ]).encode()).hexdigest()[:32]
    cached = cache.subdir("initrd") / key
    out = work / "initrd.img"
    if cached.is_file():
        shutil.copy(cached, out)
        return out
    osr = rootfs / "usr/lib/os-release"
    release = osr.read_bytes()
    osr.write_bytes(b"".join(line for line in release.splitlines(keepends=True)
                             if not line.startswith(b"IMAGE_VERSION=")))
    try:
        check = work / USR_CHECK
        check.write_bytes(sysconfig.FILES.joinpath(USR_CHECK).read_bytes())
        check.chmod(0o644)  # dracut keeps the mode: not the builder's umask
        dracut = compress_natively(argv) if tools is not None else argv
        built = run_in(rootfs, dracut, binds={work: "/work"}, env={"SOURCE_DATE_EPOCH": "0"},
                       what="Building the initrd with dracut", timeout=3600)
        if tools is not None:
            _check_initrd(out, built.stderr + built.stdout)
            with out.open("rb") as f:
                early = EARLY_CPIO in f.read(4096)
            if early:
                run_in(rootfs, argv, binds={work: "/work"}, env={"SOURCE_DATE_EPOCH": "0"},
                       what="Building the initrd with dracut", timeout=3600)
            else:
                plain = out.with_name("initrd.cpio")
                out.replace(plain)
                run_in(tools, [*ZSTD, "-o", "/work/initrd.img", "/work/initrd.cpio"],
                       binds={work: "/work"}, what="Compressing the initrd", timeout=900)
                plain.unlink()
    finally:
        osr.write_bytes(release)
    tmp = cached.with_name(f".{key}.{os.getpid()}")
    shutil.copy(out, tmp)
    tmp.replace(cached)
    return out


def cmdline(arch: arches.Arch, usr: disk.UsrImage, root_uuid: str, extra: Sequence[str],
            read_only: bool = False) -> str:
    """The UKI's kernel command line. It names no slot: the slot's partition UUIDs are
    derived from the verity root hash, so one UKI boots its /usr in either slot.

    ``panic=10`` and ``rd.emergency=reboot`` turn a boot that cannot finish into a
    reboot, so boot counting gets to try the other release instead of a hung host.
    """
    return " ".join([
        f"usrhash={usr.roothash}",
        f"systemd.verity_usr_data=PARTUUID={usr.data_uuid}",
        f"systemd.verity_usr_hash=PARTUUID={usr.hash_uuid}",
        "mount.usr=/dev/mapper/usr", "mount.usrfstype=erofs", "mount.usrflags=ro",
        f"root=PARTUUID={root_uuid}", "ro" if read_only else "rw",
        "console=tty0", f"console={arch.console}",
        "apparmor=1", "security=apparmor", "panic=10", "rd.shell=0", "rd.emergency=reboot",
        *extra,
    ])


def uki_name(version: str, tries: int) -> str:
    """The release's UKI file name on the ESP; ``+TRIES`` turns on systemd-boot's counting."""
    return f"cerulean_{version}" + (f"+{tries}" if tries else "") + ".efi"


def default_version(defn: ImageDefinition, lock: Lock) -> str:
    """MAJOR.YYYYMMDD.0, the date being the lock's archive snapshot."""
    return f"{defn.image_version}.{datetime.fromtimestamp(lock.source_date_epoch, UTC):%Y%m%d}.0"


def _root_tree(rootfs: Path, dest: Path, separate: tuple[str, ...] = ()) -> None:
    """Everything but /usr's contents (and *separate* trees, left as empty mount points)."""
    dest.mkdir()
    for item in sorted(rootfs.iterdir()):
        if item.name == "usr" or item.name in separate:
            (dest / item.name).mkdir(mode=0o755)
            continue
        r = subprocess.run(["cp", "-a", str(item), str(dest / item.name)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise CeruleanError(f"Copying {item} for the root partition failed: {r.stderr}")


@dataclass(frozen=True)
class DiskJob:
    """One architecture's build: the disk image to write and/or where the payload goes."""

    version: str
    fmt: str
    out: Path | None  # the disk image (None: payload only)
    payload_dir: Path | None = None  # gets usr.erofs, usr.verity, uki.efi


def build_disk(defn: ImageDefinition, lock: Lock, arch_name: str, tools: Path, work: Path,
               cache: Cache, job: DiskJob, say: Callable[[str], None]) -> DiskResult:
    started = time.monotonic()
    arch = arches.get(arch_name)
    say(f"{arch_name}: composing the root file system")
    base, hit = cached_rootfs(arch_name, lock.packages[arch_name], cache, say, native=tools)
    with overlay(base, work / "rootfs") as rootfs:
        return _build_disk(defn, lock, arch, rootfs, tools, work, cache, job, say,
                           started, hit)


def _build_disk(defn: ImageDefinition, lock: Lock, arch: arches.Arch, rootfs: Path, tools: Path,
                work: Path, cache: Cache, job: DiskJob, say: Callable[[str], None],
                started: float, hit: bool) -> DiskResult:
    arch_name = arch.debian
    epoch = lock.source_date_epoch
    version = job.version
    say(f"{arch_name}: configuring")
    sysconfig.write_identity(rootfs, defn, version)
    sysconfig.write_hardening(rootfs)
    ro = defn.system_read_only
    sysconfig.write_services(rootfs, read_only=ro)
    if defn.wants_agent:
        say(f"{arch_name}: installing the cerulean-agent package")
        install_agent(rootfs, defn, work)
    sysconfig.ship_package_database(rootfs)
    root_uuid = disk.stable_uuid("root", defn.name, arch_name)
    var_uuid = disk.stable_uuid("var", defn.name, arch_name) if ro else None
    sysconfig.write_fstab(rootfs, root_uuid, var_uuid)
    sysconfig.enable_units(rootfs, defn)
    sysconfig.strip_setuid(rootfs, defn.system_setuid_allow)
    pruned = lean.prune_apparmor_profiles(rootfs)
    if pruned:
        say(f"{arch_name}: {len(pruned)} AppArmor profiles for programs not in the image "
            "removed")
    lean.mask_units(rootfs)
    lean.mask_generators(rootfs)
    lean.defer_boot_random_seed(rootfs)
    lean.repart_in_initrd_only(rootfs)
    lean.networkd_without_bpf(rootfs)
    lean.mark_updated(rootfs, epoch)
    if defn.wants_agent:
        # The baseline of the writable configuration, on /usr (so dm-verity covers it).
        manifest = rootfs / integrity.IMAGE_MANIFEST
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_bytes(integrity.image_manifest(rootfs, image=defn.name, arch=arch_name,
                                                      version=version))
    kver = sysconfig.kernel_version(rootfs)
    say(f"{arch_name}: building the initrd (kernel {kver})")
    initrd = make_initrd(rootfs, work, kver, defn, cache,
                         rootfs_key(arch_name, lock.packages[arch_name]),
                         lambda m: say(f"{arch_name}: {m}"), tools)
    kernel = work / "vmlinuz"
    shutil.copy(rootfs / f"boot/vmlinuz-{kver}", kernel)
    say(f"{arch_name}: making the /usr image and its verity hash tree")
    usr = disk.make_usr(tools, rootfs, work, epoch)
    slot = defn.system_usr_slot_mib * disk.MIB
    if not slot:
        # Room for /usr to grow by half before a slot becomes too small for an update.
        slot = (usr.data.stat().st_size * 3 // 2 + 64 * disk.MIB - 1) // (64 * disk.MIB)
        slot *= 64 * disk.MIB
    if usr.data.stat().st_size > slot:
        raise CeruleanError(
            f"/usr needs {usr.data.stat().st_size // disk.MIB} MiB but system.usr-slot-mib is "
            f"{defn.system_usr_slot_mib}: raise it."
        )
    say(f"{arch_name}: building the UKI and the ESP")
    uki = work / "uki-A.efi"
    (rootfs / "boot").mkdir(exist_ok=True)
    line = cmdline(arch, usr, root_uuid, defn.system_kernel_cmdline, ro)
    disk.make_uki(tools, rootfs, work, arch, kver, initrd, line, uki)
    if job.payload_dir is not None:
        job.payload_dir.mkdir(parents=True, exist_ok=True)
        for src, name in ((usr.data, "usr.erofs"), (usr.hash, "usr.verity"), (uki, "uki.efi")):
            shutil.copyfile(src, job.payload_dir / name)
        (job.payload_dir / "usrhash").write_text(usr.roothash + "\n")
    if job.out is None:
        return DiskResult(arch_name, None, 0, usr.data.stat().st_size, usr.roothash,
                          time.monotonic() - started, hit)
    out, fmt = job.out, job.fmt
    disk.make_esp(tools, rootfs, work, arch, {uki_name(version, defn.system_boot_tries): uki})
    if defn.wants_agent:
        # The boot chain's manifest, for the agent's integrity check of the ESP.
        boot_manifest = rootfs / integrity.BOOT_MANIFEST
        boot_manifest.parent.mkdir(parents=True, exist_ok=True)
        boot_manifest.write_bytes(integrity.boot_manifest(work / "esp", version))
    sysconfig.remove_boot_leftovers(rootfs)
    root_tree = work / "root"
    _root_tree(rootfs, root_tree, ("var",) if ro else ())
    var = None
    if var_uuid is not None:
        var = (var_uuid, disk.root_size(rootfs / "var"))
    say(f"{arch_name}: assembling the disk")
    disk.repart_config(work, arch, usr, slot, root_uuid, disk.root_size(root_tree), var)
    raw = work / "disk.raw"
    disk.assemble(tools, work, root_tree, disk.stable_uuid("seed", defn.name, arch_name), raw,
                  rootfs / "var" if ro else None)
    disk.align_to_mib(tools, work, raw)
    final = work / out.name
    disk.convert(tools, work, raw, fmt, final)
    final.replace(out)
    return DiskResult(arch_name, out, out.stat().st_size, usr.data.stat().st_size, usr.roothash,
                      time.monotonic() - started, hit)


def build_system_image(defn: ImageDefinition, lock: Lock, cfg: ArchiveConfig,
                       arches: Sequence[str], out_dir: Path, cache: Cache, *, fmt: str | None,
                       offline: bool = False, show_progress: bool = True,
                       say: Callable[[str], None] | None = None, version: str | None = None,
                       payload_dir: Path | None = None,
                       disk_image: bool = True) -> SystemBuildResult:
    """Disk images into *out_dir*; with *payload_dir*, also each architecture's update
    payload (``payload_dir/ARCH/``); *disk_image* False makes only the payload."""
    started = time.monotonic()
    version = version or default_version(defn, lock)
    fmt = fmt or defn.system_format
    if fmt not in EXTENSIONS:
        raise CeruleanError(f"--format {fmt!r} is not one of {', '.join(EXTENSIONS)}.")
    tell = say or (lambda _m: None)
    fetch_all(cache, lock_downloads(cfg, lock, arches), offline=offline,
              show_progress=show_progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = SystemBuildResult(defn.name, "")
    with tempfile.TemporaryDirectory(prefix=f".{defn.name}.", dir=out_dir) as tmp_s:
        tmp = Path(tmp_s)
        with overlay(tools_tree(cache, tell, offline), tmp / "tools") as tools:
            for arch in arches:
                work = tmp / arch
                work.mkdir()
                out = out_dir / f"{defn.name}-{arch}.{EXTENSIONS[fmt]}" if disk_image else None
                job = DiskJob(version, fmt, out, payload_dir / arch if payload_dir else None)
                result.disks.append(build_disk(defn, lock, arch, tools, work, cache, job, tell))
                shutil.rmtree(work, ignore_errors=True)
    result.version = version
    result.seconds = time.monotonic() - started
    return result
