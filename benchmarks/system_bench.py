"""System-image benchmark: a Cerulean system image next to plain Debian, booted the same way.

In one run, on the same mirror and the same machine:

1. builds the Cerulean image (default ``vm``, amd64) with ``cerulean build``
   (warm: the default cache; ``--cold`` also builds with an empty cache);
2. builds a plain Debian trixie system with ``mmdebstrap --variant=minbase``
   plus systemd, the cloud kernel and systemd-boot's EFI binaries, and makes
   a disk of it that boots exactly like Cerulean's: OVMF → systemd-boot → a
   UKI (kernel + the Debian initrd) → an ext4 root (``--debian-include`` adds
   packages);
3. boots both under QEMU with ``cerulean.testbed.guest`` and runs inside each
   Lynis from the trixie ``lynis`` package (handed in on a disk, not
   installed), plus counts of setuid/setgid files, enabled units, running
   services and listening sockets; the guest's uptime when multi-user.target
   let the script start is the boot time.

It prints a Markdown report (the one in docs/benchmarks.md) and writes
benchmarks/results/system.json.

    .venv/bin/python benchmarks/system_bench.py [--image vm] [--cold] [--timeout 2400]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from build_bench import CERULEAN, RESULTS, ROOT, mirror, timed

sys.path.insert(0, str(ROOT / "src"))

import cerulean.arch
from cerulean.build import disk
from cerulean.build.system import overlay
from cerulean.build.system_image import tools_tree
from cerulean.debian.cache import Cache
from cerulean.testbed.guest import GuestRun, run_in_guest
from cerulean.testbed.qemu import QemuConfig

# What runs in both guests: Lynis, then the counts. $1 is the output directory.
AUDIT = r"""
out=$1
find / \( -path /proc -o -path /sys -o -path /run -o -path /dev \) -prune -o \
     -type f \( -perm -4000 -o -perm -2000 \) -print 2>/dev/null | sort -u > "$out/setuid"
systemctl list-unit-files --state=enabled --no-legend --no-pager > "$out/enabled"
systemctl list-units --type=service --state=running --no-legend --no-pager --plain \
    > "$out/running"
# Listening TCP sockets (state 0A) and bound UDP sockets (state 07), v4 and v6.
for f in tcp tcp6 udp udp6; do
  awk -v p="$f" 'NR > 1 && ((p ~ /tcp/ && $4 == "0A") || (p ~ /udp/ && $4 == "07")) \
      { print p, $2 }' "/proc/net/$f"
done | sort -u > "$out/listening"
findmnt -rn -o TARGET,OPTIONS > "$out/mounts"
# Debian keeps Lynis' profile and plugins under /etc/lynis; Lynis also looks in ./
cp lynis/etc/lynis/default.prf lynis/usr/share/lynis/
cp -r lynis/etc/lynis/plugins lynis/usr/share/lynis/plugins
cd lynis/usr/share/lynis && sh ../../sbin/lynis audit system --quick --no-colors \
    --logfile "$out/lynis.log" --report-file "$out/lynis-report.dat" > "$out/lynis.out" 2>&1
echo "lynis rc=$?" >> "$out/lynis.out"
"""


# In container-host: load Cerulean's python OCI image and start containers from it.
PODMAN = r"""
out=$1
now() { date +%s.%N; }
t0=$(now); podman load -q -i python.oci.tar > "$out/load" 2>&1; t1=$(now)
echo "load_s=$(awk "BEGIN { print $t1 - $t0 }")" >> "$out/podman"
image=$(sed -n 's/^Loaded image: //p' "$out/load" | head -1)
for i in 1 2 3 4 5; do
  t0=$(now)
  podman run --rm --network=none "$image" -c 'print(1)' >> "$out/run" 2>&1
  t1=$(now)
  echo "run_s=$(awk "BEGIN { print $t1 - $t0 }")" >> "$out/podman"
