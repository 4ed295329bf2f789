"""Policy rules: the checks of a compliance policy, in a grammar close to Wazuh SCA.

A rule is one line::

    [not ]TYPE:TARGET [-> CHECK [&& CHECK]...]

| type | target | true when (without checks) | lines the checks read |
|---|---|---|---|
| ``f`` | a file | it exists | the file's lines |
| ``d`` | a directory | it exists | the names in it; with ``-> r:NAME -> CHECKS``, |
|       |             |           | the lines of its files whose names match NAME    |
| ``p`` | a process name | a process of that name runs | the command lines of those processes |
| ``c`` | a command (run without a shell, 30 s) | it exits 0 | its output |
| ``sysctl`` | a kernel setting (``net.ipv4.ip_forward``) | it exists | its value |
| ``service`` | a systemd unit | it is known | ``enabled=STATE active=STATE`` |
| ``package`` | a Debian package | it is installed | its version |
| ``mount`` | a mount point | something is mounted there | ``SOURCE FSTYPE OPTIONS`` |

Checks, all of which one line must pass (``!`` negates one):

- ``r:REGEX``: the line matches (Python ``re.search``);
- ``n:REGEX compare OP NUMBER``: the regex's first group is a number and
  ``number OP NUMBER`` holds (``<``, ``<=``, ``==``, ``!=``, ``>=``, ``>``);
- anything else: the line equals it, after stripping spaces.

With checks, the rule is true when at least one line passes them all. ``not``
turns the whole rule around. Every rule gives its *evidence*: the line that
made it true, or why it is not.
"""

from __future__ import annotations

import errno
import operator
import os
import re
import shlex
import stat
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cerulean.agent.cves import installed_packages
from cerulean.agent.saferegex import RegexError, bounded, compile_safe
from cerulean.errors import CeruleanError

TYPES = ("f", "d", "p", "c", "sysctl", "service", "package", "mount")
OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">=": operator.ge, ">": operator.gt}
NUMERIC = re.compile(
    r"^n:(?P<rx>.*?)\s+compare\s+(?P<op><=|>=|==|!=|<|>)\s*(?P<num>-?\d+(?:\.\d+)?)$")
MAX_LINES = 100_000
# The most a file check (f:, d:, sysctl:, mount:) reads of one file. A larger file is an
# error ("too large to check"), not a pass: it is never read whole into memory.
MAX_FILE_BYTES = 8 << 20
# How files are opened: never waiting on a FIFO or a device, never becoming a terminal's.
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class RuleError(CeruleanError):
    pass


@dataclass(frozen=True)
class Check:
    kind: str  # r | n | s
    text: str
    negate: bool = False
    rx: re.Pattern[str] | None = None
    op: str = ""
    number: float = 0.0

    def passes(self, line: str) -> bool:
        if self.kind == "r":
            assert self.rx is not None
            ok = self.rx.search(bounded(line)) is not None
        elif self.kind == "n":
            assert self.rx is not None
            m = self.rx.search(bounded(line))
            try:
                ok = m is not None and OPS[self.op](float(m.group(1)), self.number)
            except (IndexError, ValueError, TypeError):  # TypeError: an optional group
                ok = False
        else:
            ok = line.strip() == self.text
        return ok != self.negate


@dataclass(frozen=True)
class Rule:
    text: str
    negate: bool
    type: str
    target: str
    name_rx: re.Pattern[str] | None  # d: which files of the directory
    checks: tuple[Check, ...]


def _check(text: str, rule: str) -> Check:
    negate = text.startswith("!")
    body = text[1:] if negate else text
    try:
        if body.startswith("r:"):
            return Check("r", body, negate, compile_safe(body[2:]))
        if body.startswith("n:"):
            m = NUMERIC.match(body)
            if not m:
                raise RuleError(f"In rule {rule!r}: {body!r} must read "
                                "'n:REGEX compare OP NUMBER'.")
            rx = compile_safe(m["rx"])
            if rx.groups < 1:
                raise RuleError(f"In rule {rule!r}: the regex of {body!r} needs a group "
                                "around the number.")
            return Check("n", body, negate, rx, m["op"], float(m["num"]))
    except RegexError as e:
        raise RuleError(f"In rule {rule!r}: {e}") from None
    return Check("s", body.strip(), negate)


