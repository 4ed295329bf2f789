"""What differs per guest architecture: QEMU binary, machine type, CPU and UEFI firmware.

Each missing piece is reported with the Debian package that provides it.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from cerulean.errors import CeruleanError
from cerulean.run import require_tool

ARCHES = ("amd64", "arm64")


@dataclass(frozen=True)
class ArchProfile:
    name: str
    qemu: str
    qemu_package: str
    machine: str
    firmware_code: Path
    firmware_vars: Path
    firmware_package: str
    console: str  # the guest's serial console device, for hints


PROFILES: dict[str, ArchProfile] = {
    "amd64": ArchProfile(
        name="amd64",
        qemu="qemu-system-x86_64",
        qemu_package="qemu-system-x86",
        machine="q35",
        firmware_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        firmware_vars=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
        firmware_package="ovmf",
        console="ttyS0",
    ),
    "arm64": ArchProfile(
        name="arm64",
        qemu="qemu-system-aarch64",
        qemu_package="qemu-system-arm",
        # GICv3 when available: KVM hosts without GICv2 emulation need it, TCG has both.
        machine="virt,gic-version=max",
        firmware_code=Path("/usr/share/AAVMF/AAVMF_CODE.fd"),
        firmware_vars=Path("/usr/share/AAVMF/AAVMF_VARS.fd"),
        firmware_package="qemu-efi-aarch64",
        console="ttyAMA0",
    ),
}

_HOST_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def profile(arch: str) -> ArchProfile:
    """The profile of *arch*, or a CeruleanError naming the valid choices."""
    try:
        return PROFILES[arch]
    except KeyError:
        raise CeruleanError(
            f"Unknown architecture {arch!r}: choose one of {', '.join(ARCHES)}."
        ) from None


def host_arch() -> str | None:
    """The Debian name of the machine we run on, or None if it is neither amd64 nor arm64."""
    return _HOST_MACHINES.get(platform.machine().lower())


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


def machine_args(prof: ArchProfile, accel: str) -> list[str]:
    """Machine, accelerator and CPU options for *accel* ("kvm" or "tcg")."""
    if accel == "kvm":
        return ["-machine", prof.machine, "-accel", "kvm", "-cpu", "host"]
    # Multi-threaded TCG runs one host thread per vCPU; "max" enables every
    # feature TCG can emulate, which modern distribution kernels expect.
    return ["-machine", prof.machine, "-accel", "tcg,thread=multi", "-cpu", "max"]


def qemu_opt(value: str | Path) -> str:
    """*value* escaped for a QEMU option list, where a comma is written as two."""
    return str(value).replace(",", ",,")
