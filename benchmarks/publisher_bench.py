"""Publisher benchmark: from a new trixie-security InRelease to a signed release on stable.

In one run:

1. a local, signed copy of the real trixie-security suite is served on
   loopback (tests/support/security_archive.py) and the image's definition
   (default ``vm``) reads its security suite from there;
2. the publisher's first round builds and publishes the first release of
   every architecture to ``stable`` (not timed: the baseline);
3. a fixed version of a package the image holds (``less``, with a changelog
   entry naming a CVE) is published to the local suite, and the publisher's
   next round is timed from the new InRelease's Date to the release's commit
   into ``stable``, with each step from the publisher's audit trail.

The publisher is started right after the archive changes, so the time a
running service adds by polling (up to its ``poll``, 10 minutes by default) is
not in the figure; it is added in the report.

    .venv/bin/python benchmarks/publisher_bench.py [--image vm] [--arch amd64,arm64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from build_bench import RESULTS, ROOT

sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from cerulean.agent.audit import AuditLog
from cerulean.debian.cache import Cache
from cerulean.debian.lock import read_lock
from cerulean.release.publisher import Publisher, load_config
from cerulean.release.repo import Repository
from support.loopback import no_proxy
from support.openpgp import make_keys, stop_agent
from support.security_archive import SecurityArchive

PACKAGE = "less"
CVE = "CVE-2026-99999"


def parse(t: str) -> datetime:
    return datetime.fromisoformat(t.replace("Z", "+00:00"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default="vm")
    ap.add_argument("--arch", default="amd64,arm64")
    args = ap.parse_args()
    arches = [a for a in args.arch.split(",") if a]
    no_proxy()
    tmp = Path(tempfile.mkdtemp(prefix="publisher-bench."))
    keys = make_keys(tmp / "gnupg")
    try:
        with SecurityArchive(tmp / "security", keys, cache=Cache(),
                             arches=("amd64", "arm64")) as archive:
            Repository.create(tmp / "repo", tmp / "keys")
            images = tmp / "images"
            images.mkdir()
            text = (ROOT / "images" / f"{args.image}.toml").read_text()
            text += (f'\n[archive]\nsecurity-mirror = "{archive.url}"\n'
                     f'keyring = "{archive.keyring}"\n')
            (images / f"{args.image}.toml").write_text(text)
            shutil.copy(ROOT / "images" / f"{args.image}.lock", images / f"{args.image}.lock")
            config = tmp / "publisher.toml"
            config.write_text(
                f'repo = "repo"\nkeys = "keys"\nwork = "work"\ncache = "{Cache().root}"\n'
                f'[[image]]\ndefinition = "images/{args.image}.toml"\n'
                f'arches = {json.dumps(arches)}\nchannels = {{ stable = "default" }}\n')
            say = lambda m: print(f"  {m}", flush=True)  # noqa: E731
            t0 = time.monotonic()
            first = Publisher(load_config(config), say=say).run_once()
            baseline = time.monotonic() - t0
            assert not first.errors, first.errors
            print(f"baseline release published in {baseline:.0f} s", flush=True)

            fix = archive.add_fix(PACKAGE, ("amd64", "arm64"), CVE,
                                  lock=read_lock(images / f"{args.image}.lock"))
            assert archive.date is not None
            inrelease_date = archive.date
            t0 = time.monotonic()
            out = Publisher(load_config(config), say=say).run_once()
            wall = time.monotonic() - t0
            assert not out.errors, out.errors
            assert any("stable" in p for p in out.published), out.published
    finally:
        stop_agent(keys.home)
    log = [e for e in AuditLog(tmp / "work" / "audit.jsonl").entries()]
    fixed = [e for e in log if e["action"] == "lock.refreshed" and CVE in e["detail"]["cves"]]
    built = [e for e in log if e["action"] == "release.built"][-1]
    published = [e for e in log if e["action"] == "release.published"][-1]
    steps = {
        "lock refreshed": (parse(fixed[0]["time"]) - inrelease_date).total_seconds(),
        "release built": (parse(built["time"]) - parse(fixed[0]["time"])).total_seconds(),
        "published (deltas, signing)": (parse(published["time"])
                                        - parse(built["time"])).total_seconds(),
    }
    total = (parse(published["time"]) - inrelease_date).total_seconds()
    result = {"image": args.image, "arches": arches, "package": PACKAGE,
              "version": fix.version, "release": published["detail"]["version"],
              "inrelease_date": inrelease_date.isoformat(), "steps_seconds": steps,
              "total_seconds": total, "round_wall_seconds": round(wall, 1),
              "baseline_seconds": round(baseline, 1), "cpus": os.cpu_count(),
              "when": datetime.now(UTC).isoformat(timespec="seconds")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "publisher.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| step | seconds |\n|---|---:|")
    for k, v in steps.items():
        print(f"| {k} | {v:.0f} |")
    print(f"| **new InRelease → signed release on stable** | **{total:.0f}** |")
    print(f"\n{args.image} {', '.join(arches)}: {PACKAGE} {fix.version} ({CVE}) in "
          f"{result['release']}; with the service's poll (10 min) the worst case is "
          f"{total + 600:.0f} s.")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
