"""``cerulean`` on a Cerulean host: the agent's command line (standard library only)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from cerulean.errors import CeruleanError

DESCRIPTION = """\
Cerulean host agent.

  cerulean update status      slot, version, staged release, last result
  cerulean update check       ask the update repository what is offered (changes nothing)
  cerulean update apply       download and install the offered release, then reboot
                              inside the maintenance window (--no-reboot: only stage it)
  cerulean update rollback    go back to the other slot's release and never re-apply this one
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
    return p


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
    if args.group != "update" or not getattr(args, "action", None):
        p.print_help()
        return 2
    try:
        return run_update(args)
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
