"""System images without booting anything: disk layout, rootfs configuration, locking.

Everything here is plain file work on temporary trees, or resolution against the
synthetic signed archive on loopback (``archive_fixture``); nothing runs in a
chroot, mounts or calls QEMU.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cerulean import arch as arches
from cerulean.build import chroot, disk, sysconfig, system, system_image
from cerulean.build.definition import DefinitionError, ImageDefinition, load_definition
from cerulean.build.image import lock_downloads
from cerulean.build.plan import ensure_lock
from cerulean.debian.archive import ArchiveConfig
from cerulean.debian.cache import Cache
from cerulean.debian.fetch import fetch_all
from cerulean.debian.lock import Lock, LockedPackage, inputs_hash
from cerulean.errors import CeruleanError

if TYPE_CHECKING:
    from archive_fixture import SyntheticArchive

pytest_plugins = ["archive_fixture"]

MIB = 1024 * 1024
HASH_A = "00112233445566778899aabbccddeeff"
HASH_B = "ffeeddccbbaa99887766554433221100"
ROOTHASH = HASH_A + HASH_B
UUID_A = "00112233-4455-6677-8899-aabbccddeeff"
UUID_B = "ffeeddcc-bbaa-9988-7766-554433221100"
# Never contacted: port 9 (discard) on loopback.
ARCHIVE = ArchiveConfig(mirror="http://127.0.0.1:9/debian",
                        security_mirror="http://127.0.0.1:9/debian", suites=("trixie",),
                        components=("main",))


# --- helpers ----------------------------------------------------------------------------------


def write_defn(tmp_path: Path, body: str, name: str = "img") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(body)
    return path


def system_defn(tmp_path: Path, system: str = "", *, kind: str = "system") -> ImageDefinition:
    return load_definition(write_defn(tmp_path, f"""
