"""What a system image leaves out of its boot (cerulean.build.lean), on small trees."""

from __future__ import annotations

import compileall
import configparser
import importlib.util
import marshal
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cerulean.build import lean
from cerulean.build.definition import load_definition
from cerulean.build.sysconfig import FILES
from cerulean.build.system import (
    COMPILE_PYCS,
    DEFERRED,
    DEFERRED_CALLS,
    HASH_PYCS,
    PY_COMPILE_STUB,
    deferred_tools,
    held_back_compilers,
    native_python,
    native_refusal,
    plain_path,
    recorded_calls,
    replay_deferred,
)
from cerulean.build.system_image import (
    USR_CHECK_AT,
    _check_initrd,
    compress_natively,
    dracut_argv,
    kernel_modules,
    missing_drivers,
)
from cerulean.errors import CeruleanError

PROFILES = {
    # A program the image has: kept.
    "unix-chkpwd": "abi <abi/4.0>,\nprofile unix-chkpwd /{,usr/}{,s}bin/unix_chkpwd "
                   "flags=(complain) {\n  include <abstractions/base>\n}\n",
    # Programs it has not: removed, with their local include.
    "firefox": "profile firefox /{usr/lib/firefox{,-esr},opt/firefox}/firefox{,-esr} "
               "flags=(unconfined) {\n  userns,\n}\n",
    "Discord": 'profile Discord "/usr/share/discord/Discord" flags=(unconfined) {\n}\n',
    "old-style": "# a comment { with a brace\n/usr/sbin/tcpdump flags=(complain) {\n"
                 "  /etc/** r,\n}\n",
    # Entered by name only, a variable it cannot resolve, a ** inside a name: kept.
    "unprivileged_userns": "profile unprivileged_userns flags=(complain) {\n}\n",
    "chromium": "profile chromium /usr/lib/@{chromium}/@{chromium} flags=(unconfined) {\n}\n",
    "globby": "profile globby /opt/**.bin {\n}\n",
    # A confining profile for a place a host can write to: the program may come later.
    "srvtool": "profile srvtool /srv/tools/bin/tool {\n  /srv/data/** rw,\n}\n",
    # Several profiles: kept if any one of them is.
    "pair": "profile gone /usr/bin/gone {\n}\nprofile here /usr/bin/here* {\n"
            "  profile child /usr/bin/nothing {\n  }\n}\n",
}


def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    policy = root / "etc/apparmor.d"
    for d in ("abstractions", "tunables", "local", "disable"):
        (policy / d).mkdir(parents=True)
    (policy / "abstractions/base").write_text("  /etc/ld.so.cache r,\n")
    (policy / "tunables/global").write_text("@{HOME}=/home/*/\n")
    for name, text in PROFILES.items():
        (policy / name).write_text(text)
    (policy / "local/firefox").write_text("# site additions\n")
    (policy / "disable/Discord").symlink_to("../Discord")
    for prog in ("usr/sbin/unix_chkpwd", "usr/bin/here-it-is"):
        (root / prog).parent.mkdir(parents=True, exist_ok=True)
        (root / prog).write_bytes(b"\x7fELF")
    return root


def test_profiles_of_absent_programs_go_and_the_rest_stay(tmp_path: Path) -> None:
    root = tree(tmp_path)
    removed = lean.prune_apparmor_profiles(root)
    assert removed == ["Discord", "firefox", "old-style"]
    policy = root / "etc/apparmor.d"
    assert sorted(p.name for p in policy.iterdir() if p.is_file()) == [
        "chromium", "globby", "pair", "srvtool", "unix-chkpwd", "unprivileged_userns"]
    assert not (policy / "local/firefox").exists()
    assert not (policy / "disable/Discord").is_symlink()
    # What profiles include is never touched.
    assert (policy / "abstractions/base").is_file() and (policy / "tunables/global").is_file()
    assert lean.prune_apparmor_profiles(root) == []  # nothing more the second time


