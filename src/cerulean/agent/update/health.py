"""The health check that decides whether a boot is kept (part of boot-complete.target).

Healthy means: no failed units, the updater's timer is active (the agent
runs), every hook script exits 0, and, on the boots that judge a new release
of a host that had a network when it installed it, a default route (see
:meth:`cerulean.agent.update.updater.Updater.network_expected`).
Hooks are executables in ``/usr/lib/cerulean/health.d/`` (from the image) and
``/etc/cerulean/health.d/`` (the administrator's; a file of the same name
replaces the image's, an empty one turns it off). Each gets 60 seconds.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from cerulean.agent.update.host import Host

IGNORED_UNITS = ("cerulean-health.service", "cerulean-health-failed.service")


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(argv, 127, "", str(e))


def failed_units() -> list[str]:
    r = _run(["systemctl", "list-units", "--failed", "--plain", "--no-legend"])
    return [line.split()[0] for line in r.stdout.splitlines()
            if line.split() and line.split()[0] not in IGNORED_UNITS]


def default_route() -> bool:
    r = _run(["ip", "route", "show", "default"])
    return r.returncode == 0 and bool(r.stdout.strip())


def hooks(host: Host) -> list[Path]:
    by_name: dict[str, Path] = {}
    for d in ("/usr/lib/cerulean/health.d", "/etc/cerulean/health.d"):
        path = host.p(d)
        for f in sorted(path.iterdir()) if path.is_dir() else []:
            if f.is_file():
                by_name[f.name] = f
    return [by_name[n] for n in sorted(by_name)
            if by_name[n].stat().st_size > 0 and os.access(by_name[n], os.X_OK)]


def check(host: Host, *, network: bool = True, network_wait: float = 90,
          say: Callable[[str], None] = print) -> list[str]:
    """Every problem found (empty: healthy); *network*: a default route is required."""
    problems = []
    if network:
        deadline = time.monotonic() + network_wait
        while not default_route() and time.monotonic() < deadline:
            time.sleep(2)
        if not default_route():
            problems.append("no default route (the network is not up)")
    if _run(["systemctl", "is-active", "--quiet", "cerulean-update.timer"]).returncode != 0:
        problems.append("the updater (cerulean-update.timer) is not active")
    for hook in hooks(host):
        r = _run([str(hook)], timeout=60)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
            problems.append(f"health hook {hook.name} failed: {tail[0]}")
    failed = failed_units()
    if failed:
        problems.append("failed units: " + ", ".join(failed))
    for p in problems:
        say(f"unhealthy: {p}")
    return problems
