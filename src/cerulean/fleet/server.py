"""The fleet server's data directory, settings and the process that serves the API.

A data directory holds everything one fleet needs::

    fleet.toml     settings (below); written by `cerulean fleet init`
    ca.crt ca.key  the fleet CA (ca.key: mode 0600)
    server.crt server.key
    fleet.db       the SQLite database, unless `database` names a PostgreSQL one
    update-trust/  the update repository's metadata verified so far (fleet.releases)

Several servers on one PostgreSQL database are replicas: give each a copy of
the same directory (the CA must be the same) and put any TCP load balancer in
front; they keep no state of their own but the verified update metadata, which
each gets again from the repository. TLS must reach the servers (TCP
pass-through), since the host's certificate is checked there.
"""

from __future__ import annotations

import getpass
import os
import ssl
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cerulean.errors import CeruleanError
from cerulean.protocol.net import split_host_port

DEFAULT_PORT = 8443


class FleetConfigError(CeruleanError):
    pass


@dataclass(frozen=True)
class Setting:
    key: str
    type: type
    default: Any
    help: str


# One table: fleet.toml's keys, their defaults, the checks and `fleet init --help`.
SETTINGS = (
    Setting("database", str, "", "SQLAlchemy URL; empty: sqlite in the data directory"),
    Setting("listen", str, f"0.0.0.0:{DEFAULT_PORT}", "address:port the server listens on"),
    Setting("public-url", str, "", "how hosts reach the server, e.g. https://fleet.example:8443"),
    Setting("names", list, ["localhost", "127.0.0.1"], "names in the server certificate"),
    Setting("cert-hours", int, 24, "lifetime of a host certificate (renewed at half)"),
    Setting("workers", int, 1, "server processes (one per core is a good start)"),
    Setting("keep-alive", int, 30, "seconds an idle connection stays open for the next "
            "request"),
    Setting("max-connections", int, 10000, "open connections per server process; more "
            "are answered 503"),
    Setting("update-repo", str, "", "the TUF update repository (a directory or an http(s) "
            "URL) whose channels rollouts choose releases from; empty: any release version"),
    Setting("update-root", str, "", "the repository's root.json the fleet verifies it by "
            "(needed with update-repo)"),
)


@dataclass(frozen=True)
class FleetConfig:
    data: Path
    database: str
    listen: str
    public_url: str
    names: list[str] = field(default_factory=list)
    cert_hours: int = 24
    workers: int = 1
    update_repo: str = ""
    keep_alive: int = 30
    max_connections: int = 10000
    update_root: str = ""

    @property
    def update_source(self) -> Any:
        """Where rollouts' releases come from (a releases.Source), or None."""
        from cerulean.fleet.releases import Source

        if not self.update_repo:
            return None
        repo = self.update_repo
        if not repo.startswith(("http://", "https://")):
            repo = str(self.data / repo)  # a relative path is beside fleet.toml
        return Source(repo, self.data / self.update_root if self.update_root else None,
                      self.data)

    @property
    def cert_lifetime(self) -> timedelta:
        return timedelta(hours=self.cert_hours)

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)


def parse_listen(value: str) -> tuple[str, int]:
    address = split_host_port(value, "0.0.0.0")
    if address is None:
        raise FleetConfigError(f"{value!r} is not an address:port such as 0.0.0.0:8443.")
    return address


def default_data() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/cerulean-fleet")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "cerulean-fleet"


def check_settings(values: dict[str, Any], where: str) -> dict[str, Any]:
    known = {s.key: s for s in SETTINGS}
    out = {s.key: s.default for s in SETTINGS}
    for k, v in values.items():
        s = known.get(k)
        if s is None:
            raise FleetConfigError(f"{where}: unknown key {k!r}; valid: {', '.join(known)}.")
        if not isinstance(v, s.type) or isinstance(v, bool):
            raise FleetConfigError(f"{where}: {k!r} must be a {s.type.__name__}.")
        out[k] = v
    parse_listen(out["listen"])
    if not out["names"] or not all(isinstance(n, str) and n for n in out["names"]):
        raise FleetConfigError(f"{where}: 'names' must list at least one host name or address.")
    if not 1 <= out["cert-hours"] <= 24 * 90:
        raise FleetConfigError(f"{where}: 'cert-hours' must be between 1 and 2160.")
    if not 1 <= out["workers"] <= 64:
        raise FleetConfigError(f"{where}: 'workers' must be between 1 and 64.")
    if not 1 <= out["keep-alive"] <= 3600:
        raise FleetConfigError(f"{where}: 'keep-alive' must be between 1 and 3600 seconds.")
    if out["update-root"] and not out["update-repo"]:
        raise FleetConfigError(f"{where}: 'update-root' is set but 'update-repo' is not.")
    if not 100 <= out["max-connections"] <= 1_000_000:
        raise FleetConfigError(f"{where}: 'max-connections' must be between 100 and "
                               "1000000.")
    return out


