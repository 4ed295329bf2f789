"""Agent benchmark: the integrity scan against AIDE on the same tree, and the agent's
footprint.

In one run, on this machine:

1. **Integrity.** A full scan of one directory tree (default: the ``usr`` of the
   largest cached system root file system, else ``/usr/share``) by
   ``cerulean.agent.integrity.scan`` and by ``aide --init`` (Debian's ``aide``
   package), with the attributes both record: type, permissions, owner, group,
   size, link target and sha256. The tree is read once first so both find it in
   the page cache; then the two alternate, ``--rounds`` times each. Wall time,
   CPU time (user + system, from the child's rusage) and peak resident memory;
   AIDE runs with one worker (like the agent) and with two.
2. **Footprint.** ``cerulean-agent.service`` as it runs in a booted ``vm``
   image (``--disk``, under QEMU: software emulation here, so its CPU figure is
   an upper bound) with the shipped rules and default settings: resident memory
   after it settled, and CPU time over a quiet minute, as a share of one CPU.
   Without ``--disk``, ``cerulean agent run`` on this machine (whose /root and
   /tmp, full of build trees, make the watches far larger than on a server).

It prints a Markdown report (the one in docs/benchmarks.md) and writes
benchmarks/results/agent.json.

    .venv/bin/python benchmarks/agent_bench.py [--disk out/vm-amd64.qcow2] [--tree DIR]
                                               [--rounds 3] [--idle 60]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PYTHON = sys.executable

SCAN = """
import sys
from pathlib import Path
from cerulean.agent.integrity import scan
states = scan(Path("/"), [sys.argv[1]])
print(len(states))
"""

AGENT = """
import sys
from pathlib import Path
from cerulean.agent import daemon, detect
shipped = Path(sys.argv[1])
real = detect.load_rule_files
detect.load_rule_files = lambda dirs: real([shipped])
sys.exit(daemon.run(say=lambda m: print(m, flush=True)))
"""


def measured(argv: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run *argv*; its wall time, CPU time and peak RSS (from its own rusage)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[0]} failed: {err.strip()[-500:]}")
    return {"wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "max_rss_mib": round(usage.ru_maxrss / 1024, 1), "out": out.strip()[-80:]}


def default_tree() -> Path:
    systems = Path.home() / ".cache/cerulean/systems"
    trees = [d / "rootfs/usr" for d in systems.iterdir() if (d / "rootfs/usr/bin").is_dir()] \
        if systems.is_dir() else []
    if trees:
        return max(trees, key=lambda d: sum(1 for _ in d.rglob("*")))
    return Path("/usr/share")


def aide_conf(tmp: Path, tree: Path, workers: int) -> Path:
    conf = tmp / f"aide-{workers}.conf"
    conf.write_text(
        f"database_out=file:{tmp}/aide-{workers}.db\n"
        "gzip_dbout=no\n"
        f"num_workers={workers}\n"
        "Cerulean = p+ftype+u+g+s+l+sha256\n"
        f"{tree} Cerulean\n")
    return conf


def tree_stats(tree: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(tree):
        for n in names:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            files += 1
            if os.path.isfile(p) and not os.path.islink(p):
                size += st.st_size
                with open(p, "rb") as f:  # into the page cache, for both tools alike
                    while f.read(1 << 20):
                        pass
    return files, size


def integrity(tree: Path, rounds: int) -> dict[str, object]:
    aide = shutil.which("aide")
    if aide is None:
        raise SystemExit("aide is not installed: apt-get install --no-install-recommends aide")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    files, size = tree_stats(tree)
    runs: dict[str, list[dict[str, float]]] = {"cerulean": [], "aide-1": [], "aide-2": []}
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp_s:
        tmp = Path(tmp_s)
        confs = {w: aide_conf(tmp, tree, w) for w in (1, 2)}
        for _ in range(rounds):
            runs["cerulean"].append(measured([PYTHON, "-c", SCAN, str(tree)], env))
            for w in (1, 2):
                (tmp / f"aide-{w}.db").unlink(missing_ok=True)
                runs[f"aide-{w}"].append(measured([aide, "--init", f"--config={confs[w]}"]))
    summary = {name: {k: statistics.median(r[k] for r in rs)  # type: ignore[type-var]
                      for k in ("wall_s", "cpu_s", "max_rss_mib")}
               for name, rs in runs.items()}
    return {"tree": str(tree), "files": files, "bytes": size, "rounds": rounds,
            "aide": subprocess.run([aide, "--version"], capture_output=True, text=True,
                                   check=False).stdout.splitlines()[0],
            "median": summary, "runs": runs}


def footprint(idle: int) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    shipped = ROOT / "src/cerulean/agent/data/rules.d"
    proc = subprocess.Popen([PYTHON, "-c", AGENT, str(shipped)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(20)  # start-up, the first snapshot of every process
        if proc.poll() is not None:
            said = proc.stdout.read().decode() if proc.stdout else ""
            raise SystemExit(f"the agent stopped: {said.strip()[-500:]}")
        hz = os.sysconf("SC_CLK_TCK")

        def ticks() -> int:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])

        t0, w0 = ticks(), time.monotonic()
        time.sleep(idle)
        t1, w1 = ticks(), time.monotonic()
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ":" in line)
        rss = int(status["VmRSS"].split()[0]) / 1024
        hwm = int(status["VmHWM"].split()[0]) / 1024
    finally:
        proc.terminate()
        proc.wait(15)
    cpu = (t1 - t0) / hz
    return {"where": "this machine", "idle_s": round(w1 - w0, 1), "cpu_s": round(cpu, 2),
            "cpu_share_percent": round(100 * cpu / (w1 - w0), 2),
            "rss_mib": round(rss, 1), "peak_rss_mib": round(hwm, 1),
            "processes": len([p for p in os.listdir("/proc") if p.isdigit()])}


GUEST = r"""
out=$1
i=0
until systemctl is-active -q cerulean-agent.service || [ $i -ge 600 ]; do
  sleep 0.5; i=$((i + 1))
