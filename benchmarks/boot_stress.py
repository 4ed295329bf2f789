"""Boot stress: one disk image booted again and again by `cerulean test`'s code, with
the host's other cores kept busy, counting every kernel oops and panic.

It exists for the ``Oops: int3`` crash of x86 guests under QEMU's multi-threaded
TCG before 9.1 (see ``cerulean.testbed.accel``): a boot that crashes is counted,
never retried. Each boot runs ``cerulean.testbed.qemu.run_test`` exactly as
`cerulean test` does, so the TCG threading and vCPU count are the testbed's own
unless ``--cpus`` or ``CERULEAN_TCG_THREADS=multi|single`` say otherwise.

    .venv/bin/python benchmarks/boot_stress.py DISK [--boots 30] [--busy 1] [--cpus N]
    # before the fix: two vCPUs, one host thread each
    CERULEAN_TCG_THREADS=multi .venv/bin/python benchmarks/boot_stress.py DISK --cpus 2 \
        --label before

It prints one line per boot and a Markdown summary (for docs/benchmarks.md), and
writes benchmarks/results/boot-stress-LABEL.json; the console logs of failed boots
are kept in benchmarks/results/boot-stress-LABEL/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from cerulean.testbed.console import scan
from cerulean.testbed.qemu import QemuConfig, TestResult, run_test

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def burn() -> None:
    """Keep one core busy until killed."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def count(res: TestResult) -> dict[str, int]:
    """Oopses and panics on the whole console (not only the first failure)."""
    s = scan(res.console_log.read_bytes(), emulated=True)
    kinds = [e.kind for e in s.events]
    text = res.console_log.read_text(errors="replace")
    return {"oops": kinds.count("kernel oops"), "panic": kinds.count("kernel panic"),
            "bug": kinds.count("kernel BUG"), "stalls": len(s.stalls),
            "int3": text.count("Oops: int3")}


def smp(argv: list[str]) -> int | None:
    """The guest's vCPUs as QEMU was told (``-smp N``)."""
    return int(argv[argv.index("-smp") + 1]) if "-smp" in argv else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("disk", type=Path)
    ap.add_argument("--boots", type=int, default=30)
    ap.add_argument("--busy", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="cores to keep busy beside the guest (default: all but one)")
    ap.add_argument("--cpus", type=int, help="guest vCPUs (default: the testbed's)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--label", default=os.environ.get("CERULEAN_TCG_THREADS") or "default")
    args = ap.parse_args()
    if not args.disk.is_file():
        raise SystemExit(f"{args.disk} does not exist.")
    cfg = QemuConfig() if args.cpus is None else QemuConfig(cpus=args.cpus)
    keep = RESULTS / f"boot-stress-{args.label}"
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.busy)]
    for b in burners:
        b.start()
    boots: list[dict[str, object]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="cerulean-stress-") as tmp:
            for i in range(1, args.boots + 1):
                res = run_test(args.disk, cfg, timeout_s=args.timeout, log_dir=Path(tmp))
                c = count(res)
                row: dict[str, object] = {
                    "boot": i, "passed": res.passed, "outcome": res.outcome.value,
                    "time_to_ready_s": res.time_to_ready_s, "uptime_s": res.guest_uptime_s,
                    "tcg_threads": res.threads.mode if res.threads else None,
                    "cpus": smp(res.argv), "failed_by": res.blame.who if res.blame else None,
                    "failure": res.blame.why if res.blame else None, **c}
                boots.append(row)
                if not res.passed:
                    shutil.copy(res.console_log, keep / f"boot-{i}.console.log")
                ready = f"{res.time_to_ready_s:6.1f} s" if res.time_to_ready_s else "   -    "
                print(f"boot {i:3}: {res.outcome.value:8} {ready}  oops {c['oops']} panic "
                      f"{c['panic']} stalls {c['stalls']}"
                      + (f"  {res.blame}" if res.blame else ""), flush=True)
    finally:
        for b in burners:
            b.kill()
    ready_times = [float(b["time_to_ready_s"]) for b in boots  # type: ignore[arg-type]
                   if b["time_to_ready_s"] is not None]
    threads = boots[0]["tcg_threads"] if boots else None
    cpus = boots[0]["cpus"] if boots else None
    summary = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "disk": str(args.disk),
        "label": args.label, "boots": len(boots), "busy_cores": args.busy, "cpus": cpus,
        "tcg_threads": threads, "passed": sum(1 for b in boots if b["passed"]),
        "oopses": sum(int(b["oops"]) for b in boots),  # type: ignore[call-overload]
        "panics": sum(int(b["panic"]) for b in boots),  # type: ignore[call-overload]
        "int3": sum(int(b["int3"]) for b in boots),  # type: ignore[call-overload]
        "boots_with_stalls": sum(1 for b in boots if b["stalls"]),
        "median_time_to_ready_s": round(statistics.median(ready_times), 1)
        if ready_times else None,
        "runs": boots,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"boot-stress-{args.label}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n| {args.label} | {cpus} | {threads} | {summary['boots']} | {summary['passed']} "
          f"| {summary['oopses']} ({summary['int3']} int3) | {summary['panics']} | "
          f"{summary['boots_with_stalls']} | {summary['median_time_to_ready_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
