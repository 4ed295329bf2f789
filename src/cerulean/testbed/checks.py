"""The named pass/fail checks of a test boot, computed from what the console showed.

A boot ends in one of four ways (:class:`Outcome`); the checks say what that
means for each property the image promises. Without a READY report the
checks that need it fail and say so, rather than being silently skipped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from cerulean.testbed.accel import TCG_THREADS_ENV
from cerulean.testbed.console import ConsoleEvent, ReadyReport

NO_TIMEOUT = "no timeout"
MULTI_USER = "multi-user reached"
NO_FAILED_UNITS = "no failed units"
CLEAN_CONSOLE = "no panic, oops or emergency shell"
USR_READ_ONLY = "/usr read-only"
USR_DM = "/usr on device-mapper"
USR_VERITY = "/usr verity verified"
BOOT_GOOD = "boot marked good"
CHECK_NAMES = (NO_TIMEOUT, MULTI_USER, NO_FAILED_UNITS, CLEAN_CONSOLE, USR_READ_ONLY, USR_DM,
               USR_VERITY, BOOT_GOOD)

_DM_PREFIXES = ("/dev/mapper/", "/dev/dm-")


class Outcome(StrEnum):
    """Why watching the console stopped."""

    READY = "ready"  # the READY report arrived
    FAILED = "failed"  # a panic, oops or emergency shell showed on the console
    TIMEOUT = "timeout"  # neither happened in time
    EXITED = "exited"  # QEMU ended by itself first


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def evaluate(outcome: Outcome, report: ReadyReport | None, events: list[ConsoleEvent], *,
             timeout_s: float, elapsed_s: float, time_to_ready_s: float | None = None,
             qemu_detail: str = "", stalls: Sequence[ConsoleEvent] = ()) -> list[Check]:
    """The checks for a boot that ended with *outcome*, in a fixed order.

    *stalls* (soft lockups of an emulated guest) fail nothing; the console check names them.
    """
    checks = [_timeout(outcome, timeout_s, elapsed_s),
              _multi_user(outcome, report, events, time_to_ready_s, qemu_detail)]
    checks.append(_failed_units(report))
    if events:
        shown = "; ".join(str(e) for e in events[:3])
        more = f" (and {len(events) - 3} more)" if len(events) > 3 else ""
        checks.append(Check(CLEAN_CONSOLE, False, shown + more))
    elif stalls:
        checks.append(Check(CLEAN_CONSOLE, True,
                            f"none on the console; {len(stalls)} emulation stall(s), "
                            f"first on line {stalls[0].line}: {stalls[0].text}"))
    else:
        checks.append(Check(CLEAN_CONSOLE, True, "none on the console"))
    checks.extend(_usr(report))
    checks.append(_blessed(report))
    return checks


def _blessed(report: ReadyReport | None) -> Check:
    """systemd-boot's boot counting: the slot's entry must have been marked good."""
    if report is None:
        return Check(BOOT_GOOD, False, "unknown: no READY report")
    state = report.get("bless")
    if state == "good":
        return Check(BOOT_GOOD, True, "systemd-bless-boot marked this boot good")
    if state == "clean":
        return Check(BOOT_GOOD, True, "boot counting is off for this entry (boot-tries = 0)")
    if state is None:
        return Check(BOOT_GOOD, False, "the READY report has no 'bless' key")
    return Check(BOOT_GOOD, False,
                 f"bless={state!r}: boot-complete.target was not reached, so systemd-boot "
                 "will count this as a failed try")


def _timeout(outcome: Outcome, timeout_s: float, elapsed_s: float) -> Check:
    if outcome is Outcome.TIMEOUT:
        return Check(NO_TIMEOUT, False,
                     f"timed out after {timeout_s:g} s without a READY report or a failure")
    return Check(NO_TIMEOUT, True, f"done after {elapsed_s:.1f} s (limit {timeout_s:g} s)")


def _multi_user(outcome: Outcome, report: ReadyReport | None, events: list[ConsoleEvent],
                time_to_ready_s: float | None, qemu_detail: str) -> Check:
    if report is not None:
        parts = []
        if time_to_ready_s is not None:
            parts.append(f"READY report after {time_to_ready_s:.1f} s")
        if report.uptime is not None:
            parts.append(f"guest uptime {report.uptime:g} s")
        if report.get("state"):
            parts.append(f"state {report.get('state')}")
        return Check(MULTI_USER, True, ", ".join(parts) or "READY report received")
    if outcome is Outcome.FAILED and events:
        why = f"boot stopped at the {events[0].kind} on console line {events[0].line}"
    elif outcome is Outcome.EXITED:
        why = f"QEMU exited before the READY report ({qemu_detail or 'no message'})"
    else:
        why = "no READY report before the timeout"
    return Check(MULTI_USER, False, why)


def _failed_units(report: ReadyReport | None) -> Check:
    if report is None:
        return Check(NO_FAILED_UNITS, False, "unknown: no READY report")
    if "failed" not in report.values:
        return Check(NO_FAILED_UNITS, False, "the READY report has no 'failed' key")
    if report.failed_units:
        return Check(NO_FAILED_UNITS, False, "failed: " + " ".join(report.failed_units))
    return Check(NO_FAILED_UNITS, True, "none")


def _usr(report: ReadyReport | None) -> list[Check]:
    names = (USR_READ_ONLY, USR_DM, USR_VERITY)
    if report is None:
        return [Check(n, False, "unknown: no READY report") for n in names]
    usr = report.usr
    if usr is None:
        return [Check(n, False, "the READY report has no 'usr' key") for n in names[:2]] + [
            _verity(report)]
    source, fstype, options = usr
    ro = "ro" in options
    dm = source.startswith(_DM_PREFIXES)
    mount = "read-only" if ro else f"with options {','.join(options) or '(none)'}"
    where = f"from {source}" if dm else f"from {source}, not a /dev/mapper or /dev/dm-* device"
    return [
        Check(USR_READ_ONLY, ro, f"{fstype or 'unknown type'} mounted {mount}"),
        Check(USR_DM, dm, where),
        _verity(report),
    ]


def _verity(report: ReadyReport) -> Check:
    verity = report.get("verity")
    if verity == "verified":
        return Check(USR_VERITY, True, "verity=verified")
    if verity is None:
        return Check(USR_VERITY, False, "the READY report has no 'verity' key")
    return Check(USR_VERITY, False, f"verity={verity!r}, expected 'verified'")


# The console events a stale translation can cause (not an emergency or rescue shell).
_CRASHES = ("kernel panic", "kernel oops", "kernel BUG")
# What a stale translation of self-modified code looks like in an x86 guest: the INT3
# the kernel planted while patching, run after the patch was done.
_STRAY_INT3 = re.compile(r"\bOops: int3\b|\bint3: 0000\b")


@dataclass(frozen=True)
class Blame:
    """Who failed a boot: "guest" (the image) or "emulator" (QEMU or the host), and why."""

    who: str
    why: str

    def __str__(self) -> str:
        if self.who == "emulator":
            return f"The emulator failed, not the guest: {self.why}"
        return f"The guest failed: {self.why}"


def blame(outcome: Outcome, checks: Sequence[Check], events: Sequence[ConsoleEvent], *,
          qemu_returncode: int | None, qemu_detail: str = "",
          stalls: Sequence[ConsoleEvent] = (), racy_tcg: bool = False,
          console_lines: int = 0) -> Blame | None:
    """Whether a failed boot is the image's fault or the emulator's (None: it passed).

    Only what is known to be QEMU's or the host's is put on the emulator: QEMU ending
    with an error, a firmware that never printed, a stray INT3 under a multi-threaded
    TCG that is known to run stale code (*racy_tcg*), and a timeout with the guest's
    vCPUs starved. Everything else is the guest's; an oops is never hidden either way,
    and on a racy TCG the guest's crash says that the emulator may be behind it.
    """
    failed = [c for c in checks if not c.passed]
    if not failed:
        return None
    if outcome is Outcome.EXITED and (qemu_returncode or 0) != 0:
        return Blame("emulator", f"QEMU stopped with {qemu_detail or 'an error'}")
    if events:
        first = events[0]
        if racy_tcg and any(_STRAY_INT3.search(e.text) for e in events):
            return Blame("emulator", f"{first} is the INT3 the kernel plants while it patches "
                                     "its own code, run from a stale translation by this QEMU's "
                                     "multi-threaded TCG; run single-threaded TCG or a newer "
                                     "QEMU")
        if racy_tcg and first.kind in _CRASHES:
            # Other crashes can come from the same stale code; they stay the guest's
            # (nothing known clears the image), but the report says how to tell.
            return Blame("guest", f"{first}; this QEMU's multi-threaded TCG is known to run "
                                  "stale code with several vCPUs, so the emulator may be the "
                                  f"cause: boot again with {TCG_THREADS_ENV}=single to tell")
        return Blame("guest", str(first))
    if outcome is Outcome.TIMEOUT:
        if console_lines == 0:
            return Blame("emulator", "nothing at all reached the serial console, not even "
                                     "from the firmware")
        if stalls:
            return Blame("emulator", f"the host starved the guest's vCPUs ({len(stalls)} "
                                     f"stall(s), first on console line {stalls[0].line}) "
                                     "until the timeout; retry on a less busy host or "
                                     "raise --timeout")
        return Blame("guest", "no READY report before the timeout; the console log shows "
                              "where the boot stopped")
    if outcome is Outcome.EXITED:
        return Blame("guest", "the guest rebooted or powered off before its READY report")
    return Blame("guest", "; ".join(f"{c.name}: {c.detail}" for c in failed))
