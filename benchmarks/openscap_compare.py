"""The anssi-bp28-intermediary profile against OpenSCAP on the same booted system.

1. A Debian 13 tool tree with ``openscap-scanner`` and ``ssg-debian`` (whose
   ``ssg-debian12-ds.xml`` carries the ``anssi_bp28_intermediary`` profile) is
   made once with mmdebstrap and cached (``--tools``). OpenSCAP 1.4 needs a
   newer C library than Debian 12 has, and ``oscap-chroot`` on an image's root
   cannot judge kernel settings, mounts or services, so it runs *inside* the
   guest, from that tree, against the live system.
2. The ``vm`` image (``--disk``) is booted in QEMU. SSG's content is for Debian 12
   and applies only where ``/etc/debian_version`` says 12 (its CPE check); the image
   is built from Debian 13, so for oscap's runs alone a file saying ``12.13`` is
   bind-mounted over it. Inside, in one boot:
   ``cerulean policy check --profile anssi-bp28-intermediary --json`` and
   ``oscap xccdf eval`` of the same profile, then ``cerulean policy fix`` and
   both again, so the comparison covers a host before and after the fixes.
3. ``cerulean policy compare`` sets each of the 220 rules side by side; the
   report (Markdown, for docs/agent.md) lists every rule on which they differ.

Results go to benchmarks/results/openscap/ (both tools' raw output included).

    .venv/bin/python benchmarks/openscap_compare.py --disk out/vm-amd64.qcow2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "openscap"
sys.path.insert(0, str(ROOT / "src"))

PROFILE = "xccdf_org.ssgproject.content_profile_anssi_bp28_intermediary"

GUEST = r"""
set -u
out=$1
T=$PWD/tools
# The guest's own libraries first (its C library above all); the tree fills in the rest.
LIB=/usr/lib/$(uname -m)-linux-gnu:$T/usr/lib/$(uname -m)-linux-gnu
oscap() {
    LD_LIBRARY_PATH=$LIB OSCAP_SCHEMA_PATH=$T/usr/share/openscap/schemas \
        OSCAP_XSLT_PATH=$T/usr/share/openscap/xsl "$T/usr/bin/oscap" "$@"
}
DS=$T/usr/share/xml/scap/ssg/content/ssg-debian12-ds.xml
oscap --version | head -1 > "$out/oscap-version"
dpkg-query -W -f '${Version}\n' cerulean-agent > "$out/agent-version" 2>&1
for pass in before after; do
    if [ "$pass" = after ]; then
        cerulean policy fix --profile anssi-bp28-intermediary > "$out/fix.txt" 2>&1
    fi
    start=$(date +%s)
    cerulean policy check --profile anssi-bp28-intermediary --json > "$out/ours-$pass.json" \
        2> "$out/ours-$pass.err"
    echo "cerulean $pass: exit $?, $(( $(date +%s) - start )) s" >> "$out/times"
    # SSG's Debian 12 content applies only where /etc/debian_version says 12 (its CPE
    # check); Cerulean is built from Debian 13. For oscap's runs alone, the file says 12.
    printf '12.13\n' > /run/debian_version.12
    mount --bind /run/debian_version.12 /etc/debian_version
    start=$(date +%s)
    oscap xccdf eval --profile PROFILE --results "$out/oscap-$pass.xml" "$DS" \
        > "$out/oscap-$pass.txt" 2> "$out/oscap-$pass.err"
    echo "oscap $pass: exit $?, $(( $(date +%s) - start )) s" >> "$out/times"
    umount /etc/debian_version
done
exit 0
""".replace("PROFILE", PROFILE)


def tool_tree(where: Path) -> Path:
    """A Debian 13 tree with openscap-scanner and ssg-debian, made once."""
    from cerulean.debian.archive import default_archive

    if (where / "usr/bin/oscap").exists():
        return where
    tmp = where.with_name(where.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"making the OpenSCAP tool tree in {where} (mmdebstrap, Debian 13)", file=sys.stderr)
    subprocess.run(["mmdebstrap", "--variant=minbase", "--mode=root", "--quiet",
                    "--include=openscap-scanner,ssg-debian", "trixie", str(tmp),
                    default_archive().mirror], check=True)
    tmp.rename(where)
    return where


def compare(result_dir: Path, when: str) -> dict[str, object]:
    from cerulean.agent import xccdf

    ours = json.loads((result_dir / f"ours-{when}.json").read_text())
    theirs = xccdf.read_results(result_dir / f"oscap-{when}.xml")
    pairs = xccdf.compare(ours, theirs)
    return {"summary": xccdf.summary(pairs), "ours_score": ours["score"],
            "openscap": {r: sum(1 for v in theirs.values() if v == r)
                         for r in sorted(set(theirs.values()))},
            "rules": [p.to_json() for p in pairs]}


def markdown(report: dict[str, dict[str, object]]) -> str:
    lines = []
    for when in ("before", "after"):
        r = report[when]
        s = r["summary"]
        assert isinstance(s, dict)
        lines += [f"### {when} `cerulean policy fix`", "",
                  f"- ours: score {r['ours_score']}%; OpenSCAP: {r['openscap']}",
                  f"- {s['both']} rules evaluated by both: {s['agree']} agree, "
                  f"{s['differ']} differ; of the {s['both_judged']} both passed or failed, "
                  f"{s['agree_judged']} agree", "",
                  "| rule | ours | OpenSCAP |", "|---|---|---|"]
        rules = r["rules"]
        assert isinstance(rules, list)
        lines += [f"| `{p['rule']}` | {p['ours']} | {p['openscap']} |"
                  for p in rules if not p["agree"]]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--disk", type=Path, required=True, help="a built vm image")
    p.add_argument("--tools", type=Path,
                   default=Path.home() / ".cache/cerulean/openscap-tools",
                   help="where the Debian 13 OpenSCAP tree is made and kept")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args()
    from cerulean.testbed.guest import run_in_guest
    from cerulean.testbed.qemu import QemuConfig

    tools = tool_tree(args.tools)
    shutil.rmtree(RESULTS, ignore_errors=True)
    RESULTS.mkdir(parents=True)
    # Only what oscap needs of the tree: the program, its libraries, its schemas, the content.
    libdir = next(tools.glob("usr/lib/*-linux-gnu"))
    parts = ["usr/bin/oscap", str(libdir.relative_to(tools)), "usr/share/openscap",
             "usr/share/xml/scap"]
    run = run_in_guest(args.disk, GUEST, files={f"tools/{x}": tools / x for x in parts},
                       cfg=QemuConfig(memory_mib=4096), out_dir=RESULTS / "guest",
                       timeout_s=args.timeout, out_mib=256)
    if run.returncode != 0:
        print(f"the guest run failed (rc {run.returncode}); console: {run.console_log}",
              file=sys.stderr)
        return 1
    out = run.out_dir
    report = {when: compare(out, when) for when in ("before", "after")}
    report["versions"] = {"oscap": (out / "oscap-version").read_text().strip(),
                          "agent": (out / "agent-version").read_text().strip()}
    (RESULTS / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print((out / "times").read_text(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
