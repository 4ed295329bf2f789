"""Boot time: a Cerulean system image next to plain Debian, booted the same way, in one run.

For each architecture it builds the Cerulean image (default ``vm``) and the plain
Debian system of ``system_bench.py`` (minbase + systemd + the cloud kernel, booted
OVMF/AAVMF → systemd-boot → UKI → ext4 root), then boots them in turn, ``--boots``
times each, under the testbed's QEMU settings (TCG here). In every boot a script
run after multi-user.target (``cerulean.testbed.guest``) records systemd's own
timestamps (firmware, loader, kernel, initrd, userspace), ``systemd-analyze blame``
and ``critical-chain``; for Cerulean the READY report's uptime is read from the
console. It prints a Markdown report (docs/benchmarks.md) and writes
benchmarks/results/boot.json and the last boot's blame per system.

    .venv/bin/python benchmarks/boot_bench.py [--arch amd64,arm64] [--boots 3]
        [--image vm] [--work DIR]  # DIR keeps the disks: a second run boots them again
        [--cerulean-disk ARCH=PATH]  # boot this image instead of building one
        [--before-disk ARCH=PATH]    # and this one too, as "before" (an older build)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from build_bench import CERULEAN, RESULTS, ROOT, mirror, timed
from system_bench import plain_debian

from cerulean.build.chroot import ensure_binfmt
from cerulean.testbed.console import scan
from cerulean.testbed.guest import GuestRun, run_in_guest
from cerulean.testbed.qemu import QemuConfig

# Run inside both guests once multi-user.target is reached. Boot is not finished
# while this script runs (it is part of the boot), so `systemd-analyze time` would
# refuse: the timestamps come from systemd's properties instead.
PROFILE = r"""
out=$1
for p in FirmwareTimestampMonotonic LoaderTimestampMonotonic InitRDTimestampMonotonic \
         UserspaceTimestampMonotonic SecurityStartTimestampMonotonic \
         SecurityFinishTimestampMonotonic GeneratorsStartTimestampMonotonic \
         GeneratorsFinishTimestampMonotonic UnitsLoadStartTimestampMonotonic \
         UnitsLoadFinishTimestampMonotonic InitRDGeneratorsStartTimestampMonotonic \
         InitRDGeneratorsFinishTimestampMonotonic InitRDUnitsLoadStartTimestampMonotonic \
         InitRDUnitsLoadFinishTimestampMonotonic; do
  echo "$p=$(systemctl show -p "$p" --value)"
done > "$out/times"
echo "MultiUser=$(systemctl show -p ActiveEnterTimestampMonotonic --value multi-user.target)" \
  >> "$out/times"
uname -r > "$out/kernel"
# Cerulean prints its READY report once boot-complete.target has decided the boot: wait
# for it, so the units on its way have their times too.
if [ -x /usr/lib/cerulean/ready-report ]; then
  for i in $(seq 600); do [ -e /run/cerulean-ready.txt ] && break; sleep 1; done
fi
systemd-analyze blame --no-pager > "$out/blame" 2>&1
systemctl show --all '*' > "$out/units" 2>&1 \
  -p Id,After,InactiveExitTimestampMonotonic,ActiveEnterTimestampMonotonic,CPUUsageNSec
"""


def phases(run: GuestRun) -> dict[str, float | None]:
    """Seconds spent in each phase, from systemd's timestamps (µs)."""
    t: dict[str, int] = {}
    for line in run.text("times").splitlines():
        key, _, value = line.partition("=")
        if value.strip().isdigit():
            t[key] = int(value)

    def s(us: int | None) -> float | None:
        return None if us is None else round(us / 1e6, 2)

    initrd, user, multi = (t.get("InitRDTimestampMonotonic"), t.get("UserspaceTimestampMonotonic"),
                           t.get("MultiUser"))
    firmware, loader = t.get("FirmwareTimestampMonotonic"), t.get("LoaderTimestampMonotonic")
    def span(name: str) -> float | None:
        a, b = t.get(f"{name}StartTimestampMonotonic"), t.get(f"{name}FinishTimestampMonotonic")
        return s(b - a) if a and b else None

    return {
        "generators_s": span("Generators"),
        "initrd_generators_s": span("InitRDGenerators"),
        "units_load_s": span("UnitsLoad"),
        "firmware_s": s(firmware - loader) if firmware and loader else None,
        "loader_s": s(loader),
        "kernel_s": s(initrd or user),
        "initrd_s": s(user - initrd) if initrd and user else None,
        "userspace_s": s(multi - user) if multi and user else None,
        "multi_user_s": s(multi),  # since the kernel started
    }


def critical_chain(units_text: str, goal: str) -> list[tuple[str, float, float]]:
    """(unit, when it started, how long it took) on the way to *goal*, earliest first: from
    each unit, the After= dependency that became active last before it started (the
    way ``systemd-analyze critical-chain`` walks, computed here because that command
    refuses while the boot, which includes the script collecting this, has not finished).
    """
    units: dict[str, dict[str, str]] = {}
    for block in units_text.split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in fields:
            units[fields["Id"]] = fields

    def at(unit: dict[str, str], key: str) -> int:
        v = unit.get(key, "0")
        return int(v) if v.isdigit() else 0

    chain: list[tuple[str, float, float]] = []
    name: str | None = goal
    seen: set[str] = set()
    while name is not None and name in units and name not in seen:
        seen.add(name)
        u = units[name]
        start, active = at(u, "InactiveExitTimestampMonotonic"), at(
            u, "ActiveEnterTimestampMonotonic")
        chain.append((name, start / 1e6, max(0, active - start) / 1e6))
        before = [(at(units[d], "ActiveEnterTimestampMonotonic"), d)
                  for d in u.get("After", "").split() if d in units]
        before = [(t, d) for t, d in before if 0 < t <= max(start, active)]
        name = max(before)[1] if before else None
    return chain[::-1]


