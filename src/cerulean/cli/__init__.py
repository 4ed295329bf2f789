"""The ``cerulean`` command: one thin module per command group, no logic of its own.

Errors meant for users (:class:`CeruleanError`) are printed as one sentence
with a non-zero exit; an interrupt exits 130, and SIGTERM ends the process by the
signal, each without a traceback and after the command has cleaned up (mounts,
temporary trees, VMs).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from cerulean import __version__
from cerulean.cli import agentdeb, build, fleet, images, lock, publisher, release, testbed
from cerulean.errors import CeruleanError

DESCRIPTION = """\
Cerulean Linux: build minimal, reproducible OS images from the Debian archive.

Typical use:
  cerulean images                          list the built-in image definitions
  cerulean lock images/base.toml           pin exact package versions in images/base.lock
  cerulean build images/base.toml          build OCI images for amd64 and arm64 into out/
  cerulean lock --refresh images/base.toml move the lock to the newest packages
  cerulean test out/base.amd64.raw         boot a disk image in QEMU and check it is healthy
  cerulean boot out/base.amd64.raw         boot a disk image with its console on this terminal
  cerulean release --help                  releases, the signed update repository, rollouts
  cerulean publisher --help                security fixes to signed releases, unattended
  cerulean agent-deb                       the host agent's .deb, for existing Debian servers
  cerulean fleet --help                    the fleet server: enrollment, inventory, alerts
  cerulean demo out/vm-amd64.qcow2         a fleet server and a VM that enrolls in it
"""


def _print_error(message: str) -> None:
    from rich.console import Console

    # The message is plain text (it may contain [brackets]) and is kept on one line.
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print("[bold red]error:[/] ", end="")
    err.print(message, markup=False, soft_wrap=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cerulean",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"cerulean {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step and command")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for module in (images, lock, build, release, publisher, testbed, agentdeb, fleet):
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    # SIGTERM (a service manager, `timeout`, a CI runner) unwinds like Ctrl-C, then
    # ends the process by the signal as before; by default Python would die on the spot
    # and leave mounts, temporary trees or a fleet server behind. A handler set by
    # whoever started us (SIG_IGN included) is left alone.
    ours = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        rc: int = args.func(args)
        return rc
    except CeruleanError as e:
        _print_error(str(e))
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
        return 128 + signal.SIGTERM  # not reached
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Terminated(SystemExit):
    """SIGTERM arrived: raised in the main thread so that cleanup (``finally`` blocks,
    context managers: mounts, temporary trees, child processes) runs as for Ctrl-C. A
    SystemExit, so no ``except Exception`` swallows it and an event loop (asyncio,
    uvloop) stops on it instead of logging it and carrying on."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(128 + signal.SIGTERM)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
