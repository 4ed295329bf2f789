"""``cerulean agent run``: the long-running host agent (the ``cerulean-agent`` service).

It serves the host's metrics (:mod:`cerulean.agent.metrics`) in the Prometheus
text format on a local port, and runs the detection loop
(:mod:`cerulean.agent.guard`) with the rules of ``/usr/lib/cerulean/rules.d``
and ``/etc/cerulean/rules.d``. It tells systemd when it is ready
(``Type=notify``) and stops cleanly on SIGTERM or SIGINT.

Configuration is TOML, ``/usr/lib/cerulean/agent.toml``, then
``/etc/cerulean/agent.toml``, then ``/var/lib/cerulean/fleet/agent.toml`` (the
policies the host's fleet assigns, written by the agent); later files win key
by key::

    metrics-listen = "127.0.0.1:9477"   # host:port, "" to turn the endpoint off
    detect = true                       # run the detection rules
    watch = ["/etc", "/boot", "/root", "/home", "/tmp", "/var/tmp", "/dev/shm"]
    scan-interval = 10                  # seconds between process/socket/... snapshots
    integrity-interval = 3600           # seconds between full integrity scans (0: none)
    policies = ["cerulean-baseline"]    # profiles cerulean-policy.timer runs (hourly)
    policy-mode = "audit"               # audit | enforce | autocorrect
    fleet-interval = 60                 # seconds between reports to the fleet (0: none)

Once the host is enrolled in a fleet (``cerulean agent enroll``, or by itself
with the systemd credential ``cerulean.fleet``), the agent sends what is new
every ``fleet-interval`` seconds (:mod:`cerulean.agent.fleetlink`).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import FrameType
from typing import Any, cast

from cerulean.agent import metrics
from cerulean.agent.audit import AuditLog
from cerulean.agent.guard import WATCH, Guard, self_alert
from cerulean.agent.policy import MODES, is_profile_name
from cerulean.agent.settings import read_layers
from cerulean.agent.update.host import Host
from cerulean.errors import CeruleanError
from cerulean.protocol.net import split_host_port

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLEET_LAYER = "var/lib/cerulean/fleet/agent.toml"
KEYS = {"metrics-listen": str, "detect": bool, "watch": list, "scan-interval": int,
        "policies": list, "policy-mode": str, "integrity-interval": int,
        "fleet-interval": int}


class AgentError(CeruleanError):
    pass


@dataclass
class AgentConfig:
    metrics_listen: str = "127.0.0.1:9477"
    detect: bool = True
    watch: list[str] = field(default_factory=lambda: list(WATCH))
    scan_interval: int = 10
    policies: list[str] = field(default_factory=lambda: ["cerulean-baseline"])
    policy_mode: str = "audit"
    integrity_interval: int = 3600
    fleet_interval: int = 60
    sources: list[str] = field(default_factory=list)


def load_agent_config(root: Path = Path("/")) -> AgentConfig:
    cfg = AgentConfig()
    values, cfg.sources = read_layers(
        [root / "usr/lib/cerulean/agent.toml", root / "etc/cerulean/agent.toml",
         root / FLEET_LAYER], KEYS,
        AgentError)
    for k, v in values.items():
        setattr(cfg, k.replace("-", "_"), v)
    if cfg.metrics_listen:
        parse_listen(cfg.metrics_listen)
    if not all(isinstance(w, str) and w.startswith("/") for w in cfg.watch):
        raise AgentError("'watch' must be a list of absolute paths.")
    if not 1 <= cfg.scan_interval <= 3600:
        raise AgentError("'scan-interval' must be between 1 and 3600 seconds.")
    if cfg.integrity_interval and not 60 <= cfg.integrity_interval <= 7 * 86400:
        raise AgentError("'integrity-interval' must be 0 (no scans) or 60 to 604800 seconds.")
    if cfg.fleet_interval and not 5 <= cfg.fleet_interval <= 86400:
        raise AgentError("'fleet-interval' must be 0 (no reports) or 5 to 86400 seconds.")
    if not all(is_profile_name(p) for p in cfg.policies):
        raise AgentError("'policies' must be a list of profile names (letters, digits, '.', "
                         "'_' and '-'), not paths.")
    if cfg.policy_mode not in MODES:
        raise AgentError(f"'policy-mode' must be one of {', '.join(MODES)}, "
                         f"not {cfg.policy_mode!r}.")
    return cfg


def parse_listen(value: str) -> tuple[str, int]:
    address = split_host_port(value, "127.0.0.1")
    if address is None:
        raise AgentError(f"'metrics-listen' must be HOST:PORT (such as 127.0.0.1:9477), "
                         f"not {value!r}.")
    return address


def exposition(root: Path = Path("/"), slot: str = "",
               alerts: dict[tuple[str, str], int] | None = None,
               extra: Callable[[], list[metrics.Family]] | None = None) -> bytes:
    from cerulean.agent import outbox
    from cerulean.agent.fleetlink import STATE

    families = [*metrics.collect(root), *metrics.cerulean_state(root, slot),
                *outbox.families(root / STATE / "outbox.db")]
    if alerts is not None:
        families.append(metrics.alert_family(alerts))
    if extra is not None:
        families += extra()
    return metrics.render(families).encode()


def _handler() -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cerulean-agent"
        sys_version = ""

        def _reply(self, body: bool) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "Only /metrics is served here.")
                return
            data = cast(metrics.MetricsServer, self.server).scrape()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def setup(self) -> None:
            super().setup()
            self.rfile = metrics.CappedReader(self.rfile)  # type: ignore[assignment]

        def parse_request(self) -> bool:
            ok = super().parse_request()  # the request line and every header are in
            cast(metrics.MetricsServer, self.server).request_read(self.connection)
            return ok

        def do_GET(self) -> None:
            self._reply(True)

        def do_HEAD(self) -> None:
            self._reply(False)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per scrape would flood the journal

    return Handler


def metrics_server(listen: str, scrape: Callable[[], bytes],
                   report: Callable[[str, dict[str, Any]], None] | None = None
                   ) -> metrics.MetricsServer:
    """The endpoint (bounded: see :class:`metrics.MetricsServer`); *report* gets what it
    says about its own load, for the audit trail."""
    host, port = parse_listen(listen)
    try:
        return metrics.MetricsServer((host, port), _handler(), scrape, report)
    except OSError as e:
        raise AgentError(f"Cannot listen on {listen} for metrics: {e.strerror or e}.") from e


def notify(state: str) -> None:
    """Tell systemd (sd_notify), when it started us with Type=notify."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(state.encode())


