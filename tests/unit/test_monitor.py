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
    user = X86_FIRMWARE.replace("RIP=000000003ca7b2b0", "RIP=00007f3a10c2b2b0")
    assert monitor.where(user, "amd64").endswith("in user space")
    # Right after a reset: paging off, at the reset vector.
    reset = X86_FIRMWARE.replace("RIP=000000003ca7b2b0", "RIP=000000000000fff0") \
        .replace("CR0=80010033", "CR0=60000010")
    assert monitor.where(reset, "amd64").endswith("in the firmware (or a boot loader)")
    assert monitor.where(" PC=ffff800080a1b2c4 X00=0", "arm64").endswith("in the Linux kernel")
    assert monitor.where("no registers here", "amd64") == \
        "the monitor did not say where the vCPU is"


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
                answer = {"info registers": X86_FIRMWARE,
                          "info cpus": "* CPU #0: thread_id=4242 (halted)\n"}.get(command, "")
                conn.sendall(f"{command}\r\n\x1b[K{answer}".replace("\n", "\r\n").encode()
                             + b"(qemu) ")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path
    server.close()


def test_ask_returns_only_the_answer(fake_monitor: Path) -> None:
    answer = monitor.ask(fake_monitor, "info registers")
    assert answer.startswith("CPU#0\nRAX=") and "(qemu)" not in answer and "\r" not in answer
    assert monitor.describe(fake_monitor, "amd64") == \
        "the vCPU is at RIP=0x3ca7b2b0, in the firmware (or a boot loader) (halted)"


def test_a_monitor_that_is_not_there_is_said_plainly(tmp_path: Path) -> None:
    assert monitor.ask(tmp_path / "nothing.sock", "info registers") == ""
    assert monitor.describe(tmp_path / "nothing.sock", "amd64") == "QEMU's monitor did not answer"