done
sleep 60  # the first snapshots, the boot's last jobs
pid=$(systemctl show -p MainPID --value cerulean-agent.service)
ticks() { awk '{print $14 + $15}' /proc/$pid/stat; }
t0=$(ticks); s0=$(cut -d' ' -f1 /proc/uptime)
sleep IDLE
t1=$(ticks); s1=$(cut -d' ' -f1 /proc/uptime)
echo "$t0 $t1 $s0 $s1 $(getconf CLK_TCK)" > "$out/ticks"
grep -E '^(VmRSS|VmHWM):' /proc/$pid/status > "$out/status"
ls /proc | grep -c '^[0-9]' > "$out/processes"
"""


def footprint_in_guest(disk: Path, idle: int) -> dict[str, object]:
    sys.path.insert(0, str(ROOT / "src"))
    from cerulean.testbed.guest import run_in_guest

    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        run = run_in_guest(disk, GUEST.replace("IDLE", str(idle)), out_dir=Path(tmp) / "g",
                           timeout_s=1800)
        if run.returncode != 0:
            raise SystemExit(f"the guest script failed: {run.text('stderr')[-500:]}")
        t0, t1, s0, s1, hz = run.text("ticks").split()
        status = dict(line.split(":", 1) for line in run.text("status").splitlines())
        processes = int(run.text("processes"))
    cpu = (int(t1) - int(t0)) / int(hz)
    wall = float(s1) - float(s0)
    return {"where": f"booted {disk.name} (QEMU, software emulation)",
            "idle_s": round(wall, 1), "cpu_s": round(cpu, 2),
            "cpu_share_percent": round(100 * cpu / wall, 2),
            "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "peak_rss_mib": round(int(status["VmHWM"].split()[0]) / 1024, 1),
            "processes": processes}


def markdown(report: dict[str, object]) -> str:
    integ = report["integrity"]
    assert isinstance(integ, dict)
    med = integ["median"]
    lines = [
        f"Measured {integ['when']} on {os.cpu_count()} CPUs: a full scan of "
        f"`{integ['tree']}` ({integ['files']} entries, {integ['bytes'] / 2**20:.0f} MiB of "
        f"file data, in the page cache), median of {integ['rounds']} rounds, {integ['aide']}.",
        "",
        "| tool | wall (s) | CPU (s) | peak RSS (MiB) |",
        "|---|---|---|---|",
    ]
    names = {"cerulean": "cerulean integrity scan (1 thread)",
             "aide-1": "aide --init, num_workers=1", "aide-2": "aide --init, num_workers=2"}
    for key, label in names.items():
        m = med[key]
        lines.append(f"| {label} | {m['wall_s']} | {m['cpu_s']} | {m['max_rss_mib']} |")
    c, a1, a2 = med["cerulean"], med["aide-1"], med["aide-2"]
    lines += [
        "",
        f"Ratios: aide (1 worker) / cerulean: wall {a1['wall_s'] / c['wall_s']:.2f}x, "
        f"CPU {a1['cpu_s'] / c['cpu_s']:.2f}x; aide (2 workers) / cerulean: wall "
        f"{a2['wall_s'] / c['wall_s']:.2f}x, CPU {a2['cpu_s'] / c['cpu_s']:.2f}x.",
    ]
    fp = report["footprint"]
    assert isinstance(fp, dict)
    lines += [
        "",
        f"Measured {report['when']}. Agent footprint ({fp['where']}; shipped rules, "
        "default settings, "
        f"{fp['processes']} processes): resident memory "
        f"{fp['rss_mib']} MiB (peak {fp['peak_rss_mib']} MiB); CPU over {fp['idle_s']} s "
        f"of quiet: {fp['cpu_s']} s, {fp['cpu_share_percent']}% of one CPU.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, default=None, help="the tree to scan")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--idle", type=int, default=60, help="seconds of quiet for the CPU share")
    p.add_argument("--disk", type=Path, default=None,
                   help="a built vm image: measure the footprint inside it")
    p.add_argument("--skip-integrity", action="store_true", help="measure the footprint only")
    args = p.parse_args()
    tree = args.tree or default_tree()
    if not tree.is_dir():
        raise SystemExit(f"{tree} is not a directory.")
    report: dict[str, object] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    saved = RESULTS / "agent.json"
    if args.skip_integrity and saved.exists():
        before = json.loads(saved.read_text())
        report["integrity"] = {"when": before["when"], **before["integrity"]}
    else:
        print(f"integrity: scanning {tree}", file=sys.stderr)
        report["integrity"] = {"when": report["when"], **integrity(tree, args.rounds)}
    print("footprint: running the agent", file=sys.stderr)
    report["footprint"] = footprint_in_guest(args.disk, args.idle) if args.disk \
        else footprint(args.idle)
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
