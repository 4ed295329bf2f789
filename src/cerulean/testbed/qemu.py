"""Running a disk image in QEMU: the command line, interactive boots and test boots.

Every boot runs on a throwaway qcow2 overlay whose backing file is the disk
(QEMU opens backing files read-only) and on a copy of the firmware's variable
store, both in a temporary directory, so the disk and the system firmware
files are never written.

:func:`run_test` boots headless with the serial console written to a log file,
watches that file until the guest's READY report, a failure on the console or
the timeout, then always stops QEMU, and turns what it saw into named checks.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cerulean.errors import CeruleanError
from cerulean.run import require_tool, run
from cerulean.testbed import process
from cerulean.testbed.accel import (
    AccelChoice,
    TcgThreads,
    choose_accel,
    qemu_complaint,
    tcg_threads,
)
from cerulean.testbed.arch import (
    ArchProfile,
    firmware,
    machine_args,
    profile,
    qemu_binary,
    qemu_opt,
)
from cerulean.testbed.checks import Blame, Check, Outcome, blame, evaluate
from cerulean.testbed.console import ConsoleEvent, ConsoleScanner, ReadyReport
from cerulean.testbed.disk import DiskInfo, detect_arch, inspect_disk

__all__ = [
    "Launch",
    "QemuConfig",
    "TestResult",
    "boot_interactive",
    "build_argv",
    "detect_arch",
    "prepare",
    "run_test",
]

log = logging.getLogger("cerulean.testbed")

DEFAULT_TIMEOUT_S = 600.0
POLL_S = 0.25
PROGRESS_S = 1.0
# After a panic or oops, let the trace reach the log before QEMU is stopped.
FAILURE_GRACE_S = 2.0
MIN_MEMORY_MIB = 256


@dataclass(frozen=True)
class QemuConfig:
    """How to run the VM. arch None means: detect it from the disk."""

    arch: str | None = None
    memory_mib: int = 2048
    cpus: int = 0  # 0: one vCPU under TCG, two under KVM (see vcpus)
    accel: str = "auto"  # auto (probe KVM, else TCG), kvm or tcg
    extra_args: tuple[str, ...] = ()
    network: bool = True  # user-mode networking (NAT, no root needed)
    ssh_port: int | None = None  # host port forwarded to the guest's port 22
    disk_size_mib: int | None = None  # a larger virtual disk, as a cloud would give (overlay)

    def validate(self) -> None:
        if self.arch is not None:
            profile(self.arch)
        if self.memory_mib < MIN_MEMORY_MIB:
            raise CeruleanError(f"The VM needs at least {MIN_MEMORY_MIB} MiB of memory, "
                                f"not {self.memory_mib}.")
        if self.cpus < 0:
            raise CeruleanError(f"The VM needs at least one CPU, not {self.cpus}.")
        if self.ssh_port is not None:
            if not 1 <= self.ssh_port <= 65535:
                raise CeruleanError(f"The SSH port {self.ssh_port} is not a TCP port (1-65535).")
            if not self.network:
                raise CeruleanError("An SSH port forward needs the VM's network.")


@dataclass(frozen=True)
class Launch:
    """A prepared VM: everything decided, the overlay and variable store created."""

    disk: DiskInfo
    arch: str
    accel: AccelChoice
    overlay: Path
    vars_copy: Path
    overlay_argv: list[str]
    argv: list[str]
    threads: TcgThreads | None = None  # under TCG: one host thread per vCPU, or one for all

    @property
    def racy_tcg(self) -> bool:
        return self.accel.accel == "tcg" and self.threads is not None and self.threads.racy


@dataclass
class TestResult:
    """What a test boot showed; passed only if every check passed."""

    __test__ = False  # a result, not a pytest test class

    disk: Path
    arch: str
    accel: AccelChoice
    outcome: Outcome
    checks: list[Check]
    console_log: Path
    timeout_s: float
    elapsed_s: float
    time_to_ready_s: float | None
    report: ReadyReport | None
    events: list[ConsoleEvent]
    qemu_pid: int
    qemu_returncode: int | None
    qemu_stderr: str = ""
    argv: list[str] = field(default_factory=list)
    stalls: list[ConsoleEvent] = field(default_factory=list)  # soft lockups under TCG
    threads: TcgThreads | None = None
    blame: Blame | None = None  # who failed the boot (None: it passed)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def guest_uptime_s(self) -> float | None:
        return self.report.uptime if self.report else None

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "disk": str(self.disk),
            "arch": self.arch,
            "accel": self.accel.accel,
            "accel_reason": self.accel.reason,
            "tcg_threads": self.threads.mode if self.threads else None,
            "tcg_threads_reason": self.threads.reason if self.threads else None,
            "passed": self.passed,
            "outcome": self.outcome.value,
            "time_to_ready_s": _round(self.time_to_ready_s),
            "guest_uptime_s": self.guest_uptime_s,
            "elapsed_s": _round(self.elapsed_s),
            "timeout_s": self.timeout_s,
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail}
                       for c in self.checks],
            "report": self.report.values if self.report else None,
            "events": [{"kind": e.kind, "line": e.line, "text": e.text} for e in self.events],
            "stalls": [{"line": e.line, "text": e.text} for e in self.stalls],
            "console_log": str(self.console_log),
            "qemu_returncode": self.qemu_returncode,
            "failed_by": self.blame.who if self.blame else None,
            "failure": self.blame.why if self.blame else None,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def vcpus(cfg: QemuConfig, accel: str) -> int:
    """The guest's vCPUs: as configured, else one under TCG and two under KVM.

    Under emulation every vCPU costs a host core, and a second one made boots no faster
    on a 2-core host (measured in docs/benchmarks.md), while the suite runs two guests at
    once; under KVM a second vCPU is nearly free.
    """
    if cfg.cpus:
        return cfg.cpus
    return 1 if accel == "tcg" else 2


def build_argv(*, qemu: str, prof: ArchProfile, accel: str, cfg: QemuConfig,
               firmware_code: Path, vars_copy: Path, overlay: Path,
               console: Path | None, disk_format: str = "qcow2", cache: str = "unsafe",
               reboot: bool = False, tcg_thread: str = "multi") -> list[str]:
    """The QEMU command line; *console* None means the serial console on stdio.

    The disk is a throwaway *overlay* unless a caller boots a disk it owns
    (*disk_format*, *cache* writeback); *reboot* lets the guest reboot in place
    instead of ending QEMU.
    """
    argv = [
        qemu, "-name", "cerulean-testbed",
        *machine_args(prof, accel, tcg_thread),
        "-smp", str(vcpus(cfg, accel)), "-m", str(cfg.memory_mib),
        # Only the devices listed here: no default VGA, CD-ROM or NIC.
        "-nodefaults", "-no-user-config",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu_opt(firmware_code)}",
        "-drive", f"if=pflash,format=raw,unit=1,file={qemu_opt(vars_copy)}",
        # cache=unsafe: the overlay is thrown away, so flushes buy nothing.
        "-drive", f"if=none,id=disk0,format={disk_format},cache={cache},discard=unmap,"
                  f"file={qemu_opt(overlay)}",
        "-device", "virtio-blk-pci,drive=disk0,bootindex=0",
        # Early boot (random seeds, sshd keys) must not wait for entropy.
        "-device", "virtio-rng-pci",
    ]
    if cfg.network:
        netdev = "user,id=net0"
        if cfg.ssh_port is not None:
            netdev += f",hostfwd=tcp:127.0.0.1:{cfg.ssh_port}-:22"
        # romfile= drops iPXE, so the firmware never tries a network boot.
        argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,romfile="]
    if console is None:
        # Serial console and QEMU monitor multiplexed on the terminal (Ctrl-A C, Ctrl-A X).
        argv += ["-nographic", "-serial", "mon:stdio"]
    else:
        # A panic that reboots ends QEMU instead of booting again.
        argv += ["-display", "none", *([] if reboot else ["-no-reboot"]),
                 # A machine that is powered on again keeps its earlier console text.
                 "-chardev", f"file,id=console0,path={qemu_opt(console)}"
                             + (",append=on" if reboot else ""),
                 "-serial", "chardev:console0"]
    return argv + list(cfg.extra_args)


def create_overlay(disk: DiskInfo, overlay: Path, size_mib: int | None = None) -> list[str]:
    """A qcow2 *overlay* backed by *disk*; returns the qemu-img command it ran."""
    qemu_img = require_tool("qemu-img", "qemu-utils")
    argv = [qemu_img, "create", "-q", "-f", "qcow2", "-b", str(disk.path), "-F", disk.format,
            str(overlay)]
    if size_mib is not None:
        argv.append(f"{size_mib}M")
    run(argv)
    return argv


def prepare(disk: Path, cfg: QemuConfig, workdir: Path, console: Path | None) -> Launch:
    """Check everything, choose the accelerator and create the overlay in *workdir*."""
    cfg.validate()
    info, _, detected = inspect_disk(disk)
    arch = cfg.arch or detected
    if arch is None:
        raise CeruleanError(
            f"Cannot tell the architecture of {disk} from its partition types or its ESP's "
            "EFI/BOOT/BOOT*.EFI loader; pass --arch amd64 or --arch arm64."
        )
    if detected and detected != arch:
        log.warning("%s looks like an %s disk but is booted as %s", disk, detected, arch)
    prof = profile(arch)
    qemu = qemu_binary(prof)
    code, vars_template = firmware(prof)
    accel = choose_accel(arch, cfg.accel)
    threads = tcg_threads(qemu, vcpus(cfg, accel.accel)) if accel.accel == "tcg" else None
    overlay, vars_copy = workdir / "overlay.qcow2", workdir / "efivars.fd"
    if cfg.disk_size_mib is not None and cfg.disk_size_mib * 1024 * 1024 < info.virtual_size:
        raise CeruleanError(
            f"--disk-size {cfg.disk_size_mib} MiB is smaller than the image "
            f"({info.virtual_size // 1048576} MiB)."
        )
    overlay_argv = create_overlay(info, overlay, cfg.disk_size_mib)
    shutil.copyfile(vars_template, vars_copy)
    argv = build_argv(qemu=qemu, prof=prof, accel=accel.accel, cfg=cfg, firmware_code=code,
                      vars_copy=vars_copy, overlay=overlay, console=console,
                      tcg_thread=threads.mode if threads else "multi")
    return Launch(info, arch, accel, overlay, vars_copy, overlay_argv, argv, threads)


def boot_interactive(disk: Path, cfg: QemuConfig | None = None) -> int:
    """Boot *disk* with its serial console on this terminal; return QEMU's exit code."""
    cfg = cfg or QemuConfig()
    with tempfile.TemporaryDirectory(prefix="cerulean-boot-") as tmp:
        launch = prepare(disk, cfg, Path(tmp), console=None)
        say = sys.stderr
        print(f"Booting {disk} ({launch.arch}, {launch.accel.accel.upper()}: "
              f"{launch.accel.reason}) on a throwaway overlay; the disk is not changed.", file=say)
        if cfg.ssh_port is not None:
            print(f"SSH: ssh -p {cfg.ssh_port} USER@127.0.0.1 reaches the guest's port 22.",
                  file=say)
        print("Quit with Ctrl-A X; Ctrl-A C switches to the QEMU monitor, Ctrl-A H lists "
              "the other keys.", file=say, flush=True)
        proc = process.start(launch.argv, background=False)
        try:
            return proc.wait()
        finally:
            process.stop(proc)


