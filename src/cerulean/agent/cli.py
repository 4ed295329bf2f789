"""``cerulean`` on a Cerulean host: the agent's command line (standard library only)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cerulean.errors import CeruleanError

DESCRIPTION = """\
Cerulean host agent.

  cerulean update status      slot, version, staged release, last result
  cerulean update check       ask the update repository what is offered (changes nothing)
  cerulean update apply       download and install the offered release, then reboot
                              inside the maintenance window (--no-reboot: only stage it)
  cerulean update rollback    go back to the other slot's release and never re-apply this one
  cerulean audit verify       check that no entry of the audit trail was edited, removed
                              or moved (exit 1 names the first that was)
  cerulean audit show         the audit trail's last entries
  cerulean cve report --tracker FILE
                              the CVEs that affect this host's packages (Debian Security
                              Tracker JSON), worst first
  cerulean agent metrics      this host's metrics, as the agent serves them to Prometheus
  cerulean agent run          the agent itself (what cerulean-agent.service runs)
"""


def _print(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    for k, v in data.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        elif isinstance(v, list):
            v = ", ".join(map(str, v)) or "-"
        print(f"{k.replace('_', ' ')}: {'-' if v is None else v}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cerulean", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="group", metavar="COMMAND")
    up = sub.add_parser("update", help="atomic A/B updates of this host",
                        description="Atomic, signed A/B updates of this host.")
    usub = up.add_subparsers(dest="action", metavar="ACTION")
    for name, text in (("status", "show slots, versions, staged release and last result"),
                       ("check", "show what the repository offers this host"),
                       ("apply", "install the offered release into the other slot"),
                       ("run", "what the timer runs: reconcile, apply, reboot in the window"),
                       ("rollback", "boot the other slot's release and skip this one from now"),
                       ("health", "run the health check (part of boot-complete.target)")):
        a = usub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        a.add_argument("--json", action="store_true", help="print the result as JSON")
        if name in ("check", "apply", "run"):
            a.add_argument("--url", help="use this repository instead of the configured one")
        if name in ("apply", "run"):
            a.add_argument("--no-reboot", action="store_true",
                           help="only stage the release; it boots at the next reboot")
            a.add_argument("--now", action="store_true",
                           help="reboot even outside the maintenance window")
        if name == "rollback":
            a.add_argument("--no-reboot", action="store_true",
                           help="switch the boot entry but do not reboot")
        if name == "health":
            a.add_argument("--fallback", action="store_true",
                           help="on failure during a counted boot, mark it bad and reboot")
    au = sub.add_parser("audit", help="the agent's hash-chained audit trail",
                        description="The agent's audit trail: every action it took, each "
                        "entry chained to the one before by its sha256.")
    asub = au.add_subparsers(dest="action", metavar="ACTION")
    v = asub.add_parser("verify", help="check every entry and the chain",
                        description="Check every entry and the chain; exit 1 and name the "
                        "first entry that was edited, removed, inserted or moved.")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    sh = asub.add_parser("show", help="print the last entries",
                         description="Print the audit trail's last entries (not verified: "
                         "run verify for that).")
    sh.add_argument("-n", "--last", type=int, default=20, metavar="N",
                    help="how many entries (default: 20; 0: all)")
    sh.add_argument("--json", action="store_true", help="print the entries as JSON lines")
    cv = sub.add_parser("cve", help="CVEs that affect this host",
                        description="CVEs that affect this host's installed packages.")
    csub = cv.add_subparsers(dest="action", metavar="ACTION")
    rep = csub.add_parser("report", help="list the CVEs that affect this host, worst first",
                          description="List the CVEs that affect this host's installed "
                          "packages (dpkg's status), from the Debian Security Tracker's JSON "
                          "(a copy of security-tracker.debian.org/tracker/data/json), worst "
                          "first: a fix is available, Debian has no fix yet, or undetermined.")
    rep.add_argument("--tracker", required=True, type=Path, metavar="FILE",
                     help="the Security Tracker's JSON")
    rep.add_argument("--release", default=None,
                     help="the Debian release to read (default: this host's VERSION_CODENAME)")
    rep.add_argument("--json", action="store_true", help="print the findings as JSON")
    ag = sub.add_parser("agent", help="the long-running host agent",
                        description="The long-running host agent (cerulean-agent.service).")
    gsub = ag.add_subparsers(dest="action", metavar="ACTION")
    gsub.add_parser("run", help="run the agent until SIGTERM",
                    description="Run the agent until SIGTERM: it serves this host's metrics "
                    "on metrics-listen (default 127.0.0.1:9477; /etc/cerulean/agent.toml).")
    gsub.add_parser("metrics", help="print this host's metrics once",
                    description="Print this host's metrics once, in the Prometheus text "
                    "format the agent serves on /metrics.")
    return p


def run_agent(args: argparse.Namespace) -> int:
    from cerulean.agent import daemon

    if args.action == "metrics":
        sys.stdout.write(daemon.exposition(slot=daemon.booted_slot()).decode())
        return 0
    return daemon.run(say=lambda m: print(m, flush=True), slot=daemon.booted_slot())


def run_cve(args: argparse.Namespace) -> int:
    from cerulean.agent import cves
    from cerulean.agent.update.host import Host

    release = args.release or Host().os_release().get("VERSION_CODENAME") or "trixie"
    try:
        tracker = cves.load_tracker(args.tracker)
    except FileNotFoundError:
        raise CeruleanError(f"The tracker file {args.tracker} does not exist.") from None
    except ValueError as e:
        raise CeruleanError(f"{args.tracker} is not the Security Tracker's JSON: "
                            f"{str(e).rstrip('.')}.") from None
    packages = cves.installed_packages()
    found = cves.affecting(packages, tracker, release)
    if args.json:
        print(json.dumps({"release": release, "packages": len(packages),
                          "findings": [f.to_json() for f in found]}, indent=2))
        return 0
    for f in found:
        fix = f"fixed in {f.fixed_version}" if f.fixed_version else f.status
        print(f"{f.cve:<16} {f.severity:<17} {f.source} {f.installed}: {fix}")
    counts = {s: sum(1 for f in found if f.status == s)
              for s in ("fix-available", "no-fix-yet", "undetermined")}
    n = len(found)
    print(f"{n} CVE{' affects' if n == 1 else 's affect'} {len(packages)} installed packages "
          f"on {release}: "
          f"{counts['fix-available']} with a fix available, {counts['no-fix-yet']} without "
          f"a fix yet, {counts['undetermined']} undetermined.")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from cerulean.agent.audit import AuditLog
    from cerulean.agent.update.host import Host

    log = AuditLog(Host().audit_log)
    if args.action == "verify":
        verdict = log.verify()
        if args.json:
            print(json.dumps(verdict.to_json(), indent=2, sort_keys=True))
        elif verdict.ok:
            print(f"The audit trail is intact: {verdict.entries} entries, last hash "
                  f"{verdict.head[:16]}.")
            for note in verdict.notes:
                print(f"note: {note}")
        else:
            for prob in verdict.problems:
                print(f"error: {prob.message}", file=sys.stderr)
            n = verdict.entries
            print("No entry before it is intact." if n == 0 else
                  f"Entry 1 before it is intact (hash {verdict.head[:16]})." if n == 1 else
                  f"Entries 1..{n} before it are intact (last hash {verdict.head[:16]}).",
                  file=sys.stderr)
        return 0 if verdict.ok else 1
    if args.last < 0:
        raise CeruleanError("--last must be 0 (all) or more.")
    entries = list(log.entries())
    for e in entries[-args.last:] if args.last else entries:
        if args.json:
            print(json.dumps(e, sort_keys=True))
        else:
            raw = e.get("detail")
            detail: dict[str, Any] = raw if isinstance(raw, dict) else {}
            text = detail.get("message") or ", ".join(f"{k}={v}" for k, v in detail.items())
            print(f"{e.get('seq', '?'):>6}  {e.get('time', '?')}  {e.get('actor', '?')}: "
                  f"{e.get('action', '?')}  {text}")
    return 0


def run_update(args: argparse.Namespace) -> int:
    from cerulean.agent.update import health
    from cerulean.agent.update.updater import Updater

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    up = Updater(say=say, url=getattr(args, "url", None))
    if args.action == "status":
        _print(up.status(), args.json)
        return 0
    if args.action == "health":
        problems = health.check(up.host, network=up.network_expected(), say=say)
        if problems and args.fallback:
            out = up.health_failed(problems)
            _print(vars(out), args.json)
        elif not problems:
            say("healthy")
        return 1 if problems else 0
    if args.action == "check":
        out = up.check()
    elif args.action in ("apply", "run"):
        out = up.run(reboot=False if args.no_reboot else None, ignore_window=args.now)
    elif args.action == "rollback":
        out = up.rollback(reboot=not args.no_reboot)
    else:  # pragma: no cover - argparse only allows the actions above
        raise AssertionError(args.action)
    _print(vars(out), args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.group not in ("update", "audit", "agent", "cve") or \
            not getattr(args, "action", None):
        p.print_help()
        return 2
    try:
        if args.group == "agent":
            return run_agent(args)
        if args.group == "cve":
            return run_cve(args)
        return run_audit(args) if args.group == "audit" else run_update(args)
    except CeruleanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}.",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