def booted_slot() -> str:
    """The A/B slot this boot runs from ("" when the host has no such layout)."""
    from cerulean.agent.update.disk import booted_slot_name

    try:
        return booted_slot_name(Host().cmdline())
    except (CeruleanError, OSError):
        return ""


def _integrity_loop(root: Path, interval: int, stop: threading.Event,
                    say: Callable[[str], None], first_after: float = 300) -> None:
    """A full integrity scan every *interval* seconds, the first *first_after* seconds after
    start (boot is busy enough); new changes go to the audit trail."""
    from datetime import UTC, datetime

    from cerulean.agent import integrity

    wait = first_after
    while not stop.wait(wait):
        wait = interval
        try:
            total, new = integrity.periodic_scan(
                root, AuditLog(Host(root).audit_log),
                datetime.now(UTC).isoformat(timespec="seconds"))
        except Exception as e:  # one failed scan must not end the loop
            say(f"error: integrity scan: {e}")
            continue
        if new:
            say(f"integrity: {new} new change{'s' if new != 1 else ''} "
                f"({total} since the baseline)")


def _fleet_loop(root: Path, interval: int, stop: threading.Event,
                say: Callable[[str], None]) -> None:
    """Report to the fleet every *interval* seconds, once the host is enrolled. A failure
    is said once (not every round) and the reports wait in the outbox; after a failure the
    next try comes sooner (5 s, doubling up to *interval*), so a host whose network comes
    up after the agent enrolls within seconds of it."""
    from cerulean.agent import fleetlink

    last_error = ""
    failures = 0
    while True:
        error = ""
        try:
            if fleetlink.load_enrollment(root) is None:
                e = fleetlink.enroll_from_credential(root)
                if e is not None:
                    say(f"fleet: enrolled at {e.server} as host {e.host_id}")
            if fleetlink.load_enrollment(root) is not None:
                r = fleetlink.sync(root)
                error = r.error or (f"{r.failed} reports not delivered, {r.pending} waiting"
                                    if r.failed else "")
        except Exception as e:  # the next round tries again
            error = str(e)
        if error != last_error:
            say(f"fleet: {error}" if error else "fleet: reports are delivered again")
            last_error = error
        failures = min(failures + 1, 16) if error else 0
        if stop.wait(min(interval, 5 * 2 ** (failures - 1)) if failures else interval):
            return


