"""``cerulean lock``: pin an image's packages in images/NAME.lock."""

from __future__ import annotations

import argparse
import json

from cerulean.cli.common import add_cache_options, find_definition, open_cache


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lock",
        help="resolve an image's packages and write its lockfile",
        description=(
            "Resolve the packages of an image definition for each of its architectures and "
            "write DEFINITION.lock next to it. An up-to-date lock is left alone; --refresh "
            "moves it to the newest archive state and prints what changed."
        ),
    )
    p.add_argument("definition", help="images/NAME.toml, or a built-in image name")
    p.add_argument("--refresh", action="store_true",
                   help="resolve again against the newest archive state")
    p.add_argument("--json", action="store_true", help="print the changes as JSON")
    add_cache_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cerulean.build.plan import ensure_lock

    defn = find_definition(args.definition)
    con = Console(highlight=False, soft_wrap=True)
    res = ensure_lock(defn, open_cache(args), refresh=args.refresh, offline=args.offline,
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