def test_attachments_and_braces() -> None:
    assert lean.profile_attachments(PROFILES["pair"]) == ["/usr/bin/gone", "/usr/bin/here*"]
    assert lean.profile_attachments(PROFILES["old-style"]) == ["/usr/sbin/tcpdump"]
    assert lean.profile_attachments(PROFILES["unprivileged_userns"]) == [None]
    assert lean.profile_attachments("abi <abi/4.0>,\ninclude <tunables/global>\n") == []
    assert lean._expand_braces("/{usr/,}{s,}bin/x") == [
        "/usr/sbin/x", "/usr/bin/x", "/sbin/x", "/bin/x"]
    assert lean._expand_braces("/a/{b{1,2},c}/d") == ["/a/b1/d", "/a/b2/d", "/a/c/d"]


def test_globs_in_the_build_root_and_apparmor_sets(tmp_path: Path) -> None:
    root = tmp_path / "ro[o]t*"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/here-it-is").write_bytes(b"")
    assert lean._attachment_present(root, "/usr/bin/here*") is True
    assert lean._attachment_present(root, "/usr/bin/h[^x]re-it-is") is True
    assert lean._attachment_present(root, "/usr/bin/h[^e]re-it-is") is False


def test_no_apparmor_no_change(tmp_path: Path) -> None:
    assert lean.prune_apparmor_profiles(tmp_path) == []


def unit_tree(tmp_path: Path, units: dict[str, str]) -> Path:
    root = tmp_path / "root"
    system = root / "usr/lib/systemd/system"
    system.mkdir(parents=True)
    for name, text in units.items():
        (system / name).write_text(text)
    return root


SEED = ("[Unit]\nDescription=Update Boot Loader Random Seed\nDefaultDependencies=no\n"
        "After=local-fs.target systemd-random-seed.service\nConflicts=shutdown.target\n"
        "Before=sysinit.target shutdown.target\n\n[Service]\nType=oneshot\n"
        "ExecStart=bootctl --graceful random-seed\n")


def test_the_boot_loader_seed_is_refreshed_once_the_system_is_up(tmp_path: Path) -> None:
    root = unit_tree(tmp_path, {lean.RANDOM_SEED: SEED})
    assert lean.defer_boot_random_seed(root)
    text = (root / lean.UNITS / lean.RANDOM_SEED).read_text()
    assert not (root / "etc").exists()  # /usr only: the next release can undo it
    assert "Before=sysinit.target" not in text and "\nBefore=shutdown.target\n" in text
    assert "\nAfter=multi-user.target boot-complete.target\n" in text
    assert "ExecStart=bootctl --graceful random-seed" in text  # the rest as shipped
    # A unit ordered differently than expected is a build error, not a silent change.
    changed = unit_tree(tmp_path / "other", {lean.RANDOM_SEED: SEED.replace(
        "Before=sysinit.target shutdown.target", "Before=basic.target")})
    with pytest.raises(CeruleanError, match="not ordered as Cerulean expects"):
        lean.defer_boot_random_seed(changed)
    assert not lean.defer_boot_random_seed(unit_tree(tmp_path / "none", {}))


