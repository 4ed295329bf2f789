"""KVM or TCG: which accelerator QEMU uses, decided once per process.

``/dev/kvm`` existing is not enough: on some hosts (nested or sandboxed
virtualisation) a KVM guest starts but then hangs with its vCPU stuck in the
host kernel, or QEMU stops with "KVM internal error". So the probe boots the
real UEFI firmware under KVM, with no disk, and KVM counts as working only if
the firmware reaches its boot manager (it clears the serial console, which
happens after CPU, memory, interrupt and timer set-up) within a few seconds.
Otherwise the testbed falls back to TCG, which is slower but always works.

``CERULEAN_ACCEL=kvm|tcg`` skips the probe and forces a choice.

Under TCG with more than one vCPU, QEMU normally runs one host thread per vCPU
(multi-threaded TCG). Before QEMU 9.1 that mode has a race: a vCPU can translate
guest code while another vCPU rewrites it, and keep running the old translation
afterwards (fixed by "accel/tcg: Always lock pages before translation" in 8.1 and
a follow-up for code that crosses a page in 9.1). A Linux guest rewrites its own
code while it boots (static keys, alternatives): it plants an INT3, patches, and
removes the INT3; a stale translation still holding the INT3 then ends in
``Oops: int3`` and a panic, more often the busier the host. So :func:`tcg_threads`
runs such guests single-threaded on an older QEMU.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cerulean.arch import host_arch
from cerulean.errors import CeruleanError
from cerulean.testbed import process
from cerulean.testbed.arch import firmware, machine_args, profile, qemu_binary, qemu_opt

log = logging.getLogger("cerulean.testbed")

ACCEL_ENV = "CERULEAN_ACCEL"
TCG_THREADS_ENV = "CERULEAN_TCG_THREADS"
ACCELS = ("auto", "kvm", "tcg")
KVM_DEVICE = Path("/dev/kvm")
PROBE_TIMEOUT_S = 10.0
_PROBE_POLL_S = 0.1
# Boot-manager output: OVMF and AAVMF clear the console when BDS starts, and log boot options.
_FIRMWARE_PROGRESS = (b"\x1b[2J", b"BdsDxe")


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str


# The first QEMU release whose multi-threaded TCG keeps translations coherent with
# code that other vCPUs modify (see the module's docstring).
MTTCG_COHERENT_FROM = (9, 1)


@dataclass(frozen=True)
class TcgThreads:
    """How TCG runs the vCPUs: "multi" (a host thread each) or "single" (one for all).

    *racy* is true for several vCPUs on a multi-threaded TCG that is known to run
    stale code (only when forced with ``CERULEAN_TCG_THREADS=multi``).
    """

    mode: str
    reason: str
    qemu_version: tuple[int, int, int] | None = None
    racy: bool = False


@dataclass(frozen=True)
class KvmProbe:
    works: bool
    detail: str


def _validate(value: str, source: str) -> str:
    value = value.strip().lower()
    if value not in ACCELS:
        raise CeruleanError(f"{source} is {value!r}; valid values: {', '.join(ACCELS)}.")
    return value


def choose_accel(arch: str, requested: str = "auto") -> AccelChoice:
    """KVM if asked for or if it works for *arch* on this host, else TCG; with the reason."""
    requested = _validate(requested, "The accelerator")
    if requested != "auto":
        return AccelChoice(requested, f"{requested.upper()} was requested")
    forced = os.environ.get(ACCEL_ENV, "")
    if forced.strip():
        value = _validate(forced, f"${ACCEL_ENV}")
        if value != "auto":
            return AccelChoice(value, f"{ACCEL_ENV}={value}")
    host = host_arch()
    if host != arch:
        return AccelChoice("tcg", f"the host is {host or 'another architecture'}, "
                                  f"the guest {arch}")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return AccelChoice("tcg", f"{KVM_DEVICE} is missing or not accessible")
    probe = probe_kvm(arch)
    if probe.works:
        return AccelChoice("kvm", probe.detail)
    return AccelChoice("tcg", f"KVM does not work here ({probe.detail})")


@functools.cache
def qemu_version(binary: str) -> tuple[int, int, int] | None:
    """The version *binary* prints (``QEMU emulator version 7.2.22 ...``), or None."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if m is None:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0)