done
podman --version >> "$out/podman"
"""


def podman_times(tmp: Path, timeout: float) -> dict[str, object]:
    """Container start time inside the booted container-host image (TCG)."""
    for image in ("container-host", "python"):
        _, r = timed([str(CERULEAN), "build", str(ROOT / "images" / f"{image}.toml"),
                      "--arch", "amd64", "--out", str(tmp / "podman")])
        if r.returncode != 0:
            raise SystemExit(f"cerulean build {image} failed: {r.stderr.strip()[-500:]}")
    run = run_in_guest(tmp / "podman" / "container-host-amd64.qcow2", PODMAN,
                       files={"python.oci.tar": tmp / "podman" / "python.oci.tar"},
                       cfg=QemuConfig(disk_size_mib=4096),  # room for container storage
                       timeout_s=timeout, out_dir=tmp / "run-podman")
    values: dict[str, list[float]] = {}
    for line in run.text("podman").splitlines():
        key, _, value = line.partition("=")
        try:
            values.setdefault(key, []).append(float(value))
        except ValueError:
            continue
    runs = values.get("run_s", [])
    printed = run.text("run").split().count("1")
    if run.returncode != 0 or len(runs) != 5 or printed != 5:
        raise SystemExit(f"podman in container-host failed: {run.text('load')} {run.text('run')} "
                         f"{run.text('stderr')}")
    return {"load_s": values["load_s"][0], "first_run_s": runs[0],
            "median_run_s": sorted(runs)[2], "version": run.text("podman").splitlines()[-1]}


def lynis_tree(url: str, dest: Path) -> Path:
    """The trixie lynis package, extracted (not installed) into *dest*."""
    _, r = timed(["mmdebstrap", "--quiet", "--variant=extract", "--include=lynis",
                  "--architectures=amd64", "--components=main", "trixie", str(dest), url])
    if r.returncode != 0:
        raise SystemExit(f"fetching lynis failed: {r.stderr.strip()[-500:]}")
    return dest


def plain_debian(url: str, arch: str, include: list[str], work: Path,
                 options: list[str] | None = None) -> tuple[Path, float]:
    """A plain Debian disk, built and laid out to boot the way Cerulean does (*options*:
    more of mmdebstrap's, such as hooks)."""
    a = cerulean.arch.get(arch)
    tree = work / "debian-root"
    started = time.perf_counter()
    pkgs = ["systemd-sysv", f"linux-image-cloud-{arch}", "systemd-boot-efi", *include]
    _, r = timed(["mmdebstrap", "--quiet", "--variant=minbase", f"--architectures={arch}",
                  "--components=main", "--include=" + ",".join(pkgs), *(options or []),
                  "trixie", str(tree), url])
    if r.returncode != 0:
        raise SystemExit(f"mmdebstrap failed: {r.stderr.strip()[-500:]}")
    with overlay(tools_tree(Cache(), lambda _m: None, offline=False), work / "tools") as tools:
        raw = _debian_disk(tools, tree, a, work)
    return raw, time.perf_counter() - started


def _debian_disk(tools: Path, tree: Path, a: cerulean.arch.Arch, work: Path) -> Path:
    kver = sorted(p.name[len("vmlinuz-"):] for p in (tree / "boot").glob("vmlinuz-*"))[-1]
    root_uuid = disk.stable_uuid("plain-debian-root", a.name)
    line = f"root=PARTUUID={root_uuid} rw console=tty0 console={a.console}"
    uki = work / "debian.efi"
    disk.make_uki(tools, tree, work, a, kver, tree / f"boot/initrd.img-{kver}", line, uki)
    disk.make_esp(tools, tree, work, a, {"debian.efi": uki})
    d = work / "repart.d"
    d.mkdir(exist_ok=True)
    (d / "00-esp.conf").write_text("[Partition]\nType=esp\nCopyBlocks=/work/esp.img\n")
    size = disk.root_size(tree)
    (d / "10-root.conf").write_text(
        f"[Partition]\nType=root-{a.gpt}\nUUID={root_uuid}\nFormat=ext4\nCopyFiles=/src/root:/\n"
        f"SizeMinBytes={size}\nSizeMaxBytes={size}\n")
    raw = work / "debian.raw"
    disk.assemble(tools, work, tree, disk.stable_uuid("plain-debian-seed"), raw)
    return raw


def summarize(run: GuestRun) -> dict[str, object]:
    report: dict[str, list[str]] = {}
    for line in run.text("lynis-report.dat").splitlines():
        key, _, value = line.partition("=")
        report.setdefault(key, []).append(value)

    def lines(name: str) -> list[str]:
        return [x for x in run.text(name).splitlines() if x.strip()]

    index = report.get("hardening_index", [""])[0]
    return {
        "script_rc": run.returncode,
        "boot_to_multi_user_s": run.uptime_at_start_s,
        "lynis_hardening_index": int(index) if index.isdigit() else None,
        "lynis_tests": int(report.get("lynis_tests_done", ["0"])[0] or 0),
        "lynis_warnings": len(report.get("warning[]", [])),
        "lynis_suggestions": len(report.get("suggestion[]", [])),
        "setuid_setgid_files": len(lines("setuid")),
        "enabled_unit_files": len(lines("enabled")),
        "running_services": len(lines("running")),
        "listening_sockets": len(lines("listening")),
        "setuid_list": lines("setuid"),
        "listening_list": lines("listening"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--image", default="vm")
    ap.add_argument("--arch", default="amd64", choices=["amd64"])
    ap.add_argument("--cold", action="store_true", help="also build once with an empty cache")
    ap.add_argument("--debian-include", default="", help="extra packages for plain Debian")
    ap.add_argument("--timeout", type=float, default=2400, help="per guest run, seconds")
    ap.add_argument("--skip-podman", action="store_true",
                    help="skip container start times in container-host")
    args = ap.parse_args()
    os.chdir(ROOT)  # the tools tree's definition is found in ./images
    url = mirror()
    result: dict[str, object] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                 "cpus": os.cpu_count(), "image": args.image, "arch": args.arch}
    with tempfile.TemporaryDirectory(prefix="cerulean-sysbench-") as tmp_s:
        tmp = Path(tmp_s)
        definition = str(ROOT / "images" / f"{args.image}.toml")
        if args.cold:
            wall, r = timed([str(CERULEAN), "build", definition, "--arch", args.arch,
                             "--format", "raw", "--out", str(tmp / "cold"),
                             "--cache", str(tmp / "cold-cache")])
            if r.returncode != 0:
                raise SystemExit(f"cold cerulean build failed: {r.stderr.strip()[-500:]}")
            result["cerulean_cold_build_s"] = round(wall, 1)
            shutil.rmtree(tmp / "cold-cache")
        wall, r = timed([str(CERULEAN), "build", definition, "--arch", args.arch,
                         "--format", "raw", "--out", str(tmp)])
        if r.returncode != 0:
            raise SystemExit(f"cerulean build failed: {r.stderr.strip()[-500:]}")
        result["cerulean_build_s"] = round(wall, 1)
        print(f"cerulean build: {wall:.1f} s", file=sys.stderr)
        include = [p for p in args.debian_include.split(",") if p]
        plain, seconds = plain_debian(url, args.arch, include, tmp)
        result["debian_build_s"] = round(seconds, 1)
        print(f"plain Debian build: {seconds:.1f} s", file=sys.stderr)
        lynis = lynis_tree(url, tmp / "lynis")
        for name, image in (("cerulean", tmp / f"{args.image}-{args.arch}.raw"),
                            ("debian", plain)):
            run = run_in_guest(image, AUDIT, files={"lynis": lynis},
                               cfg=QemuConfig(memory_mib=2048), timeout_s=args.timeout,
                               out_dir=tmp / f"run-{name}")
            if run.returncode is None:
                raise SystemExit(f"the {name} guest did not finish; console: "
                                 f"{run.console_log.read_text(errors='replace')[-2000:]}")
            result[name] = summarize(run)
            keep = RESULTS / f"system-{name}"
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(run.out_dir, keep)
            counts = {k: v for k, v in result[name].items()  # type: ignore[attr-defined]
                      if not k.endswith("_list")}
            print(f"{name}: {json.dumps(counts)}", file=sys.stderr)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "system.json").write_text(json.dumps(result, indent=2) + "\n")
        if not args.skip_podman:
            result["podman"] = podman_times(tmp, args.timeout)
            print(f"podman: {result['podman']}", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "system.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


def markdown(r: dict[str, object]) -> str:
    c: dict[str, object] = r["cerulean"]  # type: ignore[assignment]
    d: dict[str, object] = r["debian"]  # type: ignore[assignment]
    rows = [
        ("Lynis hardening index", "lynis_hardening_index"),
        ("Lynis warnings", "lynis_warnings"),
        ("Lynis suggestions", "lynis_suggestions"),
        ("setuid/setgid files", "setuid_setgid_files"),
        ("enabled unit files", "enabled_unit_files"),
        ("running services", "running_services"),
        ("listening sockets (TCP listen + UDP bound)", "listening_sockets"),
        ("boot to multi-user.target, TCG (s)", "boot_to_multi_user_s"),
    ]
    out = [f"Measured {r['when']} on {r['cpus']} CPUs, {r['arch']}, QEMU TCG.", "",
           f"| | Cerulean `{r['image']}` | plain Debian trixie (minbase + systemd) |",
           "|---|---|---|"]
    out += [f"| {label} | {c[key]} | {d[key]} |" for label, key in rows]
    out.append(f"| image build (s) | {r['cerulean_build_s']} (warm cache) | "
               f"{r['debian_build_s']} (mmdebstrap + UKI + disk) |")
    if "cerulean_cold_build_s" in r:
        out.append(f"| image build, empty cache (s) | {r['cerulean_cold_build_s']} | |")
    if "podman" in r:
        pm: dict[str, object] = r["podman"]  # type: ignore[assignment]
        out += ["", f"In the booted `container-host` (TCG, {pm['version']}): "
                f"`podman load` of the `python` OCI archive {pm['load_s']:.1f} s; "
                f"`podman run --rm --network=none python -c 'print(1)'` first "
                f"{pm['first_run_s']:.2f} s, median of 5 {pm['median_run_s']:.2f} s."]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