[image]
kind = "{kind}"
architectures = ["amd64"]
[packages]
include = ["hello"]
[system]
{system}
"""))


def fake_usr(tmp_path: Path, hash_bytes: int, roothash: str = ROOTHASH) -> disk.UsrImage:
    """A UsrImage whose files are sparse: only their sizes matter to repart_config."""
    data, hashf = tmp_path / "usr.erofs", tmp_path / "usr.verity"
    with data.open("wb") as f:
        f.truncate(3 * MIB)
    with hashf.open("wb") as f:
        f.truncate(hash_bytes)
    return disk.UsrImage(data, hashf, roothash)


def parse_partition(text: str) -> dict[str, str]:
    lines = text.splitlines()
    assert lines[0] == "[Partition]"
    return dict(line.split("=", 1) for line in lines[1:])


def sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)


def sysctl(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def locked(name: str, sha: str = "a" * 64, version: str = "1.0") -> LockedPackage:
    return LockedPackage(name, version, "amd64", name, version, sha, 100, "trixie",
                         f"pool/main/{name[0]}/{name}/{name}_{version}_amd64.deb")


# --- disk: identifiers ------------------------------------------------------------------------


def test_verity_uuids_are_the_halves_of_the_root_hash() -> None:
    assert disk.verity_uuids(ROOTHASH) == (UUID_A, UUID_B)
    usr = disk.UsrImage(Path("/nonexistent/d"), Path("/nonexistent/h"), ROOTHASH)
    assert usr.data_uuid == UUID_A
    assert usr.hash_uuid == UUID_B


def test_stable_uuid_is_deterministic_and_input_dependent() -> None:
    # Pinned: changing it changes every rebuilt disk's identifiers.
    assert disk.stable_uuid("root", "web", "amd64") == "113afcb3-24c5-43ae-ad9c-5c10027a3e94"
    assert disk.stable_uuid("root", "web", "amd64") == disk.stable_uuid("root", "web", "amd64")
    assert disk.stable_uuid("root", "web", "arm64") != disk.stable_uuid("root", "web", "amd64")
    assert disk.stable_uuid("seed", "web", "amd64") != disk.stable_uuid("root", "web", "amd64")
    # The parts are separated, so moving a boundary gives another UUID.
    assert disk.stable_uuid("ab", "c") != disk.stable_uuid("a", "bc")
    u = uuid.UUID(disk.stable_uuid("x"))
    assert u.version == 4
    assert u.variant == uuid.RFC_4122


# --- disk: repart definitions -----------------------------------------------------------------


@pytest.mark.parametrize(("arch", "gpt"), [("amd64", "x86-64"), ("arm64", "arm64")])
def test_repart_config_layout(tmp_path: Path, arch: str, gpt: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "repart.d").mkdir()
    (work / "repart.d" / "99-stale.conf").write_text("[Partition]\nType=swap\n")
    hash_bytes = 3 * MIB + 5  # larger than slot/100 here, and not MiB-aligned
    usr = fake_usr(tmp_path, hash_bytes)
    slot = 64 * MIB
    root_uuid = disk.stable_uuid("root", "img", arch)
    d = disk.repart_config(work, arches.get(arch), usr, slot, root_uuid, 200 * MIB)

    assert d == work / "repart.d"
    assert sorted(p.name for p in d.iterdir()) == [
        "00-esp.conf", "10-usr-a.conf", "11-usr-a-verity.conf", "12-usr-b.conf",
        "13-usr-b-verity.conf", "20-root.conf"]
    conf = {p.name[:-5]: parse_partition(p.read_text()) for p in d.iterdir()}
    types = {k: v["Type"] for k, v in conf.items()}
    assert types == {
        "00-esp": "esp", "10-usr-a": f"usr-{gpt}", "11-usr-a-verity": f"usr-{gpt}-verity",
        "12-usr-b": f"usr-{gpt}", "13-usr-b-verity": f"usr-{gpt}-verity",
        "20-root": f"root-{gpt}"}
    labels = {k: v.get("Label") for k, v in conf.items()}
    assert labels == {
        "00-esp": None, "10-usr-a": "usr-A", "11-usr-a-verity": "usr-A-verity",
        "12-usr-b": "_empty", "13-usr-b-verity": "_empty", "20-root": "root"}

    # The A slot is identified by its root hash; B has no identity until an update.
    assert conf["10-usr-a"]["UUID"] == UUID_A
    assert conf["11-usr-a-verity"]["UUID"] == UUID_B
    assert "UUID" not in conf["12-usr-b"] and "UUID" not in conf["13-usr-b-verity"]
    assert conf["20-root"]["UUID"] == root_uuid
    assert conf["10-usr-a"]["CopyBlocks"] == "/work/usr.erofs"
    assert conf["11-usr-a-verity"]["CopyBlocks"] == "/work/usr.verity"
    assert conf["00-esp"]["CopyBlocks"] == "/work/esp.img"
    assert conf["10-usr-a"]["ReadOnly"] == "yes"

    # Both usr slots have the same fixed size.
    for name in ("10-usr-a", "12-usr-b"):
        assert conf[name]["SizeMinBytes"] == conf[name]["SizeMaxBytes"] == str(slot)
    # Both hash partitions: fixed, MiB-aligned, room for A's hash tree.
    for name in ("11-usr-a-verity", "13-usr-b-verity"):
        assert conf[name]["SizeMinBytes"] == conf[name]["SizeMaxBytes"] == str(4 * MIB)
    b_hash = int(conf["13-usr-b-verity"]["SizeMinBytes"])
    assert b_hash >= hash_bytes and b_hash % MIB == 0

    assert conf["20-root"]["SizeMinBytes"] == conf["20-root"]["SizeMaxBytes"] == str(200 * MIB)
    assert conf["20-root"]["Format"] == "ext4"
    assert conf["20-root"]["CopyFiles"] == "/src/root:/"


def test_repart_config_read_only_root_has_a_var_partition(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    usr = fake_usr(tmp_path, 8192)
    d = disk.repart_config(work, arches.get("arm64"), usr, 64 * MIB, "r", 100 * MIB,
                           ("v-uuid", 80 * MIB))
    names = sorted(p.name for p in d.iterdir())
    assert names[-2:] == ["20-root.conf", "30-var.conf"]  # var last: it grows on first boot
    root = parse_partition((d / "20-root.conf").read_text())
    assert root["ReadOnly"] == "yes" and root["GrowFileSystem"] == "no"
    conf = parse_partition((d / "30-var.conf").read_text())
    assert conf == {"Type": "var", "Label": "var", "UUID": "v-uuid", "Format": "ext4",
                    "CopyFiles": "/src/var:/", "SizeMinBytes": str(80 * MIB),
                    "SizeMaxBytes": str(80 * MIB)}


def test_repart_hash_partitions_sized_for_a_full_slot(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    usr = fake_usr(tmp_path, 8192)  # a tiny hash tree: the slot's size decides
    slot = 1024 * MIB  # slot / 100 = 10.24 MiB -> 11 MiB
    d = disk.repart_config(work, arches.get("amd64"), usr, slot, "u", 100 * MIB)
    for name in ("11-usr-a-verity", "13-usr-b-verity"):
        conf = parse_partition((d / f"{name}.conf").read_text())
        assert conf["SizeMinBytes"] == conf["SizeMaxBytes"] == str(11 * MIB)


# --- disk: root partition size ----------------------------------------------------------------


def test_root_size_of_an_empty_tree_is_the_growth_room(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    tree.mkdir()
    assert disk.root_size(tree) == 64 * MIB


def test_root_size_covers_content_and_grows_with_it(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    sparse(tree / "etc/big", 10 * MIB)
    sparse(tree / "var/lib/data", 5 * MIB + 1)
    (tree / "etc/small").write_bytes(b"x" * 100)
    content = 10 * MIB + 5 * MIB + 1 + 100
    first = disk.root_size(tree)
    assert first % MIB == 0
    assert first >= content + 64 * MIB
    # Symlinks count as links: their targets (here outside the tree) are not added.
    sparse(tmp_path / "outside/huge", 500 * MIB)
    (tree / "var/huge").symlink_to(tmp_path / "outside/huge")
    with_link = disk.root_size(tree)
    assert first <= with_link < first + MIB
    sparse(tree / "var/more", 30 * MIB)
    grown = disk.root_size(tree)
    assert grown % MIB == 0
    assert grown >= with_link + 30 * MIB
    assert grown >= content + 30 * MIB + 64 * MIB


# --- the kernel command line ------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "console"), [("amd64", "ttyS0"), ("arm64", "ttyAMA0")])
def test_cmdline(arch: str, console: str) -> None:
    usr = disk.UsrImage(Path("/nonexistent/d"), Path("/nonexistent/h"), ROOTHASH)
    root_uuid = disk.stable_uuid("root", "img", arch)
    line = system_image.cmdline(arches.get(arch), usr, root_uuid,
                                ("quiet", "systemd.log_level=debug"))
    args = line.split(" ")
    assert args[0] == f"usrhash={ROOTHASH}"
    for expected in (f"systemd.verity_usr_data=PARTUUID={UUID_A}",
                     f"systemd.verity_usr_hash=PARTUUID={UUID_B}",
                     "mount.usr=/dev/mapper/usr", "mount.usrfstype=erofs", "mount.usrflags=ro",
                     f"root=PARTUUID={root_uuid}", f"console={console}", "panic=10",
                     "rd.emergency=reboot"):
        assert args.count(expected) == 1, expected
    other = "ttyAMA0" if console == "ttyS0" else "ttyS0"
    assert f"console={other}" not in args
    # The serial console comes last so it is /dev/console (the one tests read).
    consoles = [a for a in args if a.startswith("console=")]
    assert consoles == ["console=tty0", f"console={console}"]
    assert args[-2:] == ["quiet", "systemd.log_level=debug"]
    # One UKI boots its /usr from either slot: the command line names no slot.
    assert not [a for a in args if "slot" in a]


def test_cmdline_without_extra_args() -> None:
    usr = disk.UsrImage(Path("/nonexistent/d"), Path("/nonexistent/h"), ROOTHASH)
    line = system_image.cmdline(arches.get("amd64"), usr, "r", ())
    assert line.endswith(" rd.emergency=reboot")
    assert "  " not in line


# --- sysconfig: setuid ------------------------------------------------------------------------


def test_strip_setuid(tmp_path: Path) -> None:
    root = tmp_path / "root"
    files = {
        "usr/bin/sudo": 0o4755,  # allowed by default
        "usr/lib/openssh/ssh-keysign": 0o4755,  # allowed by default
        "usr/local/bin/custom": 0o2755,  # allowed by the image
        "usr/bin/ping": 0o4755,
        "usr/bin/wall": 0o2755,
        "usr/sbin/both": 0o6750,
        "bin/mount": 0o4711,
        "usr/bin/plain": 0o755,
    }
    for rel, m in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"#!/bin/sh\n")
        os.chmod(p, m)
    # A setuid file outside the tree, reached through a symlink inside it.
    outside = tmp_path / "outside-suid"
    outside.write_bytes(b"")
    os.chmod(outside, 0o4755)
    (root / "usr/bin/link").symlink_to(outside)
    (root / "var/mail").mkdir(parents=True)
    os.chmod(root / "var/mail", 0o2775)
    (root / "usr/share/sgid-dir").mkdir(parents=True)
    os.chmod(root / "usr/share/sgid-dir", 0o3777)

    changed = sysconfig.strip_setuid(root, ("/usr/local/bin/custom",))

    assert changed == ["/bin/mount", "/usr/bin/ping", "/usr/bin/wall", "/usr/sbin/both"]
    assert {rel: mode(root / rel) for rel in files} == {
        "usr/bin/sudo": 0o4755,
        "usr/lib/openssh/ssh-keysign": 0o4755,
        "usr/local/bin/custom": 0o2755,
        "usr/bin/ping": 0o755,
        "usr/bin/wall": 0o755,
        "usr/sbin/both": 0o750,
        "bin/mount": 0o711,
        "usr/bin/plain": 0o755,
    }
    assert mode(outside) == 0o4755
    assert (root / "usr/bin/link").is_symlink()
    assert mode(root / "var/mail") == 0o2775
    assert mode(root / "usr/share/sgid-dir") == 0o3777
    # A second pass finds nothing left to change.
    assert sysconfig.strip_setuid(root, ("/usr/local/bin/custom",)) == []


def test_strip_setuid_without_image_allowances_strips_them(tmp_path: Path) -> None:
    p = tmp_path / "usr/local/bin/custom"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"")
    os.chmod(p, 0o4755)
    assert sysconfig.strip_setuid(tmp_path, ()) == ["/usr/local/bin/custom"]
    assert mode(p) == 0o755


# --- sysconfig: hardening ---------------------------------------------------------------------

SHADOW = (
    "root:$y$j9T$abcdefgh$ijklmnop:19700:0:99999:7:::\n"
    "daemon:*:19700:0:99999:7:::\n"
    "rootless:$6$salt$hash:19700:0:99999:7:::\n"
    "alice:$6$x$y:19700:0:99999:7:::\n"
)


def test_write_hardening_with_sshd(tmp_path: Path) -> None:
    root = tmp_path
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/sshd_config").write_text("Include /etc/ssh/sshd_config.d/*.conf\n")
    (root / "etc/shadow").write_text(SHADOW)
    sysconfig.write_hardening(root)

    hard = root / "usr/lib/sysctl.d/90-cerulean-hardening.conf"
    cloud = root / "usr/lib/sysctl.d/95-cerulean-cloud-tuning.conf"
    assert sorted(p.name for p in (root / "usr/lib/sysctl.d").iterdir()) == [
        "90-cerulean-hardening.conf", "95-cerulean-cloud-tuning.conf"]
    h = sysctl(hard)
    assert h["kernel.kptr_restrict"] == "2"
    assert h["kernel.dmesg_restrict"] == "1"
    assert h["kernel.unprivileged_bpf_disabled"] == "1"
    assert h["net.ipv4.conf.all.rp_filter"] == "1"
    assert h["net.ipv4.conf.default.rp_filter"] == "1"
    c = sysctl(cloud)
    assert c["net.ipv4.tcp_congestion_control"] == "bbr"
    assert c["net.core.default_qdisc"] == "fq"
    assert mode(hard) == mode(cloud) == 0o644

    drop_in = root / "etc/ssh/sshd_config.d/50-cerulean.conf"
    lines = drop_in.read_text().splitlines()
    assert "PermitRootLogin no" in lines
    assert "PasswordAuthentication no" in lines
    assert mode(drop_in) == 0o644

    assert (root / "etc/shadow").read_text() == (
        "root:*:19700:0:99999:7:::\n"
        "daemon:*:19700:0:99999:7:::\n"
        "rootless:$6$salt$hash:19700:0:99999:7:::\n"
        "alice:$6$x$y:19700:0:99999:7:::\n"
    )


def test_write_hardening_without_sshd_or_shadow(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    sysconfig.write_hardening(tmp_path)
    assert (tmp_path / "usr/lib/sysctl.d/90-cerulean-hardening.conf").is_file()
    assert not (tmp_path / "etc/ssh").exists()
    assert not (tmp_path / "etc/shadow").exists()
    # Nothing for packages the image does not have.
    assert not (tmp_path / "usr/lib/systemd/resolved.conf.d").exists()
    assert not (tmp_path / "etc/audit").exists()
    assert not (tmp_path / "etc/login.defs").exists()


def test_write_hardening_resolved_audit_modules_login(tmp_path: Path) -> None:
    root = tmp_path
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "usr/lib/systemd/systemd-resolved").write_text("")
    (root / "etc/audit/rules.d").mkdir(parents=True)
    (root / "etc/login.defs").write_text("# c\nUMASK\t\t022\nPASS_MAX_DAYS\t99999\nX 1\n")
    sysconfig.write_hardening(root)
    resolved = (root / "usr/lib/systemd/resolved.conf.d/50-cerulean.conf").read_text()
    assert "LLMNR=no" in resolved.splitlines() and "MulticastDNS=no" in resolved.splitlines()
    modprobe = (root / "usr/lib/modprobe.d/50-cerulean.conf").read_text().splitlines()
    for proto in ("dccp", "sctp", "rds", "tipc"):
        assert f"install {proto} /bin/false" in modprobe
    rules = root / "etc/audit/rules.d/50-cerulean.rules"
    assert "-w /etc/shadow -p wa -k identity" in rules.read_text().splitlines()
    assert mode(rules) == 0o640
    defs = [line.split() for line in (root / "etc/login.defs").read_text().splitlines()]
    assert ["UMASK", "027"] in defs and ["PASS_MAX_DAYS", "365"] in defs
    assert ["PASS_MIN_DAYS", "1"] in defs and ["X", "1"] in defs and ["UMASK", "022"] not in defs
    assert "Authorized use only" in (root / "etc/issue.net").read_text()
    assert (root / "etc/issue").read_text().startswith("Cerulean Linux \\n \\l\n")


# --- sysconfig: identity, fstab, kernel -------------------------------------------------------


def test_write_identity(tmp_path: Path) -> None:
    defn = system_defn(tmp_path, 'hostname = "web-1"')
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "etc/os-release").write_text('ID=debian\n')  # a regular file, replaced
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    sysconfig.write_identity(root, defn, "13.20260101")

    assert (root / "etc/hostname").read_text() == "web-1\n"
    osr = root / "etc/os-release"
    assert osr.is_symlink()
    assert os.readlink(osr) == "../usr/lib/os-release"
    text = osr.read_text().splitlines()
    assert 'ID="cerulean"' in text
    assert 'IMAGE_ID="img"' in text
    assert 'IMAGE_VERSION="13.20260101"' in text
    assert (root / "etc/machine-id").read_text() == ""
    # Again, over the symlink it made: the result is the same.
    sysconfig.write_identity(root, defn, "13.20260101")
    assert os.readlink(osr) == "../usr/lib/os-release"


def _fstab(root: Path) -> dict[str, tuple[str, str, set[str]]]:
    """mount point -> (device, type, options) of root/etc/fstab."""
    out = {}
    for line in (root / "etc/fstab").read_text().splitlines():
        if line and not line.startswith("#"):
            device, mountpoint, fstype, options, *_ = line.split()
            out[mountpoint] = (device, fstype, set(options.split(",")))
    return out


def test_write_fstab(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    sysconfig.write_fstab(tmp_path, "15b8e3f5-4e70-4123-ab55-5f650e6e46a9")
    fstab = _fstab(tmp_path)
    assert sorted(fstab) == ["/", "/dev/shm", "/home", "/tmp", "/var/tmp"]
    device, fstype, options = fstab["/"]
    assert (device, fstype) == ("PARTUUID=15b8e3f5-4e70-4123-ab55-5f650e6e46a9", "ext4")
    assert {"rw", "x-systemd.growfs"} <= options
    for world_writable in ("/tmp", "/dev/shm", "/var/tmp"):
        assert {"nosuid", "nodev", "noexec"} <= fstab[world_writable][2], world_writable
    assert fstab["/var/tmp"][:2] == ("/var/tmp", "none") and "bind" in fstab["/var/tmp"][2]
    assert {"bind", "nosuid", "nodev"} <= fstab["/home"][2]


def test_write_fstab_read_only_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    sysconfig.write_fstab(tmp_path, "r-uuid", "v-uuid")
    fstab = _fstab(tmp_path)
    assert fstab["/"] == ("PARTUUID=r-uuid", "ext4", {"ro"})
    device, fstype, options = fstab["/var"]
    assert (device, fstype) == ("PARTUUID=v-uuid", "ext4")
    assert {"rw", "nosuid", "nodev", "x-systemd.growfs", "x-initrd.mount"} <= options
    # /var is mounted before the /var/tmp bind mount on it.
    lines = (tmp_path / "etc/fstab").read_text().splitlines()
    assert lines.index(next(x for x in lines if " /var " in x)) < lines.index(
        next(x for x in lines if x.startswith("/var/tmp")))


def test_write_services_grows_the_writable_partition(tmp_path: Path) -> None:
    for read_only, grown in ((False, "50-root.conf"), (True, "50-var.conf")):
        root = tmp_path / str(read_only)
        (root / "usr/lib/systemd/system").mkdir(parents=True)
        sysconfig.write_services(root, read_only=read_only)
        assert [p.name for p in (root / "usr/lib/repart.d").iterdir()] == [grown]
        text = (root / "usr/lib/repart.d" / grown).read_text()
        conf = parse_partition("".join(x + "\n" for x in text.splitlines()
                                       if not x.startswith("#")))
        assert conf == {"Type": grown[3:-5], "GrowFileSystem": "yes"}


@pytest.mark.parametrize(("tries", "name"), [(3, "cerulean_13.20261125.0+3.efi"),
                                             (0, "cerulean_13.20261125.0.efi")])
def test_uki_name_carries_the_boot_count(tries: int, name: str) -> None:
    assert system_image.uki_name("13.20261125.0", tries) == name
    # The updater on the host reads the same names.
    from cerulean.agent.update.boot import ENTRY

    m = ENTRY.match(name)
    assert m is not None and m["version"] == "13.20261125.0"


def test_boot_tries_is_bounded(tmp_path: Path) -> None:
    p = tmp_path / "img.toml"
    head = '[image]\nkind = "system"\n[packages]\ninclude = ["systemd"]\n[system]\n'
    p.write_text(head + "boot-tries = 12\n")
    with pytest.raises(DefinitionError) as e:
        load_definition(p)
    assert str(e.value) == f"{p}: 'system.boot-tries': must be at most 9."
    p.write_text(head + "read-only = true\n")
    d = load_definition(p)
    assert d.system_read_only is True and d.system_boot_tries == 3


def test_kernel_version(tmp_path: Path) -> None:
    mods = tmp_path / "usr/lib/modules"
    mods.mkdir(parents=True)
    (mods / "6.12.48+deb13-cloud-amd64").mkdir()
    assert sysconfig.kernel_version(tmp_path) == "6.12.48+deb13-cloud-amd64"


@pytest.mark.parametrize("count", [0, 2])
def test_kernel_version_needs_exactly_one(tmp_path: Path, count: int) -> None:
    mods = tmp_path / "usr/lib/modules"
    mods.mkdir(parents=True)
    for i in range(count):
        (mods / f"6.12.{i}-amd64").mkdir()
    with pytest.raises(CeruleanError) as e:
        sysconfig.kernel_version(tmp_path)
    assert str(e.value) == (
        f"A system image needs exactly one kernel; found {count} in /usr/lib/modules "
        "(add one linux-image package to packages.include).")


def test_kernel_version_without_a_modules_directory(tmp_path: Path) -> None:
    with pytest.raises(CeruleanError, match=r"found 0 .*add one linux-image package"):
        sysconfig.kernel_version(tmp_path)


# --- sysconfig: /boot -------------------------------------------------------------------------


def test_remove_boot_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    boot = root / "boot"
    boot.mkdir(parents=True)
    (boot / "vmlinuz-6.12").write_bytes(b"kernel")
    (boot / "initrd.img-6.12").write_bytes(b"initrd")
    (boot / "System.map-6.12").symlink_to("/nonexistent")  # dangling
    (boot / "grub").mkdir()
    (boot / "grub/grub.cfg").write_text("x")
    keep = tmp_path / "esp-contents"
    keep.mkdir()
    (keep / "precious").write_text("x")
    (boot / "efi").symlink_to(keep)  # a link to a directory: removed, target untouched
    (root / "vmlinuz").symlink_to("boot/vmlinuz-6.12")
    (root / "vmlinuz.old").symlink_to("boot/vmlinuz-6.11")  # dangling
    (root / "initrd.img").symlink_to("boot/initrd.img-6.12")
    (root / "initrd.img.old").symlink_to("boot/initrd.img-6.11")
    (root / "etc").mkdir()
    (root / "etc/keep").write_text("x")

    sysconfig.remove_boot_leftovers(root)

    assert boot.is_dir() and list(boot.iterdir()) == []
    assert sorted(p.name for p in root.iterdir()) == ["boot", "etc"]
    assert (root / "etc/keep").read_text() == "x"
    assert (keep / "precious").read_text() == "x"


def test_remove_boot_leftovers_without_boot(tmp_path: Path) -> None:
    sysconfig.remove_boot_leftovers(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- sysconfig: files digest ------------------------------------------------------------------


def test_files_digest_follows_the_shipped_files(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = sysconfig.files_digest()
    assert len(real) == 64 and int(real, 16) >= 0
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.conf").write_text("a = 1\n")
    (files / "b.service").write_text("[Unit]\n")
    monkeypatch.setattr(sysconfig, "FILES", files)
    first = sysconfig.files_digest()
    assert first != real
    assert sysconfig.files_digest() == first
    (files / "b.service").write_text("[Unit]\nDescription=x\n")
    changed = sysconfig.files_digest()
    assert changed != first
    (files / "b.service").write_text("[Unit]\n")
    assert sysconfig.files_digest() == first
    # The name counts, not only the content.
    (files / "b.service").rename(files / "c.service")
    assert sysconfig.files_digest() not in (first, changed)


# --- definitions ------------------------------------------------------------------------------


def test_system_settings_parse(tmp_path: Path) -> None:
    defn = system_defn(tmp_path, """
