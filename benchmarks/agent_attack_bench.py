"""Agent under attack: what an ordinary local user can do to cerulean-agent.service.

Boots a built system image (``--disk``, default ``out/vm-amd64.qcow2``), or with
``--debian`` a plain Debian trixie system with the ``cerulean-agent`` .deb installed by
apt and its service enabled (built here with mmdebstrap, booted the same way), in QEMU.
The guest's agent enrolls in a fleet server started here (SQLite) and reports to it
every 10 s. Inside the guest, each attack runs as the unprivileged user ``nobody`` for
``--seconds``.
Ten seconds into every attack, that user also plants a set-ID file in ``/tmp`` (for
the inotify flood, inside one of the flooded directories): the alert the agent must
still raise. For each attack it records:

- whether the service is still active, and how often systemd restarted it;
- the seconds from the set-ID file's creation to its alert in the audit trail;
- the service's peak memory (cgroup ``memory.current`` sampled twice a second)
  against its ``MemoryMax``, and its CPU share against its ``CPUQuota``;
- whether the metrics endpoint answered a scrape at the end of the attack, and
  which of the agent's own degradation metrics were non-zero;
- the same scrape 20 s after the attack stopped (recovery);
- at the fleet server: how long after its creation the set-ID alert was listed there
  (the guest's clock against this machine's, so to a second or so), and which of the
  agent's own alerts (``agent-*``) arrived while the attack ran or just after.

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

    .venv/bin/python benchmarks/agent_attack_bench.py [--disk out/vm-amd64.qcow2 | --debian]
                                                      [--seconds 60] [--label after]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
import urllib.error
from pathlib import Path
from typing import Any

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
             "suppress", "limit", "error", "rescans", "restart")
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

def metric(name):
    """The value of the agent's metric *name* now (None: not there, or no scrape)."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:9477/metrics", timeout=5) as r:
            text = r.read().decode()
    except Exception:
        return None
    return next((float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                 if l.startswith(name + " ")), None)

def trail_has(text):
    try:
        with TRAIL.open("rb") as f:
            f.seek(max(0, TRAIL.stat().st_size - (64 << 20)))
            return text.encode() in f.read()
    except OSError:
        return False

# Reports to the fleet every FLEET_INTERVAL s (the credential is handed in already).
conf = pathlib.Path("/etc/cerulean/agent.toml")
conf.parent.mkdir(parents=True, exist_ok=True)
text = conf.read_text() if conf.exists() else ""
if "fleet-interval" not in text:
    conf.write_text(text + "\nfleet-interval = FLEET_INTERVAL\n")
subprocess.run(["systemctl", "restart", "cerulean-agent.service"], capture_output=True)
for i in range(600):
    if show("ActiveState") == "active":
        break
    time.sleep(0.5)
enrolled = pathlib.Path("/var/lib/cerulean/fleet/enrollment.json")
for i in range(600):
    if enrolled.exists():
        break
    time.sleep(0.5)
time.sleep(30)
results = {"memory_max": show("MemoryMax"), "cpu_quota_per_sec": show("CPUQuotaPerSecUSec"),
           "enrolled": enrolled.exists(),
           "marked_filesystems": metric("cerulean_watch_marked_filesystems"),
           "security": (subprocess.run(["systemd-analyze", "security", "--no-pager",
                                        "cerulean-agent.service"], capture_output=True,
                                       text=True).stdout.strip().splitlines() or ["?"])[-1],
           "os": next((l.split("=", 1)[1].strip('"') for l in
                      pathlib.Path("/etc/os-release").read_text().splitlines()
                      if l.startswith("PRETTY_NAME=")), "?"),
           "attacks": {}}
