"""Configuring a composed system rootfs: identity, hardening, services.

Every change is a plain file operation on the rootfs directory, except unit
enablement, which uses ``systemctl --root`` semantics inside the chroot so
presets and aliases are followed exactly as systemd defines them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from importlib.resources import files
from pathlib import Path

from cerulean.build.chroot import run_in
from cerulean.build.configure import os_release
from cerulean.build.definition import ImageDefinition
from cerulean.errors import CeruleanError

FILES = files("cerulean.build") / "files"

# setuid/setgid programs a general-purpose host keeps (everything else loses
# the bit); images add to it with system.setuid-allow.
DEFAULT_SETUID_ALLOW = ("/usr/bin/sudo", "/usr/bin/passwd", "/usr/bin/su",
                        "/usr/lib/openssh/ssh-keysign")

# Enabled for every system image: each one is listed with its reason in
# docs/system-images.md.
BASE_UNITS = ("cerulean-ready.service", "cerulean-ssh-keygen.service", "systemd-networkd.service",
              "systemd-resolved.service", "systemd-timesyncd.service",
              "systemd-boot-check-no-failures.service", "cerulean-update.timer",
              "cerulean-health.service", "cerulean-agent.service", "cerulean-policy.timer")


def files_digest() -> str:
    """A hash of every file Cerulean adds to system images (for cache keys)."""
    h = hashlib.sha256()
    for f in sorted(FILES.iterdir(), key=lambda f: f.name):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _install(name: str, dest: Path, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes((FILES / name).read_bytes())
    os.chmod(dest, mode)


def write_identity(root: Path, defn: ImageDefinition, image_version: str) -> None:
    (root / "etc/hostname").write_text(defn.system_hostname + "\n")
    (root / "usr/lib/os-release").write_bytes(os_release(defn, image_version, "trixie"))
    osr = root / "etc/os-release"
    if osr.is_symlink() or osr.exists():
        osr.unlink()
    osr.symlink_to("../usr/lib/os-release")
    (root / "etc/machine-id").write_text("")


def write_hardening(root: Path) -> None:
    _install("90-cerulean-hardening.conf", root / "usr/lib/sysctl.d/90-cerulean-hardening.conf")
    _install("95-cerulean-cloud-tuning.conf",
             root / "usr/lib/sysctl.d/95-cerulean-cloud-tuning.conf")
    if (root / "etc/ssh/sshd_config").exists():
        _install("sshd-cerulean.conf", root / "etc/ssh/sshd_config.d/50-cerulean.conf")
    if (root / "usr/lib/systemd/systemd-resolved").exists():
        _install("resolved-cerulean.conf",
                 root / "usr/lib/systemd/resolved.conf.d/50-cerulean.conf")
    _install("modprobe-cerulean.conf", root / "usr/lib/modprobe.d/50-cerulean.conf")
    if (root / "etc/audit/rules.d").is_dir():
        _install("audit-cerulean.rules", root / "etc/audit/rules.d/50-cerulean.rules", 0o640)
    banner = (FILES / "issue-banner").read_text()
    (root / "etc/issue").write_text(f"Cerulean Linux \\n \\l\n\n{banner}\n")
    (root / "etc/issue.net").write_text(banner)
    _login_defs(root / "etc/login.defs")
    # No password for root: console login is for the emergency target only.
    shadow = root / "etc/shadow"
    if shadow.exists():
        lines = shadow.read_text().splitlines()
        shadow.write_text("".join(
            ("root:*:" + line.split(":", 2)[2] if line.startswith("root:") else line) + "\n"
            for line in lines))


# login.defs: new files private to their group, and password ageing for the
# accounts that have passwords at all.
LOGIN_DEFS = {"UMASK": "027", "PASS_MAX_DAYS": "365", "PASS_MIN_DAYS": "1"}


def _login_defs(path: Path) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    seen: set[str] = set()
    for i, line in enumerate(lines):
        words = line.split()
        if words and words[0] in LOGIN_DEFS:
            lines[i] = f"{words[0]}\t\t{LOGIN_DEFS[words[0]]}"
            seen.add(words[0])
    lines += [f"{k}\t\t{v}" for k, v in LOGIN_DEFS.items() if k not in seen]
    path.write_text("\n".join(lines) + "\n")


def write_services(root: Path, read_only: bool = False) -> None:
    _install("ready-report", root / "usr/lib/cerulean/ready-report", 0o755)
    for unit in ("cerulean-ready.service", "cerulean-ssh-keygen.service"):
        _install(unit, root / f"usr/lib/systemd/system/{unit}")
    # The last partition grows to the disk on first boot: root, or /var when the
    # root is read-only.
    grow = "50-var.conf" if read_only else "50-root.conf"
    _install(grow, root / "usr/lib/repart.d" / grow)
    network = root / "etc/systemd/network/80-cerulean-dhcp.network"
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text("[Match]\nType=ether\nKind=!*\n\n[Network]\nDHCP=yes\n")


def enable_units(root: Path, defn: ImageDefinition) -> None:
    present = [u for u in BASE_UNITS if _unit_exists(root, u)]
    enable = [*present, *defn.system_enable]
    if enable:
        run_in(root, ["systemctl", "enable", *enable], what="Enabling units")
    if defn.system_disable:
        run_in(root, ["systemctl", "disable", *defn.system_disable], what="Disabling units")


def _unit_exists(root: Path, unit: str) -> bool:
    return any((root / d / unit).exists() for d in ("usr/lib/systemd/system", "etc/systemd/system"))


def strip_setuid(root: Path, allow: tuple[str, ...]) -> list[str]:
    """Drop setuid/setgid bits from every file not allowed; returns the paths changed."""
    allowed = set(DEFAULT_SETUID_ALLOW) | set(allow)
    changed: list[str] = []
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            st = p.lstat()
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                continue
            rel = "/" + str(p.relative_to(root))
            if rel in allowed:
                continue
            os.chmod(p, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            changed.append(rel)
    return sorted(changed)


# Mount options beyond the defaults: no devices, setuid programs or (where
# nothing needs it) executables on the world-writable and user-owned trees.
HARDENED_MOUNTS = (
    "tmpfs /tmp tmpfs nosuid,nodev,noexec,mode=1777,size=50% 0 0",
    "tmpfs /dev/shm tmpfs nosuid,nodev,noexec,mode=1777 0 0",
    "/var/tmp /var/tmp none bind,nosuid,nodev,noexec 0 0",
    "/home /home none bind,nosuid,nodev 0 0",
)


def write_fstab(root: Path, root_partuuid: str, var_partuuid: str | None = None) -> None:
    """/etc/fstab; with *var_partuuid* the root is read-only and /var is its own partition."""
    if var_partuuid is None:
        # / is listed so that systemd grows its file system to the partition, which
        # systemd-repart grows to the disk on first boot (x-systemd.growfs).
        mounts = [f"PARTUUID={root_partuuid} / ext4 rw,x-systemd.growfs 0 1"]
    else:
        # /var is mounted by the initrd, so early services that sandbox /var/tmp
        # (systemd-resolved) find it in place.
        mounts = [f"PARTUUID={root_partuuid} / ext4 ro 0 1",
                  f"PARTUUID={var_partuuid} /var ext4 "
                  "rw,nosuid,nodev,x-initrd.mount,x-systemd.growfs 0 2"]
    (root / "etc/fstab").write_text(
        "# /usr comes from the kernel command line (usrhash=, mount.usr=).\n"
        + "".join(m + "\n" for m in [*mounts, *HARDENED_MOUNTS]))


def kernel_version(root: Path) -> str:
    mods = sorted(p.name for p in (root / "usr/lib/modules").iterdir()) if (
        root / "usr/lib/modules").is_dir() else []
    if len(mods) != 1:
        raise CeruleanError(
            f"A system image needs exactly one kernel; found {len(mods)} in /usr/lib/modules "
            "(add one linux-image package to packages.include)."
        )
    return mods[0]


def remove_boot_leftovers(root: Path) -> None:
    """The kernel lives in the UKI: nothing boots from /boot inside the root file system."""
    for p in list((root / "boot").glob("*")):
        if p.is_file() or p.is_symlink():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
    for name in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        q = root / name
        if q.is_symlink() or q.exists():
            q.unlink()


def ship_package_database(rootfs: Path) -> None:
    """A copy of dpkg's status on /usr: /var/lib/dpkg is on the writable partition, which
    an update leaves as it was, so after one it no longer describes the running release.
    The agent (inventory, CVE report) reads the /usr copy."""
    from cerulean.agent.cves import USR_DPKG_STATUS

    dest = rootfs / USR_DPKG_STATUS
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(rootfs / "var/lib/dpkg/status", dest)
    os.chmod(dest, 0o644)
