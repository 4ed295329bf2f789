"""``cerulean release``: build releases and run the signed (TUF) update repository."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cerulean.cli.common import add_cache_options, find_definition, open_cache, parse_arches

if TYPE_CHECKING:
    from rich.console import Console

REPO = Path("releases/repo")
KEYS = Path("releases/keys")
OUT = Path("releases")

EPILOG = """\
A first release and its rollout:
  cerulean release init                                 create releases/repo and releases/keys
  cerulean release build images/vm.toml --disk qcow2    releases/vm/VERSION/ (+ a disk to install)
  cerulean release publish releases/vm/VERSION --channel stable --waves now
  cerulean release serve                                serve releases/repo on :8080
Later:
  cerulean lock --refresh security images/vm.toml       newest security fixes, CVEs listed
  cerulean release build images/vm.toml                 the next version, notes with CVEs
  cerulean release publish releases/vm/NEXT             in waves: 1% first, all after 3 days
  cerulean release pause vm NEXT                        stop the waves (resume, withdraw)
  cerulean release refresh                              re-sign the timestamp (daily, from a timer)
"""


def _repo_args(p: argparse.ArgumentParser, keys: bool = True) -> None:
    p.add_argument("--repo", type=Path, default=REPO,
                   help=f"the repository directory (default: {REPO})")
    if keys:
        p.add_argument("--keys", type=Path, default=KEYS,
                       help=f"the private keys directory, never served (default: {KEYS})")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "release", help="build releases and publish them to the signed update repository",
        description="Build versioned releases of system images and publish them to a TUF "
                    "update repository in channels and waves.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rs = p.add_subparsers(dest="release_cmd", metavar="ACTION")

    a = rs.add_parser("init", help="create an empty update repository and its keys",
                      description="Create a TUF repository (root, targets, snapshot, timestamp; "
                                  "ed25519 keys) and the key files, mode 0600.")
    _repo_args(a)
    a.add_argument("--root-keys", type=int, default=1, help="number of root keys (default 1)")
    a.add_argument("--root-threshold", type=int, default=1,
                   help="root signatures needed to change root (default 1)")
    a.set_defaults(func=run_init)

    a = rs.add_parser("build", help="build the next release of a system image",
                      description="Build a system image definition into a release directory: "
                                  "the /usr image, verity data and UKI per architecture as "
                                  "compressed payloads, release.json and NOTES.md (package "
                                  "changes and the CVEs they fix).")
    a.add_argument("definition", help="images/NAME.toml, or a built-in image name")
    a.add_argument("--arch", help="comma-separated architectures (default: all of the image's)")
    a.add_argument("--out", type=Path, default=OUT, help=f"releases directory (default: {OUT})")
    a.add_argument("--version", help="the version (default: MAJOR.YYYYMMDD.N, the next one)")
    a.add_argument("--disk", choices=("raw", "qcow2", "vhd", "vhdx"),
                   help="also write a disk image of this release in this format")
    a.add_argument("--repo", type=Path,
                   help="count versions already published there when choosing the next one")
    a.add_argument("--locked", action="store_true",
                   help="build exactly the lock; fail if it is missing or outdated")
    a.add_argument("--level", type=int, default=19, choices=range(1, 20), metavar="1-19",
                   help="zstd level of the payloads (default 19: smallest downloads)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    add_cache_options(a)
    a.set_defaults(func=run_build)

    a = rs.add_parser("publish", help="add a release to a channel of the repository",
                      description="Sign a release into the repository (with deltas from the "
                                  "newest earlier releases) and add it to a channel.")
    a.add_argument("release", type=Path, help="a release directory (releases/IMAGE/VERSION)")
    _repo_args(a)
    a.add_argument("--channel", default="stable", help="stable, lts or preview (default stable)")
    a.add_argument("--waves", default="default",
                   help="'default' (1%%, 5%% after 4 h, 25%% after a day, 50%% after two, "
                        "all after three), 'now', or HOURS:FRACTION pairs like '0:0.1,24:1'")
    a.add_argument("--no-delta", action="store_true", help="publish full payloads only")
    a.add_argument("--level", type=int, default=19, choices=range(1, 20), metavar="1-19",
                   help="zstd level of the deltas (default 19)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(func=run_publish)

    for name, state, text in (("pause", "paused", "stop a release's waves"),
                              ("resume", "active", "let a paused release's waves continue"),
                              ("withdraw", "withdrawn", "stop offering a release for good")):
        a = rs.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        a.add_argument("image")
        a.add_argument("version")
        a.add_argument("--channel", default="stable", help="the channel (default stable)")
        _repo_args(a)
        a.set_defaults(func=run_state, state=state)

    a = rs.add_parser("status", help="channels, releases, states and wave progress")
    _repo_args(a, keys=False)
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(func=run_status)

    a = rs.add_parser("refresh", help="re-sign the timestamp (and snapshot/targets when due)",
                      description="Re-sign the timestamp metadata (it expires after a day) and "
                                  "the snapshot and targets metadata when half their life is "
                                  "gone. Run it daily from a timer.")
    _repo_args(a)
    a.add_argument("--all", action="store_true", help="re-sign targets and snapshot too")
    a.set_defaults(func=run_refresh)

    a = rs.add_parser("rotate-key", help="replace a role's key (the old one is revoked)",
                      description="Generate a new key for ROLE, publish a new root version that "
                                  "trusts only it (signed by the current root keys), and "
                                  "re-sign. The old private key moves to KEYS/retired/.")
    a.add_argument("role", choices=("root", "targets", "snapshot", "timestamp"))
    _repo_args(a)
    a.set_defaults(func=run_rotate)

    a = rs.add_parser("serve", help="serve the repository over HTTP (for trying it out)")
    _repo_args(a, keys=False)
    a.add_argument("--host", default="127.0.0.1", help="address to listen on")
    a.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    a.set_defaults(func=run_serve)

    def usage(_a: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)


def _console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def run_init(args: argparse.Namespace) -> int:
    from cerulean.release.repo import Repository

    repo = Repository.create(args.repo, args.keys, root_keys=args.root_keys,
                             root_threshold=args.root_threshold)
    print(f"Created the update repository {repo.path} (keys in {repo.keys}, mode 0600).")
    print(f"Images trust it through {repo.meta / '1.root.json'}: set [update] root to it.")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from cerulean.build.plan import archive_for, ensure_lock
    from cerulean.release.build import build_release
    from cerulean.release.publish import published_releases
    from cerulean.release.repo import Repository

    defn = find_definition(args.definition)
    arches = parse_arches(args.arch, defn)
    cache = open_cache(args)
    con = _console()
    lr = ensure_lock(defn, cache, locked=args.locked, offline=args.offline,
                     show_progress=not args.json)
    known: list[str] = []
    if args.repo:
        known = [d.version for d in published_releases(Repository.open(args.repo, KEYS),
                                                       defn.name)]

    def say(msg: str) -> None:
        if not args.json:
            con.print(f"[dim]{msg}[/]")

    res = build_release(defn, lr.lock, archive_for(defn), list(arches), args.out, cache,
                        version=args.version, known_versions=known, disk_format=args.disk,
                        offline=args.offline, show_progress=not args.json, say=say,
                        level=args.level)
    if args.json:
        print(json.dumps({"release": str(res.path), "version": res.doc.version,
                          "previous": res.doc.previous, "cves": res.doc.cves,
                          "changes": len(res.doc.changes),
                          "disks": [str(d) for d in res.disks],
                          "seconds": round(res.seconds, 1)}, indent=2))
        return 0
    con.print(f"[bold]Built {defn.name} {res.doc.version}[/] in {res.seconds:.0f} s: {res.path}")
    for arch, ar in res.doc.arches.items():
        total = sum(p.full.size for p in ar.parts.values())
        con.print(f"  {arch}: payload {total / 1048576:.1f} MiB, usrhash {ar.roothash[:16]}…")
    if res.doc.previous:
        con.print(f"  {len(res.doc.changes)} package changes since {res.doc.previous}, "
                  f"{len(res.doc.cves)} CVEs fixed (see NOTES.md)")
    for d in res.disks:
        con.print(f"  disk: {d}")
    con.print(f"Publish it with: cerulean release publish {res.path}")
    return 0


def run_publish(args: argparse.Namespace) -> int:
    from cerulean.release.publish import parse_waves, publish
    from cerulean.release.repo import Repository

    waves = parse_waves(args.waves)
    repo = Repository.open(args.repo, args.keys)
    con = _console()
    doc = publish(repo, args.release, args.channel, waves, deltas=not args.no_delta,
                  say=lambda m: None if args.json else con.print(f"[dim]{m}[/]"),
                  level=args.level)
    deltas = {a: {n: sorted(p.deltas) for n, p in ar.parts.items()}
              for a, ar in doc.arches.items()}
    if args.json:
        print(json.dumps({"image": doc.image, "version": doc.version, "channel": args.channel,
                          "waves": waves, "deltas": deltas}, indent=2))
        return 0
    print(f"Published {doc.image} {doc.version} to {args.channel} "
          f"({', '.join(f'{f:.0%} after {s // 3600} h' for s, f in waves)}).")
    for a, parts in deltas.items():
        froms = sorted({v for vs in parts.values() for v in vs})
        print(f"  {a}: deltas from {', '.join(froms) if froms else 'none (full payloads only)'}")
    return 0


def run_state(args: argparse.Namespace) -> int:
    from cerulean.release.publish import set_state
    from cerulean.release.repo import Repository

    repo = Repository.open(args.repo, args.keys)
    print(set_state(repo, args.channel, args.image, args.version, args.state))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from cerulean.release.repo import Repository

    repo = Repository.open(args.repo, KEYS)
    now = datetime.now(UTC)
    out = {}
    for name in repo.channels():
        out[name] = [{**e.to_json(), "hosts_eligible": e.fraction(now)}
                     for e in repo.channel(name).entries]
    ts = repo.load("timestamp").signed
    if args.json:
        print(json.dumps({"channels": out, "timestamp_expires": ts.expires.isoformat(),
                          "root_version": repo.root_version()}, indent=2))
        return 0
    print(f"{repo.path}: root v{repo.root_version()}, timestamp expires "
          f"{ts.expires:%Y-%m-%d %H:%M} UTC")
    for name, entries in out.items():
        print(f"{name}:")
        for e in entries:
            print(f"  {e['image']} {e['version']}  {e['state']}  published {e['published']}  "
                  f"offered to {e['hosts_eligible']:.0%} of hosts")
    if not out:
        print("No channel has a release yet: cerulean release publish RELEASE_DIR")
    return 0


def run_refresh(args: argparse.Namespace) -> int:
    from cerulean.release.repo import Repository

    done = Repository.open(args.repo, args.keys).refresh(all_roles=args.all)
    print(f"Re-signed {', '.join(done)}.")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    from cerulean.release.repo import Repository

    repo = Repository.open(args.repo, args.keys)
    keyid = repo.rotate_key(args.role)
    print(f"The {args.role} role now trusts only key {keyid[:16]}… (root "
          f"v{repo.root_version()}); the old key is in {repo.keys / 'retired'}.")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from cerulean.release.repo import Repository
    from cerulean.release.serve import make_server

    Repository.open(args.repo, KEYS)
    srv = make_server(args.repo, args.host, args.port, quiet=False)
    print(f"Serving {args.repo} at http://{args.host}:{srv.server_address[1]}/ (Ctrl-C stops)")
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
    return 0
