"""Where detection events come from: snapshots of /proc and /etc, and sshd's log lines.

Each sensor returns events as flat mappings (the fields detection rules read).
:class:`NewOnly` turns repeated snapshots into events for what is new since
the last one (a new listening socket, a module loaded, an account added), so a
rule fires once per thing, not once per scan.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Event = dict[str, Any]
TCP_LISTEN = "0A"
UDP_CONNECTED = "01"  # a UDP socket connect()ed to one peer: a client, not a server
EPHEMERAL_PORTS = (32768, 60999)  # the kernel's default ip_local_port_range
# Bytes of a command line read from /proc (any user can make one of megabytes; an alert
# keeps fewer still: cerulean.agent.detect.MAX_EVIDENCE_TEXT).
MAX_CMDLINE = 64 << 10
# The user name is the attacker's to choose ("admin from 10.9.9.9"), so the address is
# the last "from IP port N" of the line.
SSHD = [
    (re.compile(r"^Failed (?P<method>\S+) for (?:invalid user )?(?P<user>.*) from "
                r"(?P<ip>[0-9a-fA-F:.]+) port (?P<port>\d+)(?: ssh2)?(?::.*)?$"), "failed"),
    (re.compile(r"^Invalid user (?P<user>.*) from (?P<ip>[0-9a-fA-F:.]+)"
                r"(?: port (?P<port>\d+))?$"), "invalid-user"),
    (re.compile(r"^Accepted (?P<method>\S+) for (?P<user>.*) from (?P<ip>[0-9a-fA-F:.]+) "
                r"port (?P<port>\d+)(?: ssh2)?(?::.*)?$"), "accepted"),
]


def processes(root: Path = Path("/")) -> list[Event]:
    """Running processes: their executable (and whether it was deleted, or is a memfd: a
    program run from memory), command line, effective (``proc.uid``) and real
    (``proc.ruid``) user, working directory. Kernel threads (no executable) are left out."""
    proc = root / "proc"
    out: list[Event] = []
    try:
        pids = sorted((p for p in os.listdir(proc) if p.isdigit()), key=int)
    except OSError:  # no /proc (a container without it)
        return out
    for pid in pids:
        d = proc / pid
        try:
            exe = os.readlink(d / "exe")
            with open(d / "cmdline", "rb") as f:
                cmdline = f.read(MAX_CMDLINE)
            status = (d / "status").read_text()
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        # A program run from memory (memfd_create, then execve of /proc/self/fd/N) has an
        # executable that never was a file: "/memfd:NAME (deleted)". That is its own case
        # (proc.exe_memfd), not a deleted file.
        memfd = exe.startswith("/memfd:")
        # The kernel appends " (deleted)" to the link, but a file may be named so too:
        # the executable's own inode (reached through the link) says whether it is gone.
        try:
            deleted = not memfd and os.stat(d / "exe").st_nlink == 0
        except OSError:
            deleted = exe.endswith(" (deleted)")
        if deleted or memfd:
            exe = exe.removesuffix(" (deleted)")
        uids = next((line.split()[1:3] for line in status.splitlines()
                     if line.startswith("Uid:")), ["-1", "-1"])
        try:
            cwd = os.readlink(d / "cwd")
        except OSError:
            cwd = ""
        out.append({"proc.pid": int(pid), "proc.name": comm, "proc.exe": exe,
                    "proc.exe_deleted": deleted, "proc.exe_memfd": memfd,
                    "proc.uid": int(uids[1]),
                    "proc.ruid": int(uids[0]), "proc.cwd": cwd,
                    "proc.cmdline": cmdline.replace(b"\0", b" ").decode(errors="replace")
                    .strip()})
    return out


def accounts(root: Path = Path("/")) -> list[Event]:
    """Accounts in /etc/passwd."""
    out: list[Event] = []
    try:
        lines = (root / "etc/passwd").read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":")
        if len(parts) < 7 or not parts[2].lstrip("-").isdigit():
            continue
        out.append({"user.name": parts[0], "user.uid": int(parts[2]),
                    "user.gid": int(parts[3]) if parts[3].isdigit() else -1,
                    "user.home": parts[5], "user.shell": parts[6]})
    return out


def _address(hex_addr: str) -> tuple[str, int]:
    """/proc/net's address: the IP in host byte order (32-bit words), then the port."""
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.IPv4Address(words) if len(raw) == 4 else ipaddress.IPv6Address(words)
    return str(ip), int(port, 16)