def parse_rule(text: str) -> Rule:
    """One rule, or a RuleError naming what is wrong with it."""
    line = text.strip()
    negate = line.startswith("not ")
    if negate:
        line = line[4:].lstrip()
    head, _, rest = line.partition(" -> ")
    kind, sep, target = head.partition(":")
    if not sep or kind not in TYPES or not target.strip():
        raise RuleError(f"{text!r} is not a rule: it must start with one of "
                        f"{', '.join(t + ':' for t in TYPES)} and a target.")
    name_rx = None
    if kind == "d" and " -> " in rest:
        name, _, rest = rest.partition(" -> ")
        if not name.startswith("r:"):
            raise RuleError(f"In rule {text!r}: a directory's file names are matched "
                            "with r:REGEX.")
        try:
            name_rx = compile_safe(name[2:])
        except RegexError as e:
            raise RuleError(f"In rule {text!r}: {e}") from None
    checks = tuple(_check(c.strip(), text) for c in rest.split(" && ")) if rest.strip() else ()
    return Rule(text, negate, kind, target.strip(), name_rx, checks)


@dataclass(frozen=True)
class Outcome:
    passed: bool
    evidence: str


@dataclass
class Host:
    """Where rules look: *root* for files and /proc, and how commands run."""

    root: Path = Path("/")
    run: Callable[[Sequence[str]], tuple[int, str]] | None = None

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def cached(self) -> Host:
        """This host, running each command once (for one pass over a policy: many checks
        read the same ``sshd -T``)."""
        memo: dict[tuple[str, ...], tuple[int, str]] = {}

        def run(argv: Sequence[str]) -> tuple[int, str]:
            key = tuple(argv)
            if key not in memo:
                memo[key] = self.command(argv)
            return memo[key]

        return Host(self.root, run)

    def command(self, argv: Sequence[str]) -> tuple[int, str]:
        if self.run is not None:
            return self.run(argv)
        try:
            r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30,
                               check=False, errors="replace")
        except FileNotFoundError:
            return 127, f"{argv[0]}: command not found"
        except subprocess.TimeoutExpired:
            return 124, f"{argv[0]}: timed out after 30 s"
        return r.returncode, r.stdout + r.stderr


def _lines(text: str) -> list[str]:
    """The first MAX_LINES lines of *text* (ended by a newline, or CR LF), without
    splitting the rest: a file of millions of empty lines costs no list of millions."""
    parts = text.split("\n", MAX_LINES)
    if len(parts) > MAX_LINES:
        del parts[MAX_LINES:]  # the rest, unsplit
    elif parts[-1] == "":
        parts.pop()  # after the last newline
    return [p[:-1] if p.endswith("\r") else p for p in parts]


