"""The QEMU testbed without QEMU: console parsing, checks, command lines, GPT reading.

Boots are simulated by a small Python program standing in for QEMU that
writes console text to the log, so the watch loop, timeouts and process
clean-up are exercised for real in well under a second each.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import sys
import textwrap
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cerulean.cli import main
from cerulean.errors import CeruleanError
from cerulean.testbed import accel, arch, checks, disk, qemu
from cerulean.testbed.accel import AccelChoice, KvmProbe, TcgThreads, choose_accel, tcg_threads
from cerulean.testbed.checks import Outcome, blame, evaluate
from cerulean.testbed.console import ReadyReport, scan, strip_ansi
from cerulean.testbed.qemu import Launch, QemuConfig, build_argv, detect_arch

ESC = "\x1b"
ROOT_X86 = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
USR_X86 = "8484680c-9521-48c6-9c11-b0720656f69e"
ROOT_ARM = "b921b045-1df0-41c3-af44-4c6f280d3fae"
USR_ARM_VERITY = "6e11a4e7-fbca-4ded-b9e9-e1a512bb664e"
ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
LINUX_DATA = "0fc63daf-8483-4772-8e79-3d69d8477de4"

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                    reason="qemu-img (Debian package qemu-utils) is not installed")


def ok(unit: str) -> str:
    """A systemd status line as it appears on a serial console, colours and all."""
    return f"[{ESC}[0;32m  OK  {ESC}[0m] Reached target {ESC}[0;1;39m{unit}{ESC}[0m - X.\r\n"


READY = (
    "CERULEAN-READY-BEGIN\r\n"
    "uptime=30.20\r\n"
    "state=running\r\n"
    "failed=\r\n"
    "usr=/dev/mapper/usr erofs ro,relatime,user_xattr,cache_strategy=readaround\r\n"
    "verity=verified\r\n"
    "slot=A\r\n"
    "boot=systemd-boot 257\r\n"
    "kernel=6.12.118+deb13-cloud-amd64\r\n"
    "bless=good\r\n"
    "CERULEAN-READY-END\r\n"
)

HEALTHY = (
    f"{ESC}[2J{ESC}[01;01H{ESC}[=3h{ESC}[2J{ESC}[01;01HBdsDxe: starting Boot0002\r\n"
    "[    0.000000] Command line: usrhash=c4b5 console=ttyS0 systemd.verity_usr_data=x\r\n"
    "[    1.200000] Run /init as init process\r\n"
    + ok("sysinit.target") + ok("multi-user.target")
    + "         Starting cerulean-ready.service - Report readiness on the console...\r\n"
    + READY
    + f"{ESC}[!p{ESC}]104{ESC}\\{ESC}[?7h{ESC}[6n{ESC}[32766;32766H{ESC}[6n\r\n"
    "Debian GNU/Linux 13 cerulean ttyS0\r\n\r\ncerulean login: "
)


# --- console ----------------------------------------------------------------------------------


def test_strip_ansi_removes_escapes_and_controls() -> None:
    line = f"[{ESC}[0;32m  OK  {ESC}[0m] Started {ESC}[0;1;39mdbus{ESC}[0m.\r"
    assert strip_ansi(line) == "[  OK  ] Started dbus."
    assert strip_ansi(f"{ESC}[!p{ESC}]104{ESC}\\{ESC}[?7h{ESC}(Bx{ESC}7\ty") == "x\ty"


def test_ready_block_is_parsed_and_keeps_unknown_keys() -> None:
    s = scan(HEALTHY)
    assert s.report is not None
    assert s.events == []
    assert list(s.report.values) == ["uptime", "state", "failed", "usr", "verity", "slot",
                                     "boot", "kernel", "bless"]
    assert s.report.uptime == 30.2
    assert s.report.failed_units == []
    assert s.report.get("boot") == "systemd-boot 257"
    assert s.report.get("kernel") == "6.12.118+deb13-cloud-amd64"
    assert s.report.usr == ("/dev/mapper/usr", "erofs",
                            ["ro", "relatime", "user_xattr", "cache_strategy=readaround"])


def test_ready_block_survives_escapes_and_interleaved_kernel_lines() -> None:
    text = (f"{ESC}[0mCERULEAN-READY-BEGIN{ESC}[K\r\n"
            "uptime=12.5 3.1\r\n"
            "[   12.600000] random: crng init done\r\n"
            f"failed={ESC}[1mfoo.service{ESC}[0m bar.mount\r\n"
            "CERULEAN-READY-END\r\n")
    report = scan(text).report
    assert report is not None
    assert report.values == {"uptime": "12.5 3.1", "failed": "foo.service bar.mount"}
    assert report.uptime == 12.5
    assert report.failed_units == ["foo.service", "bar.mount"]


def test_ready_block_survives_a_getty_prompt() -> None:
    # As seen under load: the serial getty's banner and prompt between report lines.
    text = ("CERULEAN-READY-BEGIN\r\n"
            "uptime=82.29\r\n"
            "\r\r\n"
            "Cerulean Linux cerulean ttyS0\r\n"
            "\r\n"
            "cerulean login: failed=\r\n"
            "usr=/dev/mapper/usr erofs ro\r\n"
            "CERULEAN-READY-END\r\n")
    report = scan(text).report
    assert report is not None
    assert report.values == {"uptime": "82.29", "failed": "", "usr": "/dev/mapper/usr erofs ro"}
    assert report.failed_units == []


def test_console_fed_byte_by_byte() -> None:
    from cerulean.testbed.console import ConsoleScanner

    data = ("Mounting boot.mount - EFI System Partition Automount…\r\n" + HEALTHY).encode()
    s = ConsoleScanner()
    for i in range(len(data)):  # splits multi-byte characters and CRLFs too
        s.feed(data[i:i + 1])
    s.finish()
    assert s.report == scan(HEALTHY).report
    assert s.events == []


def test_incomplete_block_is_not_a_report() -> None:
    s = scan("CERULEAN-READY-BEGIN\nuptime=3\nfailed=\n")
    assert s.report is None


def test_only_the_first_complete_block_counts() -> None:
    text = READY + READY.replace("uptime=30.20", "uptime=99")
    report = scan(text).report
    assert report is not None and report.uptime == 30.2


@pytest.mark.parametrize("line, kind", [
    ("[    2.345678] Kernel panic - not syncing: VFS: Unable to mount root fs", "kernel panic"),
    ("[    5.000000] Oops: general protection fault, probably for non-canonical address",
     "kernel oops"),
    ("[    5.000000] BUG: kernel NULL pointer dereference, address: 0000000000000000",
     "kernel BUG"),
    (f"{ESC}[0;1;31mYou are in emergency mode.{ESC}[0m After logging in, type", "emergency shell"),
    ("Give root password for maintenance", "emergency shell"),
    ("Cannot open access to console, the root account is locked.", "emergency shell"),
    ("[  OK  ] Started emergency.service - Emergency Shell.\r\nEntering emergency mode.",
     "emergency shell"),
    ("You are in rescue mode. After logging in, type \"journalctl -xb\"", "rescue shell"),
    ("dracut: Generating \"/run/initramfs/rdsosreport.txt\"", "emergency shell"),
])
def test_failure_patterns(line: str, kind: str) -> None:
    s = scan(ok("basic.target") + line + "\r\n" + ok("x.target"))
    assert [e.kind for e in s.events] == [kind]
    assert s.events[0].line >= 2
    assert ESC not in s.events[0].text


LOCKUP = "[   97.035366] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [systemd:1]"


def test_a_soft_lockup_fails_a_native_boot_but_is_a_stall_under_emulation() -> None:
    text = ok("basic.target") + LOCKUP + "\r\n" + ok("x.target")
    native = scan(text)
    assert [e.kind for e in native.events] == ["kernel BUG"] and native.stalls == []
    emulated = scan(text, emulated=True)
    assert emulated.events == []
    assert [(e.kind, e.text) for e in emulated.stalls] == [("emulation stall", LOCKUP)]


def test_other_kernel_bugs_still_fail_an_emulated_boot() -> None:
    text = LOCKUP + "\n[ 98.1] BUG: unable to handle page fault for address: ffff\n"
    s = scan(text, emulated=True)
    assert [e.kind for e in s.events] == ["kernel BUG"] and len(s.stalls) == 1


# --- checks -----------------------------------------------------------------------------------


def report(**changes: str | None) -> ReadyReport:
    values = dict(scan(READY).report.values)  # type: ignore[union-attr]
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    return ReadyReport(values)


def by_name(result: list[checks.Check]) -> dict[str, checks.Check]:
    return {c.name: c for c in result}


def test_healthy_boot_passes_every_check() -> None:
    result = evaluate(Outcome.READY, report(), [], timeout_s=600, elapsed_s=41.0,
                      time_to_ready_s=40.5)
    assert [c.name for c in result] == list(checks.CHECK_NAMES)
    assert all(c.passed for c in result), result
    assert "40.5 s" in by_name(result)[checks.MULTI_USER].detail
    assert "guest uptime 30.2 s" in by_name(result)[checks.MULTI_USER].detail


@pytest.mark.parametrize("changes, failing, words", [
    ({"verity": ""}, {checks.USR_VERITY}, "expected 'verified'"),
    ({"verity": None}, {checks.USR_VERITY}, "no 'verity' key"),
    ({"failed": "a.service b.mount"}, {checks.NO_FAILED_UNITS}, "a.service b.mount"),
    ({"failed": None}, {checks.NO_FAILED_UNITS}, "no 'failed' key"),
    ({"usr": "/dev/mapper/usr erofs rw,relatime"}, {checks.USR_READ_ONLY}, "rw,relatime"),
    ({"usr": "/dev/vda2 erofs ro"}, {checks.USR_DM}, "/dev/vda2"),
    ({"usr": "/dev/dm-0 erofs ro,relatime"}, set(), ""),
    ({"usr": "/dev/mapper/usr erofs errors=ro"}, {checks.USR_READ_ONLY}, "errors=ro"),
    ({"usr": None}, {checks.USR_READ_ONLY, checks.USR_DM}, "no 'usr' key"),
    ({"bless": "clean"}, set(), ""),
    ({"bless": "indeterminate"}, {checks.BOOT_GOOD}, "boot-complete.target was not reached"),
    ({"bless": "bad"}, {checks.BOOT_GOOD}, "bless='bad'"),
    ({"bless": None}, {checks.BOOT_GOOD}, "no 'bless' key"),
])
def test_report_checks(changes: dict[str, str | None], failing: set[str], words: str) -> None:
    result = by_name(evaluate(Outcome.READY, report(**changes), [], timeout_s=600,
                              elapsed_s=40))
    assert {n for n, c in result.items() if not c.passed} == failing
    for name in failing:
        assert words in result[name].detail


def test_timeout_fails_with_a_timed_out_check() -> None:
    result = by_name(evaluate(Outcome.TIMEOUT, None, [], timeout_s=5, elapsed_s=5.2))
    assert not result[checks.NO_TIMEOUT].passed
    assert "timed out after 5 s" in result[checks.NO_TIMEOUT].detail
    assert not result[checks.MULTI_USER].passed
    assert result[checks.CLEAN_CONSOLE].passed
    assert all("no READY report" in result[n].detail
               for n in (checks.NO_FAILED_UNITS, checks.USR_VERITY))


def test_console_failure_is_named_with_its_line() -> None:
    events = scan(ok("a") + "[ 3.1] Kernel panic - not syncing: Attempted to kill init!\n").events
    result = by_name(evaluate(Outcome.FAILED, None, events, timeout_s=600, elapsed_s=9))
    assert result[checks.NO_TIMEOUT].passed
    assert "kernel panic on console line 2" in result[checks.MULTI_USER].detail
    assert "Attempted to kill init" in result[checks.CLEAN_CONSOLE].detail


def test_qemu_exit_is_explained() -> None:
    result = by_name(evaluate(Outcome.EXITED, None, [], timeout_s=600, elapsed_s=1,
                              qemu_detail="exit code 1: could not open disk"))
    assert "QEMU exited" in result[checks.MULTI_USER].detail
    assert "could not open disk" in result[checks.MULTI_USER].detail


# --- accelerator ------------------------------------------------------------------------------


@pytest.fixture
def no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(arch: str, timeout_s: float) -> KvmProbe:
        raise AssertionError("the KVM probe must not run")

    monkeypatch.setattr(accel, "_run_probe", fail)
    accel.probe_kvm.cache_clear()


def test_env_forces_tcg(monkeypatch: pytest.MonkeyPatch, no_probe: None) -> None:
    monkeypatch.setenv("CERULEAN_ACCEL", "tcg")
    assert choose_accel("amd64") == AccelChoice("tcg", "CERULEAN_ACCEL=tcg")
    monkeypatch.setenv("CERULEAN_ACCEL", "KVM")
    assert choose_accel("arm64").accel == "kvm"
    assert choose_accel("arm64", "tcg").accel == "tcg"  # an explicit request wins


def test_bad_accel_values(monkeypatch: pytest.MonkeyPatch, no_probe: None) -> None:
    monkeypatch.setenv("CERULEAN_ACCEL", "hvf")
    with pytest.raises(CeruleanError, match=r"\$CERULEAN_ACCEL is 'hvf'; valid values"):
        choose_accel("amd64")
    with pytest.raises(CeruleanError, match="The accelerator is 'xen'"):
        choose_accel("amd64", "xen")


def test_foreign_guest_uses_tcg_without_probing(monkeypatch: pytest.MonkeyPatch,
                                                no_probe: None) -> None:
    monkeypatch.delenv("CERULEAN_ACCEL", raising=False)
    monkeypatch.setattr(accel, "host_arch", lambda: "amd64")
    choice = choose_accel("arm64")
    assert choice.accel == "tcg" and "the guest arm64" in choice.reason


def test_missing_kvm_device_uses_tcg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     no_probe: None) -> None:
    monkeypatch.delenv("CERULEAN_ACCEL", raising=False)
    monkeypatch.setattr(accel, "host_arch", lambda: "amd64")
    monkeypatch.setattr(accel, "KVM_DEVICE", tmp_path / "kvm")
    assert choose_accel("amd64").accel == "tcg"


def test_probe_decides_and_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    works = {"amd64": False, "arm64": True}

    def probe(arch: str, timeout_s: float) -> KvmProbe:
        calls.append(arch)
        return KvmProbe(works[arch], "probed")

    kvm = tmp_path / "kvm"
    kvm.touch()
    monkeypatch.delenv("CERULEAN_ACCEL", raising=False)
    monkeypatch.setattr(accel, "_run_probe", probe)
    monkeypatch.setattr(accel, "KVM_DEVICE", kvm)
    accel.probe_kvm.cache_clear()
    try:
        for host, expected in (("amd64", "tcg"), ("arm64", "kvm")):
            monkeypatch.setattr(accel, "host_arch", lambda h=host: h)  # type: ignore[misc]
            assert [choose_accel(host).accel for _ in range(3)] == [expected] * 3
        assert calls == ["amd64", "arm64"]
    finally:
        accel.probe_kvm.cache_clear()


def test_qemu_complaint_prefers_the_error_line() -> None:
    err = ("qemu-system-x86_64: warning: host doesn't support requested feature\n"
           "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
           "qemu-system-x86_64: kvm.c:3183: kvm_buf_set_msrs: Assertion failed.\n")
    assert accel.qemu_complaint(err).endswith("failed to set MSR 0x10a to 0x69")
    assert accel.qemu_complaint("") == "no message"


@pytest.mark.parametrize("version, cpus, mode", [
    ((7, 2, 22), 2, "single"),  # Debian 12: the race in multi-threaded TCG
    ((9, 0, 4), 4, "single"),  # 8.1 locks pages; pages a block crosses only from 9.1
    ((9, 1, 0), 2, "multi"),
    ((10, 0, 13), 2, "multi"),  # Debian 13
    ((7, 2, 22), 1, "multi"),  # one vCPU: nothing to race with
    (None, 2, "single"),  # a version QEMU did not tell
])
def test_tcg_threads_by_qemu_version(monkeypatch: pytest.MonkeyPatch,
                                     version: tuple[int, int, int] | None, cpus: int,
                                     mode: str) -> None:
    monkeypatch.delenv("CERULEAN_TCG_THREADS", raising=False)
    monkeypatch.setattr(accel, "qemu_version", lambda _binary: version)
    got = tcg_threads("qemu-system-x86_64", cpus)
    assert got.mode == mode and not got.racy, got
    if mode == "single":
        assert "fixed in QEMU 9.1" in got.reason


def test_tcg_threads_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "qemu_version", lambda _binary: (7, 2, 22))
    monkeypatch.setenv("CERULEAN_TCG_THREADS", "multi")
    assert tcg_threads("q", 2) == TcgThreads("multi", "CERULEAN_TCG_THREADS=multi", (7, 2, 22),
                                             racy=True)
    monkeypatch.setattr(accel, "qemu_version", lambda _binary: (10, 0, 2))
    assert not tcg_threads("q", 2).racy
    monkeypatch.setenv("CERULEAN_TCG_THREADS", "two")
    with pytest.raises(CeruleanError, match=r"CERULEAN_TCG_THREADS is 'two'; valid values"):
        tcg_threads("q", 2)


def test_qemu_version_is_read_from_the_binary(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)'\n")
    fake.chmod(0o755)
    assert accel.qemu_version(str(fake)) == (7, 2, 22)
    assert accel.qemu_version(str(tmp_path / "missing")) is None


def test_tcg_command_line_single_threaded(tmp_path: Path) -> None:
    prof = arch.profile("amd64")
    argv = build_argv(qemu=prof.qemu, prof=prof, accel="tcg", cfg=QemuConfig(),
                      firmware_code=prof.firmware_code, vars_copy=tmp_path / "v.fd",
                      overlay=tmp_path / "o.qcow2", console=None, tcg_thread="single")
    assert option(argv, "-accel") == ["tcg,thread=single"]


# --- who failed -------------------------------------------------------------------------------

INT3 = ("[  118.2] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\r\n"
        "[  118.2] RIP: 0010:enqueue_task_fair+0x3a/0x5c0\r\n"
        "[  118.3] Kernel panic - not syncing: Fatal exception in interrupt\r\n")


def who(outcome: Outcome, console: str, **kw: object) -> checks.Blame | None:
    s = scan(console, emulated=True)
    found = evaluate(outcome, s.report, s.events, timeout_s=600, elapsed_s=10, stalls=s.stalls)
    return blame(outcome, found, s.events, stalls=s.stalls, console_lines=s.lines,
                 **kw)  # type: ignore[arg-type]


def test_a_healthy_boot_blames_no_one() -> None:
    assert who(Outcome.READY, HEALTHY, qemu_returncode=0) is None


def test_a_stray_int3_is_the_emulator_only_under_a_racy_tcg() -> None:
    racy = who(Outcome.FAILED, ok("basic.target") + INT3, qemu_returncode=-15, racy_tcg=True)
    assert racy is not None and racy.who == "emulator", racy
    assert "stale translation" in racy.why and "Oops: int3" in racy.why
    assert str(racy).startswith("The emulator failed, not the guest: ")
    # Single-threaded TCG, or a QEMU without the race: the same oops is the guest's.
    fair = who(Outcome.FAILED, ok("basic.target") + INT3, qemu_returncode=-15)
    assert fair is not None and fair.who == "guest" and "kernel oops" in fair.why, fair
    # Any other oops is the guest's even on a racy TCG, and the report says the emulator
    # may be behind it and how to tell; on a sound TCG it says nothing of the kind.
    gpf = who(Outcome.FAILED, "[ 5.0] Oops: general protection fault\r\n",
              qemu_returncode=-15, racy_tcg=True)
    assert gpf is not None and gpf.who == "guest", gpf
    assert "general protection fault" in gpf.why and "emulator may be the cause" in gpf.why
    assert "CERULEAN_TCG_THREADS=single" in gpf.why
    shell = who(Outcome.FAILED, "[ 9.0] You are in emergency mode.\r\n", qemu_returncode=-15,
                racy_tcg=True)
    assert shell is not None and "emulator" not in shell.why, shell
    sound = who(Outcome.FAILED, "[ 5.0] Oops: general protection fault\r\n",
                qemu_returncode=-15)
    assert sound is not None and "emulator" not in sound.why, sound


def test_qemu_failing_and_a_silent_console_are_the_emulator() -> None:
    died = who(Outcome.EXITED, "", qemu_returncode=1, qemu_detail="exit code 1: no firmware")
    assert died is not None and died.who == "emulator" and "no firmware" in died.why
    silent = who(Outcome.TIMEOUT, "", qemu_returncode=-15)
    assert silent is not None and silent.who == "emulator" and "firmware" in silent.why
    starved = who(Outcome.TIMEOUT, ok("basic.target") + LOCKUP + "\n", qemu_returncode=-15)
    assert starved is not None and starved.who == "emulator" and "stall" in starved.why


def test_guest_failures_are_the_guest() -> None:
    hung = who(Outcome.TIMEOUT, ok("basic.target"), qemu_returncode=-15)
    assert hung is not None and hung.who == "guest"
    rebooted = who(Outcome.EXITED, ok("basic.target"), qemu_returncode=0)
    assert rebooted is not None and rebooted.who == "guest" and "rebooted" in rebooted.why
    unverified = who(Outcome.READY, HEALTHY.replace("verity=verified", "verity="),
                     qemu_returncode=0)
    assert unverified is not None and unverified.who == "guest"
    assert "/usr verity verified" in unverified.why


# --- command line -----------------------------------------------------------------------------


def argv_for(arch_name: str, tmp_path: Path, console: Path | None,
             cfg: QemuConfig | None = None) -> list[str]:
    prof = arch.profile(arch_name)
    choice = choose_accel(arch_name)
    return build_argv(qemu=prof.qemu, prof=prof, accel=choice.accel, cfg=cfg or QemuConfig(),
                      firmware_code=prof.firmware_code, vars_copy=tmp_path / "efivars.fd",
                      overlay=tmp_path / "overlay.qcow2", console=console)


def option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_amd64_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                            no_probe: None) -> None:
    monkeypatch.setenv("CERULEAN_ACCEL", "tcg")
    argv = argv_for("amd64", tmp_path, tmp_path / "console.log")
    assert argv[0] == "qemu-system-x86_64"
    assert option(argv, "-machine") == ["q35"]
    assert option(argv, "-accel") == ["tcg,thread=multi"]
    assert option(argv, "-cpu") == ["max"]
    # One vCPU under emulation (a second one costs a host core and gains nothing).
    assert option(argv, "-m") == ["2048"] and option(argv, "-smp") == ["1"]
    assert option(argv_for("amd64", tmp_path, None, QemuConfig(cpus=3)), "-smp") == ["3"]
    drives = option(argv, "-drive")
    assert ("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
            in drives)
    assert f"if=pflash,format=raw,unit=1,file={tmp_path}/efivars.fd" in drives
    assert option(argv, "-chardev") == [f"file,id=console0,path={tmp_path}/console.log"]
    assert option(argv, "-serial") == ["chardev:console0"]
    assert "-no-reboot" in argv and "-nographic" not in argv
    assert "-nodefaults" in argv
    assert option(argv, "-netdev") == ["user,id=net0"]


def test_arm64_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                            no_probe: None) -> None:
    monkeypatch.setenv("CERULEAN_ACCEL", "tcg")
    cfg = QemuConfig(memory_mib=4096, cpus=4, ssh_port=2222, extra_args=("-s",))
    argv = argv_for("arm64", tmp_path, None, cfg)
    assert argv[0] == "qemu-system-aarch64"
    assert option(argv, "-machine")[0].split(",")[0] == "virt"
    assert option(argv, "-cpu") == ["max,pauth=off"]
    assert option(argv, "-accel") == ["tcg,thread=multi"]
    drives = option(argv, "-drive")
    assert any(d.endswith("file=/usr/share/AAVMF/AAVMF_CODE.fd") and "readonly=on" in d
               for d in drives)
    assert not any("AAVMF_VARS" in d for d in drives)  # only ever a copy
    assert option(argv, "-m") == ["4096"] and option(argv, "-smp") == ["4"]
    assert option(argv, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22"]
    assert option(argv, "-serial") == ["mon:stdio"] and "-nographic" in argv
    assert argv[-1] == "-s"


def test_kvm_command_line_uses_host_cpu(tmp_path: Path) -> None:
    prof = arch.profile("amd64")
    argv = build_argv(qemu="q", prof=prof, accel="kvm", cfg=QemuConfig(),
                      firmware_code=Path("/c"), vars_copy=Path("/v"),
                      overlay=Path("/o,1"), console=None)
    assert option(argv, "-accel") == ["kvm"] and option(argv, "-cpu") == ["host"]
    assert option(argv, "-smp") == ["2"]
    assert any(d.endswith("file=/o,,1") for d in option(argv, "-drive"))  # commas escaped


@pytest.mark.parametrize("cfg, words", [
    (QemuConfig(arch="sparc"), "Unknown architecture 'sparc': choose one of amd64, arm64."),
    (QemuConfig(memory_mib=64), "at least 256 MiB"),
    (QemuConfig(cpus=-1), "at least one CPU"),
    (QemuConfig(ssh_port=70000), "not a TCP port"),
])
def test_bad_config(cfg: QemuConfig, words: str) -> None:
    with pytest.raises(CeruleanError, match=words.replace(".", r"\.")):
        cfg.validate()


# --- disks ------------------------------------------------------------------------------------


def write_gpt(path: Path, parts: list[tuple[str, str, int, int]], *, sector: int = 512,
              size_mib: int = 4, data: dict[int, bytes] | None = None) -> None:
    """A disk with a protective MBR and a primary GPT holding *parts* (type, name, first, last)."""
    entries = bytearray(128 * 128)
    for i, (type_guid, name, first, last) in enumerate(parts):
        e = (uuid.UUID(type_guid).bytes_le + uuid.uuid4().bytes_le
             + struct.pack("<QQQ", first, last, 0) + name.encode("utf-16-le").ljust(72, b"\0"))
        entries[i * 128:(i + 1) * 128] = e
    total = size_mib * 1024 * 1024 // sector
    header = bytearray(struct.pack(
        "<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, total - 1, 34, total - 34,
        uuid.uuid4().bytes_le, 2, 128, 128, zlib.crc32(entries)))
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<BBBBBBBBII", 0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF, 1,
                               min(total - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
        f.write(mbr)
        f.seek(sector)
        f.write(header)
        f.seek(2 * sector)
        f.write(entries)
        for offset, blob in (data or {}).items():
            f.seek(offset)
            f.write(blob)


def fat_dir_entry(short_name: bytes) -> bytes:
    return short_name + b"\x20" + b"\0" * 20


def test_detect_arch_from_partition_types(tmp_path: Path) -> None:
    amd = tmp_path / "amd.raw"
    write_gpt(amd, [(ESP, "esp", 2048, 4095), (USR_X86, "usr-A", 4096, 5000),
                    (ROOT_X86, "root", 5001, 8000)])
    assert detect_arch(amd, fmt="raw") == "amd64"
    arm = tmp_path / "arm.raw"
    write_gpt(arm, [(ROOT_ARM, "root", 2048, 4095), (USR_ARM_VERITY, "v", 4096, 5000)],
              sector=4096, size_mib=32)
    assert detect_arch(arm, fmt="raw") == "arm64"
    parts = disk.read_gpt(disk.DiskReader(arm, "raw"))
    assert [(p.name, p.offset) for p in parts] == [("root", 2048 * 4096), ("v", 4096 * 4096)]


def test_detect_arch_from_the_esp_loader(tmp_path: Path) -> None:
    img = tmp_path / "generic.raw"
    esp_at = 2048 * 512
    write_gpt(img, [(ESP, "esp", 2048, 6143), (LINUX_DATA, "root", 6144, 8000)],
              data={esp_at + 300_000: fat_dir_entry(b"BOOT       ")
                    + fat_dir_entry(b"BOOTAA64EFI")})
    assert detect_arch(img, fmt="raw") == "arm64"


def test_detect_arch_fails_clearly(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.raw"
    write_gpt(unknown, [(LINUX_DATA, "data", 2048, 4095)])
    with pytest.raises(CeruleanError, match="pass --arch amd64 or --arch arm64"):
        detect_arch(unknown, fmt="raw")
    both = tmp_path / "both.raw"
    write_gpt(both, [(ROOT_X86, "a", 2048, 4095), (ROOT_ARM, "b", 4096, 6000)])
    with pytest.raises(CeruleanError, match="Cannot tell the architecture"):
        detect_arch(both, fmt="raw")
    text = tmp_path / "notes.txt"
    text.write_text("not a disk\n" * 200)
    with pytest.raises(CeruleanError, match="not a bootable disk image: it has no GPT"):
        detect_arch(text, fmt="raw")
    with pytest.raises(CeruleanError, match="does not exist"):
        detect_arch(tmp_path / "missing.raw", fmt="raw")


@needs_qemu_img
def test_detect_arch_of_a_qcow2(tmp_path: Path) -> None:
    import subprocess

    raw = tmp_path / "a.raw"
    write_gpt(raw, [(ESP, "esp", 2048, 6143), (LINUX_DATA, "root", 6144, 8000)],
              data={2048 * 512 + 4096 + 7: fat_dir_entry(b"BOOTX64 EFI")})
    q = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q], check=True)
    assert disk.disk_info(q).format == "qcow2"
    assert detect_arch(q) == "amd64"
    reader = disk.DiskReader(q, "qcow2", raw.stat().st_size)
    assert reader.read(1000, 3000) == raw.read_bytes()[1000:4000]  # unaligned ranges too


# --- preparing a VM: the disk is never written ------------------------------------------------


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_probe: None
              ) -> list[list[str]]:
    """Firmware in tmp_path, a forced TCG, raw disks without qemu-img; records qemu-img calls."""
    fw = tmp_path / "fw"
    fw.mkdir()
    for name in ("code.fd", "vars.fd"):
        (fw / name).write_bytes(name.encode())
    for name, prof in list(arch.PROFILES.items()):
        monkeypatch.setitem(arch.PROFILES, name, dataclasses.replace(
            prof, firmware_code=fw / "code.fd", firmware_vars=fw / "vars.fd"))
    monkeypatch.setenv("CERULEAN_ACCEL", "tcg")
    monkeypatch.setattr(qemu, "qemu_binary", lambda prof: f"/usr/bin/{prof.qemu}")
    monkeypatch.setattr(qemu, "require_tool", lambda name, package=None: f"/usr/bin/{name}")
    monkeypatch.setattr(qemu, "inspect_disk", lambda d: disk.inspect_disk(d, fmt="raw"))
    calls: list[list[str]] = []

    def run(argv: list[str]) -> None:
        calls.append([str(a) for a in argv])
        Path(argv[-1]).write_bytes(b"QFI\xfb")

    monkeypatch.setattr(qemu, "run", run)
    return calls


def test_overlay_is_the_only_writable_disk(fake_host: list[list[str]], tmp_path: Path) -> None:
    original = tmp_path / "images" / "vm.raw"
    original.parent.mkdir()
    write_gpt(original, [(ESP, "esp", 2048, 4095), (ROOT_X86, "root", 4096, 8000)])
    before = original.read_bytes()
    work = tmp_path / "work"
    work.mkdir()
    launch = qemu.prepare(original, QemuConfig(), work, console=tmp_path / "c.log")
    assert launch.arch == "amd64" and launch.accel.accel == "tcg"
    # qemu-img makes a qcow2 overlay in the work directory backed by the original...
    assert fake_host == [["/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", "-b",
                          str(original.resolve()), "-F", "raw", str(work / "overlay.qcow2")]]
    # ...and QEMU only ever sees the overlay and a copy of the variable store.
    assert not any(str(original) in a or "images" in a for a in launch.argv)
    disks = [d for d in option(launch.argv, "-drive") if "if=pflash" not in d]
    assert disks == [f"if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap,"
                     f"file={work}/overlay.qcow2"]
    pflash = option(launch.argv, "-drive")[:2]
    assert "readonly=on" in pflash[0] and pflash[0].endswith(f"file={tmp_path}/fw/code.fd")
    assert pflash[1].endswith(f"file={work}/efivars.fd")
    assert (work / "efivars.fd").read_bytes() == b"vars.fd"
    assert "snapshot" not in " ".join(launch.argv)
    assert original.read_bytes() == before


def test_given_arch_wins_and_missing_firmware_names_the_package(
        fake_host: list[list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "vm.raw"
    write_gpt(img, [(LINUX_DATA, "root", 2048, 4095)])
    launch = qemu.prepare(img, QemuConfig(arch="arm64"), tmp_path, console=None)
    assert launch.argv[0] == "/usr/bin/qemu-system-aarch64"
    monkeypatch.setitem(arch.PROFILES, "arm64", dataclasses.replace(
        arch.PROFILES["arm64"], firmware_code=tmp_path / "nope.fd"))
    with pytest.raises(CeruleanError, match="install the Debian package 'qemu-efi-aarch64'"):
        qemu.prepare(img, QemuConfig(arch="arm64"), tmp_path, console=None)


# --- test boots against a stand-in for QEMU ---------------------------------------------------


FAKE_QEMU = textwrap.dedent("""\
    import signal, sys, time
    log, script = sys.argv[1], sys.argv[2:]
    if "--ignore-term" in script:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(log, "ab", buffering=0) as f:
        for chunk in script:
            if chunk == "--ignore-term":
                continue
            if chunk.startswith("sleep:"):
                time.sleep(float(chunk[6:]))
            elif chunk.startswith("exit:"):
                print("qemu-system-x86_64: error: " + chunk[5:], file=sys.stderr)
                sys.exit(1)
            else:
                f.write(chunk.encode())
    time.sleep(3600)
