"""Agent under attack: what an ordinary local user can do to cerulean-agent.service.

Boots a built system image (``--disk``, default ``out/vm-amd64.qcow2``) in QEMU and,
inside it, runs each attack as the unprivileged user ``nobody`` for ``--seconds``.
Ten seconds into every attack, that user also plants a set-ID file in ``/tmp`` (for
the inotify flood, inside one of the flooded directories): the alert the agent must
still raise. For each attack it records:

- whether the service is still active, and how often systemd restarted it;
- the seconds from the set-ID file's creation to its alert in the audit trail;
- the service's peak memory (cgroup ``memory.current`` sampled twice a second)
  against its ``MemoryMax``, and its CPU share against its ``CPUQuota``;
- whether the metrics endpoint answered a scrape at the end of the attack, and
  which of the agent's own degradation metrics were non-zero;
- the same scrape 20 s after the attack stopped (recovery).

The attacks:

metrics-connections
    1,000 connections to the metrics port, each holding half a request.
huge-arguments
    40 programs at a time run from /tmp, each with 1 MiB of arguments.
udp-sockets
    unconnected UDP sockets, opened and closed in a loop.
inotify-flood
    20,000 directories made in /tmp in about a second, and more after.
long-paths
    directories nested under /tmp beyond PATH_MAX (4,096 bytes).

It prints a Markdown table (docs/benchmarks.md) and writes
benchmarks/results/agent-attacks.json. The guest runs under software
emulation here, so CPU shares are upper bounds and latencies are slower than on
hardware; compare runs made the same way.

    .venv/bin/python benchmarks/agent_attack_bench.py [--disk out/vm-amd64.qcow2]
                                                      [--seconds 60] [--label after]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ATTACKS = ("metrics-connections", "huge-arguments", "udp-sockets", "inotify-flood",
           "long-paths")

# Runs as nobody inside the guest: one attack, until killed.
ATTACKER = r'''
import os, resource, socket, sys, time
name = sys.argv[1]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
if name == "metrics-connections":
    held = []
    for _ in range(1000):
        try:
            s = socket.create_connection(("127.0.0.1", 9477), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
            held.append(s)
        except OSError:
            time.sleep(0.01)
    while True:
        time.sleep(1)
elif name == "huge-arguments":
    import shutil, subprocess
    shutil.copy("/usr/bin/sleep", "/tmp/attack-sleep")
    os.chmod("/tmp/attack-sleep", 0o755)
    arg = "a" * (128 * 1024 - 1)  # MAX_ARG_STRLEN is 128 KiB per argument
    while True:
        procs = [subprocess.Popen(["/tmp/attack-sleep", "2", *[arg] * 8]) for _ in range(40)]
        for p in procs:
            p.wait()
elif name == "udp-sockets":
    while True:
        socks = []
        for _ in range(200):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", 0))
            socks.append(s)
        time.sleep(0.5)
        for s in socks:
            s.close()
elif name == "inotify-flood":
    os.makedirs("/tmp/flood", exist_ok=True)
    i = 0
    while True:
        os.mkdir(f"/tmp/flood/d{i}")
        i += 1
        if i % 20000 == 0:
            time.sleep(1)
elif name == "long-paths":
    os.makedirs("/tmp/deep", exist_ok=True)
    fd = os.open("/tmp/deep", os.O_RDONLY | os.O_DIRECTORY)
    part = "p" * 200
    while True:
        try:
            os.mkdir(part, dir_fd=fd)
        except FileExistsError:
            pass
        nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
        open(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w").close()
        time.sleep(0.05)
'''

# Runs as root inside the guest: each attack in turn, measured.
HARNESS = r'''
import json, os, pathlib, subprocess, sys, time, urllib.request
out = pathlib.Path(sys.argv[1]); seconds = int(sys.argv[2]); attacks = sys.argv[3:]
CG = pathlib.Path("/sys/fs/cgroup/system.slice/cerulean-agent.service")
TRAIL = pathlib.Path("/var/lib/cerulean/audit/audit.jsonl")
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]

def show(prop):
    return subprocess.run(["systemctl", "show", "-P", prop, "cerulean-agent.service"],
                          capture_output=True, text=True).stdout.strip()

def cpu_usec():
    try:
        for line in (CG / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0

def mem():
    try:
        return int((CG / "memory.current").read_text())
    except (OSError, ValueError):
        return 0

def scrape():
    try:
        with urllib.request.urlopen("http://127.0.0.1:9477/metrics", timeout=5) as r:
            text = r.read().decode()
    except Exception as e:
        return False, [f"scrape failed: {type(e).__name__}: {e}"]
    words = ("drop", "overflow", "refus", "evict", "truncat", "rotat", "unwatched", "degrad",
             "suppress", "limit", "error")
    hot = []
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if any(w in name for w in words):
            try:
                if float(value) > 0:
                    hot.append(f"{name} {value}")
            except ValueError:
                pass
    return True, hot

def trail_has(text):
    try:
        with TRAIL.open("rb") as f:
            f.seek(max(0, TRAIL.stat().st_size - (64 << 20)))
            return text.encode() in f.read()
    except OSError:
        return False

for i in range(600):
    if show("ActiveState") == "active":
        break
    time.sleep(0.5)
time.sleep(30)
results = {"memory_max": show("MemoryMax"), "cpu_quota_per_sec": show("CPUQuotaPerSecUSec"),
           "attacks": {}}
for name in attacks:
    restarts0 = int(show("NRestarts") or 0)
    u0, w0 = cpu_usec(), time.monotonic()
    atk = subprocess.Popen([*AS_NOBODY, "python3", "/run/cerulean-guest/in/attacker.py", name],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, latency, probe_t = 0, None, None
    where = "/tmp/flood/d5000" if name == "inotify-flood" else "/tmp"
    probe = f"{where}/suid-probe-{name}"
    end = w0 + seconds
    while time.monotonic() < end:
        peak = max(peak, mem())
        now = time.monotonic()
        if probe_t is None and now - w0 >= 10:
            subprocess.run([*AS_NOBODY, "sh", "-c",
                            f"cp /usr/bin/true {probe} && chmod 4755 {probe}"],
                           capture_output=True)
            probe_t = time.monotonic()
        if probe_t is not None and latency is None and trail_has(probe):
            latency = round(time.monotonic() - probe_t, 1)
        time.sleep(0.5)
    scraped, hot = scrape()
    u1, w1 = cpu_usec(), time.monotonic()
    atk.kill(); atk.wait()
    subprocess.run(["pkill", "-9", "-u", "nobody"], capture_output=True)
    for _ in range(40):  # the alert may still come, late
        if latency is not None or probe_t is None:
            break
        if trail_has(probe):
            latency = round(time.monotonic() - probe_t, 1)
        time.sleep(0.5)
    time.sleep(20)
    recovered, hot_after = scrape()
    results["attacks"][name] = {
        "active": show("ActiveState"), "restarts": int(show("NRestarts") or 0) - restarts0,
        "alert_s": latency, "peak_mib": round(peak / 2**20, 1),
        "cpu_share": round((u1 - u0) / 1e6 / (w1 - w0), 2),
        "scrape_ok": scraped, "degradation": hot, "scrape_after_ok": recovered,
        "degradation_after": hot_after}
    subprocess.run(["rm", "-rf", "/tmp/flood", "/tmp/deep", "/tmp/attack-sleep", probe],
                   capture_output=True)
(out / "attacks.json").write_text(json.dumps(results, indent=1))
'''

GUEST = "python3 ./harness.py \"$1\" SECONDS ATTACKS\n"


def markdown(report: dict[str, object]) -> str:
    res = report["results"]
    assert isinstance(res, dict)
    lines = [
        f"`{report['label']}` ({report['disk']}, {report['when']}; {report['seconds']} s per "
        f"attack, as `nobody`; the unit's MemoryMax {res['memory_max']}):",
        "",
        "| attack | service | restarts | set-ID alert after | peak memory | CPU share | "
        "metrics scrape | its own degradation shown | 20 s later |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["attacks"].items():
        alert = "never" if r["alert_s"] is None else f"{r['alert_s']} s"
        shown = "; ".join(r["degradation"])[:160] or "nothing"
        lines.append(
            f"| {name} | {r['active']} | {r['restarts']} | {alert} | {r['peak_mib']} MiB | "
            f"{r['cpu_share']:.0%} | {'answered' if r['scrape_ok'] else 'failed'} | {shown} | "
            f"{'answered' if r['scrape_after_ok'] else 'failed'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--disk", type=Path, default=ROOT / "out" / "vm-amd64.qcow2")
    p.add_argument("--seconds", type=int, default=60, help="length of each attack")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset")
    p.add_argument("--label", default="this tree", help="names the run in the report")
    args = p.parse_args()
    if not args.disk.is_file():
        raise SystemExit(f"{args.disk} does not exist: build it with cerulean build "
                         "images/vm.toml --arch amd64 --format qcow2")
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise SystemExit(f"Unknown attacks: {', '.join(unknown)} (known: {', '.join(ATTACKS)}).")
    sys.path.insert(0, str(ROOT / "src"))
    from cerulean.testbed.guest import run_in_guest

    with tempfile.TemporaryDirectory(prefix="agent-attacks-") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "attacker.py").write_text(ATTACKER)
        (tmp / "harness.py").write_text(HARNESS)
        script = GUEST.replace("SECONDS", str(args.seconds)).replace("ATTACKS", " ".join(attacks))
        run = run_in_guest(args.disk, script, files={"attacker.py": tmp / "attacker.py",
                                                     "harness.py": tmp / "harness.py"},
                           out_dir=tmp / "g", timeout_s=600 + len(attacks) * (args.seconds + 60))
        if run.returncode != 0:
            raise SystemExit(f"the guest script failed: {run.text('stderr')[-800:]}")
        results = json.loads(run.text("attacks.json"))
    report: dict[str, object] = {"label": args.label, "disk": args.disk.name,
                                 "seconds": args.seconds, "results": results,
                                 "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = RESULTS / "agent-attacks.json"
    runs = json.loads(saved.read_text()) if saved.is_file() else {}
    runs[args.label] = report
    saved.write_text(json.dumps(runs, indent=1) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