hostname = "web-1"
format = "raw"
kernel-cmdline = ["quiet"]
usr-slot-mib = 2048
enable = ["ssh.service"]
disable = ["apt-daily.timer"]
setuid-allow = ["/usr/bin/newgrp"]
initrd-modules = ["lvm"]
""")
    assert defn.is_system
    assert defn.image_kind == "system"
    assert defn.system_hostname == "web-1"
    assert defn.system_format == "raw"
    assert defn.system_kernel_cmdline == ("quiet",)
    assert defn.system_usr_slot_mib == 2048
    assert defn.system_enable == ("ssh.service",)
    assert defn.system_disable == ("apt-daily.timer",)
    assert defn.system_setuid_allow == ("/usr/bin/newgrp",)
    assert defn.system_initrd_modules == ("lvm",)


def test_system_defaults(tmp_path: Path) -> None:
    defn = system_defn(tmp_path)
    assert (defn.system_hostname, defn.system_format, defn.system_usr_slot_mib) == (
        "cerulean", "qcow2", 0)
    assert defn.system_kernel_cmdline == defn.system_enable == defn.system_setuid_allow == ()


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vhd", "vhdx"])
def test_system_formats(tmp_path: Path, fmt: str) -> None:
    assert system_defn(tmp_path, f'format = "{fmt}"').system_format == fmt


def test_system_format_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError) as e:
        system_defn(tmp_path, 'format = "vmdk"')
    assert str(e.value) == (
        f"{tmp_path / 'img.toml'}: 'system.format' has 'vmdk'; valid: raw, qcow2, vhd, vhdx.")


@pytest.mark.parametrize("value", ["-1", "true", "false", '"2048"', "1.5", "[]"])
def test_usr_slot_mib_must_be_a_non_negative_integer(tmp_path: Path, value: str) -> None:
    with pytest.raises(DefinitionError) as e:
        system_defn(tmp_path, f"usr-slot-mib = {value}")
    assert str(e.value) == (
        f"{tmp_path / 'img.toml'}: 'system.usr-slot-mib' must be a non-negative integer.")


def test_initrd_drivers_are_kernel_module_names(tmp_path: Path) -> None:
    defn = system_defn(tmp_path, 'initrd-drivers = ["virtio_blk", "dm-verity"]')
    assert defn.system_initrd_drivers == ("virtio_blk", "dm-verity")
    with pytest.raises(DefinitionError, match=r"'virtio blk' is not a valid kernel module name"):
        system_defn(tmp_path, 'initrd-drivers = ["virtio blk"]')


def test_usr_slot_mib_zero_is_automatic(tmp_path: Path) -> None:
    assert system_defn(tmp_path, "usr-slot-mib = 0").system_usr_slot_mib == 0


def test_unknown_system_key_and_kind(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError) as e:
        system_defn(tmp_path, 'host-name = "x"')
    assert str(e.value) == (
        f"{tmp_path / 'img.toml'}: unknown key 'system.host-name'; valid in [system]: "
        "agent, boot-tries, disable, enable, format, hostname, initrd-drivers, initrd-modules, "
        "kernel-cmdline, read-only, setuid-allow, usr-slot-mib.")
    with pytest.raises(DefinitionError) as e:
        system_defn(tmp_path, kind="vm")
    assert str(e.value) == (
        f"{tmp_path / 'img.toml'}: 'image.kind' has 'vm'; valid: container, system.")
    with pytest.raises(DefinitionError) as e:
        system_defn(tmp_path, 'hostname = ["a"]')
    assert str(e.value) == f"{tmp_path / 'img.toml'}: 'system.hostname' must be a string."


def test_resolution_inputs_mark_system_images(tmp_path: Path) -> None:
    sysd = system_defn(tmp_path)
    cont = system_defn(tmp_path, kind="container")
    assert sysd.resolution_inputs()["essential"] is True
    assert "essential" not in cont.resolution_inputs()
    assert {k: v for k, v in sysd.resolution_inputs().items()
            if k not in ("essential", "agent")} == cont.resolution_inputs()
    # The agent's dependencies join a system image's lock unless it goes without one.
    assert "python3-tuf" in sysd.resolution_inputs()["agent"]  # type: ignore[operator]
    assert "agent" not in system_defn(tmp_path, "agent = false").resolution_inputs()
    # So switching kinds makes the old lock stale.
    assert inputs_hash(sysd.resolution_inputs()) != inputs_hash(cont.resolution_inputs())
    # Settings that do not change the packages leave the inputs alone.
    tuned = system_defn(tmp_path, 'hostname = "other"\nformat = "raw"')
    assert tuned.resolution_inputs() == sysd.resolution_inputs()


# --- locking and composing against the synthetic archive -------------------------------------


def add_system_packages(archive: SyntheticArchive) -> None:
    """An Essential shell whose closure reaches libgreet1, and a kernel package.

    With the defaults (base-files Essential; hello -> libgreet1, base-files) the
    Essential closure is base-files, essential-sh, libgreet1 and libtiny.
    """
    archive.add("essential-sh", "5.2-1", "amd64", files={"usr/bin/sh": b"#!sh\n"},
                pre_depends="libtiny (>= 1.0)",
                extra_control={"Essential": "yes", "Priority": "required"})
    archive.add("libtiny", "1.1-1", "amd64", "libgreet1 (>= 1.0)",
                files={"usr/lib/x86_64-linux-gnu/libtiny.so.1": b"\x7fELF tiny"})
    archive.add("kernel-amd64", "6.12-1", "amd64",
                files={"usr/lib/modules/6.12-amd64/modules.dep": b""})
    archive.add("kernel-arm64", "6.12-1", "amd64",
                files={"usr/share/doc/kernel-arm64/copyright": b"wrong arch name\n"})
    archive.publish()


def archive_defn(tmp_path: Path, archive: SyntheticArchive, name: str, kind: str,
                 include: list[str], exclude: list[str] | None = None) -> ImageDefinition:
    return load_definition(write_defn(tmp_path, f"""