def test_masks_units_generators_and_repart_outside_the_initrd(tmp_path: Path) -> None:
    root = unit_tree(tmp_path, {"modprobe@.service": "[Unit]\n",
                                "systemd-repart.service": "[Unit]\n", "ssh.service": ""})
    gens = root / lean.GENERATORS
    gens.mkdir(parents=True)
    for g in ("systemd-ssh-generator", "systemd-fstab-generator", "systemd-sysv-generator",
              "systemd-rc-local-generator", "systemd-integritysetup-generator",
              "systemd-debug-generator"):
        (gens / g).write_bytes(b"\x7fELF")
    (root / "etc/init.d").mkdir(parents=True)
    (root / "etc/init.d/ssh").write_text("#!/bin/sh\n")  # has a unit: no need for sysv
    (root / "etc/integritytab").write_text("")
    assert lean.mask_units(root) == ["modprobe@drm.service"]
    assert os.readlink(root / lean.UNITS / "modprobe@drm.service") == "/dev/null"
    # e2scrub's units go where there is no LVM for them to check through, and stay where
    # there is.
    for unit in ("e2scrub_reap.service", "e2scrub_all.timer", "e2scrub_all.service"):
        (root / lean.UNITS / unit).write_text("[Unit]\n")
    with_lvm = tmp_path / "with-lvm"
    shutil.copytree(root, with_lvm, symlinks=True)
    (with_lvm / "usr/sbin").mkdir(parents=True, exist_ok=True)
    (with_lvm / lean.LVM).write_bytes(b"\x7fELF")
    assert lean.mask_units(with_lvm) == ["modprobe@drm.service"]
    assert (with_lvm / lean.UNITS / "e2scrub_reap.service").read_text() == "[Unit]\n"
    assert lean.mask_units(root) == ["modprobe@drm.service", "e2scrub_reap.service",
                                     "e2scrub_all.timer", "e2scrub_all.service"]
    assert os.readlink(root / lean.UNITS / "e2scrub_reap.service") == "/dev/null"
    assert lean.mask_generators(root) == [
        "systemd-rc-local-generator", "systemd-ssh-generator", "systemd-sysv-generator"]
    assert {p.name: os.readlink(p) for p in gens.iterdir() if p.is_symlink()} == {
        g: "/dev/null" for g in ("systemd-rc-local-generator", "systemd-ssh-generator",
                                 "systemd-sysv-generator")}
    assert (gens / "systemd-fstab-generator").read_bytes() == b"\x7fELF"
    assert not (root / "etc/systemd").exists()  # /usr only: the next release can undo it
    # A SysV script without a unit keeps the generator.
    (gens / "systemd-sysv-generator").unlink()
    (gens / "systemd-sysv-generator").write_bytes(b"\x7fELF")
    (root / "etc/init.d/legacy").write_text("#!/bin/sh\n")
    assert "systemd-sysv-generator" not in lean.mask_generators(root)
    assert lean.repart_in_initrd_only(root)
    dropin = root / lean.UNITS / "systemd-repart.service.d"
    assert "ConditionPathExists=/etc/initrd-release" in next(dropin.iterdir()).read_text()
    assert not lean.networkd_without_bpf(root)  # no networkd, no drop-in
    assert not (root / lean.UNITS / f"{lean.NETWORKD}.d").exists()
    (root / lean.UNITS / lean.NETWORKD).write_text("[Service]\nSystemCallFilter=@system-service\n")
    assert lean.networkd_without_bpf(root)
    conf = next((root / lean.UNITS / f"{lean.NETWORKD}.d").iterdir()).read_text()
    assert "[Service]\nSystemCallFilter=~bpf\n" in conf