def run(root: Path = Path("/"), say: Callable[[str], None] = print,
        stop: threading.Event | None = None, slot: str = "") -> int:
    """Serve until SIGTERM/SIGINT (or until *stop* is set, in tests)."""
    cfg = load_agent_config(root)
    stop = stop or threading.Event()
    # The rules load and the watches are set before anything is served: a bad rule file
    # stops the agent first, and what happens once it answers is seen.
    guard = None
    if cfg.detect:
        from cerulean.agent.detect import load_rule_files

        rules = load_rule_files([root / "usr/lib/cerulean/rules.d",
                                 root / "etc/cerulean/rules.d"])
        guard = Guard(rules, AuditLog(Host(root).audit_log), root, cfg.watch,
                      float(cfg.scan_interval), say)
        guard.start()
    if root == Path("/"):
        # The service: give up CAP_SYS_ADMIN and all but the marks' use of
        # open_by_handle_at, whatever runs (before any thread starts).
        from cerulean.agent.confine import ConfineError, confine

        try:
            confine(guard.fs_marks if guard is not None else None)
        except ConfineError as e:
            say(f"warning: the agent cannot confine itself ({e.strerror or e})")
            if guard is not None:
                guard.drop_marks(f"the agent cannot confine their use ({e.strerror or e})")
    server: metrics.MetricsServer | None = None

    def own_state() -> list[metrics.Family]:  # the agent's own limits and degradation
        return [*(server.families() if server is not None else []),
                *(guard.families() if guard is not None else [])]

    if cfg.metrics_listen:
        trail = AuditLog(Host(root).audit_log)
        try:
            server = metrics_server(cfg.metrics_listen, lambda: exposition(
                root, slot, dict(guard.by_rule) if guard is not None else None, own_state),
                lambda message, evidence: self_alert(
                    trail, "agent-metrics-overload", "warning", message, evidence, say))
        except AgentError:
            if guard is not None:
                guard.close()
            raise
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        say(f"Serving metrics on http://{cfg.metrics_listen}/metrics")
    if guard is not None:
        def watch() -> None:
            assert guard is not None
            while not stop.is_set():
                try:
                    guard.step(wait=1.0)
                except Exception as e:  # one bad round must not end detection
                    say(f"error: detection: {e}")
                    guard.failed(e)  # a metric and an audit entry: never silent
                    stop.wait(5)

        watcher_thread = threading.Thread(target=watch, name="guard", daemon=True)
        watcher_thread.start()
        say(f"Detecting with {len(guard.rules)} rules, watching {', '.join(cfg.watch)}")

    if cfg.integrity_interval:
        threading.Thread(target=_integrity_loop, name="integrity", daemon=True,
                         args=(root, cfg.integrity_interval, stop, say)).start()

    if cfg.fleet_interval:
        threading.Thread(target=_fleet_loop, name="fleet", daemon=True,
                         args=(root, cfg.fleet_interval, stop, say)).start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    notify("READY=1")
    stop.wait()
    notify("STOPPING=1")
    if server is not None:
        server.shutdown()
        server.server_close()
    if guard is not None:
        watcher_thread.join(10)
        if not watcher_thread.is_alive():  # else the process exit closes it
            guard.close()
    say("Stopped.")
    return 0
