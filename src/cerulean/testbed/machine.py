"""A test machine that keeps its disk: boots, reboots in place, and can lose power.

:func:`cerulean.testbed.qemu.run_test` boots a throwaway overlay once; update
tests need the opposite: one disk that lives through many boots (an update
writes the other slot, reboots, falls back...), a guest that reboots itself
without ending QEMU, a console to wait on, and a way to cut the power
(SIGKILL to QEMU: what the guest had not flushed is lost, as on real
hardware). The EFI variable store is kept next to the disk, like a real
machine's NVRAM.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cerulean.errors import CeruleanError
from cerulean.testbed import process
from cerulean.testbed.accel import choose_accel, tcg_threads
from cerulean.testbed.arch import firmware, profile, qemu_binary
from cerulean.testbed.console import ConsoleScanner, ReadyReport, strip_ansi
from cerulean.testbed.disk import inspect_disk
from cerulean.testbed.guest import credential_args
from cerulean.testbed.monitor import ask, fits, monitor_args, where
from cerulean.testbed.qemu import QemuConfig, build_argv, vcpus


@dataclass
class Machine:
    """*disk* (raw or qcow2) is booted read-write; *credentials* go in over SMBIOS."""

    disk: Path
    workdir: Path
    cfg: QemuConfig = field(default_factory=QemuConfig)
    credentials: dict[str, str] = field(default_factory=dict)
    console_log: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _pos: int = field(init=False, default=0)
    boots: int = field(init=False, default=0)
    restart_pos: int = field(init=False, default=0)  # where the last power-on began
    monitor: Path = field(init=False)  # QEMU's monitor socket, asked when a wait times out
    arch: str = field(init=False, default="")  # the guest's, once started

    # How many console lines a timeout's message quotes.
    TAIL_LINES = 12

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.workdir / "console.log"
        self.monitor = self.workdir / "monitor.sock"
        self._monitor_dir: Path | None = None  # a short directory of our own, when needed
        if not fits(self.monitor):
            self._monitor_dir = Path(tempfile.mkdtemp(prefix="cerulean-mon-"))
            self.monitor = self._monitor_dir / "monitor.sock"

    def start(self) -> None:
        """Power on (a new console log section starts; earlier text stays in the file)."""
        if self.proc is not None and self.proc.poll() is None:
            raise CeruleanError("The machine is already running.")
        info, _, detected = inspect_disk(self.disk)
        arch = self.cfg.arch or detected
        if arch is None:
            raise CeruleanError(f"Cannot tell the architecture of {self.disk}.")
        self.arch = arch
        prof = profile(arch)
        code, vars_template = firmware(prof)
        nvram = self.workdir / "efivars.fd"
        if not nvram.exists():
            shutil.copyfile(vars_template, nvram)
        extra: list[str] = []
        for name, value in sorted(self.credentials.items()):
            extra += credential_args(name, value)
        cfg = QemuConfig(**{**self.cfg.__dict__, "extra_args": (*self.cfg.extra_args, *extra)})
        qemu = qemu_binary(prof)
        accel = choose_accel(arch, cfg.accel).accel
        threads = tcg_threads(qemu, vcpus(cfg, accel)).mode if accel == "tcg" else "multi"
        argv = build_argv(qemu=qemu, prof=prof, accel=accel, cfg=cfg,
                          firmware_code=code, vars_copy=nvram, overlay=self.disk,
                          console=self.console_log, disk_format=info.format,
                          cache="writeback", reboot=True, tcg_thread=threads)
        argv += monitor_args(self.monitor)
        with self.console_log.open("ab") as f:
            f.write(f"\n===== power on {time.strftime('%H:%M:%S')} =====\n".encode())
        self._pos = self.restart_pos = self.console_log.stat().st_size
        self.proc = process.start(argv, stderr=self.workdir / "qemu.stderr")
        self.boots += 1

    def text(self, since: int = 0) -> str:
        return strip_ansi(self.console_log.read_bytes()[since:].decode("utf-8", "replace"))

    def mark(self, at: int | None = None) -> int:
        """A position in the console log (its end, or *at*); later waits look only after
        it."""
        self._pos = self.console_log.stat().st_size if at is None else at
        return self._pos

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until *pattern* (a regex) shows on the console after the last mark."""
        m = self.wait_for(pattern, timeout)
        if m is None:
            raise self._stuck(f"{pattern!r} did not show on the console within {timeout:.0f} s")
        return m

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """Like :meth:`expect`, but None if *pattern* has not shown within *timeout*."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text(self._pos)
            m = rx.search(text)
            if m:
                self._advance_past(m.group(0))  # the next wait starts after it
                return m
            if self.proc is None or self.proc.poll() is not None:
                raise CeruleanError(f"QEMU stopped before {pattern!r} showed on the console.")
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def _advance_past(self, matched: str) -> None:
        raw = self.console_log.read_bytes()
        key = matched.encode()
        i = raw.find(key, self._pos)
        self._pos = i + len(key) if i >= 0 else len(raw)

    def ready(self, timeout: float) -> ReadyReport:
        """The next READY report on the console (one per boot)."""
        deadline = time.monotonic() + timeout
        while True:
            raw = self.console_log.read_bytes()
            scanner = ConsoleScanner()
            scanner.feed(raw[self._pos:])
            if scanner.report is not None:
                end = raw.find(b"CERULEAN-READY-END", self._pos)
                self._pos = end + len(b"CERULEAN-READY-END") if end >= 0 else len(raw)
                return scanner.report
            if self.proc is None or self.proc.poll() is not None:
                raise CeruleanError("QEMU stopped before the next READY report.")
            if time.monotonic() > deadline:
                raise self._stuck(f"No READY report within {timeout:.0f} s")
            time.sleep(0.25)

    def _stuck(self, what: str) -> CeruleanError:
        """The error for a wait that timed out: what the console showed last, and where
        the vCPU is (its registers are kept beside the console log)."""
        lines = [ln for ln in self.text(self._pos).splitlines() if ln.strip()]
        shown = "\n".join(f"  | {ln[:200]}" for ln in lines[-self.TAIL_LINES:])
        last = (f"the console's last lines since then:\n{shown}" if lines
                else "the console showed nothing since then")
        registers = ask(self.monitor, "info registers")
        if registers:
            (self.workdir / "registers.txt").write_text(registers + "\n")
            vcpu = (f"{where(registers, self.arch)} "
                    f"(registers: {self.workdir / 'registers.txt'})")
        else:
            vcpu = "QEMU's monitor did not answer"
        return CeruleanError(f"{what} (log: {self.console_log}); {vcpu}; {last}")

    def kill(self) -> None:
        """Cut the power: SIGKILL, no shutdown, no flush inside the guest."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            process.stop(self.proc)
            self.proc = None

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._monitor_dir is not None:
            shutil.rmtree(self._monitor_dir, ignore_errors=True)
