"""``cerulean images``: list the image definitions."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from cerulean.build.definition import images_dir, load_definition


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("images", help="list the built-in image definitions",
                       description="List the image definitions in images/ with a line each.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    defs = [load_definition(p) for p in sorted(images_dir().glob("*.toml"))]
    if args.json:
        print(json.dumps([
            {"name": d.name, "description": d.image_description, "path": str(d.path),
             "architectures": list(d.image_architectures), "packages": list(d.packages_include)}
            for d in defs
        ], indent=2))
        return 0
    t = Table(box=None, show_header=True, header_style="bold")
    t.add_column("image")
    t.add_column("description")
    t.add_column("arches")
    for d in defs:
        t.add_row(d.name, d.image_description, ",".join(d.image_architectures))
    Console().print(t)
    return 0