for name in attacks:
    restarts0 = int(show("NRestarts") or 0)
    u0, w0 = cpu_usec(), time.monotonic()
    started_wall, probe_wall = time.time(), None
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
            probe_t, probe_wall = time.monotonic(), time.time()
        if probe_t is not None and latency is None and trail_has(probe):
            latency = round(time.monotonic() - probe_t, 1)
        time.sleep(0.5)
    scraped, hot = scrape()
    u1, w1 = cpu_usec(), time.monotonic()
    ended_wall = time.time()
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
        "degradation_after": hot_after, "started_wall": started_wall,
        "probe_wall": probe_wall, "ended_wall": ended_wall, "recovered_wall": time.time()}
    subprocess.run(["rm", "-rf", "/tmp/flood", "/tmp/deep", "/tmp/attack-sleep", probe],
                   capture_output=True)
(out / "attacks.json").write_text(json.dumps(results, indent=1))
'''

GUEST = "python3 ./harness.py \"$1\" SECONDS ATTACKS\n"
FLEET_INTERVAL = 10  # seconds between the guest agent's reports in this benchmark
GROUP = "attacks"


def watch_fleet(api: Any, stop: threading.Event, seen: dict[int, dict[str, Any]]) -> None:
    """Every 2 s, the alerts of the group's hosts at the fleet, each with this machine's
    time when it was first listed."""
    while not stop.wait(2):
        try:
            for h in api.get(f"/api/v1/hosts?group={GROUP}")["hosts"]:
                for a in api.get(f"/api/v1/hosts/{h['id']}/alerts?limit=1000"):
                    if a["id"] not in seen:
                        seen[a["id"]] = {"listed": time.time(), "rule": a["rule"],
                                         "evidence": json.dumps(a["evidence"])[:4000]}
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            continue  # the next round tries again


def fleet_view(seen: dict[int, dict[str, Any]], name: str, r: dict[str, Any]) -> None:
    """What the fleet had of attack *name* (its guest record *r*, amended)."""
    probe = f"suid-probe-{name}"
    hits = sorted(a["listed"] for a in seen.values() if probe in a["evidence"])
    r["fleet_alert_s"] = (round(hits[0] - r["probe_wall"], 1)
                          if hits and r["probe_wall"] is not None else None)
    r["fleet_alert_during"] = bool(hits) and hits[0] <= r["ended_wall"] + 2
    own: dict[str, int] = {}
    for a in seen.values():
        if (a["rule"].startswith("agent-")
                and r["started_wall"] - 2 <= a["listed"] <= r["recovered_wall"] + 2):
            own[a["rule"]] = own.get(a["rule"], 0) + 1
    r["fleet_own_alerts"] = own


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def debian_disk(work: Path) -> Path:
    """Plain Debian trixie, the agent's .deb installed by apt and its service enabled, and
    a wired network configured by DHCP (systemd-networkd), so that it reaches the fleet."""
    from build_bench import mirror
    from system_bench import plain_debian

    from cerulean.build import agent

    deb = agent.build_deb(work / "deb").path
    hooks = "/usr/share/mmdebstrap/hooks/file-mirror-automount"  # the .deb, inside
    network = "[Match]\\nName=en* eth*\\n\\n[Network]\\nDHCP=yes\\n"
    raw, seconds = plain_debian(mirror(), "amd64", ["procps", str(deb)], work, [
        f"--hook-dir={hooks}",
        f"--customize-hook=printf '{network}' > \"$1/etc/systemd/network/20-wired.network\"",
        '--customize-hook=chroot "$1" systemctl enable cerulean-agent.service '
        'systemd-networkd.service'])
    print(f"plain Debian with {deb.name}: built in {seconds:.0f} s", file=sys.stderr)
    return raw


def markdown(report: dict[str, object]) -> str:
    res = report["results"]
    assert isinstance(res, dict)
    lines = [
        f"`{report['label']}` ({report['disk']}, {report['when']}; {report['seconds']} s per "
        f"attack, as `nobody`; the unit's MemoryMax {res['memory_max']}; enrolled in the "
        f"fleet: {'yes' if res.get('enrolled') else 'no'}, reporting every "
        f"{report.get('fleet_interval', '?')} s; file systems under fanotify marks: "
        f"{res.get('marked_filesystems')}; {res.get('security', '?')}):",
        "",
        "| attack | service | restarts | set-ID alert after | at the fleet after | "
        "peak memory | CPU share | metrics scrape | its own degradation shown | "
        "in the fleet | 20 s later |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["attacks"].items():
        alert = "never" if r["alert_s"] is None else f"{r['alert_s']} s"
        fleet = ("never" if r.get("fleet_alert_s") is None else
                 f"{r['fleet_alert_s']} s" + ("" if r.get("fleet_alert_during") else " (after)"))
        shown = "; ".join(r["degradation"])[:160] or "nothing"
        own = ", ".join(f"{k} ×{v}" for k, v in sorted(r.get("fleet_own_alerts", {}).items()))
        lines.append(
            f"| {name} | {r['active']} | {r['restarts']} | {alert} | {fleet} | "
            f"{r['peak_mib']} MiB | {r['cpu_share']:.0%} | "
            f"{'answered' if r['scrape_ok'] else 'failed'} | {shown} | {own or 'none'} | "
            f"{'answered' if r['scrape_after_ok'] else 'failed'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--disk", type=Path, default=ROOT / "out" / "vm-amd64.qcow2")
    p.add_argument("--debian", action="store_true",
                   help="plain Debian trixie with the agent's .deb instead of --disk")
    p.add_argument("--seconds", type=int, default=60, help="length of each attack")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset")
    p.add_argument("--label", default="this tree", help="names the run in the report")
    args = p.parse_args()
    if not args.debian and not args.disk.is_file():
        raise SystemExit(f"{args.disk} does not exist: build it with cerulean build "
                         "images/vm.toml --arch amd64 --format qcow2")
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise SystemExit(f"Unknown attacks: {', '.join(unknown)} (known: {', '.join(ATTACKS)}).")
    sys.path.insert(0, str(ROOT / "src"))
    from cerulean.testbed.demo import local_fleet
    from cerulean.testbed.guest import credential_args, run_in_guest
    from cerulean.testbed.qemu import QemuConfig

    with tempfile.TemporaryDirectory(prefix="agent-attacks-") as tmp_s:
        tmp = Path(tmp_s)
        disk = debian_disk(tmp / "debian") if args.debian else args.disk
        (tmp / "attacker.py").write_text(ATTACKER)
        (tmp / "harness.py").write_text(HARNESS.replace("FLEET_INTERVAL", str(FLEET_INTERVAL)))
        script = GUEST.replace("SECONDS", str(args.seconds)).replace("ATTACKS", " ".join(attacks))
        seen: dict[int, dict[str, Any]] = {}
        stop = threading.Event()
        with local_fleet(tmp / "fleet", free_port(), tmp / "fleet.log") as fleet:
            credential = fleet.guest_credential(GROUP, {"environment": "cloud", "region": "local"})
            poller = threading.Thread(target=watch_fleet, args=(fleet.api, stop, seen),
                                      daemon=True)
            poller.start()
            try:
                run = run_in_guest(disk, script, files={"attacker.py": tmp / "attacker.py",
                                                        "harness.py": tmp / "harness.py"},
                                   cfg=QemuConfig(extra_args=tuple(credential_args(
                                       "cerulean.fleet", credential))),
                                   out_dir=tmp / "g",
                                   timeout_s=900 + len(attacks) * (args.seconds + 60))
                time.sleep(2 * FLEET_INTERVAL)  # the last reports, when the guest was late
            finally:
                stop.set()
                poller.join()
        if run.returncode != 0:
            raise SystemExit(f"the guest script failed: {run.text('stderr')[-800:]}")
        results = json.loads(run.text("attacks.json"))
        for name, r in results["attacks"].items():
            fleet_view(seen, name, r)
    report: dict[str, object] = {"label": args.label,
                                 "disk": "plain Debian trixie + cerulean-agent.deb"
                                 if args.debian else args.disk.name,
                                 "fleet_interval": FLEET_INTERVAL,
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
