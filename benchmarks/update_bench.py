"""Update benchmark: a real trixie-security refresh shipped to a host in QEMU.

In one run, against the real archive:

1. locks the image (default ``vm``) as it was before the security suite's
   current updates (the security suite left out of resolution), builds that as
   release v1 (with a disk) and publishes it to a fresh repository;
2. ``cerulean lock --refresh security`` moves the lock to the security updates
   (the CVEs they fix are listed), builds release v2 and publishes it, which
   makes zstd ``--patch-from`` deltas against v1: full payload vs delta sizes;
3. boots v1 in QEMU (TCG) on a 4 GiB disk with the repository on loopback and
   times the host's own update: download + verify + write + install (from the
   agent's "Installing" line to its "Rebooting" line, guest clock), and from
   that to v2's READY report (host clock);
4. publishes a broken v3 (its updater is masked, so its health check fails)
   and times from the health check's verdict to v2 running again.

It prints a Markdown report (the one in docs/benchmarks.md) and writes
benchmarks/results/update.json.

    .venv/bin/python benchmarks/update_bench.py [--image vm] [--arch amd64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from build_bench import CERULEAN, RESULTS, ROOT

sys.path.insert(0, str(ROOT / "src"))

from cerulean.build.definition import load_definition
from cerulean.build.plan import resolve_lock
from cerulean.debian.cache import Cache
from cerulean.debian.lock import write_lock
from cerulean.protocol.update import ReleaseDoc
from cerulean.release.publish import publish
from cerulean.release.repo import Repository
from cerulean.release.serve import serving
from cerulean.testbed.machine import Machine
from cerulean.testbed.qemu import QemuConfig

CONSOLE = "[Service]\nStandardOutput=journal+console\nStandardError=journal+console\n"
STAMP = r"\[\s*([0-9.]+)\]"


def cli(*args: str | Path, cwd: Path) -> str:
    r = subprocess.run([str(CERULEAN), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"cerulean {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="vm")
    ap.add_argument("--arch", default="amd64")
    ap.add_argument("--timeout", type=float, default=1500)
    args = ap.parse_args()
    result: dict[str, object] = {"image": args.image, "arch": args.arch}
    with tempfile.TemporaryDirectory(prefix="cerulean-update-bench-") as tmp_s:
        tmp = Path(tmp_s)
        work = tmp / "work"
        (work / "images").mkdir(parents=True)
        for p in (ROOT / "images").glob("*.toml"):
            shutil.copy(p, work / "images" / p.name)
        repo = Repository.create(tmp / "repo", tmp / "keys")
        defn_path = work / "images" / f"{args.image}.toml"
        defn_path.write_text(defn_path.read_text() + "\n[update]\nroot = "
                             f'"{repo.meta / "1.root.json"}"\n')
        defn = load_definition(defn_path)
        cache = Cache()
        print("locking without the security suite's current updates", file=sys.stderr)
        write_lock(defn.lock_path, resolve_lock(
            defn, cache, keep=lambda _a, p: not p.suite.endswith("-security")))
        out = tmp / "releases"
        v1, v2, v3 = "13.20261101.1", "13.20261101.2", "13.20261101.3"
        print(f"building {v1}", file=sys.stderr)
        cli("release", "build", defn_path, "--arch", args.arch, "--out", out, "--version", v1,
            "--disk", "raw", "--locked", cwd=work)
        publish(repo, out / args.image / v1, "stable", [(0, 1.0)])
        refresh = json.loads(cli("lock", "--refresh", "security", defn_path, "--json",
                                 cwd=work))
        result["security_changes"] = sum(len(c) for c in refresh["changes"].values())
        result["cves"] = refresh["cves"]
        print(f"building {v2} ({len(refresh['cves'])} CVEs)", file=sys.stderr)
        cli("release", "build", defn_path, "--arch", args.arch, "--out", out, "--version", v2,
            "--locked", cwd=work)
        t = time.monotonic()
        doc = publish(repo, out / args.image / v2, "stable", [(0, 1.0)])
        result["publish_s"] = round(time.monotonic() - t, 1)
        ar = doc.arches[args.arch]
        result["parts"] = {
            name: {"bytes": part.size, "full": part.full.size,
                   "delta": part.deltas[v1].payload.size if v1 in part.deltas else None}
            for name, part in ar.parts.items()}
        changes = ReleaseDoc.from_json(json.loads(
            (out / args.image / v2 / "release.json").read_text())).changes
        result["packages_changed"] = len(changes)

        # v3: the same packages, its updater masked, so its health check fails.
        broken = work / "images" / f"{args.image}-broken.toml"
        text = defn_path.read_text().replace("[image]\n", f'[image]\nname = "{args.image}"\n',
                                             1)
        text = text.replace("[system]\n", '[system]\nkernel-cmdline = '
                            '["systemd.mask=cerulean-update.timer"]\n', 1)
        broken.write_text(text)
        shutil.copy(defn.lock_path, broken.with_suffix(".lock"))
        print(f"building {v3} (broken)", file=sys.stderr)
        cli("release", "build", broken, "--arch", args.arch, "--out", out, "--version", v3,
            "--locked", cwd=work)

        disk = tmp / "host.raw"
        shutil.copyfile(out / args.image / v1 / f"{args.image}-{args.arch}.raw", disk)
        subprocess.run(["qemu-img", "resize", "-q", "-f", "raw", str(disk), "4G"], check=True)
        with serving(repo.path) as url:
            port = url.rsplit(":", 1)[1]
            creds = {
                "cerulean.update": f'url = "http://10.0.2.2:{port}"\n',
                "systemd.unit-dropin.cerulean-update.timer":
                    "[Timer]\nOnBootSec=\nOnActiveSec=15s\nOnUnitInactiveSec=20s\n"
                    "RandomizedDelaySec=0\n",
                "systemd.unit-dropin.cerulean-update.service": CONSOLE,
                "systemd.unit-dropin.cerulean-health.service": CONSOLE,
            }
            with Machine(disk, tmp / "machine", QemuConfig(arch=args.arch), creds) as m:
                m.start()
                m.ready(args.timeout)
                begin = m.expect(STAMP + r" cerulean\[\d+\]: Installing", args.timeout)
                end = m.expect(STAMP + rf" cerulean\[\d+\]: Rebooting into {v2}", args.timeout)
                rebooting_at = time.monotonic()
                result["apply_s"] = round(float(end[1]) - float(begin[1]), 1)
                r = m.ready(args.timeout)
                assert r.get("version") == v2, r.values
                result["reboot_to_ready_s"] = round(time.monotonic() - rebooting_at, 1)
                publish(repo, out / args.image / v3, "stable", [(0, 1.0)])
                m.expect(r"is unhealthy; rebooting into the previous release", args.timeout)
                failed_at = time.monotonic()
                while True:
                    r = m.ready(args.timeout)
                    if r.get("version") == v2:
                        break
                result["failed_to_running_s"] = round(time.monotonic() - failed_at, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "update.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.2f}"


def markdown(r: dict[str, object]) -> str:
    parts = r["parts"]
    assert isinstance(parts, dict)
    lines = [
        f"`{r['image']}` {r['arch']}: a real trixie-security refresh "
        f"({r['packages_changed']} package changes, {len(r['cves'])} CVEs; "
        "payloads at zstd -19)",
        "",
        "| part | size (MiB) | full payload (MiB) | delta (MiB) | delta / full |",
        "|---|---|---|---|---|",
    ]
    full_total = delta_total = 0
    for name, p in parts.items():
        ratio = f"{p['delta'] / p['full']:.3f}" if p["delta"] else "-"
        lines.append(f"| {name} | {mib(p['bytes'])} | {mib(p['full'])} | {mib(p['delta'])} | "
                     f"{ratio} |")
        full_total += p["full"]
        delta_total += p["delta"] or p["full"]
    lines.append(f"| total | | {mib(full_total)} | {mib(delta_total)} | "
                 f"{delta_total / full_total:.3f} |")
    lines += [
        "",
        "| step | seconds |",
        "|---|---|",
        f"| publish v2 (sign, make deltas) | {r['publish_s']} |",
        f"| on the host: download + verify + write + install (guest clock) | {r['apply_s']} |",
        f"| reboot into v2 until it is marked good | {r['reboot_to_ready_s']} |",
        f"| failed health check of v3 until v2 runs again | {r['failed_to_running_s']} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
