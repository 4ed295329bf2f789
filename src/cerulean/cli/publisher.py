"""``cerulean publisher``: the unattended service from security fix to signed release."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

EPILOG = """\
The publisher watches the archive's InRelease files; when a package an image holds
gets a fix it refreshes the lock, builds the release for every architecture,
publishes it with deltas to the image's channels in their waves, and re-signs
the timestamp, snapshot and targets metadata before they expire. Root keys are
never on this host (see `cerulean release root --help`).

  cerulean publisher install              units and an example /etc/cerulean/publisher.toml
  systemctl enable --now cerulean-publisher
  cerulean publisher status               what it did, what failed, when metadata expires
  cerulean publisher once --force         one round now, in the foreground
  cerulean publisher metrics              the Prometheus metrics (also WORK/metrics.prom)
  cerulean publisher audit                verify the audit trail, print its last entries
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from cerulean.release.publisher import DEFAULT_CONFIG

    p = sub.add_parser("publisher", help="the unattended publisher: security fixes to releases",
                       description="Run the service that turns Debian security fixes into "
                                   "signed releases in their channels, with nobody in the loop.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ps = p.add_subparsers(dest="publisher_cmd", metavar="ACTION")

    def config(a: argparse.ArgumentParser) -> None:
        a.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                       help=f"the configuration file (default: {DEFAULT_CONFIG})")

    a = ps.add_parser("run", help="run until stopped: a round every 'poll'")
    config(a)
    a.set_defaults(func=run_run)
    a = ps.add_parser("once", help="one round in the foreground, then exit",
                      description="Re-sign what is due, look at the archive, and release the "
                                  "images whose suites changed (or, with --force, every image). "
                                  "Exits 1 when any step failed.")
    config(a)
    a.add_argument("--force", action="store_true",
                   help="reconcile every image, changed or not, ignoring back-off")
    a.add_argument("--json", action="store_true", help="print the outcome as JSON")
    a.set_defaults(func=run_once)
    a = ps.add_parser("status", help="releases published, failures, metadata expiry")
    config(a)
    a.add_argument("--json", action="store_true", help="print the status as JSON")
    a.set_defaults(func=run_status)
    a = ps.add_parser("audit", help="verify the audit trail and print its last entries",
                      description="Check every entry of the publisher's hash-chained audit "
                                  "trail (exit 1 naming the first one edited, removed or "
                                  "moved) and print the last ones.")
    config(a)
    a.add_argument("-n", "--last", type=int, default=20, metavar="N",
                   help="how many entries to print (default 20)")
    a.set_defaults(func=run_audit)
    a = ps.add_parser("metrics", help="print the Prometheus metrics")
    config(a)
    a.set_defaults(func=run_metrics)
    a = ps.add_parser("install", help="install the systemd unit and an example configuration",
                      description="Write cerulean-publisher.service to /etc/systemd/system (for "
                                  "this cerulean command and --config) and, when --config does "
                                  "not exist yet, an example configuration to edit.")
    config(a)
    a.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"),
                   help="where the unit goes (default: /etc/systemd/system)")
    a.set_defaults(func=run_install)

    def usage(_a: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)


def _publisher(args: argparse.Namespace, *, verbose: bool = True) -> Any:
    from rich.console import Console

    from cerulean.release.publisher import Publisher, load_config

    con = Console(stderr=True, highlight=False, soft_wrap=True)

    def say(msg: str) -> None:
        if verbose:
            con.print(msg, markup=False)

    return Publisher(load_config(args.config), say=say)


class _Stopped(BaseException):  # not an Exception: no failure handler may swallow it
    pass


def run_run(args: argparse.Namespace) -> int:
    import signal
    import threading

    pub = _publisher(args)
    stop = threading.Event()

    # SIGTERM (systemctl stop, podman stop) and SIGINT stop it at once, whatever it is
    # doing, with an audit entry: every step is safe to cut short (a build is renamed into
    # place whole, a publication's timestamp is written last, and a restart finds what
    # was done just before), and unwinding removes temporary trees and ends the build's
    # chroots. Only the first signal counts: a second one must not cut the unwinding.
    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            return
        stop.set()
        raise _Stopped(signal.Signals(signum).name)

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        print(f"The publisher runs with {args.config}: a round every {pub.cfg.poll} s.",
              file=sys.stderr)
        pub.run_forever(stop)
    except _Stopped as e:
        with contextlib.suppress(Exception):
            pub.audit.append("publisher", "publisher.stopped", {"signal": str(e)})
        print(f"The publisher stopped ({e}).", file=sys.stderr)
        return 130 if str(e) == "SIGINT" else 0
    return 0


