"""Starting and stopping the QEMU processes the testbed runs.

A background QEMU runs in its own session so a Ctrl-C at the terminal reaches
Cerulean, which then stops QEMU itself: first politely (SIGTERM lets QEMU
flush its files and restore the terminal), then with SIGKILL. Should
Cerulean itself be killed, the kernel kills QEMU too (Linux's parent-death
signal), so no VM is ever left running on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cerulean.errors import CeruleanError

log = logging.getLogger("cerulean.testbed")

STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., Any] | None:
    """libc's prctl(), loaded before any fork; None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., Any] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: signal.Signals) -> functools.partial[None] | None:
    prctl = _prctl()
    if prctl is None:
        return None
    return functools.partial(_set_parent_death_signal, prctl, sig, os.getpid())


def _set_parent_death_signal(prctl: Callable[..., Any], sig: signal.Signals, parent: int) -> None:
    # Runs in the child between fork and exec.
    prctl(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:  # the parent died before prctl() took effect
        os._exit(1)


def start(argv: Sequence[str], *, stderr: Path | None = None,
          background: bool = True) -> subprocess.Popen[bytes]:
    """Start *argv*; in the background its stdin/stdout are closed and stderr goes to a file."""
    log.debug("start: %s", shlex.join(argv))
    try:
        if not background:
            # SIGTERM, so an orphaned interactive QEMU still restores the terminal.
            return subprocess.Popen(list(argv), preexec_fn=die_with_parent(signal.SIGTERM))
        with open(stderr or "/dev/null", "wb") as err:
            return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True,
                                    preexec_fn=die_with_parent(signal.SIGKILL))
    except OSError as e:
        raise CeruleanError(f"Could not start {argv[0]}: {e.strerror or e}.") from None


def stop(proc: subprocess.Popen[bytes], grace_s: float | None = None) -> int:
    """Stop *proc* if it still runs and reap it; return its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S if grace_s is None else grace_s)
        except subprocess.TimeoutExpired:
            # A vCPU stuck in the host kernel can ignore SIGTERM; SIGKILL cannot be ignored.
            log.debug("pid %d ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()
    return proc.returncode


def pause(proc: subprocess.Popen[bytes], seconds: float) -> None:
    """Sleep *seconds*, or less if *proc* exits meanwhile (so polling loops never spin)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)


def tail(path: Path, lines: int = 20) -> str:
    """The last *lines* non-empty lines of a text file, or "" if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])
