"""Asking a running QEMU where its vCPUs are, for the report of a machine that hangs.

A guest that stops printing leaves only its console behind, and the console cannot
tell a kernel spinning in a loop from firmware that never started. QEMU's human
monitor (HMP) on a Unix socket can: ``info registers`` shows each vCPU's program
counter and ``info cpus`` whether it is halted.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from pathlib import Path

from cerulean.testbed.console import strip_ansi

PROMPT = b"(qemu) "
# Longest Unix socket path the kernel takes (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
# How much of an answer is read at most: info registers is a few KiB per vCPU.
MAX_ANSWER = 256 * 1024

_PC = re.compile(r"\b(RIP|PC)=([0-9a-fA-F]+)")


def monitor_args(sock: Path) -> list[str]:
    """QEMU options for an HMP monitor listening on *sock*."""
    return ["-monitor", f"unix:{sock},server=on,wait=off"]


def ask(sock: Path, command: str, timeout: float = 5.0) -> str:
    """*command*'s answer from the monitor on *sock* ("" if QEMU does not answer)."""
    out = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            out = _read_until_prompt(s, timeout)  # the banner
            s.sendall(command.encode() + b"\n")
            out = _read_until_prompt(s, timeout)
    except OSError:
        return ""
    text = strip_ansi(out.decode("utf-8", "replace"))
    # The monitor echoes the command and ends with a new prompt; keep what is between.
    text = text.rsplit("(qemu)", 1)[0]
    return text.split(command, 1)[-1].strip()


def _read_until_prompt(s: socket.socket, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while not out.endswith(PROMPT) and len(out) < MAX_ANSWER and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def where(registers: str, arch: str) -> str:
    """Where the first vCPU is, from *registers* (``info registers``), in words."""
    m = _PC.search(registers)
    if m is None:
        return "the monitor did not say where the vCPU is"
    pc = int(m.group(2), 16)
    return f"the vCPU is at {m.group(1)}={pc:#x}, {region(pc, registers, arch)}"


def region(pc: int, registers: str, arch: str) -> str:
    """A guess at what runs at *pc*: the kernel, user space, or firmware."""
    if pc >= 0xFFFF_0000_0000_0000:
        return "in the Linux kernel"
    if arch == "amd64":
        cr0 = re.search(r"\bCR0=([0-9a-fA-F]+)", registers)
        paging = cr0 is not None and int(cr0.group(1), 16) & 0x8000_0000
        # UEFI firmware runs identity-mapped below 4 GiB; the reset vector is at 0xfffffff0.
        if not paging or pc < 0x1_0000_0000:
            return "in the firmware (or a boot loader)"
    elif pc < 0x1_0000_0000:
        return "in the firmware (or a boot loader)"
    return "in user space"


def describe(sock: Path, arch: str) -> str:
    """One sentence on where a running machine's first vCPU is, for an error message."""
    registers = ask(sock, "info registers")
    if not registers:
        return "QEMU's monitor did not answer"
    state = ask(sock, "info cpus")
    halted = " (halted)" if "halted" in state else ""
    return where(registers, arch) + halted
