"""``cerulean release``: build releases and run the signed (TUF) update repository."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cerulean.cli.common import add_cache_options, find_definition, open_cache, parse_arches
from cerulean.errors import CeruleanError

if TYPE_CHECKING:
    from rich.console import Console

    from cerulean.release.repo import Repository

REPO = Path("releases/repo")
KEYS = Path("releases/keys")
ROOT_KEYS = Path("releases/root-keys")
OUT = Path("releases")

EPILOG = """\
A first release and its rollout:
  cerulean release init                                 releases/repo, releases/keys (online)
                                                        and releases/root-keys (take it offline)
  cerulean release build images/vm.toml --disk qcow2    releases/vm/VERSION/ (+ a disk to install)
  cerulean release publish releases/vm/VERSION --channel stable --waves now
  cerulean release serve                                serve releases/repo on :8080
Later:
  cerulean lock --refresh security images/vm.toml       newest security fixes, CVEs listed
  cerulean release build images/vm.toml                 the next version, notes with CVEs
  cerulean release publish releases/vm/NEXT             in waves: 1% first, all after 3 days
  cerulean release pause vm NEXT                        stop the waves (resume, withdraw)
  cerulean release refresh                              re-sign the timestamp (the publisher does)
Root ceremonies, where the root keys are (see `cerulean release root --help`):
  cerulean release root status                          keys, thresholds, expiry
  cerulean release root renew                           a new root version before it expires
  cerulean release root rotate targets                  new targets key, the old one destroyed
"""


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return int(text)


def _repo_args(p: argparse.ArgumentParser, keys: bool = True, root: bool = False) -> None:
    p.add_argument("--repo", type=Path, default=REPO,
                   help=f"the repository directory (default: {REPO})")
    if keys:
        p.add_argument("--keys", type=Path, default=KEYS,
                       help=f"the online keys (targets, snapshot, timestamp), never served "
                            f"(default: {KEYS})")
    if root:
        p.add_argument("--root-keys", type=Path, default=ROOT_KEYS,
                       help=f"the root keys, kept offline (default: {ROOT_KEYS})")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "release", help="build releases and publish them to the signed update repository",
        description="Build versioned releases of system images and publish them to a TUF "
                    "update repository in channels and waves.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rs = p.add_subparsers(dest="release_cmd", metavar="ACTION")

    a = rs.add_parser("init", help="create an empty update repository and its keys",
                      description="Create a TUF repository (root, targets, snapshot, timestamp; "
                                  "ed25519 keys). The online keys go to --keys, the root keys "
                                  "to their own directory, --root-keys, meant for removable "
                                  "media: move it off the publishing host. Key files are mode "
                                  "0600, sealed with a passphrase when CERULEAN_KEYS_PASSPHRASE "
                                  "(online keys) or CERULEAN_ROOT_KEYS_PASSPHRASE (root keys) "
                                  "is set, or the systemd credentials cerulean.keys-passphrase "
                                  "and cerulean.root-keys-passphrase.")
    _repo_args(a, root=True)
    a.add_argument("--root-key-count", type=int, default=3,
                   help="number of root keys (default 3)")
    a.add_argument("--root-threshold", type=int, default=2,
                   help="root signatures needed to change root (default 2)")
    a.add_argument("--one-root-signature", action="store_true",
                   help="allow a root threshold of 1 (one stolen root key then forks hosts)")
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
                   help="count versions already published there when choosing the next one, "
                        "and compare with the previous release's packages published there")
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

    _register_root(rs)

    a = rs.add_parser("serve", help="serve the repository over HTTP (for trying it out)")
    _repo_args(a, keys=False)
    a.add_argument("--host", default="127.0.0.1", help="address to listen on")
    a.add_argument("--port", type=_port, default=8080,
                   help="port (default 8080; 0: any free one)")
    a.set_defaults(func=run_serve)

    def usage(_a: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)


ROOT_EPILOG = """\
A root ceremony runs on the machine that holds the root keys (offline), with the
repository's metadata at hand (the repository itself, or a copy whose new
metadata/N.root.json and root.json are then copied back). Each new root version
is signed by a threshold of the old root keys and of the new ones, so every host
can walk from the root it shipped with to the new one. Replaced keys are
destroyed (overwritten, then removed) unless --archive names a directory outside
the repository. Root expires after 365 days: renew it well before (the publisher's
status and metrics say when).
  cerulean release root status
  cerulean release root renew
  cerulean release root rotate root --key 3f2a       replace one root key, threshold kept
  cerulean release root rotate timestamp              the online keys directory gets the new key
  cerulean release root threshold root 3 --add-keys 2  3 of 5 root keys from now on
