"""Everything Cerulean knows per architecture, in one table.

The build (EFI file names, GPT partition types, qemu-user for chroots) and the
testbed (QEMU binary, machine, UEFI firmware) both read it, so adding an
architecture is one entry here.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from cerulean.errors import CeruleanError


@dataclass(frozen=True)
class Arch:
    name: str  # Debian's name
    efi: str  # EFI file-name suffix: BOOTX64.EFI, linuxx64.efi.stub
    gpt: str  # architecture suffix of Discoverable Partitions types (usr-x86-64)
    console: str  # the serial console device the kernel writes to
    qemu_user: str  # the binfmt_misc entry of qemu-user-static
    qemu: str  # qemu-system binary
    qemu_package: str
    machine: str
    tcg_cpu: str  # -cpu under software emulation
    firmware_code: Path
    firmware_vars: Path
    firmware_package: str

    @property
    def debian(self) -> str:
        return self.name


ARCHES: dict[str, Arch] = {
    "amd64": Arch(
        name="amd64", efi="x64", gpt="x86-64", console="ttyS0", qemu_user="qemu-x86_64",
        qemu="qemu-system-x86_64", qemu_package="qemu-system-x86", machine="q35",
        tcg_cpu="max",
        firmware_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        firmware_vars=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
        firmware_package="ovmf",
    ),
    "arm64": Arch(
        name="arm64", efi="aa64", gpt="arm64", console="ttyAMA0", qemu_user="qemu-aarch64",
        qemu="qemu-system-aarch64", qemu_package="qemu-system-arm",
        # GICv3 when available: KVM hosts without GICv2 emulation need it, TCG has both.
        machine="virt,gic-version=max",
        # Emulating pointer authentication (the QARMA cipher on every signed return)
        # costs TCG more than half its speed: without it an edge image is ready in
        # 87 s instead of 241 s. Guests then run without PAC, as on older cores.
        tcg_cpu="max,pauth=off",
        firmware_code=Path("/usr/share/AAVMF/AAVMF_CODE.fd"),
        firmware_vars=Path("/usr/share/AAVMF/AAVMF_VARS.fd"),
        firmware_package="qemu-efi-aarch64",
    ),
}

_HOST_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def get(name: str) -> Arch:
    """The entry for *name*, or a CeruleanError naming the valid choices."""
    try:
        return ARCHES[name]
    except KeyError:
        raise CeruleanError(
            f"Unknown architecture {name!r}: choose one of {', '.join(ARCHES)}."
        ) from None


def host_arch() -> str | None:
    """The Debian name of the machine we run on, or None if Cerulean does not know it."""
    return _HOST_MACHINES.get(platform.machine().lower())
