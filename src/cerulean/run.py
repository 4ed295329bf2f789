"""The single way Cerulean runs external tools.

The command line is logged, output is captured, and a failure becomes a
:class:`CeruleanError` that says which tool failed and what it printed.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from cerulean.errors import CeruleanError

log = logging.getLogger("cerulean.run")


def require_tool(name: str, package: str | None = None) -> str:
    """Return the path of tool *name*, or fail saying which package provides it."""
    path = shutil.which(name)
    if path is None:
        hint = f" (install the Debian package '{package or name}')" if package or name else ""
        raise CeruleanError(f"The tool '{name}' is needed but was not found on PATH{hint}.")
    return path


def run(
    argv: Sequence[str | Path],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run *argv*, capturing stdout and stderr; raise CeruleanError on failure."""
    args = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            input=input,
            capture_output=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise CeruleanError(f"The tool '{args[0]}' was not found.") from None
    except subprocess.TimeoutExpired:
        raise CeruleanError(f"'{shlex.join(args)}' did not finish within {timeout} s.") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        last = detail.splitlines()[-1] if detail else "no output"
        raise CeruleanError(
            f"'{Path(args[0]).name}' failed with exit code {proc.returncode}: {last}"
        )
    return proc