"""


def _register_root(rs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = rs.add_parser("root", help="root ceremonies: renew root, rotate keys, change thresholds",
                      description="Change the repository's root metadata where the root keys "
                                  "are.", epilog=ROOT_EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    r = p.add_subparsers(dest="root_cmd", metavar="ACTION")
    a = r.add_parser("status", help="root version, expiry, every role's keys and threshold")
    _repo_args(a, root=True)
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(func=run_root_status)
    a = r.add_parser("renew", help="a new root version with a fresh expiry, same keys")
    _repo_args(a, root=True)
    a.set_defaults(func=run_root, action="renew")
    a = r.add_parser("rotate", help="replace a role's key (one, or all of them)",
                     description="Replace --key (or every key) of ROLE by a new one; the number "
                                 "of keys and the threshold stay. The replaced private keys are "
                                 "destroyed, or moved to --archive.")
    a.add_argument("role", choices=("root", "targets", "snapshot", "timestamp"))
    a.add_argument("--key", help="the key ID (or its first characters) to replace")
    a.add_argument("--archive", type=Path,
                   help="keep the replaced private keys in this directory (outside the "
                        "repository) instead of destroying them")
    _repo_args(a, root=True)
    a.set_defaults(func=run_root, action="rotate")
    a = r.add_parser("threshold", help="change how many of a role's keys must sign")
    a.add_argument("role", choices=("root", "targets", "snapshot", "timestamp"))
    a.add_argument("threshold", type=int)
    a.add_argument("--add-keys", type=int, default=0, help="new keys to add to the role first")
    a.add_argument("--one-root-signature", action="store_true",
                   help="allow a root threshold of 1 (one stolen root key then forks hosts)")
    _repo_args(a, root=True)
    a.set_defaults(func=run_root, action="threshold")

    def usage(_a: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)


def _console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def run_init(args: argparse.Namespace) -> int:
    from cerulean.release.keys import passphrase
    from cerulean.release.repo import Repository

    repo = Repository.create(args.repo, args.keys, root_keys_dir=args.root_keys,
                             root_keys=args.root_key_count, root_threshold=args.root_threshold,
                             one_root_signature=args.one_root_signature)
    print(f"Created the update repository {repo.path}.")
    print(f"Online keys (targets, snapshot, timestamp): {repo.keys}"
          f"{'' if passphrase('online') else ' (not sealed with a passphrase)'}.")
    print(f"Root keys ({args.root_threshold} of {args.root_key_count} sign a new root): "
          f"{repo.root_keys}{'' if passphrase('root') else ' (not sealed with a passphrase)'}.")
    print("  Move the root keys to removable media and off this host; bring them back only "
          "for a root ceremony (cerulean release root --help).")
    print(f"Images trust it through {repo.meta / 'root.json'}, its newest root: set "
          "[update] root to it, so that every build ships the newest root.")
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
    repo = Repository.read_only(args.repo) if args.repo else None
    if repo is not None:
        known = [d.version for d in published_releases(repo, defn.name)]

    def say(msg: str) -> None:
        if not args.json:
            con.print(f"[dim]{msg}[/]")

    res = build_release(defn, lr.lock, archive_for(defn), list(arches), args.out, cache,
                        version=args.version, known_versions=known, disk_format=args.disk,
                        offline=args.offline, show_progress=not args.json, say=say,
                        level=args.level, repo=repo)
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

    repo = Repository.read_only(args.repo)
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


ROOT_WARN_DAYS = 60


def root_expiry_warning(repo: Repository, now: datetime | None = None) -> str | None:
    """A sentence when root expires within ROOT_WARN_DAYS (hosts then stop updating)."""
    expires = repo.load("root").signed.expires
    left = expires - (now or datetime.now(UTC))
    if left.days >= ROOT_WARN_DAYS:
        return None
    when = "has expired" if left.total_seconds() <= 0 else f"expires in {left.days} days"
    return (f"Root v{repo.root_version()} {when} ({expires:%Y-%m-%d}): hosts stop updating "
            "then. Renew it where the root keys are: cerulean release root renew.")


def run_refresh(args: argparse.Namespace) -> int:
    from cerulean.release.repo import Repository

    repo = Repository.open(args.repo, args.keys)
    done = repo.refresh(all_roles=args.all)
    print(f"Re-signed {', '.join(done)}.")
    warning = root_expiry_warning(repo)
    if warning:
        _console().print(f"[yellow]{warning}[/]")
    return 0


def run_root_status(args: argparse.Namespace) -> int:
    from cerulean.release.keys import ROLES, key_files
    from cerulean.release.repo import Repository

    repo = Repository.open(args.repo, KEYS, args.root_keys)
    root = repo.load("root").signed
    held = {k.keyid for k in key_files(repo.root_keys)} | {k.keyid for k in key_files(KEYS)}
    roles = {role: {"threshold": root.roles[role].threshold,
                    "keys": [{"id": k, "here": k in held} for k in root.roles[role].keyids]}
             for role in ROLES}
    if args.json:
        print(json.dumps({"version": root.version, "expires": root.expires.isoformat(),
                          "roles": roles}, indent=2))
        return 0
    print(f"{repo.path}: root v{root.version}, expires {root.expires:%Y-%m-%d %H:%M} UTC")
    for role, r in roles.items():
        ids = ", ".join(f"{k['id'][:16]}{'' if k['here'] else ' (not here)'}"
                        for k in r["keys"])
        print(f"  {role}: {r['threshold']} of {len(r['keys'])}: {ids}")
    forkable = repo.forkable_roots()
    if forkable:
        print(f"  Root v{', v'.join(map(str, forkable))}: the keys retired since meet "
              "its threshold. A host that still trusts it can be forked by whoever holds "
              "them: build images with metadata/root.json (the newest root).")
    stray = repo.stray_keys()
    for k in stray:
        print(f"  {k.path} is a {k.role} key the root no longer names: retired but not "
              "destroyed. Destroy it (shred) or archive it away from this medium.")
    warning = root_expiry_warning(repo)
    if warning:
        print(warning)
    return 0


def run_root(args: argparse.Namespace) -> int:
    from cerulean.release.repo import Repository

    repo = Repository.open(args.repo, args.keys, args.root_keys)
    if args.action == "renew":
        done = repo.renew_root()
    elif args.action == "rotate":
        done = repo.rotate_key(args.role, args.key, archive=args.archive)
    else:
        done = repo.set_threshold(args.role, args.threshold, add_keys=args.add_keys,
                                  one_root_signature=args.one_root_signature)
    for line in done:
        print(line[0].upper() + line[1:] + ".")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from cerulean.release.repo import Repository
    from cerulean.release.serve import make_server

    Repository.read_only(args.repo)
    try:
        srv = make_server(args.repo, args.host, args.port, quiet=False)
    except OSError as e:
        raise CeruleanError(f"Cannot listen on {args.host}:{args.port}: "
                            f"{e.strerror or e}.") from e
    print(f"Serving {args.repo} at http://{args.host}:{srv.server_address[1]}/ (Ctrl-C stops)")
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
    return 0
