"""Running programs inside a directory tree: a namespaced chroot.

Maintainer scripts and image tools run as root inside a private mount and PID
namespace (``unshare``), with ``/proc`` and ``/dev`` mounted for them and the
host paths they need bind-mounted in. Nothing they mount outlives the call,
and a process they leave behind dies with the namespace. For a foreign
architecture, binfmt_misc with qemu-user-static runs the tree's binaries.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from cerulean.arch import get, host_arch
from cerulean.errors import CeruleanError
from cerulean.run import require_tool

BASE_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "SYSTEMD_OFFLINE": "1",
    "HOME": "/root",
    "TERM": "dumb",
}

def ensure_binfmt(arch: str) -> None:
    """Make *arch* binaries runnable on this host through qemu-user-static."""
    if arch == host_arch():
        return
    name = get(arch).qemu_user
    node = Path("/proc/sys/fs/binfmt_misc")
    if not (node / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(node)],
                       capture_output=True, check=False)
    if not (node / name).exists():
        if not Path(f"/usr/share/binfmts/{name}").exists():
            raise CeruleanError(
                f"Building for {arch} on this host needs qemu-user-static and binfmt-support "
                "(install the Debian packages qemu-user-static and binfmt-support)."
            )
        subprocess.run(["update-binfmts", "--enable", name], capture_output=True, check=False)
    state = (node / name).read_text() if (node / name).exists() else ""
    if not state.startswith("enabled"):
        raise CeruleanError(
            f"Running {arch} programs needs binfmt_misc with {name} enabled; it could not be "
            "enabled (try: update-binfmts --enable " + name + ")."
        )
    flags = next((line.split(":", 1)[1] for line in state.splitlines()
                  if line.startswith("flags:")), "")
    if "F" not in flags:
        raise CeruleanError(
            f"The binfmt_misc entry {name} lacks the F flag, so it cannot run inside a chroot "
            "(use Debian's qemu-user-static, which registers it with F)."
        )


def chroot_command(
    root: Path,
    argv: Sequence[str],
    *,
    binds: Mapping[Path, str] | None = None,
    ro_binds: Mapping[Path, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """The command line that runs *argv* inside *root* in its own mount and PID namespace,
    with /proc, /dev and /run mounted and *binds* (host path → path inside) bound in."""
    if os.geteuid() != 0:
        raise CeruleanError("Building system images needs root (for chroot and mounts).")
    unshare = require_tool("unshare", "util-linux")
    # The tree is bound onto itself first, so that it is a mount point: inside, "/" can then
    # have its propagation changed, and a build run in here can start chroots of its own.
    mounts = ['mount --rbind "$R" "$R"', 'mount -t proc proc "$R/proc"',
              'mount --rbind /dev "$R/dev"', 'mount -t tmpfs tmpfs "$R/run"']
    for kind, table in (("--bind", binds or {}), ("--bind", ro_binds or {})):
        for host, inside in table.items():
            target = f'"$R"/{shlex.quote(inside.lstrip("/"))}'
            if Path(host).is_dir():
                make = f"mkdir -p {target}"
            else:
                make = f'mkdir -p "$(dirname {target})" && touch {target}'
            src = shlex.quote(str(Path(host).resolve()))
            mounts.append(f"{make} && mount {kind} {src} {target}")
            if table is ro_binds:
                mounts.append(f"mount -o remount,bind,ro {target}")
    script = "set -e; R=$0; " + "; ".join(mounts) + '; exec chroot "$R" "$@"'
    full_env = {**BASE_ENV, **(env or {})}
    root = root.resolve()
    for d in ("proc", "dev", "run"):
        (root / d).mkdir(exist_ok=True)
    return [unshare, "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
            "sh", "-c", script, str(root), "env", "-i",
            *[f"{k}={v}" for k, v in full_env.items()], *argv]


def run_in(
    root: Path,
    argv: Sequence[str],
    *,
    binds: Mapping[Path, str] | None = None,
    ro_binds: Mapping[Path, str] | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    what: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run *argv* inside *root*; *binds* maps host paths to paths inside the tree."""
    cmd = chroot_command(root, argv, binds=binds, ro_binds=ro_binds, env=env)
    root = root.resolve()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout,
                              errors="replace")
    except subprocess.TimeoutExpired:
        raise CeruleanError(f"{what or argv[0]} did not finish within {timeout} s.") from None
    if check and proc.returncode != 0:
        out = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        detail = " | ".join(line.strip() for line in out[-3:]) if out else "no output"
        raise CeruleanError(
            f"{what or argv[0]} failed inside {root} (exit code {proc.returncode}): {detail}"
        )
    return proc