def tcg_threads(qemu: str, cpus: int) -> TcgThreads:
    """Multi-threaded TCG where it is coherent, else one thread for all vCPUs.

    ``CERULEAN_TCG_THREADS=multi|single`` forces a mode (to reproduce a crash, or to
    measure one mode against the other).
    """
    version = qemu_version(qemu)
    shown = "QEMU " + (".".join(map(str, version)) if version else "of unknown version")
    coherent = version is not None and version[:2] >= MTTCG_COHERENT_FROM
    forced = os.environ.get(TCG_THREADS_ENV, "").strip().lower()
    if forced:
        if forced not in ("multi", "single"):
            raise CeruleanError(f"${TCG_THREADS_ENV} is {forced!r}; valid values: multi, single.")
        racy = forced == "multi" and cpus > 1 and not coherent
        return TcgThreads(forced, f"{TCG_THREADS_ENV}={forced}", version, racy)
    if cpus <= 1:
        return TcgThreads("multi", "one vCPU", version)
    if coherent:
        return TcgThreads("multi", f"{shown}: one host thread per vCPU", version)
    return TcgThreads(
        "single", f"{shown} runs the {cpus} vCPUs in one thread: its multi-threaded "
        "TCG can run stale code the guest has just rewritten (fixed in QEMU 9.1)", version)


@functools.cache
def probe_kvm(arch: str) -> KvmProbe:
    """Whether a KVM guest of *arch* really runs here; probed once per process."""
    result = _run_probe(arch, PROBE_TIMEOUT_S)
    log.info("KVM probe for %s: %s", arch, result.detail)
    return result


def _run_probe(arch: str, timeout_s: float) -> KvmProbe:
    prof = profile(arch)
    qemu = qemu_binary(prof)
    code, vars_template = firmware(prof)
    with tempfile.TemporaryDirectory(prefix="cerulean-kvm-probe-") as tmp:
        work = Path(tmp)
        vars_copy, serial, stderr = work / "vars.fd", work / "serial.log", work / "qemu.stderr"
        shutil.copyfile(vars_template, vars_copy)
        serial.touch()
        argv = [
            qemu, *machine_args(prof, "kvm"), "-m", "256", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu_opt(code)}",
            "-drive", f"if=pflash,format=raw,unit=1,file={qemu_opt(vars_copy)}",
            "-chardev", f"file,id=serial0,path={qemu_opt(serial)}", "-serial", "chardev:serial0",
        ]
        started = time.monotonic()
        proc = process.start(argv, stderr=stderr)
        try:
            return _watch_probe(proc, serial, stderr, started, timeout_s)
        finally:
            process.stop(proc, grace_s=2.0)


def qemu_complaint(stderr: str) -> str:
    """The most telling line of QEMU's stderr: its first error, else its last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no message"])[0 if errors else -1]


def _watch_probe(proc: subprocess.Popen[bytes], serial: Path, stderr: Path,
                 started: float, timeout_s: float) -> KvmProbe:
    while True:
        out = serial.read_bytes()
        if any(mark in out for mark in _FIRMWARE_PROGRESS):
            return KvmProbe(True, f"the firmware reached its boot manager under KVM in "
                                  f"{time.monotonic() - started:.1f} s")
        err = process.tail(stderr)
        if "KVM internal error" in err:
            return KvmProbe(False, "QEMU reported a KVM internal error")
        if proc.poll() is not None:
            return KvmProbe(False, f"QEMU exited with code {proc.returncode}: "
                                   f"{qemu_complaint(err)}")
        if time.monotonic() - started > timeout_s:
            return KvmProbe(False, f"the firmware made no progress under KVM in {timeout_s:g} s")
        process.pause(proc, _PROBE_POLL_S)