[image]
kind = "{kind}"
architectures = ["amd64"]
[packages]
include = {json.dumps(include)}
exclude = {json.dumps(exclude or [])}
[archive]
mirror = "{archive.url}"
security-mirror = "{archive.url}"
suites = ["{archive.suite}"]
{"[system]" + chr(10) + "agent = false" if kind == "system" else ""}
""", name))


def names(pkgs: tuple[LockedPackage, ...] | list[LockedPackage]) -> list[str]:
    return [p.name for p in pkgs]


def test_lock_adds_essential_packages_only_for_system_images(
        tmp_path: Path, archive: SyntheticArchive, archive_cache: Cache) -> None:
    add_system_packages(archive)
    sysd = archive_defn(tmp_path, archive, "sys", "system", ["kernel-{arch}"])
    cont = archive_defn(tmp_path, archive, "cont", "container", ["kernel-{arch}"])
    slock = ensure_lock(sysd, archive_cache, keyring=archive.keyring).lock
    clock = ensure_lock(cont, archive_cache, keyring=archive.keyring).lock
    assert names(slock.packages["amd64"]) == [
        "base-files", "essential-sh", "kernel-amd64", "libgreet1", "libtiny"]
    assert names(clock.packages["amd64"]) == ["kernel-amd64"]
    assert slock.inputs == inputs_hash(sysd.resolution_inputs())
    assert slock.inputs != clock.inputs
    # An excluded Essential package stays out, and so does what only it needed.
    excl = archive_defn(tmp_path, archive, "excl", "system", ["kernel-{arch}"],
                        exclude=["essential-sh"])
    elock = ensure_lock(excl, archive_cache, keyring=archive.keyring).lock
    assert names(elock.packages["amd64"]) == ["base-files", "kernel-amd64"]


def fetched_lock(tmp_path: Path, archive: SyntheticArchive, cache: Cache, name: str, kind: str,
                 include: list[str]) -> Lock:
    defn = archive_defn(tmp_path, archive, name, kind, include)
    lock = ensure_lock(defn, cache, keyring=archive.keyring).lock
    fetch_all(cache, lock_downloads(archive.cfg, lock, ["amd64"]), show_progress=False)
    return lock


def test_essential_closure_splits_the_lock(tmp_path: Path, archive: SyntheticArchive,
                                          archive_cache: Cache) -> None:
    add_system_packages(archive)
    lock = fetched_lock(tmp_path, archive, archive_cache, "sys", "system",
                        ["hello", "kernel-{arch}"])
    pkgs = lock.packages["amd64"]
    assert names(pkgs) == ["base-files", "essential-sh", "hello", "kernel-amd64", "libgreet1",
                           "libtiny"]
    first, rest = system.essential_closure("amd64", pkgs, archive_cache)
    assert names(first) == ["base-files", "essential-sh", "libgreet1", "libtiny"]
    assert names(rest) == ["hello", "kernel-amd64"]
    assert sorted([*first, *rest], key=lambda p: p.name) == list(pkgs)


def test_essential_closure_counts_excluded_dependencies_as_met(
        tmp_path: Path, archive: SyntheticArchive, archive_cache: Cache) -> None:
    add_system_packages(archive)
    defn = archive_defn(tmp_path, archive, "ex", "system", ["hello"], exclude=["libtiny"])
    lock = ensure_lock(defn, archive_cache, keyring=archive.keyring).lock
    fetch_all(archive_cache, lock_downloads(archive.cfg, lock, ["amd64"]), show_progress=False)
    pkgs = lock.packages["amd64"]
    assert "libtiny" not in names(pkgs)
    first, rest = system.essential_closure("amd64", pkgs, archive_cache)
    assert names(first) == ["base-files", "essential-sh"]
    assert names(rest) == ["hello", "libgreet1"]


def test_essential_closure_needs_essential_packages(tmp_path: Path, archive: SyntheticArchive,
                                                   archive_cache: Cache) -> None:
    add_system_packages(archive)
    lock = fetched_lock(tmp_path, archive, archive_cache, "cont", "container",
                        ["kernel-{arch}"])
    with pytest.raises(CeruleanError) as e:
        system.essential_closure("amd64", lock.packages["amd64"], archive_cache)
    assert str(e.value) == (
        "The lock for amd64 has no Essential packages, so it cannot make a system image "
        '(set image.kind = "system" and lock again).')


# --- system: rootfs cache key and host-specific files -----------------------------------------


def test_rootfs_key() -> None:
    a, b, c = locked("base-files"), locked("dash", "b" * 64), locked("zlib1g", "c" * 64)
    key = system.rootfs_key("amd64", [a, b, c])
    assert len(key) == 32 and int(key, 16) >= 0
    assert system.rootfs_key("amd64", [c, a, b]) == key
    assert system.rootfs_key("amd64", (b, c, a)) == key
    assert system.rootfs_key("amd64", [a, b, locked("zlib1g", "d" * 64)]) != key
    assert system.rootfs_key("amd64", [a, b, locked("zlib1g", "c" * 64, "1.1")]) != key
    assert system.rootfs_key("arm64", [a, b, c]) != key
    assert system.rootfs_key("amd64", [a, b]) != key


def test_clean_host_specific(tmp_path: Path) -> None:
    root = tmp_path
    for rel in ("usr/sbin/policy-rc.d", "etc/ssh/ssh_host_ed25519_key",
                "etc/ssh/ssh_host_ed25519_key.pub", "var/lib/dbus/machine-id",
                "var/log/dpkg.log", "var/lib/dpkg/status-old", "boot/initrd.img-6.12",
                "etc/ssh/sshd_config", "var/lib/dpkg/status", "boot/vmlinuz-6.12"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    system.clean_host_specific(root)
    assert (root / "etc/machine-id").read_text() == ""
    for gone in ("usr/sbin/policy-rc.d", "etc/ssh/ssh_host_ed25519_key",
                 "etc/ssh/ssh_host_ed25519_key.pub", "var/lib/dbus/machine-id",
                 "var/log/dpkg.log", "var/lib/dpkg/status-old", "boot/initrd.img-6.12"):
        assert not (root / gone).exists(), gone
    for kept in ("etc/ssh/sshd_config", "var/lib/dpkg/status", "boot/vmlinuz-6.12"):
        assert (root / kept).read_text() == "x", kept


# --- system_image: cheap checks ---------------------------------------------------------------


def test_build_system_image_refuses_an_unknown_format(tmp_path: Path) -> None:
    defn = system_defn(tmp_path)
    with pytest.raises(CeruleanError) as e:
        system_image.build_system_image(defn, Lock("", ()), ARCHIVE, ["amd64"],
                                        tmp_path / "out", Cache(tmp_path / "c"), fmt="vmdk")
    assert str(e.value) == "--format 'vmdk' is not one of raw, qcow2, vhd, vhdx."
    assert not (tmp_path / "out").exists()


# --- chroot -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("machine", "arch"),
                         [("x86_64", "amd64"), ("aarch64", "arm64"), ("riscv64", None)])
def test_host_arch(monkeypatch: pytest.MonkeyPatch, machine: str, arch: str | None) -> None:
    monkeypatch.setattr("cerulean.arch.platform.machine", lambda: machine)
    assert chroot.host_arch() == arch


def test_host_arch_on_this_machine() -> None:
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("checks the x86_64 mapping on an x86_64 host")
    assert chroot.host_arch() == "amd64"


def test_run_in_refuses_without_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cerulean.build.chroot.os.geteuid", lambda: 1000)
    with pytest.raises(CeruleanError) as e:
        chroot.run_in(tmp_path, ["true"])
    assert str(e.value) == "Building system images needs root (for chroot and mounts)."
    assert list(tmp_path.iterdir()) == []


def test_ensure_binfmt_is_a_no_op_for_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chroot, "host_arch", lambda: "amd64")

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("no subprocess for the host architecture")

    monkeypatch.setattr("cerulean.build.chroot.subprocess.run", boom)
    chroot.ensure_binfmt("amd64")


def test_two_builds_of_one_package_set_compose_it_once(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A second build on the same cache waits for the first's composition and uses it
    (before, it could delete the tree the first was building on)."""
    import threading
    import time

    composed: list[Path] = []

    def install(root: Path, arch: str, locked: object, cache: object,
                progress: object = None, native: object = None) -> None:
        time.sleep(0.5)
        (root / "marker").write_text("composed")
        composed.append(root)

    monkeypatch.setattr(system, "install_rootfs", install)
    cache = Cache(tmp_path / "cache")
    pkgs = [locked("base-files")]
    results: dict[str, tuple[Path, bool]] = {}
    said: list[str] = []

    def build(name: str) -> None:
        results[name] = system.cached_rootfs("amd64", pkgs, cache, said.append)

    first = threading.Thread(target=build, args=("first",))
    first.start()
    time.sleep(0.1)
    build("second")
    first.join()
    assert len(composed) == 1
    assert results["first"] == (results["second"][0], False) and results["second"][1]
    assert (results["second"][0] / "marker").read_text() == "composed"
    assert said == ["waiting for another build that composes the same packages"]