def test_first_boot_does_not_redo_what_the_build_did(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for d in ("etc", "var"):
        (root / d).mkdir(parents=True)
    lean.mark_updated(root, 1_764_547_200)
    for d in ("etc", "var"):
        stamp = root / d / ".updated"
        assert "TIMESTAMP_NSEC=1764547200000000000\n" in stamp.read_text()
        assert stamp.stat().st_mtime_ns == 1_764_547_200 * 10**9


def test_compiled_modules_become_hash_based(tmp_path: Path) -> None:
    """The header rewrite the composition runs with the image's Python, here with this one."""
    lib = tmp_path / "usr/lib/python3/dist-packages/pkg"
    lib.mkdir(parents=True)
    source = lib / "mod.py"
    source.write_text("VALUE = 42\n")
    orphan = lib / "gone.py"
    orphan.write_text("X = 1\n")
    compileall.compile_dir(lib, quiet=1)
    orphan.unlink()  # a .pyc without its source stays as it was
    pyc = Path(importlib.util.cache_from_source(str(source)))
    gone = Path(importlib.util.cache_from_source(str(orphan)))
    before, gone_before = pyc.read_bytes(), gone.read_bytes()
    assert int.from_bytes(before[4:8], "little") == 0  # timestamp-based, as Debian makes them
    os.utime(source, (0, 0))  # what the /usr image does to every file's time
    subprocess.run([sys.executable, "-c", HASH_PYCS, str(tmp_path / "usr/lib")], check=True)
    after = pyc.read_bytes()
    assert after[:4] == before[:4] and int.from_bytes(after[4:8], "little") == 3
    assert after[8:16] == importlib.util.source_hash(source.read_bytes())
    assert after[16:] == before[16:]  # the compiled code itself is unchanged
    assert gone.read_bytes() == gone_before
    # Python takes it as it is, whatever the source's time: no compiling again.
    out = subprocess.run([sys.executable, "-v", "-c", "import pkg.mod"],
                         cwd=tmp_path / "usr/lib/python3/dist-packages", capture_output=True,
                         text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                         check=True).stderr
    assert f"matches {source}" in out and "bytecode is stale" not in out



def test_modules_are_compiled_for_the_tree_they_are_in(tmp_path: Path) -> None:
    """What a foreign architecture's composition runs with the tools tree's Python (here
    this one) over the target tree: checked-hash files whose code names the path the
    target sees, a symlinked module read as the target resolves it, failures said."""
    root = tmp_path / "root"
    std = root / "usr/lib/python3.13"
    pkg = root / "usr/lib/python3/dist-packages/pkg"
    for d in (std, pkg, root / "etc/python3.13"):
        d.mkdir(parents=True)
    (std / "mod.py").write_text("def where():\n    return __file__\n")
    (root / "etc/python3.13/sitecustomize.py").write_text("SITE = 'the target'\n")
    (std / "sitecustomize.py").symlink_to("/etc/python3.13/sitecustomize.py")
    (std / "dangling.py").symlink_to("/etc/nowhere.py")
    (pkg / "ok.py").write_text("X = 1\n")
    # Links that climb out of the tree: ".." stops at its top, and what is outside is
    # never read (here the file exists outside only).
    (tmp_path / "outside.py").write_text("SECRET = 1\n")
    (pkg / "escape.py").symlink_to("../../../../../../../../outside.py")
    (pkg / "via-abs-dir.py").symlink_to("/etc/python3.13/../../outside.py")

    def compile_all() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", COMPILE_PYCS, str(root),
                               "usr/lib/python3.13", "usr/lib/python3/dist-packages",
                               "usr/share/python3"], capture_output=True, text=True)

    assert compile_all().returncode == 0
    # A module that does not compile fails the run, as it fails Debian's postinst.
    (pkg / "broken.py").write_text("def (:\n")
    bad = compile_all()
    assert bad.returncode != 0, bad
    assert "not compiled: /usr/lib/python3/dist-packages/pkg/broken.py" in bad.stderr
    assert "1 modules do not compile" in bad.stderr, bad.stderr
    for src in (std / "mod.py", std / "sitecustomize.py", pkg / "ok.py"):
        pyc = Path(importlib.util.cache_from_source(str(src)))
        data = pyc.read_bytes()
        assert int.from_bytes(data[4:8], "little") == 3, src  # checked-hash
        real = src.resolve() if not src.is_symlink() else root / "etc/python3.13/sitecustomize.py"
        assert data[8:16] == importlib.util.source_hash(real.read_bytes()), src
        code = marshal.loads(data[16:])
        assert code.co_filename == "/" + str(src.relative_to(root)), code.co_filename
    for src in (pkg / "broken.py", std / "dangling.py", pkg / "escape.py",
                pkg / "via-abs-dir.py"):
        assert not Path(importlib.util.cache_from_source(str(src))).exists(), src
    # The same climbing link, once the tree has the file at its top: read from the tree.
    (root / "outside.py").write_text("INSIDE = 1\n")
    compile_all()
    escape = Path(importlib.util.cache_from_source(str(pkg / "escape.py"))).read_bytes()
    assert escape[8:16] == importlib.util.source_hash(b"INSIDE = 1\n")


