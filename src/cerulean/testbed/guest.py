"""Running a script inside a booted guest, with files in and results out.

Works with any systemd (v256 or newer) guest, Cerulean or not, without a
network, an agent or changes to the image:

- the script and its input files go in as a tar archive written straight onto
  a read-only virtio disk (serial ``cerin``);
- a systemd unit that unpacks and runs it is handed to the guest's systemd as
  the ``systemd.extra-unit.*`` credential through SMBIOS (type 11), and a
  ``systemd.unit-dropin.multi-user.target`` credential makes multi-user.target
  want it, so it runs once the system is up;
- the script writes results into the directory given as ``$1``, which is
  archived onto a second, writable virtio disk (serial ``cerout``) and read
  back on the host with every path checked (``tarfile``'s data filter);
- the unit prints a ``CERULEAN-GUEST-*`` line with the exit status on the
  console and powers the guest off.

The guest's uptime when the unit starts is reported too: the time it took
that system to reach multi-user.target.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cerulean.errors import CeruleanError
from cerulean.testbed import process
from cerulean.testbed.arch import qemu_opt
from cerulean.testbed.qemu import QemuConfig, prepare

UNIT = "cerulean-guest-run.service"
_DONE = re.compile(rb"CERULEAN-GUEST-DONE rc=(\d+)")
_START = re.compile(rb"CERULEAN-GUEST-START uptime=([0-9.]+)")

_RUNNER = """\
#!/bin/sh
# Runs inside the guest: the script, then its results onto the output disk.
out=/run/cerulean-guest/out
mkdir -p "$out"
cd /run/cerulean-guest/in && sh ./run.sh "$out" > "$out/stdout" 2> "$out/stderr"
rc=$?
tar -cf /dev/disk/by-id/virtio-cerout -C "$out" .
sync
echo "CERULEAN-GUEST-DONE rc=$rc" > /dev/console
systemctl --no-block poweroff
"""

_DISKS = "/dev/disk/by-id/virtio-cerin /dev/disk/by-id/virtio-cerout"

# The unit does not require the two disks' device units: a device job gives up after 90 s
# (DefaultDeviceTimeoutSec), which an emulated guest on a busy host can take to find its
# disks, and the script would never run. udevadm waits for them for up to 15 minutes, and
# a guest that never finds them says so and powers off.
UNIT_TEXT = f"""\
[Unit]
Description=Run a script handed in by cerulean.testbed
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "CERULEAN-GUEST-START uptime=$$(cut -d" " -f1 /proc/uptime)" \\
  > /dev/console; \\
  if ! udevadm wait --timeout=900 {_DISKS}; then \\
    echo "CERULEAN-GUEST-DONE rc=125 (the input and output disks did not appear)" \\
      > /dev/console; systemctl --no-block poweroff; exit 1; fi; \\
  mkdir -p /run/cerulean-guest/in && \\
  tar -xf /dev/disk/by-id/virtio-cerin -C /run/cerulean-guest/in && \\
  exec sh /run/cerulean-guest/in/.cerulean-runner'
"""


def credential_args(name: str, value: str) -> list[str]:
    """QEMU options that hand the guest's systemd the credential *name* = *value*."""
    b64 = base64.b64encode(value.encode()).decode()
    return ["-smbios", f"type=11,value=io.systemd.credential.binary:{name}={b64}"]


@dataclass
class GuestRun:
    """The outcome of :func:`run_in_guest`."""

    returncode: int | None  # the script's exit status; None if it never finished
    out_dir: Path  # what the script wrote into $1, plus its stdout and stderr
    console_log: Path
    elapsed_s: float  # from starting QEMU to its exit
    uptime_at_start_s: float | None  # guest uptime when multi-user.target let the unit run

    def text(self, name: str) -> str:
        p = self.out_dir / name
        return p.read_text(errors="replace") if p.is_file() else ""


def _input_tar(script: str, files: dict[str, Path], dest: Path) -> None:
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, text in (("run.sh", script), (".cerulean-runner", _RUNNER)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
        for name, path in files.items():
            if not path.exists():
                raise CeruleanError(f"The file {path} for the guest does not exist.")
            tar.add(path, arcname=name)
    # A disk is whole 512-byte sectors; tar already pads to 10 KiB records.
    assert dest.stat().st_size % 512 == 0


def _read_output(raw: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(raw, "r:") as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise CeruleanError(f"The guest's output disk holds no readable archive ({e}).") from None


def run_in_guest(disk: Path, script: str, *, files: dict[str, Path] | None = None,
                 cfg: QemuConfig | None = None, timeout_s: float = 900,
                 out_dir: Path, out_mib: int = 64) -> GuestRun:
    """Boot *disk*, run *script* (sh) as root once multi-user.target is reached, power off.

    *files* (name in the guest's working directory -> host path, directories
    included) go in next to the script. Results land in *out_dir*; the console
    log is ``out_dir/console.log``.
    """
    cfg = cfg or QemuConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    console_log = out_dir / "console.log"
    console_log.write_bytes(b"")
    with tempfile.TemporaryDirectory(prefix="cerulean-guest-") as tmp_s:
        tmp = Path(tmp_s)
        in_tar, out_raw = tmp / "in.tar", tmp / "out.raw"
        _input_tar(script, files or {}, in_tar)
        with out_raw.open("wb") as f:
            f.truncate(out_mib * 1024 * 1024)
        extra = [
            "-drive", f"if=none,id=cerin,format=raw,readonly=on,file={qemu_opt(in_tar)}",
            "-device", "virtio-blk-pci,drive=cerin,serial=cerin",
            "-drive", f"if=none,id=cerout,format=raw,file={qemu_opt(out_raw)}",
            "-device", "virtio-blk-pci,drive=cerout,serial=cerout",
            *credential_args(f"systemd.extra-unit.{UNIT}", UNIT_TEXT),
            *credential_args("systemd.unit-dropin.multi-user.target",
                             f"[Unit]\nWants={UNIT}\n"),
        ]
        run_cfg = dataclasses.replace(cfg, extra_args=(*cfg.extra_args, *extra))
        launch = prepare(disk, run_cfg, tmp, console=console_log)
        started = time.monotonic()
        proc = process.start(launch.argv, stderr=tmp / "qemu.stderr")
        rc: int | None = None
        uptime: float | None = None
        try:
            deadline = started + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                text = console_log.read_bytes()
                m = _DONE.search(text)
                if m:
                    rc = int(m.group(1))
                    # Give the guest a little time to power off by itself.
                    end = time.monotonic() + 60
                    while proc.poll() is None and time.monotonic() < end:
                        process.pause(proc, 0.5)
                    break
                process.pause(proc, 0.5)
        finally:
            process.stop(proc)
        elapsed = time.monotonic() - started
        text = console_log.read_bytes()
        if rc is None and (m := _DONE.search(text)):
            rc = int(m.group(1))
        if (s := _START.search(text)) is not None:
            uptime = float(s.group(1))
        if rc is not None:
            if b"disks did not appear" in text:
                raise CeruleanError(f"The guest never saw its input and output disks (its "
                                    f"console: {console_log}).")
            _read_output(out_raw, out_dir / "result")
    return GuestRun(rc, out_dir / "result", console_log, elapsed, uptime)