def boot_once(disk: Path, out: Path, timeout: float) -> dict[str, object]:
    run = run_in_guest(disk, PROFILE, cfg=QemuConfig(), timeout_s=timeout, out_dir=out)
    if run.returncode != 0:
        raise SystemExit(f"the guest run of {disk} failed (rc {run.returncode}); console: "
                         f"{run.console_log}")
    ready = scan(run.console_log.read_bytes(), emulated=True).report
    row: dict[str, object] = {**phases(run), "wall_s": round(run.elapsed_s, 1),
                              "ready_uptime_s": ready.uptime if ready else None}
    goal = "cerulean-ready.service" if ready else "multi-user.target"
    chain = critical_chain(run.text("units"), goal)
    (run.out_dir / "chain").write_text("".join(
        f"{name} @{start:.1f}s +{took:.1f}s\n" for name, start, took in chain))
    return row


def median(rows: list[dict[str, object]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]  # type: ignore[arg-type]
    return round(statistics.median(values), 1) if values else None


def build_cerulean(image: str, arch: str, work: Path) -> Path:
    disk = work / f"{image}-{arch}.qcow2"
    wall, r = timed([str(CERULEAN), "build", str(ROOT / "images" / f"{image}.toml"),
                     "--arch", arch, "--format", "qcow2", "--out", str(work)])
    if r.returncode != 0:
        raise SystemExit(f"cerulean build {image} --arch {arch} failed: {r.stderr[-800:]}")
    print(f"cerulean build {image} {arch}: {wall:.1f} s", file=sys.stderr)
    return disk


def debian_disk(url: str, arch: str, work: Path) -> Path:
    kept = work / f"debian-{arch}.raw"
    if not kept.exists():
        ensure_binfmt(arch)  # mmdebstrap runs an arm64 system's scripts under qemu-user
        with tempfile.TemporaryDirectory(prefix="debian-", dir=work) as tmp:
            raw, seconds = plain_debian(url, arch, [], Path(tmp))
            raw.replace(kept)
        print(f"plain Debian {arch}: {seconds:.1f} s", file=sys.stderr)
    return kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="vm")
    ap.add_argument("--arch", default="amd64,arm64")
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--work", type=Path, help="keep the disks here (default: a temporary one)")
    ap.add_argument("--cerulean-disk", action="append", default=[], metavar="ARCH=PATH")
    ap.add_argument("--before-disk", action="append", default=[], metavar="ARCH=PATH",
                    help="an older Cerulean image to boot in the same run")
    args = ap.parse_args()
    os.chdir(ROOT)  # the tools tree's definition is found in ./images
    given = dict(x.split("=", 1) for x in args.cerulean_disk)
    before = dict(x.split("=", 1) for x in args.before_disk)
    url = mirror()
    result: dict[str, object] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                 "cpus": os.cpu_count(), "image": args.image, "arches": {}}
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="cerulean-bootbench-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    try:
        for arch in args.arch.split(","):
            disks = {"cerulean": Path(given[arch]) if arch in given
                     else build_cerulean(args.image, arch, work),
                     "debian": debian_disk(url, arch, work)}
            if arch in before:
                disks["before"] = Path(before[arch])
            rows: dict[str, list[dict[str, object]]] = {name: [] for name in disks}
            for i in range(args.boots):
                for name, disk in disks.items():  # in turn, so drift hits both alike
                    out = work / f"run-{arch}-{name}-{i}"
                    shutil.rmtree(out, ignore_errors=True)
                    row = boot_once(disk, out, args.timeout)
                    rows[name].append(row)
                    print(f"{arch} {name} boot {i + 1}: {json.dumps(row)}", file=sys.stderr)
                    keep = RESULTS / f"boot-{arch}-{name}"
                    shutil.rmtree(keep, ignore_errors=True)
                    shutil.copytree(out / "result", keep)
            summary = {name: {key: median(r, key) for key in r[0]} for name, r in rows.items()}
            result["arches"][arch] = {"median": summary, "runs": rows}  # type: ignore[index]
    finally:
        if tmp is not None:
            tmp.cleanup()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "boot.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result, args.boots))
    return 0


def markdown(r: dict[str, object], boots: int) -> str:
    out = [f"Measured {r['when']} on {r['cpus']} CPUs, QEMU TCG, median of {boots} boots "
           "each, the systems booted in turn. Seconds since the kernel started (systemd's "
           "timestamps); READY is Cerulean's report after boot-complete.target.", "",
           "| arch | system | kernel | initrd | userspace | multi-user.target | READY "
           "| multi-user, / Debian |",
           "|---|---|---|---|---|---|---|---|"]
    arches: dict[str, dict[str, dict[str, dict[str, float | None]]]] = r["arches"]  # type: ignore[assignment]
    for arch, data in arches.items():
        med = data["median"]
        deb = med["debian"]["multi_user_s"]
        for name, m in med.items():
            ratio = (f"{(m['multi_user_s'] or 0) / deb:.2f}"
                     if name != "debian" and deb else "")
            label = {"cerulean": f"Cerulean `{r['image']}`", "debian": "plain Debian",
                     "before": f"Cerulean `{r['image']}` before"}[name]
            out.append(f"| {arch} | {label} | {m['kernel_s']} | {m['initrd_s'] or '-'} | "
                       f"{m['userspace_s']} | {m['multi_user_s']} | "
                       f"{m['ready_uptime_s'] or '-'} | {ratio} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