def test_compilers_are_held_back_and_put_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib/python3.13").mkdir(parents=True)
    py3compile = root / "usr/bin/py3compile"
    py3compile.write_text("#!/usr/bin/python3\nreal\n")
    py_compile = root / "usr/lib/python3.13/py_compile.py"
    py_compile.write_text("the real py_compile\n")
    (root / "usr/bin/python3.13").write_text("")
    native = tmp_path / "tools"
    (native / "usr/bin").mkdir(parents=True)
    (native / "usr/lib/python3.13").mkdir(parents=True)
    (native / "usr/lib/python3.13/py_compile.py").write_text("")

    def status(tree: Path, version: str) -> None:
        (tree / "var/lib/dpkg").mkdir(parents=True, exist_ok=True)
        (tree / "var/lib/dpkg/status").write_text(
            "Package: libc6\nStatus: install ok installed\nVersion: 2.41-12\n\n"
            f"Package: python3.13-minimal\nStatus: install ok unpacked\nVersion: {version}\n"
            "Description: a\n multi-line field: with a colon\n")

    status(root, "3.13.5-2")
    status(native, "3.13.5-2")
    assert native_python(root, native) is None  # the tools tree has no python3.13 program
    (native / "usr/bin/python3.13").write_text("")
    assert native_python(root, native) == "python3.13"
    status(native, "3.13.7-1")  # another patch release may compile differently
    assert native_python(root, native) is None
    status(native, "3.13.5-2")
    with pytest.raises(RuntimeError), held_back_compilers(root, "python3.13"):
        assert not py3compile.exists()  # its callers skip it
        assert py_compile.read_bytes() == PY_COMPILE_STUB
        # The stub runs as a script and imports without compiling anything.
        subprocess.run([sys.executable, "-E", "-S", str(py_compile), str(py_compile)],
                       check=True)
        raise RuntimeError("a package's script failed")
    assert py3compile.read_text() == "#!/usr/bin/python3\nreal\n"
    assert py_compile.read_text() == "the real py_compile\n"
    assert sorted(p.name for p in (root / "usr/lib/python3.13").iterdir()) == ["py_compile.py"]
    with held_back_compilers(root, None):  # no native Python: nothing is touched
        assert py3compile.exists() and py_compile.read_text() == "the real py_compile\n"


