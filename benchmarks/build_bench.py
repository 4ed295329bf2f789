"""Build-time and size benchmark: Cerulean next to mmdebstrap, in the same run.

For each built-in image and architecture it measures a cold build (empty
cache: every package downloaded) and a warm build (median of several), and the
uncompressed size; then, on the same mirror and in the same run, mmdebstrap
with --variant=essential, --variant=minbase and --variant=custom with exactly
the `base` image's package set. It prints a Markdown report (the one in
docs/benchmarks.md) and writes benchmarks/results/latest.json.

    .venv/bin/python benchmarks/build_bench.py [--images base,static] [--warm-runs 5]
                                               [--skip-mmdebstrap] [--mmdebstrap-arm64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CERULEAN = Path(sys.executable).parent / "cerulean"
RESULTS = ROOT / "benchmarks" / "results"


def timed(argv: list[str], **kw: object) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, check=False,
                       **kw)  # type: ignore[call-overload]
    return time.perf_counter() - t, r


def build(image: str, arch: str, cache: Path, out: Path) -> tuple[float, dict[str, object]]:
    wall, r = timed([str(CERULEAN), "build", str(ROOT / "images" / f"{image}.toml"), "--arch",
                     arch, "--out", str(out), "--cache", str(cache), "--locked", "--json"])
    if r.returncode != 0:
        raise SystemExit(f"cerulean build {image} --arch {arch} failed: {r.stderr.strip()}")
    return wall, json.loads(r.stdout)


def mirror() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from cerulean.debian.archive import default_archive

    return default_archive().mirror


def locked_packages(image: str, arch: str) -> list[str]:
    lock = tomllib.loads((ROOT / "images" / f"{image}.lock").read_text())
    return [p["name"] for p in lock["packages"][arch]]


def mmdebstrap(variant: str, arch: str, url: str, include: list[str] | None = None
               ) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "root.tar"
        argv = ["mmdebstrap", "--quiet", f"--variant={variant}", f"--architectures={arch}",
                "--components=main"]
        if include:
            argv.append("--include=" + ",".join(include))
        argv += ["trixie", str(tar), url]
        wall, r = timed(argv)
        if r.returncode != 0:
            raise SystemExit(f"mmdebstrap --variant={variant} failed: {r.stderr.strip()[-500:]}")
        size = sum(m.size for m in __import__("tarfile").open(tar).getmembers() if m.isfile())
        return wall, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", default="static,base,python,core")
    ap.add_argument("--arches", default="amd64,arm64")
    ap.add_argument("--warm-runs", type=int, default=5)
    ap.add_argument("--skip-mmdebstrap", action="store_true")
    ap.add_argument("--mmdebstrap-arm64", action="store_true",
                    help="also run mmdebstrap for arm64 (needs qemu-user, minutes)")
    args = ap.parse_args()
    images = args.images.split(",")
    arches = args.arches.split(",")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="cerulean-bench-") as tmp_s:
        tmp = Path(tmp_s)
        for image in images:
            for arch in arches:
                cold_cache = tmp / f"cold-{image}-{arch}"
                cold, res = build(image, arch, cold_cache, tmp / "out-cold")
                warm_cache = cold_cache  # now populated
                warm = [build(image, arch, warm_cache, tmp / "out-warm")
                        for _ in range(args.warm_runs)]
                a = res["arches"][0]  # type: ignore[index]
                rows.append({
                    "image": image, "arch": arch, "packages": a["packages"],
                    "cold_s": round(cold, 3),
                    "warm_s": round(statistics.median(w for w, _ in warm), 3),
                    "warm_internal_s": round(statistics.median(
                        float(r["seconds"]) for _, r in warm), 3),  # type: ignore[arg-type]
                    "size_bytes": a["size"],
                    "archive_bytes": (tmp / "out-warm" / f"{image}.oci.tar").stat().st_size,
                })
                shutil.rmtree(cold_cache)
                print(f"{image}/{arch}: cold {cold:.2f} s, warm {rows[-1]['warm_s']} s, "
                      f"{a['size'] / 1048576:.1f} MiB", file=sys.stderr)
        refs: list[dict[str, object]] = []
        if not args.skip_mmdebstrap and shutil.which("mmdebstrap"):
            url = mirror()
            mm_arches = ["amd64"] + (["arm64"] if args.mmdebstrap_arm64 else [])
            for arch in mm_arches:
                for variant, include in (("essential", None), ("minbase", None),
                                         ("extract", locked_packages("base", arch))):
                    wall, size = mmdebstrap(variant, arch, url, include)
                    refs.append({"tool": f"mmdebstrap --variant={variant}"
                                 + (" (base's packages)" if include else ""),
                                 "arch": arch, "seconds": round(wall, 2), "size_bytes": size})
                    print(f"mmdebstrap {variant}/{arch}: {wall:.1f} s, {size / 1048576:.1f} MiB",
                          file=sys.stderr)
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cpus": os.cpu_count(), "cerulean": rows, "reference": refs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


def markdown(report: dict[str, object]) -> str:
    rows: list[dict[str, object]] = report["cerulean"]  # type: ignore[assignment]
    refs: list[dict[str, object]] = report["reference"]  # type: ignore[assignment]
    out = [f"Measured {report['when']} on {report['cpus']} CPUs.", "",
           "| image | arch | packages | cold build (s) | warm build (s) | warm, in-process (s) "
           "| uncompressed (MiB) | oci-archive (MiB) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['image']} | {r['arch']} | {r['packages']} | {r['cold_s']} | "
                   f"{r['warm_s']} | {r['warm_internal_s']} | "
                   f"{int(r['size_bytes']) / 1048576:.1f} | "  # type: ignore[call-overload]
                   f"{int(r['archive_bytes']) / 1048576:.1f} |")  # type: ignore[call-overload]
    if refs:
        out += ["", "| reference | arch | time (s) | uncompressed (MiB) |", "|---|---|---|---|"]
        for f in refs:
            out.append(f"| {f['tool']} | {f['arch']} | {f['seconds']} | "
                       f"{int(f['size_bytes']) / 1048576:.1f} |")  # type: ignore[call-overload]
        by = {(r["image"], r["arch"]): r for r in rows}
        custom = next((f for f in refs if "base's" in str(f["tool"])), None)
        base = by.get(("base", "amd64"))
        if custom and base:
            out += ["", "Ratios (same run, same mirror, amd64, `base` package set):",
                    f"- mmdebstrap / cerulean cold: "
                    f"{float(custom['seconds']) / float(base['cold_s']):.1f}x",  # type: ignore[arg-type]
                    f"- mmdebstrap / cerulean warm: "
                    f"{float(custom['seconds']) / float(base['warm_s']):.1f}x"]  # type: ignore[arg-type]
        b64 = by.get(("base", "arm64"))
        if base and b64:
            out.append(f"- base warm build arm64 / amd64: "
                       f"{float(b64['warm_s']) / float(base['warm_s']):.2f}")  # type: ignore[arg-type]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