def run_test(disk: Path, cfg: QemuConfig | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
             log_dir: Path | None = None, *,
             on_start: Callable[[Launch, Path], None] | None = None,
             on_progress: Callable[[float, str], None] | None = None) -> TestResult:
    """Boot *disk* headless, watch its console and check it came up healthy.

    The console log is kept in *log_dir* (default: next to the disk) as
    ``<disk stem>.console.log``; *on_start* is told the launch and that path
    once QEMU is about to start; *on_progress* is told, about once a second, the
    seconds since then and the console's latest line.
    """
    cfg = cfg or QemuConfig()
    if timeout_s <= 0:
        raise CeruleanError(f"The timeout must be more than 0 seconds, not {timeout_s:g}.")
    with tempfile.TemporaryDirectory(prefix="cerulean-test-") as tmp:
        work = Path(tmp)
        launch_dir = log_dir if log_dir is not None else Path(disk).parent
        console_log = launch_dir / f"{Path(disk).stem}.console.log"
        launch = prepare(disk, cfg, work, console=console_log)
        _start_log(console_log)
        if on_start:
            on_start(launch, console_log)
        stderr = work / "qemu.stderr"
        started = time.monotonic()
        proc = process.start(launch.argv, stderr=stderr)
        try:
            outcome, scanner, ready_at = _watch(proc, console_log, started, timeout_s,
                                                emulated=launch.accel.accel == "tcg",
                                                on_progress=on_progress)
        finally:
            returncode = process.stop(proc)
        elapsed = time.monotonic() - started
        qemu_stderr = process.tail(stderr)
    time_to_ready = ready_at - started if ready_at is not None else None
    qemu_detail = (f"exit code {returncode}: {qemu_complaint(qemu_stderr)}"
                   if outcome is Outcome.EXITED else "")
    checks = evaluate(outcome, scanner.report, scanner.events, timeout_s=timeout_s,
                      elapsed_s=elapsed, time_to_ready_s=time_to_ready, qemu_detail=qemu_detail,
                      stalls=scanner.stalls)
    fault = blame(outcome, checks, scanner.events, qemu_returncode=returncode,
                  qemu_detail=qemu_detail, stalls=scanner.stalls, racy_tcg=launch.racy_tcg,
                  console_lines=scanner.lines)
    return TestResult(
        disk=Path(disk), arch=launch.arch, accel=launch.accel, outcome=outcome, checks=checks,
        console_log=console_log, timeout_s=timeout_s, elapsed_s=elapsed,
        time_to_ready_s=time_to_ready, report=scanner.report, events=scanner.events,
        stalls=scanner.stalls,
        qemu_pid=proc.pid, qemu_returncode=returncode, qemu_stderr=qemu_stderr,
        argv=launch.argv, threads=launch.threads, blame=fault,
    )