def test_tools_the_tools_tree_stands_in_for_record_their_calls(tmp_path: Path) -> None:
    root, native = tmp_path / "root", tmp_path / "tools"
    for tree, udev in ((root, "257.13-1"), (native, "257.13-1")):
        for d in ("usr/bin", "usr/sbin", "var/lib/dpkg", "etc/ca-certificates/update.d"):
            (tree / d).mkdir(parents=True)
        (tree / "var/lib/dpkg/status").write_text(
            f"Package: udev\nVersion: {udev}\n\nPackage: kmod\nVersion: 34.2-2\n")
        (tree / "usr/bin/systemd-hwdb").write_text("hwdb\n")
        (tree / "usr/bin/kmod").write_text("kmod\n")
        (tree / "usr/sbin/depmod").symlink_to("../bin/kmod")
    (root / "usr/sbin/update-ca-certificates").write_text("#!/bin/sh\n")
    (native / "usr/bin/openssl").write_text("")
    # run-parts is missing from the tools tree: the target's own script runs then.
    with deferred_tools(root, native) as chosen:
        assert [d.path for d in chosen] == ["usr/bin/systemd-hwdb", "usr/sbin/depmod"]
        for name, args in (("systemd-hwdb", ["--usr", "update"]),
                           ("depmod", ["6.12.1-arm64"]),
                           ("systemd-hwdb", ["--usr", "update"]),  # once is enough
                           ("depmod", ["-a", "with space\nand a line", "%s 'q'", ""]),
                           ("depmod", ["6.12.1-arm64"])):  # where it was made last
            stub = root / "usr" / ("bin" if name == "systemd-hwdb" else "sbin") / name
            text = stub.read_text().replace(f"/{DEFERRED_CALLS}", str(root / DEFERRED_CALLS))
            subprocess.run(["sh", "-c", text, name, *args], check=True)
    assert (root / "usr/bin/systemd-hwdb").read_text() == "hwdb\n"
    assert os.readlink(root / "usr/sbin/depmod") == "../bin/kmod"
    assert not list((root / "usr/sbin").glob("*.cerulean-held"))
    calls = root / DEFERRED_CALLS
    assert recorded_calls((calls / "systemd-hwdb").read_bytes()) == [("--usr", "update")]
    assert recorded_calls((calls / "depmod").read_bytes()) == [
        ("-a", "with space\nand a line", "%s 'q'", ""), ("6.12.1-arm64",)]
    with pytest.raises(CeruleanError, match="could not be read back"):
        recorded_calls(b"Aone\0Xtwo\0E\0")
    for cut in (b"Aone\0", b"Aone\0E\0Atw"):
        with pytest.raises(CeruleanError, match="cut short"):
            recorded_calls(cut)
    # Another udev in the tools tree, a hook to run, or a failure: nothing is deferred,
    # and what was changed is put back.
    (native / "usr/bin/run-parts").write_text("")
    (root / "etc/ca-certificates/update.d/jks").write_text("#!/bin/sh\n")
    (native / "var/lib/dpkg/status").write_text("Package: udev\nVersion: 258-1\n")
    with pytest.raises(RuntimeError), deferred_tools(root, native) as chosen:
        assert chosen == []
        raise RuntimeError("dpkg failed")
    (root / "etc/ca-certificates/update.d/jks").unlink()
    with pytest.raises(RuntimeError), deferred_tools(root, native) as chosen:
        assert [d.path for d in chosen] == ["usr/sbin/update-ca-certificates"]
        raise RuntimeError("dpkg failed")
    assert (root / "usr/sbin/update-ca-certificates").read_text() == "#!/bin/sh\n"


