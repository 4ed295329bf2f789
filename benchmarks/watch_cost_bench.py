"""What a file event costs the agent's watch, with and without fanotify marks.

Makes --files files in a watched directory on /dev/shm (a file system of its own), in
batches of 1,000, and reads the watch's events after each batch; reports the CPU time
the reads took per event, for a Watcher without marks and one with them, alternately
(--rounds times each), and whether each file was reported exactly once. Needs root
(the marks need CAP_SYS_ADMIN); without it only the first column is measured.

    .venv/bin/python benchmarks/watch_cost_bench.py [--files 10000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cerulean.agent.watch import Watcher


def one(marks: bool, files: int) -> tuple[float, int, int, int]:
    """(CPU µs per event, events, distinct paths, file systems marked)."""
    d = tempfile.mkdtemp(dir="/dev/shm")
    try:
        with Watcher([d], marks=marks) as w:
            paths: list[str] = []
            cpu = 0.0
            for batch in range(files // 1000):
                for i in range(1000):
                    os.close(os.open(f"{d}/f{batch}-{i}", os.O_CREAT | os.O_WRONLY, 0o600))
                t = time.process_time()
                while got := w.read(0.05, settle=0):
                    paths += [e["file.path"] for e in got]
                cpu += time.process_time() - t
            return cpu / max(1, len(paths)) * 1e6, len(paths), len(set(paths)), w.marked
    finally:
        shutil.rmtree(d)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    print("| watch | CPU per event | events | distinct | file systems marked |")
    print("|---|---|---|---|---|")
    for _ in range(args.rounds):
        for marks in (False, True):
            us, n, distinct, marked = one(marks, args.files)
            print(f"| {'inotify + marks' if marks else 'inotify'} | {us:.1f} µs | {n} | "
                  f"{distinct} | {marked} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
