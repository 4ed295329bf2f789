"""``cerulean boot`` and ``cerulean test``: run a disk image in QEMU, by hand or as a test."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cerulean.testbed.qemu import QemuConfig

_DISK_HELP = "disk image to boot (raw, qcow2, vpc/VHD or vhdx with a GPT and an ESP)"
_ACCEL_HELP = ("auto (default: KVM if a short probe shows it works, else TCG), kvm or tcg; "
               "the environment variable CERULEAN_ACCEL does the same")

_BOOT_DESCRIPTION = """\
Boot a disk image in QEMU with its serial console on this terminal, to log in
and look around. QEMU runs on a throwaway qcow2 overlay and a copy of the UEFI
variable store, so the disk image itself is never changed; everything written
in the VM is gone when QEMU stops.

Quit with Ctrl-A X. Ctrl-A C switches between the console and the QEMU monitor.

Examples:
  cerulean boot out/vm-amd64.qcow2
  cerulean boot out/vm-arm64.qcow2 --memory 4096 --cpus 4
  cerulean boot out/vm-amd64.qcow2 --ssh-port 2222    then: ssh -p 2222 USER@127.0.0.1
"""

_TEST_DESCRIPTION = """\
Boot a disk image headless in QEMU (on a throwaway overlay; the image is not
changed) and check that it comes up healthy. The image reports on its serial
console once multi-user.target is reached (the CERULEAN-READY block); the
test watches the console until that report, a kernel panic or oops, an
emergency shell, or the timeout, then stops QEMU and checks:

  no timeout                         the boot ended before --timeout
  multi-user reached                 the READY report arrived
  no failed units                    systemd lists no failed units
  no panic, oops or emergency shell  nothing of the kind on the console
  /usr read-only                     /usr is mounted ro
  /usr on device-mapper              /usr comes from /dev/mapper/* or /dev/dm-*
  /usr verity verified               /usr is a dm-verity device
  boot marked good                   systemd-bless-boot marked the boot good
                                     (boot-complete.target reached), so
                                     systemd-boot's boot counting keeps the slot

The console log is kept as DISK-STEM.console.log in --log-dir. Exit status
is 0 if every check passed, 1 otherwise; a failed test says whether the guest
failed (the image) or the emulator did (QEMU or a starved host). Under TCG (no
working KVM) a boot takes one to two minutes.

Examples:
  cerulean test out/vm-amd64.qcow2
  cerulean test out/vm-arm64.qcow2 --timeout 900 --log-dir logs/ --json
"""


def _add_vm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("disk", type=Path, metavar="DISK", help=_DISK_HELP)
    p.add_argument("--arch", help="amd64 or arm64 (default: detected from the disk's "
                                  "partition types or its ESP's boot loader)")
    p.add_argument("--memory", type=int, default=2048, metavar="MIB",
                   help="guest memory in MiB (default: 2048)")
    p.add_argument("--cpus", type=int, default=0, metavar="N",
                   help="guest CPUs (default: 1 under emulation, 2 under KVM; on QEMU "
                        "older than 9.1 several emulated CPUs share one host thread)")
    p.add_argument("--accel", default="auto", metavar="auto|kvm|tcg", help=_ACCEL_HELP)
    p.add_argument("--disk-size", type=int, metavar="MIB",
                   help="give the VM a larger disk than the image, as a cloud would (the "
                        "image grows its root file system into it on first boot)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    boot = sub.add_parser(
        "boot", help="boot a disk image in QEMU with its console on this terminal",
        description=_BOOT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_vm_options(boot)
    boot.add_argument("--ssh-port", type=int, metavar="PORT",
                      help="forward 127.0.0.1:PORT on this host to the guest's SSH port 22")
    boot.set_defaults(func=run_boot)

    test = sub.add_parser(
        "test", help="boot a disk image headless and check it comes up healthy",
        description=_TEST_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_vm_options(test)
    test.add_argument("--timeout", type=float, default=600.0, metavar="S",
                      help="give up after S seconds without a READY report (default: 600)")
    test.add_argument("--log-dir", type=Path, metavar="DIR",
                      help="where to keep the console log (default: next to the disk)")
    test.add_argument("--json", action="store_true", help="print the result as JSON")
    test.set_defaults(func=run_test)

    demo = sub.add_parser(
        "demo", help="a fleet server and a VM that enrolls in it by itself, on this machine",
        description="Start a fleet server (SQLite), boot DISK in QEMU with the systemd "
        "credential cerulean.fleet (as a cloud's user data hands it in), wait until its "
        "agent has enrolled and reported, then print the dashboard's address and login. "
        "Both keep running until Ctrl-C.")
    demo.add_argument("disk", type=Path, metavar="DISK", help="a Cerulean system image")
    demo.add_argument("--dir", type=Path, default=Path("out/fleet-demo"),
                      help="the fleet's data, login and logs (default: out/fleet-demo)")
    demo.add_argument("--port", type=int, default=8443, help="the server's port (8443)")
    demo.add_argument("--timeout", type=float, default=1200.0, metavar="S",
                      help="give up if the VM has not enrolled after S seconds (1200)")
    demo.add_argument("--no-wait", action="store_true",
                      help="stop the VM and the server once the host shows up")
    demo.set_defaults(func=run_demo)


def _config(args: argparse.Namespace, ssh_port: int | None = None) -> QemuConfig:
    from cerulean.testbed.qemu import QemuConfig

    return QemuConfig(arch=args.arch, memory_mib=args.memory, cpus=args.cpus,
                      accel=args.accel, ssh_port=ssh_port, disk_size_mib=args.disk_size)


def run_boot(args: argparse.Namespace) -> int:
    from cerulean.testbed.qemu import boot_interactive

    rc = boot_interactive(args.disk, _config(args, args.ssh_port))
    return 0 if rc == 0 else 1


def run_demo(args: argparse.Namespace) -> int:
    from cerulean.testbed.demo import run_demo

    return run_demo(args.disk, args.dir, args.port, args.timeout, wait=not args.no_wait)


def run_test(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.status import Status

    from cerulean.testbed.qemu import Launch, run_test

    con = Console(stderr=True, highlight=False, soft_wrap=True)
    status: Status | None = None

    def started(launch: Launch, console_log: Path) -> None:
        nonlocal status
        if args.json:
            return
        threads = f", {launch.threads.reason}" if launch.threads else ""
        con.print(f"Booting {args.disk} ({launch.arch}, {launch.accel.accel.upper()}: "
                  f"{launch.accel.reason}{threads}); console log: {console_log}", markup=False)
        if launch.accel.accel == "tcg":
            con.print("Under emulation a boot takes one to two minutes (arm64: up to five).",
                      markup=False)
        if con.is_terminal:
            status = con.status("Booting", spinner="dots")
            status.start()

    def progress(elapsed: float, line: str) -> None:
        if status is not None:
            room = max(20, con.width - 30)
            text = line if len(line) <= room else line[:room - 1] + "…"
            status.update(f"Booting: {elapsed:4.0f} s  {escape(text)}")

    try:
        res = run_test(args.disk, _config(args), timeout_s=args.timeout, log_dir=args.log_dir,
                       on_start=started, on_progress=progress)
    finally:
        if status is not None:
            status.stop()
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
        return 0 if res.passed else 1
    width = max(len(c.name) for c in res.checks)
    for c in res.checks:
        mark = "[green]✓[/]" if c.passed else "[red]✗[/]"
        con.print(f"{mark} {c.name.ljust(width)}  ", end="")
        con.print(c.detail, markup=False)
    if res.time_to_ready_s is not None:
        uptime = (f" (guest uptime {res.guest_uptime_s:g} s)"
                  if res.guest_uptime_s is not None else "")
        con.print(f"Time to ready: {res.time_to_ready_s:.1f} s{uptime}")
    failed = [c for c in res.checks if not c.passed]
    if failed:
        if res.blame is not None:
            con.print(str(res.blame), markup=False)
        con.print(f"[bold red]FAILED[/]: {len(failed)} of {len(res.checks)} checks; "
                  "the console log is ", end="")
    else:
        con.print(f"[bold green]PASSED[/]: all {len(res.checks)} checks; console log ", end="")
    con.print(str(res.console_log), markup=False)
    return 0 if res.passed else 1
