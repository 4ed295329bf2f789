"""Reading a guest's serial console: the READY report and the signs of a failed boot.

The image's ``cerulean-ready.service`` runs after multi-user.target and writes
a block of ``key=value`` lines to the console::

    CERULEAN-READY-BEGIN
    uptime=30.20
    failed=
    usr=/dev/mapper/usr erofs ro,relatime
    ...
    CERULEAN-READY-END

Known keys are uptime, state, failed (space-separated failed units), usr
("SOURCE FSTYPE OPTIONS" of /usr), verity ("verified" for a dm-verity /usr),
slot and boot; any other key is kept as it is. Console text arrives in
arbitrary chunks with terminal escapes and CRs mixed in, so the scanner works
on complete lines with escapes stripped, and keeps only the first complete block.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

READY_BEGIN = "CERULEAN-READY-BEGIN"
READY_END = "CERULEAN-READY-END"
# A serial getty prints its prompt on the same console; a report line can land
# right after it ("cerulean login: failed=").
_LOGIN_PROMPT = re.compile(r"^\S+ login:\s*")

# CSI (ESC [ ... final, including private ones like ESC [ ? 7 h and ESC [ = 3 h),
# OSC (ESC ] ... BEL or ST), charset designations (ESC ( B), other two-byte escapes.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[()*+].|\x1b[0-~]"
)
# What is left of control characters after the escapes: CRs, bells, backspaces...
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_KEY_VALUE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)=(.*)$")

# (kind, pattern) pairs; each one means the boot failed.
FAILURE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("kernel panic", re.compile(r"Kernel panic")),
    ("kernel oops", re.compile(r"\bOops:")),
    ("kernel BUG", re.compile(r"\bBUG:")),
    ("emergency shell", re.compile(
        r"emergency mode|Entering emergency|You are in emergency mode"
        r"|Give root password for maintenance"
        r"|Cannot open access to console, the root account is locked")),
    ("rescue shell", re.compile(r"You are in rescue mode|Entering rescue mode")),
    # dracut drops to its own shell after writing this report.
    ("emergency shell", re.compile(r"rdsosreport\.txt")),
)

# Under emulation (TCG) a vCPU is a host thread: when the host is busy it can go
# unscheduled for tens of seconds, and the guest kernel's watchdog then reports
# "BUG: soft lockup" although nothing in the guest is wrong. For an emulated guest
# that line is kept as a stall, not a failure; a guest that really hangs still
# fails on the timeout, and every other BUG, oops and panic still fails the boot.
EMULATION_STALL = re.compile(r"\bBUG: soft lockup\b")


def strip_ansi(text: str) -> str:
    """*text* without terminal escape sequences and control characters (tabs stay)."""
    return _CONTROL.sub("", _ANSI.sub("", text))


@dataclass(frozen=True)
class ConsoleEvent:
    """A console line that shows the boot failed."""

    kind: str
    line: int  # 1-based line number in the console log
    text: str

    def __str__(self) -> str:
        return f"{self.kind} on console line {self.line}: {self.text}"


@dataclass(frozen=True)
class ReadyReport:
    """The guest's READY block; *values* keeps every key in the order it came."""

    values: dict[str, str]

    def get(self, key: str) -> str | None:
        return self.values.get(key)

    @property
    def uptime(self) -> float | None:
        try:
            return float(self.values.get("uptime", "").split()[0])
        except (ValueError, IndexError):
            return None

    @property
    def failed_units(self) -> list[str]:
        return self.values.get("failed", "").split()

    @property
    def usr(self) -> tuple[str, str, list[str]] | None:
        """(source, fstype, options) of /usr, or None if the report lacks it."""
        fields = self.values.get("usr", "").split()
        if not fields:
            return None
        source = fields[0]
        fstype = fields[1] if len(fields) > 1 else ""
        options = fields[2].split(",") if len(fields) > 2 else []
        return source, fstype, options


class ConsoleScanner:
    """Fed console bytes as they arrive; finds the READY report and failure lines.

    *emulated* is true for a guest under TCG: its soft lockups go to *stalls*.
    """

    def __init__(self, emulated: bool = False) -> None:
        self.emulated = emulated
        self.stalls: list[ConsoleEvent] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._block: dict[str, str] | None = None
        self.lines = 0
        self.report: ReadyReport | None = None
        self.events: list[ConsoleEvent] = []
        self.last_line = ""  # the latest non-empty line, escapes stripped

    def feed(self, data: bytes) -> None:
        text = self._partial + self._decoder.decode(data)
        *complete, self._partial = text.split("\n")
        for raw in complete:
            self._line(raw)

    def finish(self) -> None:
        """Treat what is left as a last line (the console stopped mid-line)."""
        rest = self._partial + self._decoder.decode(b"", final=True)
        self._partial = ""
        if rest:
            self._line(rest)

    def _line(self, raw: str) -> None:
        self.lines += 1
        line = strip_ansi(raw).strip()
        if not line:
            return
        self.last_line = line
        if self.emulated and EMULATION_STALL.search(line):
            self.stalls.append(ConsoleEvent("emulation stall", self.lines, line))
            return
        for kind, pattern in FAILURE_PATTERNS:
            if pattern.search(line):
                self.events.append(ConsoleEvent(kind, self.lines, line))
                break
        if self.report is not None:
            return
        if READY_BEGIN in line:
            self._block = {}
        elif self._block is not None:
            if READY_END in line:
                self.report, self._block = ReadyReport(self._block), None
            elif m := _KEY_VALUE.match(_LOGIN_PROMPT.sub("", line)):
                # Kernel messages can land between the report's lines; they are
                # not key=value lines, so skipping them keeps the block intact.
                self._block.setdefault(m.group(1), m.group(2).strip())


def scan(text: str | bytes, emulated: bool = False) -> ConsoleScanner:
    """A scanner that has read the whole console *text*."""
    s = ConsoleScanner(emulated)
    s.feed(text.encode() if isinstance(text, str) else text)
    s.finish()
    return s