def _start_log(console_log: Path) -> None:
    try:
        console_log.parent.mkdir(parents=True, exist_ok=True)
        console_log.write_bytes(b"")
    except OSError as e:
        raise CeruleanError(f"Cannot write the console log {console_log} "
                            f"({e.strerror or e}); choose another log directory.") from None


def _watch(proc: subprocess.Popen[bytes], console_log: Path, started: float,
           timeout_s: float, emulated: bool = False,
           on_progress: Callable[[float, str], None] | None = None,
           ) -> tuple[Outcome, ConsoleScanner, float | None]:
    """Read the console as it grows until READY, a failure, QEMU's exit or the timeout."""
    scanner = ConsoleScanner(emulated)
    deadline = started + timeout_s
    failure_deadline: float | None = None
    told = 0.0
    with open(console_log, "rb") as log_file:
        while True:
            scanner.feed(log_file.read())
            now = time.monotonic()
            if on_progress is not None and now - told >= PROGRESS_S:
                on_progress(now - started, scanner.last_line)
                told = now
            if scanner.report is not None:
                return Outcome.READY, scanner, now
            if scanner.events and failure_deadline is None:
                failure_deadline = min(deadline, now + FAILURE_GRACE_S)
            if proc.poll() is not None:
                scanner.feed(log_file.read())
                scanner.finish()
                if scanner.report is not None:
                    return Outcome.READY, scanner, time.monotonic()
                return (Outcome.FAILED if scanner.events else Outcome.EXITED), scanner, None
            if failure_deadline is not None and now >= failure_deadline:
                scanner.finish()
                return Outcome.FAILED, scanner, None
            if now >= deadline:
                scanner.finish()
                return Outcome.TIMEOUT, scanner, None
            process.pause(proc, POLL_S)