def read_bounded(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file *path*. A FIFO, a device or a socket is refused
    before it is opened and again once it is (it may have been swapped in between), so a
    read never waits; a file over *limit* bytes is refused, not read. Raises RuleError, or
    OSError (FileNotFoundError when it is not there)."""
    limit = MAX_FILE_BYTES if limit is None else limit
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    if not stat.S_ISREG(mode):
        raise RuleError(f"{path} is not a regular file; it is not read.")
    fd = os.open(path, READ_FLAGS)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise RuleError(f"{path} is not a regular file; it is not read.")
        if st.st_size > limit:
            raise RuleError(f"{path} is too large to check ({st.st_size >> 20} MiB, more "
                            f"than {limit >> 20} MiB).")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 16):  # /proc files say size 0: read to the end
            size += len(chunk)
            if size > limit:
                raise RuleError(f"{path} is too large to check (more than {limit >> 20} MiB).")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read(path: Path) -> list[str] | None:
    try:
        return _lines(read_bounded(path).decode(errors="replace"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except PermissionError:
        raise RuleError(f"{path} cannot be read (permission denied).") from None


def _first(lines: Iterable[str], checks: Sequence[Check], where: str) -> str | None:
    for n, line in enumerate(lines, start=1):
        if all(c.passes(line) for c in checks):
            return f"{where} line {n}: {line.strip()[:200]!r}"
    return None


def _sources(rule: Rule, host: Host) -> tuple[bool, list[tuple[str, list[str]]], str]:
    """(whether the target exists, its (where, lines) to check, what it is)."""
    t = rule.target
    if rule.type == "f":
        lines = _read(host.path(t))
        return lines is not None, [(t, lines or [])], t
    if rule.type == "d":
        d = host.path(t)
        if not d.is_dir():
            return False, [], t
        names = sorted(os.listdir(d))
        if rule.name_rx is None:
            return True, [(t, names)], t
        files = []
        for name in names:
            if rule.name_rx.search(name) and (d / name).is_file():
                files.append((f"{t.rstrip('/')}/{name}", _read(d / name) or []))
        return True, files, t
    if rule.type == "p":
        cmdlines = []
        proc = host.path("/proc")
        for pid in sorted(p for p in os.listdir(proc) if p.isdigit()) if proc.is_dir() else []:
            try:
                comm = (proc / pid / "comm").read_text().strip()
                raw = (proc / pid / "cmdline").read_bytes()
            except OSError:
                continue
            argv0 = os.path.basename(raw.split(b"\0", 1)[0].decode(errors="replace"))
            if t in (comm, argv0):
                cmdlines.append(raw.replace(b"\0", b" ").decode(errors="replace").strip())
        return bool(cmdlines), [(f"process {t}", cmdlines)], f"process {t}"
    if rule.type == "c":
        try:
            argv = shlex.split(t)
        except ValueError as e:
            raise RuleError(f"In rule {rule.text!r}: the command cannot be split ({e}).") \
                from None
        rc, out = host.command(argv)
        return rc == 0, [(f"output of {t!r}", _lines(out))], f"{t!r} (exit {rc})"
    if rule.type == "sysctl":
        lines = _read(host.path("/proc/sys/" + t.replace(".", "/")))
        return lines is not None, [(t, [" ".join(lines or [])])], t
    if rule.type == "service":
        _, enabled_out = host.command(["systemctl", "is-enabled", t])
        _, active_out = host.command(["systemctl", "is-active", t])
        enabled = (enabled_out.strip().splitlines() or [""])[0]
        active = (active_out.strip().splitlines() or [""])[0]
        known = enabled not in ("", "not-found") and "No such file" not in enabled
        return known, [(t, [f"enabled={enabled} active={active}"])], t
    if rule.type == "package":
        version = next((p.version for p in installed_packages(host.root) if p.name == t),
                       None)
        return version is not None, [(f"package {t}", [version or ""])], f"package {t}"
    # mount
    for line in _read(host.path("/proc/mounts")) or []:
        parts = line.split()
        if len(parts) >= 4 and parts[1].replace("\\040", " ") == t:
            return True, [(f"mount {t}", [" ".join([parts[0], parts[2], parts[3]])])], t
    return False, [], f"mount {t}"


def evaluate(rule: Rule, host: Host) -> Outcome:
    """Whether *rule* holds on *host*, and the evidence."""
    exists, sources, what = _sources(rule, host)
    if not rule.checks or not exists:
        held = exists
        evidence = f"{what} {'exists' if exists else 'does not exist'}"
        if rule.type == "c":
            evidence = f"{what} {'succeeded' if exists else 'failed'}"
        if rule.type == "service" and exists:
            evidence = f"{what}: {sources[0][1][0]}"
    else:
        found = next((hit for where, lines in sources
                      if (hit := _first(lines, rule.checks, where)) is not None), None)
        held = found is not None
        wanted = " && ".join(("!" if c.negate else "") + c.text for c in rule.checks)
        evidence = found or f"no line of {what} passes {wanted}"
    if rule.negate:
        return Outcome(not held, ("not: " if held else "") + evidence)
    return Outcome(held, evidence)
