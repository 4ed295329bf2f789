"""QEMU options per guest architecture, from the table in :mod:`cerulean.arch`.

Each missing piece is reported with the Debian package that provides it.
"""

from __future__ import annotations

from pathlib import Path

from cerulean.arch import ARCHES as _ARCHES
from cerulean.arch import Arch, get
from cerulean.errors import CeruleanError
from cerulean.run import require_tool

ARCHES = tuple(_ARCHES)
ArchProfile = Arch
PROFILES = _ARCHES


def profile(arch: str) -> ArchProfile:
    """The profile of *arch*, or a CeruleanError naming the valid choices."""
    return get(arch)


def qemu_binary(prof: ArchProfile) -> str:
    return require_tool(prof.qemu, prof.qemu_package)


def firmware(prof: ArchProfile) -> tuple[Path, Path]:
    """The UEFI firmware code and variable-store template for *prof*; both must exist."""
    for path in (prof.firmware_code, prof.firmware_vars):
        if not path.is_file():
            raise CeruleanError(
                f"The {prof.name} UEFI firmware {path} is missing "
                f"(install the Debian package '{prof.firmware_package}')."
            )
    return prof.firmware_code, prof.firmware_vars


def machine_args(prof: ArchProfile, accel: str, tcg_thread: str = "multi") -> list[str]:
    """Machine, accelerator and CPU options for *accel* ("kvm" or "tcg"); *tcg_thread*
    is "multi" (one host thread per vCPU) or "single" (see :func:`accel.tcg_threads`)."""
    if accel == "kvm":
        return ["-machine", prof.machine, "-accel", "kvm", "-cpu", "host"]
    # "max" enables every feature TCG can emulate, which modern distribution kernels expect.
    return ["-machine", prof.machine, "-accel", f"tcg,thread={tcg_thread}",
            "-cpu", prof.tcg_cpu]


def qemu_opt(value: str | Path) -> str:
    """*value* escaped for a QEMU option list, where a comma is written as two."""
    return str(value).replace(",", ",,")
