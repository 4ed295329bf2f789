"""``cerulean fleet``: run the fleet server and manage it from the machine it runs on."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from cerulean.errors import CeruleanError

DESCRIPTION = """\
The fleet control plane: enrollment, inventory, alerts and compliance of every
Cerulean host, over a REST API (mTLS for hosts, API tokens for people).

First start:
  cerulean fleet init --name fleet.example.com --public-url https://fleet.example.com:8443
  cerulean fleet user add alice --role admin          # and an API token for her
  cerulean fleet serve                                # listens on 0.0.0.0:8443
Enroll a host:
  cerulean fleet token create --group web --label environment=cloud --uses 10
  # prints the command to run on the host: cerulean agent enroll --server ... --token ...
Look:
  cerulean fleet hosts                                # or GET /api/v1/hosts
  cerulean fleet audit verify                         # the admin audit log's hash chain

The data directory (--data, default /var/lib/cerulean-fleet as root) holds the
settings (fleet.toml), the fleet CA and the SQLite database; --database
postgresql://... in `init` puts the data in PostgreSQL instead.
"""


def _data(p: argparse.ArgumentParser) -> None:
    from cerulean.fleet.server import default_data

    p.add_argument("--data", type=Path, default=default_data(), metavar="DIR",
                   help="the fleet's data directory (default: %(default)s)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from cerulean.fleet.server import SETTINGS

    p = sub.add_parser("fleet", help="the fleet server: enrollment, inventory, dashboard",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fs = p.add_subparsers(dest="fleet_command", metavar="COMMAND")

    i = fs.add_parser("init", help="create a data directory: settings, CA, database")
    _data(i)
    for s in SETTINGS:
        flag = "--name" if s.key == "names" else f"--{s.key}"
        if s.type is list:
            i.add_argument(flag, dest=s.key.replace("-", "_"), action="append", default=None,
                           metavar="NAME", help=f"{s.help} (repeat; default: "
                           f"{', '.join(s.default)})")
        else:
            i.add_argument(flag, dest=s.key.replace("-", "_"), type=s.type, default=None,
                           help=f"{s.help} (default: {s.default!r})")
    i.set_defaults(func=run_init)

    sv = fs.add_parser("serve", help="run the server (HTTPS, mTLS for hosts)")
    _data(sv)
    sv.set_defaults(func=run_serve)

    u = fs.add_parser("user", help="people who use the API and the dashboard")
    us = u.add_subparsers(dest="user_command", metavar="COMMAND")
    ua = us.add_parser("add", help="add a user and print an API token for them")
    _data(ua)
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=("auditor", "operator", "admin"))
    ua.add_argument("--password-stdin", action="store_true",
                    help="read a dashboard password from standard input")
    ua.set_defaults(func=run_user_add)

    t = fs.add_parser("token", help="enrollment tokens for hosts")
    ts = t.add_subparsers(dest="token_command", metavar="COMMAND")
    tc = ts.add_parser("create", help="a token hosts enroll with (printed once)")
    _data(tc)
    tc.add_argument("--group", required=True, help="the group the hosts join")
    tc.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                    help="environment=cloud|on-prem|edge, region=..., site=... (repeat)")
    tc.add_argument("--uses", type=int, default=1, help="how many hosts (default: 1)")
    tc.add_argument("--hours", type=float, default=24.0, help="valid for (default: 24)")
    tc.add_argument("--json", action="store_true")
    tc.set_defaults(func=run_token_create)

    h = fs.add_parser("hosts", help="the enrolled hosts")
    _data(h)
    h.add_argument("--group")
    h.add_argument("--json", action="store_true")
    h.set_defaults(func=run_hosts)

    sim = fs.add_parser(
        "simulate", help="load a fleet server with many simulated agents",
        description="Enroll N simulated agents with one token (each makes its own key), "
        "then check in over mTLS for --seconds: metrics every time, inventory first, an "
        "alert now and then, a new TLS connection each time as the agent does (or one kept "
        "open, --keep-alive). At the "
        "end every host compares what the server holds for it with what it had "
        "acknowledged. Prints check-ins per second, latency percentiles and lost reports.")
    sim.add_argument("--server", required=True, help="https://HOST:PORT")
    sim.add_argument("--token", required=True,
                     help="an enrollment token with at least --hosts uses")
    sim.add_argument("--ca-sha256", required=True, metavar="sha256:HEX")
    sim.add_argument("--hosts", type=int, default=100, help="how many (default: 100)")
    sim.add_argument("--seconds", type=float, default=60.0,
                     help="how long they check in (default: 60)")
    sim.add_argument("--concurrency", type=int, default=64,
                     help="check-ins in flight at once (default: 64)")
    sim.add_argument("--interval", type=float, default=0.0,
                     help="seconds each host waits between its check-ins (default: 0, "
                     "as fast as the server answers)")
    sim.add_argument("--keep-alive", action="store_true",
                     help="each host keeps its connection open between check-ins (the "
                     "server's keep-alive setting must outlast --interval)")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=run_simulate)

    a = fs.add_parser("audit", help="the admin audit log")
    as_ = a.add_subparsers(dest="audit_command", metavar="COMMAND")
    av = as_.add_parser("verify", help="check the log's hash chain")
    _data(av)
    av.set_defaults(func=run_audit_verify)
    for sp in (p, u, t, a):
        sp.set_defaults(func=_help(sp))


def _help(p: argparse.ArgumentParser) -> Any:
    def show(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2
    return show


def run_init(args: argparse.Namespace) -> int:
    from cerulean.fleet.server import SETTINGS, init

    values = {}
    for s in SETTINGS:
        v = getattr(args, s.key.replace("-", "_"))
        if v is not None:
            values[s.key] = v
    for key in ("update-repo", "update-root"):
        # A path given here is the one meant here (fleet.toml's own are beside it).
        v = values.get(key)
        if v and not v.startswith(("http://", "https://")) and not Path(v).is_absolute():
            values[key] = str(Path(v).resolve())
    old = args.data / "fleet.toml"
    if old.exists():
        import tomllib

        from cerulean.fleet.server import FleetConfigError, check_settings, load_config

        load_config(args.data)  # a clear sentence if it cannot be read
        try:
            # Every setting as fleet.toml has it; only those given here change.
            kept = check_settings(tomllib.loads(old.read_text()), str(old))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise FleetConfigError(f"{old} cannot be read: {e}.") from e
        values = {**kept, **values}
    cfg, created = init(args.data, values)
    from cerulean.fleet.ca import FleetCA

    ca = FleetCA.load(args.data)
    print(f"{'Created' if created else 'Updated'} the fleet in {args.data}")
    print(f"  database:  {cfg.database}")
    print(f"  listen:    {cfg.listen}   names: {', '.join(cfg.names)}")
    print(f"  CA:        {ca.fingerprint}")
    print("Next: cerulean fleet user add NAME --role admin, then cerulean fleet serve")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from cerulean.fleet.server import load_config, serve

    cfg = load_config(args.data)
    host, port = cfg.host_port
    public = f"  ({cfg.public_url})" if cfg.public_url else ""
    print(f"Cerulean fleet on https://{host}:{port}{public}", file=sys.stderr)
    serve(cfg)
    return 0


@contextmanager
def _session(data: Path) -> Iterator[Any]:
    from cerulean.fleet.db import make_engine, migrate, sessions
    from cerulean.fleet.server import load_config

    cfg = load_config(data)
    engine = make_engine(cfg.database)
    try:
        migrate(engine)
        with sessions(engine).begin() as s:
            yield s
    finally:
        engine.dispose()


def run_user_add(args: argparse.Namespace) -> int:
    from cerulean.fleet.auth import MIN_PASSWORD, AuthError, add_user, check_username, issue_token
    from cerulean.fleet.server import local_actor

    check_username(args.name)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else ""
    if args.password_stdin and len(password) < MIN_PASSWORD:
        raise CeruleanError(f"The password must have at least {MIN_PASSWORD} characters.")
    with _session(args.data) as s:
        try:
            add_user(s, local_actor(), args.name, args.role, password)
            token = issue_token(s, local_actor(), args.name, args.role, "made with the user")
        except AuthError as e:
            raise CeruleanError(str(e)) from e
    print(token)
    print(f"(an API token for {args.name}, {args.role}; it is shown only now)", file=sys.stderr)
    return 0


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise CeruleanError(f"--label {item!r} is not KEY=VALUE.")
        out[k.strip()] = v.strip()
    return out


def run_token_create(args: argparse.Namespace) -> int:
    from cerulean.fleet.ca import FleetCA
    from cerulean.fleet.hosts import create_enrollment_token
    from cerulean.fleet.server import load_config, local_actor

    cfg = load_config(args.data)
    if not 0 < args.hours <= 24 * 365:
        raise CeruleanError("--hours must be more than 0 and at most 8760.")
    with _session(args.data) as s:
        t = create_enrollment_token(s, local_actor(), args.group, _labels(args.label),
                                    args.uses, timedelta(hours=args.hours))
    ca = FleetCA.load(args.data)
    server = cfg.public_url or f"https://{cfg.names[0]}:{cfg.host_port[1]}"
    command = (f"cerulean agent enroll --server {server} --token {t.token} "
               f"--ca-sha256 {ca.fingerprint}")
    if args.json:
        print(json.dumps({"token": t.token, "id": t.id, "expires_at": t.expires_at.isoformat(),
                          "ca_sha256": ca.fingerprint, "command": command}, indent=2))
    else:
        print(command)
        print(f"(token {t.id}: {args.uses} use(s), until {t.expires_at:%Y-%m-%d %H:%M} UTC)",
              file=sys.stderr)
    return 0


def run_hosts(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from cerulean.fleet.db import Host

    with _session(args.data) as s:
        stmt = select(Host).order_by(Host.hostname)
        if args.group:
            stmt = stmt.where(Host.group == args.group)
        rows = list(s.execute(stmt).scalars())
        out = [{"id": h.id, "hostname": h.hostname, "group": h.group, "labels": h.labels,
                "os": h.os_release.get("PRETTY_NAME", ""), "packages": h.package_count,
                "last_seen": h.last_seen.isoformat() if h.last_seen else None,
                "revoked": h.revoked} for h in rows]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if not out:
        print("No hosts yet: create a token with `cerulean fleet token create`.")
    for h in out:
        print(f"{h['id'][:8]}  {h['hostname']:<24} {h['group']:<12} {h['os'] or '-':<28} "
              f"{h['packages']:>5} pkgs  last seen {h['last_seen'] or 'never'}"
              f"{'  REVOKED' if h['revoked'] else ''}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    import tempfile

    from cerulean.agent.fleetlink import check_server
    from cerulean.fleet.simulate import simulate

    if not 1 <= args.hosts <= 100000:
        raise CeruleanError("--hosts must be between 1 and 100000.")
    if not 0 < args.seconds <= 24 * 3600 or not 1 <= args.concurrency <= 4096:
        raise CeruleanError("--seconds must be up to a day and --concurrency 1 to 4096.")
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="cerulean-simulate-") as work:
        r = simulate(check_server(args.server), args.token, args.ca_sha256, args.hosts,
                     args.seconds, Path(work), args.concurrency, args.interval, say=say,
                     keep_alive=args.keep_alive)
    out = r.to_json()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['enrolled']} of {out['hosts']} hosts enrolled in "
              f"{out['enroll_seconds']} s")
        print(f"{out['checkins']} check-ins in {out['seconds']} s: "
              f"{out['checkins_per_second']}/s, p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms"
              f", {out['failed_checkins']} failed")
        print(f"after each host's first check-in (its inventory): p50 {out['later_p50_ms']} "
              f"ms, p99 {out['later_p99_ms']} ms")
        print(f"reports: {out['reports_made']} made, {out['reports_acknowledged']} "
              f"acknowledged, {out['reports_on_server']} held by the server, "
              f"{out['reports_pending']} pending, {out['lost']} lost")
        if out["errors"]:
            print("errors: " + ", ".join(f"{k} ×{v}" for k, v in out["errors"].items()))
    return 0 if r.lost == 0 and r.mismatched_hosts == 0 and r.enrolled == r.hosts else 1


def run_audit_verify(args: argparse.Namespace) -> int:
    from cerulean.fleet.auth import verify_audit

    with _session(args.data) as s:
        n, problem = verify_audit(s)
    if problem:
        print(f"The audit log is broken: {problem}.")
        return 1
    print(f"The audit log's {n} entries are intact.")
    return 0