def _toml(values: dict[str, Any]) -> str:
    lines = []
    for s in SETTINGS:
        v = values[s.key]
        text = ("[" + ", ".join(f'"{x}"' for x in v) + "]" if isinstance(v, list)
                else str(v) if isinstance(v, int) else f'"{v}"')
        lines.append(f"# {s.help}\n{s.key} = {text}\n")
    return "\n".join(lines)


def load_config(data: Path) -> FleetConfig:
    path = data / "fleet.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise FleetConfigError(f"{data} is not a fleet data directory (no fleet.toml); run "
                               f"`cerulean fleet init --data {data}` first.") from e
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FleetConfigError(f"{path} is not valid TOML: {e}.") from e
    v = check_settings(raw, str(path))
    database = v["database"] or f"sqlite:///{(data / 'fleet.db').resolve()}"
    return FleetConfig(data, database, v["listen"], v["public-url"], list(v["names"]),
                       v["cert-hours"], v["workers"], v["update-repo"], v["keep-alive"],
                       v["max-connections"], v["update-root"])


def init(data: Path, values: dict[str, Any]) -> tuple[FleetConfig, bool]:
    """Create (or update the settings of) a data directory: settings, CA, server
    certificate, database schema. Returns the config and whether a CA was made now."""
    from cerulean.fleet.ca import FleetCA, server_names
    from cerulean.fleet.db import make_engine, migrate

    v = check_settings(values, "fleet init")
    if v["update-repo"]:
        _check_update_root(data, v["update-root"])
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = data / ".fleet.toml.tmp"
    tmp.write_text(_toml(v))
    os.replace(tmp, data / "fleet.toml")
    cfg = load_config(data)
    created = not (data / "ca.key").exists()
    ca = FleetCA.create(data) if created else FleetCA.load(data)
    if created or server_names(data) != cfg.names:
        ca.issue_server(data, cfg.names)
    engine = make_engine(cfg.database)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    return cfg, created


def _check_update_root(data: Path, value: str) -> None:
    from cerulean.fleet.releases import read_anchor

    if not value:
        raise FleetConfigError(
            "fleet init: 'update-repo' needs 'update-root', the repository's root.json that "
            "the fleet verifies it by (such as REPO/metadata/1.root.json, copied from the "
            "publisher).")
    read_anchor(Path(value) if Path(value).is_absolute() else data / value)


def local_actor() -> str:
    """Who runs a command on the server itself (written to the audit log)."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"local:uid{os.getuid()}"


def build_app(cfg: FleetConfig) -> Any:
    from cerulean.fleet.api import FleetState, create_app
    from cerulean.fleet.ca import FleetCA
    from cerulean.fleet.db import make_engine, sessions

    engine = make_engine(cfg.database)
    return create_app(FleetState(sessions(engine), FleetCA.load(cfg.data),
                                 cfg.cert_lifetime, cfg.public_url,
                                 cfg.update_source,
                                 threads=engine.pool.size()))  # type: ignore[attr-defined]


def app_from_env() -> Any:
    """The app of each server process when there are several (uvicorn imports this)."""
    return build_app(load_config(Path(os.environ["CERULEAN_FLEET_DATA"])))


def _open_files(wanted: int) -> None:
    """Raise the soft limit of open files towards *wanted* (each connection is one), as
    far as the hard limit lets an unprivileged process."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(cfg: FleetConfig) -> None:
    import uvicorn

    from cerulean.fleet.db import make_engine, migrate
    from cerulean.fleet.tls import TLSExtensionProtocol

    engine = make_engine(cfg.database)
    try:
        migrate(engine)  # once, before any server process starts
    finally:
        engine.dispose()
    _open_files(cfg.max_connections * cfg.workers + 1024)
    host, port = cfg.host_port
    options: dict[str, Any] = dict(
        host=host, port=port, http=TLSExtensionProtocol, loop="uvloop", lifespan="on",
        ssl_certfile=str(cfg.data / "server.crt"), ssl_keyfile=str(cfg.data / "server.key"),
        ssl_ca_certs=str(cfg.data / "ca.crt"), ssl_cert_reqs=ssl.CERT_OPTIONAL,
        log_level="warning", access_log=False, server_header=False,
        # The server ends TLS itself: a client's address is its own, whatever a header
        # says (the login throttle counts by it).
        proxy_headers=False, forwarded_allow_ips="",
        limit_concurrency=cfg.max_connections, timeout_keep_alive=cfg.keep_alive,
        backlog=4096)
    if cfg.workers > 1:
        os.environ["CERULEAN_FLEET_DATA"] = str(cfg.data.resolve())
        uvicorn.run("cerulean.fleet.server:app_from_env", factory=True, workers=cfg.workers,
                    **options)
    else:
        uvicorn.Server(uvicorn.Config(build_app(cfg), **options)).run()
