"""``cerulean`` on a Cerulean host: the agent's command line (standard library only)."""

from __future__ import annotations

import argparse
import json
import sys
import time
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
  cerulean audit repair       make the trail writable again after a crash or damage
  cerulean policy list        the compliance profiles on this host
  cerulean policy check       check a profile (default: cerulean-baseline): score, each check
                              and its evidence; --html FILE or --json for reports
  cerulean policy fix         fix the failed checks that have a fix, then check again
  cerulean policy report      the last check as an HTML page (or --format json)
  cerulean policy compare --openscap RESULTS.xml
                              set a profile's results beside OpenSCAP's for the same host,
                              rule by rule (anssi-bp28-intermediary and SSG's Debian 12 one)
  cerulean integrity check    what changed in /etc since the image was built (or since the
                              first scan, on other servers), and /usr's dm-verity state
  cerulean cve report --tracker FILE|URL
                              the CVEs that affect this host's packages (Debian Security
                              Tracker JSON), worst first
  cerulean agent metrics      this host's metrics, as the agent serves them to Prometheus
  cerulean agent run          the agent itself (what cerulean-agent.service runs)
  cerulean agent enroll --server URL --token T --ca-sha256 H
                              join a fleet (the fleet prints this command with the token)
  cerulean agent report       send what is new to the fleet now (the agent does it each minute)
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
    asub.add_parser(
        "repair", help="make the trail writable again after a crash or damage",
        description="Make the audit trail writable again: cut off a torn last entry "
        "(whatever its size), move the head on to an entry a power cut left it short of, "
        "set aside entries at the end that the agent did not write, and rebuild a "
        "damaged, missing or wrong head file from the last valid entry. What is cut off "
        "or set aside is kept in audit.rejected beside the trail, and every step is "
        "written to the trail as an alert. It never rewrites entries: an edited or cut "
        "trail stays broken, and verify still names where. The agent does the same, "
        "but for a wrong head, before each write.")
    ig = sub.add_parser("integrity", help="file integrity against the image's manifest",
                        description="File integrity: this host's writable configuration "
                        "against the manifest its image shipped on /usr (covered by "
                        "dm-verity), or, on servers not built by Cerulean, against the "
                        "first scan.")
    isub = ig.add_subparsers(dest="action", metavar="ACTION")
    ic = isub.add_parser("check", help="list every change since the baseline",
                         description="List every change since the baseline: path, what "
                         "changed, old and new sha256, mode, owner and package; and /usr's "
                         "dm-verity state. Exit 0 when nothing changed, 2 when something "
                         "did, 1 on an error.")
    ic.add_argument("--json", action="store_true", help="print the result as JSON")
    cv = sub.add_parser("cve", help="CVEs that affect this host",
                        description="CVEs that affect this host's installed packages.")
    csub = cv.add_subparsers(dest="action", metavar="ACTION")
    rep = csub.add_parser("report", help="list the CVEs that affect this host, worst first",
                          description="List the CVEs that affect this host's installed "
                          "packages (dpkg's status), from the Debian Security Tracker's JSON "
                          "(a copy of security-tracker.debian.org/tracker/data/json), worst "
                          "first: a fix is available, Debian has no fix yet, or undetermined.")
    rep.add_argument("--tracker", required=True, metavar="FILE|URL",
                     help="the Security Tracker's JSON: a file, or an https:// URL fetched "
                     "into /var/cache/cerulean and used from there while it is fresh")
    rep.add_argument("--max-age", type=float, default=6, metavar="HOURS",
                     help="how old the cached copy of a URL may be before it is fetched "
                     "again (default: 6)")
    rep.add_argument("--release", default=None,
                     help="the Debian release to read (default: this host's VERSION_CODENAME)")
    rep.add_argument("--json", action="store_true", help="print the findings as JSON")
    po = sub.add_parser("policy", help="compliance profiles: check, fix, report",
                        description="Compliance profiles: check this host against one, fix "
                        "what fails, write reports. Profiles live in "
                        "/usr/lib/cerulean/policies and /etc/cerulean/policies.")
    psub = po.add_subparsers(dest="action", metavar="ACTION")
    psub.add_parser("list", help="list the profiles on this host",
                    description="List the profiles on this host and their number of checks.")
    profile_help = ("a profile name (see 'policy list') or the path of a policy file "
                    "(default: the first of 'policies' in /etc/cerulean/agent.toml, "
                    "cerulean-baseline)")
    pc = psub.add_parser("check", help="check this host against a profile",
                         description="Check this host against a profile: the score, each "
                         "check's result and the evidence of what failed. Exit 0 when no "
                         "check fails (checks that do not apply to this host aside), 2 when "
                         "some fail or cannot be checked, 1 on an error. Changes nothing but "
                         "the stored last result.")
    pf = psub.add_parser("fix", help="fix the failed checks, then check again",
                         description="Check, run the fix of every failed check that has "
                         "one (structured actions, never shell text: see docs/agent.md), "
                         "then check again and show the score before and after. Every fix "
                         "goes to the audit trail. Exit 0 when every check passes after, "
                         "2 when some still fail, 1 on an error.")
    pr = psub.add_parser("report", help="write a report of a fresh check (HTML or JSON)",
                         description="Check this host against a profile and write the report "
                         "as a self-contained HTML page or as JSON, to a file or stdout.")
    prun = psub.add_parser("run", help="what cerulean-policy.timer runs",
                           description="Run the configured profiles ('policies' in "
                           "/etc/cerulean/agent.toml) in the configured 'policy-mode': audit "
                           "only checks, enforce fixes a check once and then reports its "
                           "drift, autocorrect fixes every time.")
    prun.add_argument("--json", action="store_true", help="print the results as JSON")
    pcmp = psub.add_parser(
        "compare", help="set a profile's results beside OpenSCAP's for this host",
        description="Check this host against a profile (or read a saved 'policy check "
        "--json' report) and set each check beside OpenSCAP's result for the SCAP Security "
        "Guide rule it stands for (the check's 'ssg-debian12' IDs). Made for the "
        "anssi-bp28-intermediary profile and SSG's Debian 12 data stream: oscap xccdf eval "
        "--profile anssi_bp28_intermediary --results RESULTS.xml "
        "ssg-debian12-ds.xml. Exit 0 when both agree on every rule both evaluated, 2 when "
        "they differ, 1 on an error.")
    pcmp.add_argument("--openscap", type=Path, required=True, metavar="RESULTS.xml",
                      help="OpenSCAP's XCCDF 1.2 results (--results) or ARF (--results-arf)")
    pcmp.add_argument("--report", type=Path, metavar="FILE",
                      help="our report as JSON (from 'policy check --json') instead of "
                      "checking now")
    pcmp.add_argument("-p", "--profile", default="anssi-bp28-intermediary", metavar="PROFILE",
                      help="the profile to check when no --report is given (default: "
                      "anssi-bp28-intermediary)")
    pcmp.add_argument("--all", action="store_true", help="list the rules they agree on too")
    pcmp.add_argument("--json", action="store_true", help="print every pair as JSON")
    for a in (pc, pf, pr):
        a.add_argument("-p", "--profile", default=None, metavar="PROFILE", help=profile_help)
    for a in (pc, pf):
        a.add_argument("--json", action="store_true", help="print the result as JSON")
        a.add_argument("-v", "--verbose", action="store_true",
                       help="show the evidence of passed checks too")
    pc.add_argument("--html", type=Path, metavar="FILE", help="also write an HTML report")
    pf.add_argument("--check", action="append", default=[], metavar="ID",
                    help="fix only this check (repeat for more)")
    pf.add_argument("--dry-run", action="store_true",
                    help="show what would be done and change nothing")
    pr.add_argument("--format", choices=("html", "json"), default="html",
                    help="html (default) or json")
    pr.add_argument("-o", "--output", type=Path, metavar="FILE",
                    help="write here (default: stdout)")
    ag = sub.add_parser("agent", help="the long-running host agent",
                        description="The long-running host agent (cerulean-agent.service).")
    gsub = ag.add_subparsers(dest="action", metavar="ACTION")
    gsub.add_parser("run", help="run the agent until SIGTERM",
                    description="Run the agent until SIGTERM: it serves this host's metrics "
                    "on metrics-listen (default 127.0.0.1:9477; /etc/cerulean/agent.toml).")
    gsub.add_parser("metrics", help="print this host's metrics once",
                    description="Print this host's metrics once, in the Prometheus text "
                    "format the agent serves on /metrics.")
    en = gsub.add_parser(
        "enroll", help="join a fleet (with a token from `cerulean fleet token create`)",
        description="Join a fleet: check the fleet CA against --ca-sha256, make this host's "
        "key (it stays in /var/lib/cerulean/fleet) and get a certificate for it with the "
        "one-time token. `cerulean fleet token create` prints the whole command.")
    en.add_argument("--server", required=True, help="https://fleet.example.com:8443")
    en.add_argument("--token", required=True, help="the enrollment token (cet_...)")
    en.add_argument("--ca-sha256", required=True, metavar="sha256:HEX",
                    help="the fleet CA's fingerprint, as the token's command gives it")
    en.add_argument("--hostname", help="the name to enroll as (default: this host's name)")
    rp = gsub.add_parser(
        "report", help="send what is new to the fleet now",
        description="Queue what the fleet has not had yet (inventory, alerts, audit-trail "
        "head, compliance results, metrics) and deliver the outbox now; the running agent "
        "does this every fleet-interval seconds.")
    rp.add_argument("--json", action="store_true")
    return p