def ephemeral_ports(root: Path = Path("/")) -> tuple[int, int]:
    """The ports the kernel picks for a socket that did not bind one (ip_local_port_range)."""
    try:
        low, high = (root / "proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return EPHEMERAL_PORTS


def listening(root: Path = Path("/")) -> list[Event]:
    """Listening TCP sockets and bound UDP sockets, from /proc/net.

    A connected UDP socket is a client and is left out. An unconnected one on a port of
    the ephemeral range may be a client too (one that sent without binding: the kernel
    picked its port), and has ``sock.ephemeral`` set (the guard reports such a socket
    only once it has lasted from one snapshot to the next).
    """
    out: list[Event] = []
    low, high = ephemeral_ports(root)
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = (root / "proc/net" / proto).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10:
                continue
            if proto.startswith("tcp") and parts[3] != TCP_LISTEN:
                continue
            ip, port = _address(parts[1])
            udp = proto.startswith("udp")
            if udp and (port == 0 or parts[3] == UDP_CONNECTED):
                continue
            out.append({"sock.proto": proto.rstrip("6"), "sock.family":
                        "ipv6" if proto.endswith("6") else "ipv4", "sock.addr": ip,
                        "sock.port": port, "sock.uid": int(parts[7]),
                        "sock.inode": int(parts[9]),
                        "sock.ephemeral": udp and low <= port <= high})
    return out


def modules(root: Path = Path("/")) -> list[Event]:
    """Loaded kernel modules, from /proc/modules."""
    out: list[Event] = []
    try:
        lines = (root / "proc/modules").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 5:
            out.append({"module.name": parts[0], "module.size": int(parts[1]),
                        "module.state": parts[4]})
    return out


def sshd_event(message: str, fields: Mapping[str, str] | None = None) -> Event | None:
    """An auth event from one sshd log message (None when it is not about a login)."""
    for rx, result in SSHD:
        m = rx.match(message.rstrip())
        if m:
            d = m.groupdict()
            return {"auth.service": "sshd", "auth.result": result,
                    "auth.user": d.get("user") or "", "auth.method": d.get("method") or "",
                    "source.ip": d["ip"], "source.port": int(d["port"] or 0),
                    "auth.message": message, **({"proc.pid": int(fields["_PID"])}
                                                 if fields and fields.get("_PID", "").isdigit()
                                                 else {})}
    return None


@dataclass
class NewOnly:
    """Events for the items of a snapshot not seen in the previous one (the first
    snapshot only sets the baseline, unless *report_first*). A new item for which *hold*
    is true is reported only if the next snapshot still has it: what comes and goes
    between two snapshots is left out."""

    sense: Callable[[], Iterable[Event]]
    key: Callable[[Event], Any]
    report_first: bool = False
    hold: Callable[[Event], bool] | None = None
    _seen: set[Any] | None = field(default=None, repr=False)
    _held: set[Any] = field(default_factory=set, repr=False)  # new last time, held back

    def poll(self) -> list[Event]:
        items = list(self.sense())
        keys = {self.key(e) for e in items}
        seen, self._seen = self._seen, keys
        if seen is None:
            return items if self.report_first else []
        out, held = [], set()
        for e in items:
            k = self.key(e)
            if k in self._held or (k not in seen and not (self.hold and self.hold(e))):
                out.append(e)  # new, or new last time and still there
            elif k not in seen:
                held.add(k)
        self._held = held
        return out


SSHD_IDENTIFIERS = ("sshd", "sshd-session")  # OpenSSH 10 logs logins from sshd-session
JOURNAL_READ_BYTES = 1 << 20  # what one read of the journal takes, at most


class JournalFollower:
    """sshd's journal entries as auth events, as they are written (``journalctl --follow``
    in the background, read without blocking). Entries from before it started are not
    read again. If journalctl ends, it is started again at most once a minute."""

    def __init__(self, argv: list[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # Any user can log under sshd's name (logger -t sshd): only entries journald saw
        # come from a root process (_UID, which it sets itself) are sshd's.
        self.argv = argv or ["journalctl", "--follow", "--lines=0", "--output=json",
                             *(f"SYSLOG_IDENTIFIER={i}" for i in SSHD_IDENTIFIERS), "_UID=0"]
        self.clock = clock
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._started = -math.inf

    def _start(self) -> None:
        if self.clock() - self._started < 60:
            return
        self._started = self.clock()
        try:
            self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        except OSError:
            self._proc = None
            return
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)

    def read(self) -> list[Event]:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        if self._proc is None or self._proc.stdout is None:
            return []
        taken = 0
        while taken < JOURNAL_READ_BYTES:  # the rest waits in the pipe for the next call
            try:
                chunk = self._proc.stdout.read(65536)
            except BlockingIOError:
                chunk = None
            if not chunk:
                break
            taken += len(chunk)
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > 1 << 20:  # an entry larger than 1 MiB is not a login line
            self._buf = b""
        out = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            message = entry.get("MESSAGE") if isinstance(entry, dict) else None
            if isinstance(message, list):  # journald gives non-UTF-8 text as bytes
                message = bytes(b & 0xFF for b in message if isinstance(b, int)).decode(
                    "utf-8", "replace")
            if isinstance(message, str):
                event = sshd_event(message, {k: v for k, v in entry.items()
                                             if isinstance(v, str)})
                if event is not None:
                    out.append(event)
        return out

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
