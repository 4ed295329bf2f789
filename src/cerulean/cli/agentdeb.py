"""``cerulean agent-deb``: the host agent's package, for servers Cerulean did not build."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "agent-deb", help="write the cerulean-agent .deb (for existing Debian/Ubuntu servers)",
        description="Write the cerulean-agent package that every system image carries, so "
        "existing Debian 12/13 and Ubuntu servers can run the same agent: copy it there "
        "and run 'apt install ./cerulean-agent_*.deb', then 'systemctl enable --now "
        "cerulean-agent.service cerulean-policy.timer'. See docs/agent.md.")
    p.add_argument("--out", type=Path, default=Path("out"), metavar="DIR",
                   help="where to write it (default: out)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cerulean.build.agent import build_deb

    deb = build_deb(args.out)
    print(deb.path)
    return 0
