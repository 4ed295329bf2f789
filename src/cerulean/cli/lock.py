"""``cerulean lock``: pin an image's packages in images/NAME.lock."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from cerulean.cli.common import add_cache_options, find_definition, open_cache
from cerulean.errors import CeruleanError

if TYPE_CHECKING:
    from rich.console import Console

    from cerulean.build.definition import ImageDefinition


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lock",
        help="resolve an image's packages and write its lockfile",
        description=(
            "Resolve the packages of an image definition for each of its architectures and "
            "write DEFINITION.lock next to it. An up-to-date lock is left alone; --refresh "
            "moves it to the newest archive state and prints what changed; --refresh security "
            "moves only the packages the security suite has newer versions of, and lists the "
            "CVEs that fixes (from the packages' Debian changelogs)."
        ),
    )
    p.add_argument("definition", nargs="?", help="images/NAME.toml, or a built-in image name")
    p.add_argument("--refresh", nargs="?", const="all", metavar="security",
                   help="resolve again against the newest archive state; 'security': move "
                        "only to newer security-suite versions")
    p.add_argument("--json", action="store_true", help="print the changes as JSON")
    add_cache_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cerulean.build.plan import ensure_lock

    if args.refresh not in (None, "all", "security"):
        if args.definition is not None:
            raise CeruleanError(f"--refresh takes 'security' or nothing, not {args.refresh!r}.")
        # `cerulean lock --refresh images/vm.toml`: the value is the definition.
        args.definition, args.refresh = args.refresh, "all"
    if args.definition is None:
        raise CeruleanError("Name an image definition, e.g. `cerulean lock images/vm.toml`.")
    defn = find_definition(args.definition)
    con = Console(highlight=False, soft_wrap=True)
    if args.refresh == "security":
        return _security(args, defn, con)
    res = ensure_lock(defn, open_cache(args), refresh=bool(args.refresh), offline=args.offline,
                      show_progress=not args.json)
    if args.json:
        print(json.dumps({"lock": str(defn.lock_path), "written": res.written,
                          "changes": res.changes,
                          "packages": {a: len(p) for a, p in res.lock.packages.items()}}))
        return 0
    counts = ", ".join(f"{len(p)} for {a}" for a, p in res.lock.packages.items())
    if not res.written:
        con.print(f"{defn.lock_path} is up to date ({counts} packages).")
    elif res.previous is None:
        con.print(f"Wrote {defn.lock_path} ({counts} packages).")
    elif res.changes:
        con.print(f"Updated {defn.lock_path} ({counts} packages):")
        for line in res.changes:
            con.print(f"  {line}", markup=False)
    else:
        con.print(f"Refreshed {defn.lock_path}: no package changed ({counts} packages).")
    return 0


def _security(args: argparse.Namespace, defn: ImageDefinition, con: Console) -> int:
    from cerulean.build.plan import refresh_security

    res = refresh_security(defn, open_cache(args), offline=args.offline,
                           show_progress=not args.json)
    cves = sorted({c for chs in res.changes.values() for ch in chs for c in ch.cves})
    if args.json:
        print(json.dumps({"lock": str(defn.lock_path), "written": res.written, "cves": cves,
                          "changes": {a: [c.to_json() for c in chs]
                                      for a, chs in res.changes.items()}}, indent=2))
        return 0
    if not res.written:
        con.print(f"{defn.lock_path}: no newer security updates.")
        return 0
    con.print(f"Updated {defn.lock_path} to the newest security updates; "
              f"{len(cves)} CVEs fixed:")
    # One line per change, the packages that share it (same versions, same CVEs) together.
    for arch, chs in res.changes.items():
        groups: dict[tuple[str | None, str | None, tuple[str, ...]], list[str]] = {}
        for ch in chs:
            groups.setdefault((ch.old, ch.new, ch.cves), []).append(ch.name)
        for (old, new, fixed), names in groups.items():
            what = f"{old or '(new)'} -> {new or '(removed)'}"
            tail = f": {', '.join(fixed)}" if fixed else ""
            con.print(f"  {arch}: {', '.join(names)} {what}{tail}", markup=False)
    return 0