def test_replayed_calls_run_natively_only_as_the_target_would(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, native = tmp_path / "root", tmp_path / "tools"
    hwdb, depmod, certs = DEFERRED
    for d in ("usr/lib/udev/hwdb.d", "usr/lib/modules/6.12.1", "etc/ssl/certs",
              "usr/share/ca-certificates/mozilla", DEFERRED_CALLS):
        (root / d).mkdir(parents=True)
    (root / "etc/ca-certificates.conf").write_text("mozilla/A.crt\n")
    assert native_refusal(root, hwdb, ["--usr", "update"]) == ""
    assert native_refusal(root, depmod, ["-a", "-F", "/boot/System.map-6.12.1", "6.12.1"]) \
        == "an argument is a path"
    assert native_refusal(root, depmod, ["--basedir=/srv", "6.12.1"]) == \
        "an argument is a path"
    # A link inside the tree, relative or absolute, is fine; one that leads out is not.
    (root / "etc/ssl/certs/A.pem").symlink_to("/usr/share/ca-certificates/mozilla/A.crt")
    (root / "etc/ssl/certs/3513523f.0").symlink_to("A.pem")
    assert native_refusal(root, certs, []) == ""
    (root / "etc/ssl/certs/B.pem").symlink_to("../../../opt/B.crt")
    assert native_refusal(root, certs, []) == \
        "a link leads out of the directories it works on"
    (root / "etc/ssl/certs/B.pem").unlink()
    # A bound directory reached through a link could be the host's own.
    shutil.rmtree(root / "usr/lib/udev")
    (root / "usr/lib/udev").symlink_to("/usr/lib/udev")
    assert native_refusal(root, hwdb, ["--usr", "update"]) == \
        "/usr/lib/udev is reached through a link"
    assert not plain_path(root, "usr/lib/udev/hwdb.d") and plain_path(root, "etc/ssl/certs")
    (root / "usr/lib/udev").unlink()
    assert native_refusal(root, hwdb, ["--usr", "update"]) == "the image has no /usr/lib/udev"

    ran: list[tuple[Path, list[str], dict[Path, str]]] = []

    def fake_run_in(tree: Path, argv: list[str], **kw: object) -> None:
        binds = kw.get("binds") or {}
        assert isinstance(binds, dict)
        ran.append((tree, argv, {k: v for k, v in binds.items()}))
        for source in binds:  # an optional bind the image lacks is an empty directory
            assert source.exists(), source

    monkeypatch.setattr("cerulean.build.system.run_in", fake_run_in)
    (root / DEFERRED_CALLS / "depmod").write_bytes(b"A6.12.1\0E\0A-F\0A/boot/map\0E\0")
    (root / DEFERRED_CALLS / "update-ca-certificates").write_bytes(b"E\0")
    said: list[str] = []
    replay_deferred(root, native, [depmod, certs], said.append)
    assert [(tree, argv) for tree, argv, _ in ran] == [
        (native, ["depmod", "6.12.1"]),
        (root, ["/usr/sbin/depmod", "-F", "/boot/map"]),
        (native, ["sh", "-e", "/mnt/usr/sbin/update-ca-certificates"])]
    binds = ran[0][2]
    assert binds[root] == "/mnt" and binds[root / "usr/lib/modules"] == "/usr/lib/modules"
    assert sorted(v for k, v in binds.items() if not str(k).startswith(str(root))) == [
        "/etc/depmod.d", "/usr/lib/depmod.d", "/usr/local/lib/depmod.d"]
    assert "under emulation (an argument is a path)" in said[1]
    assert not (root / DEFERRED_CALLS).exists()


IMAGES = Path(__file__).resolve().parents[2] / "images"


def test_initrd_modules_and_drivers_per_image() -> None:
    vm = dracut_argv(load_definition(IMAGES / "vm.toml"), "6.12.0")
    modules = vm[vm.index("--modules") + 1].split()
    assert modules[:5] == ["systemd", "systemd-initrd", "systemd-veritysetup",
                           "systemd-repart", "dm"] and "kernel-modules" not in modules
    drivers = vm[vm.index("--drivers") + 1].split()
    assert {"virtio_blk", "nvme", "hv_storvsc", "dm-verity", "erofs"} <= set(drivers)
    assert "--add-drivers" not in vm
    # metal boots on hardware nobody can list: every storage driver.
    metal = dracut_argv(load_definition(IMAGES / "metal.toml"), "6.12.0")
    assert "kernel-modules" in metal[metal.index("--modules") + 1].split()
    assert "--drivers" not in metal and "--add-drivers" in metal
    # The initrd's check of /usr: the drop-in from build/files, and dd to read a block.
    at = vm.index("--include")
    assert vm[at + 1:at + 3] == ["/work/initrd-usr-check.conf", USR_CHECK_AT]
    assert vm[vm.index("--install") + 1] == "dd"
    check = (FILES / "initrd-usr-check.conf").read_text()
    assert "OnFailure=emergency.target" in check
    assert "dd if=/dev/mapper/usr of=/dev/null" in check
    # Compressed afterwards by the tools tree: the same command with no compression.
    plain = compress_natively(vm)
    assert "--no-compress" in plain and "--compress=zstd" in vm
    assert [a for a in plain if a != "--no-compress"] == [a for a in vm
                                                           if a != "--compress=zstd"]


def test_drivers_the_kernel_lacks_are_left_out(tmp_path: Path) -> None:
    """One definition for both architectures: arm64's kernel has no VMware driver."""
    mods = tmp_path / "usr/lib/modules/6.12.0-arm64"
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text(
        "kernel/drivers/block/virtio_blk.ko.xz:\nkernel/drivers/md/dm-verity.ko.xz: "
        "kernel/drivers/md/dm-bufio.ko.xz\nkernel/drivers/md/dm-mod.ko.xz:\n"
        "kernel/fs/erofs/erofs.ko.xz:\nkernel/drivers/block/xen-blkfront.ko.xz:\n")
    (mods / "modules.builtin").write_text("kernel/drivers/nvme/host/nvme.ko\n")
    have = kernel_modules(tmp_path, "6.12.0-arm64")
    assert {"virtio_blk", "dm_verity", "nvme", "xen_blkfront"} <= have
    vm = load_definition(IMAGES / "vm.toml")
    argv = dracut_argv(vm, "6.12.0-arm64", have)
    assert argv[argv.index("--drivers") + 1].split() == [
        "virtio_blk", "nvme", "xen-blkfront", "dm-mod", "dm-verity", "erofs"]
    assert {"vmw_pvscsi", "ahci", "virtio_scsi"} <= set(missing_drivers(vm, have))
    # A list the kernel has none of (a typo, an unreadable modules.dep) is an error.
    with pytest.raises(CeruleanError, match="None of system\\.initrd-drivers"):
        dracut_argv(vm, "6.12.0-arm64", set())


UNIT_DIR = Path(__file__).resolve().parents[2] / "src/cerulean/agent/units"


def _seconds(value: str) -> float:
    units = {"min": 60.0, "s": 1.0, "ms": 0.001}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value)


