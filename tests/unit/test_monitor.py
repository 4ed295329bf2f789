"""Asking QEMU's monitor where a hung guest's vCPU is (cerulean.testbed.monitor)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cerulean.testbed import monitor

# The first lines of a real `info registers` from QEMU 7.2 (x86_64, OVMF running).
X86_FIRMWARE = """\
CPU#0
RAX=0000000016966320 RBX=000000003caad570 RCX=9e3779b185ebca87 RDX=61633224ee7271c4
RIP=000000003ca7b2b0 RFL=00000206 [-----P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
CR0=80010033 CR2=0000000000000000 CR3=000000003f801000 CR4=00000668
"""


def test_where_tells_firmware_kernel_and_user_space_apart() -> None:
    assert monitor.where(X86_FIRMWARE, "amd64") == \
        "the vCPU is at RIP=0x3ca7b2b0, in the firmware (or a boot loader)"
    kernel = X86_FIRMWARE.replace("RIP=000000003ca7b2b0", "RIP=ffffffff81a3c2d0")
    assert monitor.where(kernel, "amd64").endswith("in the Linux kernel")
    # User space by its privilege level, wherever its code is (a non-PIE program is low).
    user = X86_FIRMWARE.replace("RIP=000000003ca7b2b0", "RIP=0000000000401136") \
        .replace("CPL=0", "CPL=3")
    assert monitor.where(user, "amd64").endswith("in user space")
    assert monitor.where(kernel.replace("HLT=0", "HLT=1"), "amd64").endswith(
        "in the Linux kernel (halted)")
    # Right after a reset QEMU prints EIP=, in real mode at the reset vector.
    reset = ("EAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1\n"
             "EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\n"
             "CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000\n")
    assert monitor.where(reset, "amd64") == \
        "the vCPU is at EIP=0xfff0, in the firmware (or a boot loader)"
    arm = " PC=ffff800080a1b2c4 X00=0000000000000000\nPSTATE=600003c5 -ZC- EL1h\n"
    assert monitor.where(arm, "arm64").endswith("in the Linux kernel")
    arm_user = arm.replace("PC=ffff800080a1b2c4", "PC=0000aaaad1e2f3a4").replace("EL1h", "EL0t")
    assert monitor.where(arm_user, "arm64").endswith("in user space")
    arm_fw = arm.replace("PC=ffff800080a1b2c4", "PC=000000013f8e1000")  # above 4 GiB
    assert monitor.where(arm_fw, "arm64").endswith("in the firmware (or a boot loader)")
    assert monitor.where("no registers here", "amd64") == \
        "the monitor did not say where the vCPU is"


def test_socket_paths_fit_and_commas_are_escaped(tmp_path: Path) -> None:
    assert monitor.monitor_args(Path("/tmp/a,b/m.sock")) == \
        ["-monitor", "unix:/tmp/a,,b/m.sock,server=on,wait=off"]
    assert monitor.fits(Path("/tmp/m.sock"))
    # Counted in bytes: 60 two-byte characters are 120 bytes.
    assert not monitor.fits(Path("/tmp") / ("é" * 60))


@pytest.fixture
def fake_monitor(tmp_path: Path) -> Iterator[Path]:
    """A Unix socket that talks like QEMU's HMP: a banner, a prompt, the echoed command
    (with the terminal escapes QEMU adds), its answer and a new prompt."""
    path = tmp_path / "m.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n"
                             b"(qemu) ")
                command = conn.recv(1024).decode().strip()
                answer = {"info registers": X86_FIRMWARE}.get(command, "")
                conn.sendall(f"{command}\r\n\x1b[K{answer}".replace("\n", "\r\n").encode()
                             + b"(qemu) ")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path
    server.close()


def test_ask_returns_only_the_answer(fake_monitor: Path) -> None:
    answer = monitor.ask(fake_monitor, "info registers")
    assert answer.startswith("CPU#0\nRAX=") and "(qemu)" not in answer and "\r" not in answer
    assert monitor.where(answer, "amd64") == \
        "the vCPU is at RIP=0x3ca7b2b0, in the firmware (or a boot loader)"


def test_a_monitor_that_is_not_there_answers_nothing(tmp_path: Path) -> None:
    assert monitor.ask(tmp_path / "nothing.sock", "info registers") == ""