def run_agent(args: argparse.Namespace) -> int:
    from cerulean.agent import daemon

    if args.action == "metrics":
        sys.stdout.write(daemon.exposition(slot=daemon.booted_slot()).decode())
        return 0
    if args.action == "enroll":
        from cerulean.agent import fleetlink

        e = fleetlink.enroll(args.server, args.token, args.ca_sha256, hostname=args.hostname)
        print(f"Enrolled in the fleet at {e.server} as host {e.host_id}; the certificate is "
              f"valid until {e.not_after}.")
        return 0
    if args.action == "report":
        from cerulean.agent import fleetlink

        r = fleetlink.sync()
        out = {"queued": r.queued, "delivered": r.delivered, "failed": r.failed,
               "pending": r.pending, "renewed": r.renewed, "error": r.error or None}
        _print(out, args.json)
        return 0 if not r.failed and not r.error else 1
    return daemon.run(say=lambda m: print(m, flush=True), slot=daemon.booted_slot())


def _write_new(path: Path, text: str) -> None:
    """Write a report whole (never half-written)."""
    from cerulean.agent.fileio import write_atomic

    if path.is_dir():
        raise CeruleanError(f"{path} is a directory; give a file name for the report.")
    write_atomic(path.resolve(), text.encode())


def _show_report(report: Any, verbose: bool, passed: bool = True) -> None:
    """Each check's result (the passed ones only with *passed*) and the evidence of those
    that did not pass (of all with *verbose*)."""
    mark = {"passed": "pass", "failed": "FAIL", "error": "ERR ", "notapplicable": "n/a "}
    for r in report.results:
        if r.result in ("passed", "notapplicable") and not (passed or verbose):
            continue
        ids = "; ".join(f"{k} {', '.join(v)}" for k, v in r.compliance.items())
        print(f"{mark[r.result]}  {r.id:<28} {r.title}{f'  [{ids}]' if ids else ''}")
        if r.result not in ("passed", "notapplicable") or verbose:
            if r.message:
                print(f"        {r.message}")
            for x in r.rules:
                if r.result != "passed" or verbose:
                    print(f"        {'✔' if x.held else '✘'} {x.evidence}")