def run_once(args: argparse.Namespace) -> int:
    pub = _publisher(args, verbose=not args.json)
    with pub.only_one():
        out = pub.run_once(force=args.force)
    if args.json:
        print(json.dumps(vars(out), indent=2))
    elif not (out.published or out.errors or out.refreshed):
        print("Nothing to do: no image has a new fix, and no metadata is due.")
    return 1 if out.errors else 0


def run_status(args: argparse.Namespace) -> int:
    pub = _publisher(args, verbose=False)
    st = pub.status()
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(f"Last round without errors: {st['last_success'] or 'never'}; archive last looked "
          f"at: {st['last_check'] or 'never'}.")
    if st["last_error"]:
        print(f"Last error ({st['last_error_time']}): {st['last_error']}")
    for name, im in sorted(st["images"].items()):
        line = f"  {name}: {im['version'] or 'nothing published yet'}"
        if im["failures"]:
            line += f"; {im['failures']} failed attempts, next after {im['retry_at']}"
        print(line)
    for e in st["published"][-5:]:
        line = f"  published {e['image']} {e['version']} to {e['channel']} at {e['published']}"
        if e.get("fix_to_release_seconds") is not None:
            line += f", {e['fix_to_release_seconds'] / 60:.0f} min after the fix reached " \
                    "the archive"
        if e.get("cves"):
            line += f", fixes {len(e['cves'])} CVEs"
        print(line)
    for role, when in st.get("expires", {}).items():
        print(f"  {role} metadata expires {when}")
    if st.get("repository_error"):
        print(f"Repository: {st['repository_error']}")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from cerulean.agent.audit import AuditLog
    from cerulean.release.publisher import load_config

    log = AuditLog(load_config(args.config).audit_file)
    verdict = log.verify()
    for prob in verdict.problems:
        print(f"error: {prob.message}", file=sys.stderr)
    entries = list(log.entries())
    for e in entries[-args.last:] if args.last > 0 else []:
        detail = json.dumps(e.get("detail", {}), sort_keys=True)
        print(f"{e.get('time')}  {e.get('action')}  {detail[:200]}")
    if verdict.ok:
        print(f"The audit trail is intact: {verdict.entries} entries.")
    return 0 if verdict.ok else 1


def run_metrics(args: argparse.Namespace) -> int:
    from cerulean.agent.metrics import render

    print(render(_publisher(args, verbose=False).families()), end="")
    return 0


def run_install(args: argparse.Namespace) -> int:
    from importlib import resources

    from cerulean.agent.fileio import write_atomic
    from cerulean.release.publisher import load_config

    units = resources.files("cerulean.release") / "units"
    config: Path = args.config.absolute()
    if not config.exists():
        write_atomic(config, (units / "publisher.toml").read_bytes(), 0o644)
        print(f"Wrote an example configuration to {config}: edit it before starting.")
    cfg = load_config(config)
    writable = sorted({str(cfg.work), str(cfg.repo),
                       *(str(j.definition.parent) for j in cfg.images),
                       *([str(cfg.cache)] if cfg.cache else [])})
    text = (units / "cerulean-publisher.service").read_text()
    text = (text.replace("@EXEC@", f"{sys.executable} -m cerulean.cli")
            .replace("@CONFIG@", str(config))
            .replace("@WRITABLE@", " ".join(f"-{w}" for w in writable)))
    unit = args.unit_dir / "cerulean-publisher.service"
    write_atomic(unit, text.encode(), 0o644)
    print(f"Wrote {unit}. Start it with: systemctl daemon-reload && "
          "systemctl enable --now cerulean-publisher")
    return 0
