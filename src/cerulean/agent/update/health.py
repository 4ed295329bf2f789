"""The health check that decides whether a boot is kept (part of boot-complete.target).

Healthy means: no failed units, the updater's timer is active (the agent
runs), every hook script exits 0, and, on the boots that judge a new release
of a host that had a network when it installed it, a default route (see
:meth:`cerulean.agent.update.updater.Updater.network_expected`).
Hooks are executables in ``/usr/lib/cerulean/health.d/`` (from the image) and
``/etc/cerulean/health.d/`` (the administrator's; a file of the same name
replaces the image's, an empty one turns it off). Each gets 60 seconds.

A host with an update repository must also be able to update from this release
(:func:`update_client`): its configuration reads, python3-tuf loads, the TUF
client sets up and verifies the root this host trusts, and, when there is a
default route, a real refresh of the metadata (60 seconds at most) fails for no
reason of this release's own. What the repository or the network answers
(unreachable, expired, older or badly signed metadata) is printed, not held
against the release: the previous release would get the same answer, anyone on
the network path can produce it, and a release given up is never tried again.
On the boot that judges a new release, a verified channel that has withdrawn it
since it was installed fails the check (the release is then given up).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cerulean.agent.update.client import RepoClient
from cerulean.agent.update.errors import UpdateError
from cerulean.agent.update.host import Host, load_config

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


def _root_verifies(path: Path) -> str:
    """A problem if this release cannot read and verify the root in *path*."""
    try:
        from tuf.api.metadata import Metadata, Root

        md = Metadata.from_file(str(path))
        if not isinstance(md.signed, Root):
            raise ValueError(f"it is {md.signed.type} metadata")
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except Exception as e:  # whatever it is, this release cannot verify its updates
        return (f"the update client cannot verify the root this host trusts "
                f"({path}): {str(e).rstrip('.') or type(e).__name__}")
    return ""


def update_client(host: Host, *, ask: bool = True, wait: float = 60,
                  say: Callable[[str], None] = print) -> list[str]:
    """Problems that keep this release from updating (empty: none found, or updates off).

    *ask*: refresh the metadata from the repository (there is a network to ask it
    over), for *wait* seconds at most.
    """
    try:
        cfg = load_config(host)
    except UpdateError as e:
        return [f"the update configuration cannot be read: {e}"]
    if not cfg.url or cfg.never:
        return []
    try:
        client = RepoClient(cfg.url, host.state_dir, host.trusted_root)
    except (UpdateError, OSError) as e:
        return [f"the update client cannot be set up: {e}"]
    problem = _root_verifies(client.meta_dir / "root.json")
    if problem and not _root_verifies(host.trusted_root):
        # The host's trusted copy is damaged, but this release verifies the image's root:
        # the updater seeds it again from there (a state problem, not this release's).
        say(f"note: {problem}; the image's root verifies, and the updater starts again "
            "from it")
        problem = ""
    if problem:
        return [problem]
    if not ask:
        say("note: no network, so the update repository was not asked")
        return []
    failed: list[BaseException] = []
    done = threading.Event()

    def refresh() -> None:
        try:
            client.refresh()
        except BaseException as e:  # handed over to the health check's thread
            failed.append(e)
        done.set()

    # A daemon thread: one that hangs past *wait* is left behind as the check ends.
    threading.Thread(target=refresh, name="health-update-refresh", daemon=True).start()
    if not done.wait(wait):
        say(f"note: the update repository did not answer within {wait:g} s; this "
            "release is not judged by it")
        return []
    from tuf.api.exceptions import DownloadError, RepositoryError

    if not failed:
        return _withdrawn(host, client, cfg.channel, say)
    err = failed[0]
    if isinstance(err, UpdateError) and isinstance(err.__cause__,
                                                   DownloadError | RepositoryError):
        say(f"note: {err} This release is not judged by what the repository answers.")
        return []
    return [f"the update client fails on this release: {err}"]


def _withdrawn(host: Host, client: RepoClient, channel: str,
               say: Callable[[str], None]) -> list[str]:
    """On the boot that judges a new release: whether its channel withdrew it since it
    was installed (an unplanned reboot can come before the updater takes its entry
    away). Only a verified channel document counts; one that cannot be read is a note."""
    from cerulean.agent.update.host import load_state

    staged = load_state(host).staged
    try:
        version, image = host.version, host.image
    except (UpdateError, OSError):
        return []
    if not staged or staged.get("version") != version:
        return []  # not a boot that judges a new release
    try:
        doc = client.channel(channel)
    except UpdateError as e:
        say(f"note: {e} Whether {version} is still offered was not checked.")
        return []
    entry = doc.find(image, version)
    if entry is None or entry.state == "withdrawn":
        how = "withdrawn from" if entry is not None else "no longer offered by"
        return [f"{version} was {how} the {channel} channel after it was installed"]
    return []


def check(host: Host, *, network: bool = True, network_wait: float = 90,
          repo_wait: float = 60, say: Callable[[str], None] = print) -> list[str]:
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
    problems += update_client(host, ask=default_route(), wait=repo_wait, say=say)
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