def _score_line(report: Any) -> str:
    na = report.count("notapplicable")
    return (f"{report.score:g}% ({report.count('passed')} passed, {report.count('failed')} "
            f"failed, {report.count('error')} could not be checked"
            f"{f', {na} not applicable' if na else ''}, of {len(report.results)})")


def _compare(args: argparse.Namespace, root: Path) -> int:
    from cerulean.agent import policy as pol
    from cerulean.agent import xccdf
    from cerulean.agent.rules import Host as RuleHost

    theirs = xccdf.read_results(args.openscap)
    if args.report is not None:
        try:
            report = json.loads(args.report.read_text())
        except FileNotFoundError:
            raise CeruleanError(f"The report {args.report} does not exist.") from None
        except (ValueError, OSError) as e:
            raise CeruleanError(f"{args.report} is not a readable JSON report ({e}).") from None
        if not isinstance(report, dict) or not isinstance(report.get("checks"), list):
            raise CeruleanError(f"{args.report} is not a 'cerulean policy check --json' "
                                "report.")
    else:
        report = pol.run_policy(pol.load_profile(args.profile, root, allow_path=True),
                                RuleHost(root)).to_json()
    pairs = xccdf.compare(report, theirs)
    total = xccdf.summary(pairs)
    if not total["both"]:
        raise CeruleanError(f"No check of {report.get('policy')} names an SSG rule in "
                            f"{args.openscap}: is it the results of the matching profile?")
    if args.json:
        print(json.dumps({"policy": report.get("policy"), "summary": total,
                          "rules": [p.to_json() for p in pairs]}, indent=2))
    else:
        for p in pairs:
            if p.agree and not args.all:
                continue
            mark = "same" if p.agree else "DIFF"
            print(f"{mark}  {p.rule:<52} ours {p.ours or '-':<13} openscap {p.theirs or '-'}")
            if not p.agree and p.evidence and p.ours == "fail":
                print(f"        {p.evidence}")
        print(f"{total['both']} rules evaluated by both: {total['agree']} agree, "
              f"{total['differ']} differ; of the {total['both_judged']} both passed or "
              f"failed, {total['agree_judged']} agree. Only OpenSCAP: "
              f"{total['only_openscap']}; only {report.get('policy')}: {total['only_ours']}.")
    return 0 if not total["differ"] else 2


