"""Fleet load benchmark: simulated agents against a real fleet server, on SQLite and on
PostgreSQL, on this machine.

For each database, in one run:

1. a fresh data directory (``cerulean fleet init``, ``--workers``), and for
   PostgreSQL a fresh cluster from Debian's binaries with ``fsync=on`` (the
   server's default durability; SQLite runs in WAL mode with synchronous=NORMAL);
2. ``cerulean fleet serve``;
3. **the reference**: plain mTLS requests to ``GET /api/v1/health`` with one host's
   certificate (a new connection each, as the agent makes them, or kept open with
   ``--keep-alive``, as the simulated hosts then keep theirs): what this
   machine's TLS and HTTP stack manage without the fleet's work, the ceiling
   for check-ins;
4. ``cerulean fleet simulate``: *hosts* agents enroll and check in for *seconds*;
   check-ins per second, p50/p99 latency, and reports lost (acknowledged but
   not held by the server afterwards; must be 0).

The server and the simulator share the machine's cores, so the CPU each used
is reported too. It prints a Markdown report (the one in docs/benchmarks.md)
and writes benchmarks/results/fleet.json.

    .venv/bin/python benchmarks/fleet_bench.py [--hosts 10000] [--seconds 600]
        [--workers 2] [--concurrency 64] [--databases sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvloop

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CLI = [sys.executable, "-m", "cerulean.cli"]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children that have exited or still run."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, stdin: str = "") -> str:
    return subprocess.run([*CLI, *args], input=stdin, text=True, capture_output=True,
                          check=True).stdout


def _wait(url: str, proc: subprocess.Popen[bytes]) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit("the fleet server exited")
        try:
            httpx.get(url + "/api/v1/health", verify=ctx, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the fleet server did not start")


async def _reference(url: str, ctx: ssl.SSLContext, seconds: float,
                     concurrency: int, keep_alive: bool) -> dict[str, float]:
    from cerulean.fleet.simulate import Conn

    lat: list[float] = []
    end = time.monotonic() + seconds

    async def worker() -> None:
        # The simulator's own client, so that the two differ only in the server's work.
        c = Conn(url, ctx, keep_alive)
        while time.monotonic() < end:
            t0 = time.monotonic()
            await c.request("GET", "/api/v1/health")
            lat.append((time.monotonic() - t0) * 1000)
        c.close()

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    took = time.monotonic() - start
    lat.sort()
    return {"requests_per_second": round(len(lat) / took, 1),
            "p50_ms": round(lat[len(lat) // 2], 1),
            "p99_ms": round(lat[int(len(lat) * 0.99)], 1)}


def one(db: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from cerulean.fleet.pgtemp import temporary_postgres
    from cerulean.fleet.simulate import _client_ctx, _key_and_csr, simulate

    data, port = work / db / "fleet", _free_port()
    with temporary_postgres(fsync=True, max_connections=300) if db == "postgresql" \
            else contextlib.nullcontext() as pg:
        init = ["fleet", "init", "--data", str(data), "--listen", f"127.0.0.1:{port}",
                "--workers", str(args.workers)]
        if args.keep_alive:  # longer than a host waits between its check-ins
            init += ["--keep-alive", "600", "--max-connections", str(args.hosts + 1000)]
        if pg is not None:
            init += ["--database", pg.new_database("bench")]
        out = _run(*init)
        ca = next(w for w in out.split() if w.startswith("sha256:"))
        log = open(work / f"{db}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([*CLI, "fleet", "serve", "--data", str(data)], stdout=log,
                                stderr=subprocess.STDOUT)
        url = f"https://127.0.0.1:{port}"
        try:
            _wait(url, proc)
            token = json.loads(_run("fleet", "token", "create", "--data", str(data),
                                    "--group", "bench", "--uses", str(args.hosts + 1),
                                    "--hours", "48", "--json"))["token"]
            # One enrolled host's certificate for the reference requests.
            ca_pem = (data / "ca.crt").read_text()
            key, csr = _key_and_csr("reference")
            enrolled = httpx.post(url + "/api/v1/enroll", verify=_ssl(ca_pem), json={
                "token": token, "csr": csr, "hostname": "reference"}).json()
            ref_ctx = _client_ctx(ca_pem, enrolled["certificate"], key, work, "reference")
            cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
            ref = uvloop.run(_reference(url, ref_ctx, min(30.0, args.seconds),
                                        args.concurrency, args.keep_alive))
            ref["server_cpu_share"] = round((_cpu_seconds(proc.pid) - cpu0)
                                            / (time.monotonic() - t0), 2)
            print(f"{db}: reference {ref}", file=sys.stderr)
            cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
            sim_cpu0 = time.process_time()
            r = simulate(url, token, ca, args.hosts, args.seconds, work, args.concurrency,
                         args.interval, say=lambda m: print(f"{db}: {m}", file=sys.stderr),
                         keep_alive=args.keep_alive)
            wall = time.monotonic() - t0
            result = r.to_json()
            result["server_cpu_share"] = round((_cpu_seconds(proc.pid) - cpu0) / wall, 2)
            result["simulator_cpu_share"] = round((time.process_time() - sim_cpu0) / wall, 2)
            result["reference"] = ref
            result["ratio_to_reference"] = round(
                result["checkins_per_second"] / ref["requests_per_second"], 2)
            return result
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()


def _ssl(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.check_hostname = False
    return ctx


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"{args.hosts} simulated hosts checking in for {args.seconds:g} s "
        + (f"(each host every {args.interval:g} s, at most {args.concurrency} check-ins in "
           f"flight; " if args.interval else
           f"({args.concurrency} check-ins in flight, each host again as soon as it is "
           f"answered; ")
        + ("each host keeping its TLS connection open" if args.keep_alive
           else "a new TLS connection for each check-in")
        + f"; server with {args.workers} worker processes; server and simulator on "
        f"the same {os.cpu_count()} cores):", "",
        "| database | check-ins/s | p50 | p99 | p50 / p99 after the first | failed | lost "
        "| reference mTLS requests/s | check-ins ÷ reference | server CPU | simulator CPU "
        "| enrollment |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for db, r in results.items():
        ref = r["reference"]
        lines.append(
            f"| {db} | {r['checkins_per_second']} | {r['p50_ms']} ms | {r['p99_ms']} ms | "
            f"{r['later_p50_ms']} / {r['later_p99_ms']} ms | {r['failed_checkins']} | "
            f"{r['lost']} of {r['reports_acknowledged']} | "
            f"{ref['requests_per_second']} | {r['ratio_to_reference']} | "
            f"{r['server_cpu_share']} cores | {r['simulator_cpu_share']} cores | "
            f"{r['enrolled']} hosts in {r['enroll_seconds']} s |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=10000)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--interval", type=float, default=0.0)
    p.add_argument("--databases", default="sqlite,postgresql")
    p.add_argument("--keep-alive", action="store_true",
                   help="each host (and each reference client) keeps its connection open")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="cerulean-fleet-bench-") as tmp:
        for db in [d.strip() for d in args.databases.split(",") if d.strip()]:
            (Path(tmp) / db).mkdir()
            results[db] = one(db, args, Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps({"args": vars(args), "results": results},
                                                   indent=2) + "\n")
    print(report(results, args))
    return 0 if all(r["lost"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