""")


@pytest.fixture
def fake_boot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
              ) -> Callable[..., qemu.TestResult]:
    """run_test with QEMU replaced by a program that writes the given console chunks."""
    program = tmp_path / "fake_qemu.py"
    program.write_text(FAKE_QEMU)
    img = tmp_path / "vm.raw"
    img.write_bytes(b"")
    monkeypatch.setattr(qemu.process, "STOP_GRACE_S", 0.5)
    monkeypatch.setattr(qemu, "FAILURE_GRACE_S", 0.5)
    run_test = qemu.run_test  # the real one, even if a test replaces it later

    def boot(*chunks: str, timeout_s: float = 10, **kw: Any) -> qemu.TestResult:
        def prepare(disk_path: Path, cfg: QemuConfig, work: Path, console: Path | None
                    ) -> Launch:
            assert console is not None
            info = disk.DiskInfo(disk_path, "raw", 0)
            argv = [sys.executable, str(program), str(console), *chunks]
            return Launch(info, "amd64", AccelChoice("tcg", "test"), work / "o.qcow2",
                          work / "v.fd", [], argv)

        monkeypatch.setattr(qemu, "prepare", prepare)
        return run_test(img, timeout_s=timeout_s, log_dir=tmp_path / "logs", **kw)

    return boot


def process_gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_run_test_passes_on_a_healthy_console(fake_boot: Callable[..., qemu.TestResult],
                                              tmp_path: Path) -> None:
    half = len(HEALTHY) // 2
    res = fake_boot(HEALTHY[:half], "sleep:0.3", HEALTHY[half:])
    assert res.passed, res.checks
    assert res.outcome is Outcome.READY
    assert res.time_to_ready_s is not None and 0.3 <= res.time_to_ready_s < 5
    assert res.guest_uptime_s == 30.2
    assert res.console_log == tmp_path / "logs" / "vm.console.log"
    assert "CERULEAN-READY-END" in res.console_log.read_text()
    assert res.qemu_returncode is not None and process_gone(res.qemu_pid)
    data = res.to_json()
    assert data["passed"] is True and data["report"]["slot"] == "A"


def test_run_test_tells_its_progress(fake_boot: Callable[..., qemu.TestResult],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[float, str]] = []
    monkeypatch.setattr(qemu, "PROGRESS_S", 0.2)
    res = fake_boot(ok("basic.target"), "sleep:1", HEALTHY,
                    on_progress=lambda t, line: seen.append((t, line)))
    assert res.passed and len(seen) >= 3, seen
    assert [t for t, _ in seen] == sorted(t for t, _ in seen)
    assert any("basic.target" in line for _, line in seen), seen


def test_run_test_stops_at_a_panic(fake_boot: Callable[..., qemu.TestResult]) -> None:
    res = fake_boot(ok("basic.target"), "[ 4.0] Kernel panic - not syncing: oh no\r\n",
                    "[ 4.1] CPU: 0 PID: 1 Comm: init\r\n")
    assert res.outcome is Outcome.FAILED and not res.passed
    assert res.blame is not None and res.blame.who == "guest"
    assert res.to_json()["failed_by"] == "guest"
    assert not res.check(checks.CLEAN_CONSOLE).passed
    assert res.check(checks.NO_TIMEOUT).passed
    assert res.elapsed_s < 3
    assert "Comm: init" in res.console_log.read_text()  # the trace after the panic is kept
    assert process_gone(res.qemu_pid)


def test_run_test_passes_through_a_stall_of_an_emulated_guest(
        fake_boot: Callable[..., qemu.TestResult]) -> None:
    res = fake_boot(ok("basic.target"), LOCKUP + "\r\n", "sleep:0.8", HEALTHY)
    assert res.passed, res.checks
    assert "1 emulation stall(s)" in res.check(checks.CLEAN_CONSOLE).detail
    assert res.to_json()["stalls"] == [{"line": 2, "text": LOCKUP}]


def test_run_test_times_out_and_kills_qemu(fake_boot: Callable[..., qemu.TestResult]) -> None:
    res = fake_boot("--ignore-term", ok("basic.target"), timeout_s=0.5)
    assert res.outcome is Outcome.TIMEOUT and not res.passed
    assert "timed out" in res.check(checks.NO_TIMEOUT).detail
    assert res.qemu_returncode == -9  # SIGTERM was ignored, so SIGKILL it was
    assert process_gone(res.qemu_pid)


def test_run_test_reports_qemu_exiting(fake_boot: Callable[..., qemu.TestResult]) -> None:
    res = fake_boot("exit:could not open the disk")
    assert res.outcome is Outcome.EXITED
    assert res.qemu_returncode == 1
    assert "could not open the disk" in res.check(checks.MULTI_USER).detail


# --- CLI --------------------------------------------------------------------------------------


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd, words in (("test", ["CERULEAN-READY", "/usr verity verified", "--log-dir",
                                 "Examples:"]),
                       ("boot", ["Ctrl-A X", "--ssh-port", "never changed"])):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert all(w in out for w in words), out


@pytest.mark.parametrize("argv, words", [
    (["test", "{tmp}/missing.raw"], "The disk image {tmp}/missing.raw does not exist."),
    (["boot", "{tmp}"], "{tmp} is not a disk image file."),
    (["test", "{tmp}/vm.raw", "--arch", "sparc"],
     "Unknown architecture 'sparc': choose one of amd64, arm64."),
    (["boot", "{tmp}/vm.raw", "--memory", "16"], "at least 256 MiB"),
    (["test", "{tmp}/vm.raw", "--timeout", "0"], "more than 0 seconds"),
])
def test_cli_bad_input_is_one_sentence(argv: list[str], words: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "vm.raw").write_bytes(b"\0" * 4096)
    rc = main([a.format(tmp=tmp_path) for a in argv])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 1
    assert words.format(tmp=tmp_path) in err
    assert "Traceback" not in err


def test_cli_missing_firmware(fake_host: list[list[str]], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "vm.raw"
    write_gpt(img, [(ROOT_X86, "root", 2048, 4095)])
    monkeypatch.setitem(arch.PROFILES, "amd64", dataclasses.replace(
        arch.PROFILES["amd64"], firmware_vars=tmp_path / "OVMF_VARS_4M.fd"))
    assert main(["test", str(img)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "OVMF_VARS_4M.fd is missing (install the Debian package 'ovmf')." in err


@needs_qemu_img
def test_cli_not_a_disk_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    assert main(["boot", str(notes)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{notes} is not a bootable disk image: it has no GPT partition table." in err


def test_cli_test_prints_checks(fake_boot: Callable[..., qemu.TestResult],
                                monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    def run_test(disk_path: Path, cfg: QemuConfig, **kw: object) -> qemu.TestResult:
        return fake_boot(HEALTHY.replace("verity=verified", "verity="))

    monkeypatch.setattr(qemu, "run_test", run_test)
    assert main(["test", "vm.raw"]) == 1
    err = capsys.readouterr().err
    assert "✓ no timeout" in err and "✗ /usr verity verified" in err
    assert "Time to ready:" in err and "FAILED: 1 of 8 checks" in err


def test_qemu_dies_with_cerulean(tmp_path: Path) -> None:
    """Even a SIGKILLed Cerulean leaves no VM behind: the kernel kills its QEMU too."""
    import os
    import signal
    import subprocess
    import time

    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""\
            import sys, time
            from cerulean.testbed import process
            child = process.start([sys.executable, "-c", "import time; time.sleep(60)"])
            print(child.pid, flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):  # dead; only waiting for whoever adopted it to reap it
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its parent")