def run_policy(args: argparse.Namespace) -> int:
    import socket

    from cerulean.agent import compliance, daemon, htmlreport
    from cerulean.agent import policy as pol
    from cerulean.agent.audit import AuditLog
    from cerulean.agent.rules import Host as RuleHost
    from cerulean.agent.update.host import Host

    root = Path("/")
    if args.action == "list":
        found = pol.profiles(root)
        if not found:
            print("No profiles: /usr/lib/cerulean/policies and /etc/cerulean/policies are "
                  "empty.")
        for name in found:
            try:
                p = pol.load_profile(name, root)
                print(f"{name:<26} {len(p.checks):>4} checks  {p.name}")
            except pol.PolicyError as e:
                print(f"{name:<26}  invalid: {e}")
        return 0
    if args.action == "compare":
        return _compare(args, root)
    cfg = daemon.load_agent_config(root)
    host = RuleHost(root)
    audit = AuditLog(Host(root).audit_log)
    if args.action == "run":
        store = compliance.PolicyStore(root / compliance.STORE)
        try:
            wanted = {name: cfg.policy_mode for name in cfg.policies}
            compliance.record_assignment(store, wanted, audit)
            results = []
            for name in cfg.policies:
                out = compliance.apply_profile(pol.load_profile(name, root), host,
                                               cfg.policy_mode, store=store, audit=audit,
                                               say=lambda m: print(m, flush=True))
                results.append(out)
                if not args.json:
                    print(f"{name} ({cfg.policy_mode}): {_score_line(out.after)}"
                          + (f"; drifted: {', '.join(out.drift)}" if out.drift else ""))
        finally:
            store.close()
        if args.json:
            print(json.dumps([{**o.after.to_json(), "mode": o.mode, "drift": list(o.drift),
                               "fixes": [vars(f) for f in o.fixes]} for o in results],
                             indent=2))
        return 0
    policy = pol.load_profile(args.profile or (cfg.policies or ["cerulean-baseline"])[0], root,
                             allow_path=args.profile is not None)  # a path only by hand
    if args.action == "fix" and args.dry_run:
        report = pol.run_policy(policy, host)
        by_id = {c.id: c for c in policy.checks}
        todo = [(r.id, by_id[r.id].fix) for r in report.results if r.result == "failed"
                and by_id[r.id].fix and (not args.check or r.id in args.check)]
        for cid, actions in todo:
            print(f"would fix {cid}: {'; '.join(a.describe() for a in actions)}")
        print(f"{len(todo)} of {report.count('failed')} failed checks would be fixed; "
              f"now {_score_line(report)}.")
        return 0
    if args.action in ("check", "report"):
        report = pol.run_policy(policy, host)
        store = compliance.PolicyStore(root / compliance.STORE)
        try:
            store.save(report, "audit", time.time())
        finally:
            store.close()
        if args.action == "report" or args.html:
            page = htmlreport.render(policy, report, socket.gethostname())
            if args.action == "report" and args.format == "json":
                page = json.dumps(report.to_json(), indent=2) + "\n"
            target = args.html if args.action == "check" else args.output
            if target is None:
                sys.stdout.write(page)
                return 0
            _write_new(target, page)
            print(f"wrote {target}", file=sys.stderr)
            if args.action == "report":
                return 0
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            print(f"{policy.id}: {policy.name}")
            _show_report(report, args.verbose)
            print(f"Score: {_score_line(report)}.")
        return 0 if report.clean else 2
    store = compliance.PolicyStore(root / compliance.STORE)
    try:
        out = compliance.apply_profile(policy, host, "autocorrect", store=store, audit=audit,
                                       only=args.check, actor="admin",
                                       say=(lambda _m: None) if args.json else print)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"policy": policy.id, "before": out.before.score,
                          "after": out.after.to_json(),
                          "fixes": [vars(f) for f in out.fixes]}, indent=2))
    else:
        _show_report(out.after, args.verbose, passed=False)
        left = sum(1 for r in out.after.results if r.result == "failed"
                   and not next(c for c in policy.checks if c.id == r.id).fix)
        print(f"Score: {out.before.score:g}% before, {_score_line(out.after)} after; "
              f"{sum(1 for f in out.fixes if not f.error)} checks fixed, "
              f"{sum(1 for f in out.fixes if f.error)} fixes failed, {left} failed checks "
              "have no automatic fix.")
    return 0 if out.after.clean else 2


