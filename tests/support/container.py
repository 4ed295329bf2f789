"""Running a container image cerulean built, the way a privileged container runtime would.

`podman run` cannot start containers on every machine the tests run on, so the
image is unpacked with umoci and its entrypoint started in a namespaced chroot
(cerulean.build.chroot.chroot_command): a mount and PID namespace of its own, its
root a mount point, /proc, /dev and /run mounted, the host network with the host's
/etc/resolv.conf and /etc/hosts, and the host paths it is given bound in at the same
paths.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from cerulean.build.chroot import chroot_command
from cerulean.testbed import process


def unpack(layout: Path, ref: str, dest: Path) -> Path:
    """Unpack *layout*'s *ref* into *dest* (an OCI runtime bundle); returns its rootfs."""
    umoci = shutil.which("umoci")
    assert umoci, "umoci is not installed (make test installs it)"
    subprocess.run([umoci, "unpack", "--image", f"{layout}:{ref}", str(dest)], check=True,
                   capture_output=True)
    return dest / "rootfs"


def command(rootfs: Path, argv: Sequence[str], *, shared: Sequence[Path] = (),
            env: Mapping[str, str] | None = None, cwd: Path | None = None) -> list[str]:
    """The command line that runs *argv* in the container, *shared* host paths bound in."""
    inner = list(argv)
    if cwd is not None:
        inner = ["sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *inner]
    # As container runtimes do: the host's resolver settings, for the host's network.
    binds = {Path(f): f for f in ("/etc/resolv.conf", "/etc/hosts") if Path(f).is_file()}
    return chroot_command(rootfs, inner, binds={**binds, **{p: str(p) for p in shared}},
                          env=env)


def start(argv: Sequence[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start the container in a process group of its own; it dies with the caller."""
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=process.die_with_parent(signal.SIGKILL))


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> int:
    """Stop it as a runtime does: SIGTERM to its main process (its PID 1: unshare's child,
    since unshare ignores SIGTERM while it waits), SIGKILL to all after *grace_s*."""
    if proc.poll() is None:
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            children = []
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGTERM)
        if not children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
