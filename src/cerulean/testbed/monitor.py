"""Asking a running QEMU where its vCPUs are, for the report of a machine that hangs.

A guest that stops printing leaves only its console behind, and the console cannot
tell a kernel spinning in a loop from firmware that never started. QEMU's human
monitor (HMP) on a Unix socket can: ``info registers`` shows the vCPU's program
counter, its privilege level and (x86) whether it is halted.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path

from cerulean.testbed.arch import qemu_opt
from cerulean.testbed.console import strip_ansi

PROMPT = b"(qemu) "
# Longest Unix socket path the kernel takes (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
# How much of an answer is read at most: info registers is a few KiB per vCPU.
MAX_ANSWER = 256 * 1024

# x86 prints RIP= in 64-bit code and EIP= otherwise (real mode at the reset vector).
_PC = re.compile(r"\b(RIP|EIP|PC)=([0-9a-fA-F]+)")
_CPL = re.compile(r"\bCPL=(\d)")
_EL = re.compile(r"\bPSTATE=[0-9a-fA-F]+ \S+ (?:N?S )?EL(\d)")


def monitor_args(sock: Path) -> list[str]:
    """QEMU options for an HMP monitor listening on *sock*."""
    return ["-monitor", f"unix:{qemu_opt(sock)},server=on,wait=off"]


def fits(sock: Path) -> bool:
    """Whether *sock* is short enough for a Unix socket address."""
    return len(os.fsencode(sock)) <= MAX_SOCKET_PATH


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
    halted = " (halted)" if re.search(r"\bHLT=1\b", registers) else ""
    return f"the vCPU is at {m.group(1)}={pc:#x}, {region(pc, registers, arch)}{halted}"


def region(pc: int, registers: str, arch: str) -> str:
    """What runs at *pc*: user space by the privilege level, else the kernel by its
    address range, else firmware (or a boot loader)."""
    level = _CPL.search(registers) if arch == "amd64" else _EL.search(registers)
    if level is not None and level.group(1) == ("3" if arch == "amd64" else "0"):
        return "in user space"
    if pc >= 0xFFFF_0000_0000_0000:
        return "in the Linux kernel"
    return "in the firmware (or a boot loader)"