def run_integrity(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from cerulean.agent import integrity

    problems: list[integrity.Problem] = []
    try:
        base, changes = integrity.since_baseline(
            now=datetime.now(UTC).isoformat(timespec="seconds"), problems=problems)
        boot = integrity.boot_changes()
    except integrity.IntegrityError as e:
        raise CeruleanError(str(e)) from None
    verity = integrity.usr_verity()
    if args.json:
        print(json.dumps({"baseline": base.source, "baseline_made": base.made,
                          "dirs": list(base.dirs), "usr_verity": verity,
                          "changes": [c.to_json() for c in changes],
                          "unreadable": [p.to_json() for p in problems],
                          "boot": boot.to_json()}, indent=2))
    else:
        for c in [*changes, *boot.changes]:
            old, new = c.old, c.new
            detail = []
            if "content" in c.what and old and new:
                detail.append(f"sha256 {(old.sha256 or '')[:12]} -> {(new.sha256 or '')[:12]}")
            if "mode" in c.what and old and new:
                detail.append(f"mode {old.mode:04o} -> {new.mode:04o}")
            if "owner" in c.what and old and new:
                detail.append(f"owner {old.uid}:{old.gid} -> {new.uid}:{new.gid}")
            if "target" in c.what and old and new:
                detail.append(f"link {old.target} -> {new.target}")
            pkg = f" [{c.package}]" if c.package else ""
            print(f"{','.join(c.what):<14} {c.path}{pkg}"
                  + (f"  ({'; '.join(detail)})" if detail else ""))
        since = "the image was built" if base.source == "image manifest" else \
            f"the first scan ({base.made or 'date unknown'})"
        n = len(boot.changes)
        esp = ("no boot manifest (not a Cerulean image)" if not boot.manifest else
               "not found" if boot.esp is None else
               f"{n} change{'s' if n != 1 else ''} in {boot.esp} since the image was built "
               "(UKIs known by content: the image's and those the updater installed)")
        for p in problems:
            print(f"unreadable     {p.path}  ({p.error})")
        if problems:
            print(f"{len(problems)} path{'s' if len(problems) != 1 else ''} could not be "
                  "read; their state is unknown.")
        print(f"{len(changes)} change{'s' if len(changes) != 1 else ''} in "
              f"{', '.join(base.dirs)} since {since}; /usr: dm-verity {verity}; "
              f"the ESP: {esp}.")
    return 2 if changes or boot.changes or verity == "corrupted" else 0


def run_cve(args: argparse.Namespace) -> int:
    from cerulean.agent import cves
    from cerulean.agent.update.host import Host

    release = args.release or Host().os_release().get("VERSION_CODENAME") or "trixie"
    source = str(args.tracker)
    if "://" in source:
        try:
            args.tracker = cves.fetch_tracker(source, max_age=args.max_age * 3600,
                                              say=lambda m: print(m, file=sys.stderr))
        except cves.TrackerError as e:
            raise CeruleanError(str(e)) from None
    else:
        args.tracker = Path(source)
    try:
        tracker = cves.load_tracker(args.tracker)
    except FileNotFoundError:
        raise CeruleanError(f"The tracker file {args.tracker} does not exist.") from None
    except ValueError as e:
        raise CeruleanError(f"{args.tracker} is not the Security Tracker's JSON: "
                            f"{str(e).rstrip('.')}.") from None
    packages = cves.installed_packages()
    skipped: list[str] = []
    found = cves.affecting(packages, tracker, release, skipped)
    if skipped:  # said, never silent: the report is missing these records
        print(f"warning: {len(skipped)} tracker record{'s' if len(skipped) != 1 else ''} "
              f"skipped (a version that is not a Debian version), first: {skipped[0]}",
              file=sys.stderr)
    if args.json:
        print(json.dumps({"release": release, "packages": len(packages),
                          "skipped": len(skipped),
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
            n = verdict.entries
            print(f"The audit trail is intact: {n} entr{'y' if n == 1 else 'ies'}, last hash "
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
    if args.action == "repair":
        done = log.repair()
        for step in done:
            print(f"repaired: {step}")
        if not done:
            print("Nothing to repair.")
        verdict = log.verify()
        if verdict.ok:
            print(f"The audit trail is intact: {verdict.entries} entries.")
            return 0
        for prob in verdict.problems:
            print(f"error: {prob.message}", file=sys.stderr)
        print("The trail is writable again, but it was changed before: the problem stays "
              "on record.", file=sys.stderr)
        return 1
    if args.last < 0:
        raise CeruleanError("--last must be 0 (all) or more.")
    import collections

    entries = (list(log.entries()) if not args.last
               else list(collections.deque(log.entries(), maxlen=args.last)))
    for e in entries:
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
    if args.group not in ("update", "audit", "agent", "cve", "policy", "integrity") or \
            not getattr(args, "action", None):
        p.print_help()
        return 2
    try:
        if args.group == "agent":
            return run_agent(args)
        if args.group == "cve":
            return run_cve(args)
        if args.group == "policy":
            return run_policy(args)
        if args.group == "integrity":
            return run_integrity(args)
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