def test_a_crash_looping_agent_lets_the_boot_be_judged() -> None:
    """The health check waits for the agent's start job; systemd keeps that job pending
    through automatic restarts until the start limit is hit, so the limit must be
    reachable at the agent's restart pace, or the boot is never judged."""
    agent = configparser.ConfigParser(strict=False, interpolation=None)
    agent.read(UNIT_DIR / "cerulean-agent.service")
    health = configparser.ConfigParser(strict=False, interpolation=None)
    health.read(UNIT_DIR / "cerulean-health.service")
    assert "cerulean-agent.service" in health["Unit"]["After"].split()
    burst = int(agent["Unit"]["StartLimitBurst"])
    interval = _seconds(agent["Unit"]["StartLimitIntervalSec"])
    restart = _seconds(agent["Service"]["RestartSec"])
    start = _seconds(agent["Service"]["TimeoutStartSec"])
    assert agent["Service"]["Restart"] != "always"
    # Even starts that fail only at their timeout all fit in the interval.
    assert burst > 0 and burst * start + (burst - 1) * restart < interval


def _newc(names: list[str]) -> bytes:
    """A cpio archive in dracut's format (newc) holding empty files named *names*."""
    out = b""
    for name in [*names, "TRAILER!!!"]:
        raw = name.encode() + b"\0"
        head = b"070701" + b"".join(b"%08X" % v for v in (
            0, 0o100644, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(raw), 0))
        out += head + raw
        out += b"\0" * (-len(out) % 4)
    return out


def test_an_initrd_without_the_usr_check_fails_the_build(tmp_path: Path) -> None:
    """dracut logs a file it cannot add and goes on: the build checks the archive."""
    archive = tmp_path / "initrd.cpio"
    archive.write_bytes(_newc(["usr", USR_CHECK_AT.lstrip("/"), "usr/bin/dd"]))
    _check_initrd(archive, "")
    archive.write_bytes(_newc(["usr", USR_CHECK_AT.lstrip("/"), "usr/bin/ddx"]))
    with pytest.raises(CeruleanError, match=r"left /usr/bin/dd out of the initrd: "
                       r"dracut\[E\]: ERROR: installing 'dd'"):
        _check_initrd(archive, "dracut[I]: ok\ndracut[E]: ERROR: installing 'dd'\n")
    archive.write_bytes(_newc(["usr/bin/dd"]))
    with pytest.raises(CeruleanError, match=r"50-cerulean-check\.conf out of the initrd: it "
                       "gave no error"):
        _check_initrd(archive, "")
