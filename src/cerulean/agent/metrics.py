"""Host metrics in the Prometheus text exposition format (version 0.0.4).

Names, labels and units follow node_exporter's conventions (``node_*``, base
units: seconds and bytes, ``_total`` for counters), so existing dashboards and
alert rules work unchanged; Cerulean's own state is under ``cerulean_*``.
Everything is read from ``/proc``, ``statvfs`` and ``systemctl`` on each
scrape: the agent keeps no copy, and a scrape costs a few milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

USER_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
MEMINFO = {  # /proc/meminfo field -> metric (the value is in kB)
    "MemTotal": "node_memory_MemTotal_bytes",
    "MemFree": "node_memory_MemFree_bytes",
    "MemAvailable": "node_memory_MemAvailable_bytes",
    "Buffers": "node_memory_Buffers_bytes",
    "Cached": "node_memory_Cached_bytes",
    "SwapTotal": "node_memory_SwapTotal_bytes",
    "SwapFree": "node_memory_SwapFree_bytes",
}
# File systems that hold data (not proc, sysfs, cgroups, ...).
REAL_FS = {"ext4", "ext3", "ext2", "xfs", "btrfs", "vfat", "erofs", "squashfs", "tmpfs",
           "f2fs", "zfs", "overlay"}
UNIT_STATES = ("active", "inactive", "failed", "activating", "deactivating")


@dataclass
class Family:
    """One metric family: its samples are (labels, value)."""

    name: str
    kind: str  # counter | gauge
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def render(families: Iterable[Family]) -> str:
    """The text exposition of *families* (families without samples are left out)."""
    out: list[str] = []
    for f in families:
        if not f.samples:
            continue
        out.append(f"# HELP {f.name} {f.help.replace(chr(92), chr(92) * 2)}")
        out.append(f"# TYPE {f.name} {f.kind}")
        for labels, value in f.samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            out.append(f"{f.name}{{{lab}}} {_number(value)}" if lab
                       else f"{f.name} {_number(value)}")
    return "\n".join(out) + "\n"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cpu(proc: Path) -> list[Family]:
    seconds = Family("node_cpu_seconds_total", "counter",
                     "Seconds the CPUs spent in each mode.")
    boot = Family("node_boot_time_seconds", "gauge", "Node boot time, in unixtime.")
    ctxt = Family("node_context_switches_total", "counter", "Total number of context switches.")
    for line in _read(proc / "stat").splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0].startswith("cpu") and parts[0] != "cpu":
            for mode, ticks in zip(CPU_MODES, parts[1:], strict=False):
                seconds.add(int(ticks) / USER_HZ, cpu=parts[0][3:], mode=mode)
        elif parts[0] == "btime":
            boot.add(int(parts[1]))
        elif parts[0] == "ctxt":
            ctxt.add(int(parts[1]))
    load = []
    fields = _read(proc / "loadavg").split()
    for i, name in enumerate(("node_load1", "node_load5", "node_load15")):
        f = Family(name, "gauge", f"{name[9:]}m load average.")
        if len(fields) > i:
            f.add(float(fields[i]))
        load.append(f)
    return [seconds, boot, ctxt, *load]


def memory(proc: Path) -> list[Family]:
    fams = {k: Family(v, "gauge", f"Memory information field {k}_bytes.")
            for k, v in MEMINFO.items()}
    for line in _read(proc / "meminfo").splitlines():
        key, _, rest = line.partition(":")
        if key in fams:
            number = rest.split()
            if number:
                fams[key].add(int(number[0]) * 1024)
    return list(fams.values())


def network(proc: Path) -> list[Family]:
    names = (("receive_bytes", 0), ("receive_packets", 1), ("receive_errs", 2),
             ("receive_drop", 3), ("transmit_bytes", 8), ("transmit_packets", 9),
             ("transmit_errs", 10), ("transmit_drop", 11))
    fams = [Family(f"node_network_{n}_total", "counter",
                   f"Network device statistic {n}.") for n, _ in names]
    for line in _read(proc / "net/dev").splitlines()[2:]:
        dev, _, rest = line.partition(":")
        values = rest.split()
        if len(values) < 16:
            continue
        for fam, (_, i) in zip(fams, names, strict=True):
            fam.add(int(values[i]), device=dev.strip())
    return fams


def filesystems(proc: Path, statvfs: Callable[[str], os.statvfs_result] = os.statvfs
                ) -> list[Family]:
    size = Family("node_filesystem_size_bytes", "gauge", "Filesystem size in bytes.")
    free = Family("node_filesystem_free_bytes", "gauge", "Filesystem free space in bytes.")
    avail = Family("node_filesystem_avail_bytes", "gauge",
                   "Filesystem space available to non-root users in bytes.")
    ro = Family("node_filesystem_readonly", "gauge", "Filesystem read-only status.")
    seen: set[str] = set()
    for line in _read(proc / "mounts").splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[2] not in REAL_FS:
            continue
        device, mountpoint, fstype, options = parts[:4]
        mountpoint = mountpoint.replace("\\040", " ")
        if mountpoint in seen:
            continue
        seen.add(mountpoint)
        try:
            st = statvfs(mountpoint)
        except OSError:
            continue
        labels = {"device": device, "mountpoint": mountpoint, "fstype": fstype}
        size.add(st.f_blocks * st.f_frsize, **labels)
        free.add(st.f_bfree * st.f_frsize, **labels)
        avail.add(st.f_bavail * st.f_frsize, **labels)
        ro.add(1 if "ro" in options.split(",") else 0, **labels)
    return [size, free, avail, ro]


def systemd_units(list_units: Callable[[], list[dict[str, str]]] | None = None
                  ) -> list[Family]:
    """node_systemd_unit_state, one sample per unit and state (1 for the unit's own)."""
    fam = Family("node_systemd_unit_state", "gauge", "Systemd unit state.")
    failed = Family("cerulean_systemd_units_failed", "gauge", "Units in the failed state.")
    units = (list_units or _list_units)()
    for u in units:
        name, state = u.get("unit", ""), u.get("active", "")
        if not name.endswith((".service", ".socket", ".timer", ".mount", ".target")):
            continue
        for s in UNIT_STATES:
            fam.add(1 if s == state else 0, name=name, state=s)
    if units:
        failed.add(sum(1 for u in units if u.get("active") == "failed"))
    return [fam, failed]


def _list_units() -> list[dict[str, str]]:
    try:
        r = subprocess.run(["systemctl", "list-units", "--all", "--output=json", "--no-pager"],
                           capture_output=True, text=True, timeout=10, check=False)
        data = json.loads(r.stdout) if r.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    return [u for u in data if isinstance(u, dict)]


def collect(root: Path = Path("/"), extra: Iterable[Family] = (),
            list_units: Callable[[], list[dict[str, str]]] | None = None) -> list[Family]:
    """Every family, read now (*root* is the host's / ; tests point it elsewhere)."""
    proc = root / "proc"
    now = Family("node_time_seconds", "gauge", "System time in seconds since epoch (1970).")
    now.add(time.time())
    return [*cpu(proc), *memory(proc), *network(proc), *filesystems(proc), now,
            *systemd_units(list_units), *extra]


def cerulean_state(root: Path = Path("/"), slot: str = "") -> list[Family]:
    """The update slots and the audit trail: cerulean_update_*, cerulean_audit_entries.
    *slot* is the booted slot (found once per boot by the caller: it reads the disk)."""
    from datetime import datetime

    from cerulean.agent.audit import AuditLog
    from cerulean.agent.update.host import Host, load_state
    from cerulean.errors import CeruleanError

    host = Host(root)
    info = Family("cerulean_update_info", "gauge",
                  "The running release (value 1; the labels say which).")
    staged = Family("cerulean_update_staged", "gauge",
                    "1 when a release is written to the other slot and waits to boot.")
    last = Family("cerulean_update_last_run_timestamp_seconds", "gauge",
                  "When the updater last recorded a result, by result.")
    bad = Family("cerulean_update_failed_releases", "gauge",
                 "Releases that failed on this host and will not be applied again.")
    audit = Family("cerulean_audit_entries", "gauge", "Entries in the audit trail.")
    osr = host.os_release()
    if osr.get("IMAGE_VERSION"):
        info.add(1, version=osr["IMAGE_VERSION"], image=osr.get("IMAGE_ID", ""), slot=slot)
    try:
        state = load_state(host)
    except (CeruleanError, OSError):
        state = None
    if state is not None:
        staged.add(1 if state.staged else 0)
        bad.add(len(state.bad))
        if state.last.get("time") and state.last.get("result"):
            try:
                t = datetime.fromisoformat(state.last["time"].replace("Z", "+00:00"))
                last.add(t.timestamp(), result=state.last["result"])
            except ValueError:
                pass
    trail = AuditLog(host.audit_log)
    head = trail.head_path
    if head.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            audit.add(json.loads(head.read_bytes())["seq"])
    trail_families: list[Family] = []
    if head.exists() or trail.path.exists():
        with contextlib.suppress(OSError):
            trail_families = trail.families()
    from cerulean.agent.integrity import metric_families

    return [info, staged, last, bad, audit, *trail_families, *policy_families(root),
            *metric_families(root)]


def policy_families(root: Path = Path("/")) -> list[Family]:
    """The last result of each policy profile (``cerulean policy`` and its timer)."""
    from cerulean.agent.compliance import last_reports

    checks = Family("cerulean_policy_checks", "gauge",
                    "Checks of a policy profile by result, at its last run.")
    score = Family("cerulean_policy_score_ratio", "gauge",
                   "Passed checks of a profile over those that passed or failed (0 to 1).")
    when = Family("cerulean_policy_last_run_timestamp_seconds", "gauge",
                  "When each profile last ran.")
    for name, doc in sorted(last_reports(root).items()):
        for result in ("passed", "failed", "errors", "notapplicable"):
            checks.add(float(doc.get(result, 0)), policy=name,
                       result="error" if result == "errors" else result)
        judged = doc.get("passed", 0) + doc.get("failed", 0)
        score.add(doc.get("passed", 0) / judged if judged else 1.0, policy=name)
        when.add(float(doc.get("time", 0)), policy=name)
    return [checks, score, when]


def alert_family(counts: dict[tuple[str, str], int]) -> Family:
    """Alerts the detection rules raised since the agent started, by rule and priority."""
    fam = Family("cerulean_alerts_total", "counter",
                 "Alerts raised by the detection rules since the agent started.")
    for (rule, priority), n in sorted(counts.items()):
        fam.add(n, rule=rule, priority=priority)
    return fam


# The endpoint's limits. Whoever may connect to the port (every local user) must not be
# able to take the agent's file descriptors, threads or CPU: detection and the audit
# trail need them more than a scrape does.
MAX_CONNECTIONS = 16  # connections served at once; more are closed as they are accepted
# ... unless the newcomer's whole request is there within NEWCOMER_WAIT_S and one of those
# open has not sent its own: the oldest such is cut to make room (a scraper sends at once;
# a client that holds slots by sending slowly, or not at all, loses them to it, however
# fast it makes new ones).
NEWCOMER_WAIT_S = 0.02
IO_TIMEOUT_S = 5.0  # how long one read or write on a connection may wait
REQUEST_DEADLINE_S = 10.0  # how long a connection may stay open in all
LISTEN_BACKLOG = 64  # connections the kernel queues before they are accepted
ACCEPT_BACKOFF_MAX_S = 1.0  # longest pause after accept() fails (no file descriptors)
SCRAPE_REUSE_S = 1.0  # scrapes this close together share one reading of the host
REPORT_EVERY_S = 300.0  # at most one audit entry about refused connections this often
REPORT_RETRY_S = 10.0  # when that entry could not be written, the next try


MAX_REQUEST_BYTES = 16 << 10  # the request line and headers of one connection, at most


class CappedReader:
    """A connection's input that ends after :data:`MAX_REQUEST_BYTES`: what a client sends
    is never held beyond that (Python's header parser would keep a hundred lines of
    64 KiB each, and parse them all when the connection ends)."""

    def __init__(self, raw: Any, limit: int | None = None) -> None:
        self.raw = raw
        self.left = MAX_REQUEST_BYTES if limit is None else limit

    def _take(self, read: Callable[[int], bytes], size: int | None) -> bytes:
        if self.left <= 0:
            return b""
        data = read(self.left if size is None or size < 0 else min(size, self.left))
        self.left -= len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        return self._take(self.raw.readline, size)

    def read(self, size: int = -1) -> bytes:
        return self._take(self.raw.read, size)

    def close(self) -> None:
        self.raw.close()


def sent_request(conn: socket.socket, wait: float = 0.0) -> bool:
    """Whether *conn*'s whole request (up to its blank line) waits, unread, in the
    kernel (waiting up to *wait* seconds for it to come): a client that sent it is not a
    slow one, however late its thread reads it."""
    try:  # a copy of the socket without the connection's timeout
        with socket.socket(fileno=os.dup(conn.fileno())) as peek:
            if wait > 0:
                select.select([peek], [], [], wait)
            data = peek.recv(MAX_REQUEST_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return False
    return b"\r\n\r\n" in data or b"\n\n" in data


class MetricsServer(ThreadingHTTPServer):
    """The metrics endpoint, bounded: at most :data:`MAX_CONNECTIONS` connections (so at
    most that many file descriptors and threads), each closed after
    :data:`REQUEST_DEADLINE_S`; a connection over the cap whose whole request is there
    takes the place of the oldest one still sending its own, or else is closed at
    once; both are counted. When ``accept()`` itself fails (the process is out of file descriptors)
    the loop pauses instead of spinning. *report* (message, evidence) is called at most
    once every :data:`REPORT_EVERY_S` seconds while connections are refused or cut."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 scrape: Callable[[], bytes],
                 report: Callable[[str, dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._lock = threading.Lock()
        self._open: dict[socket.socket, float] = {}  # connection -> when it was accepted
        self._requested: set[socket.socket] = set()  # those that sent a whole request
        # Connections cut (evicted, past their deadline) whose thread has not ended yet:
        # they hold a thread and a file still, so they count against the cap too.
        self._closing: set[socket.socket] = set()
        self._scrape = scrape
        self._scrape_lock = threading.Lock()
        self._last_scrape: tuple[float, bytes] | None = None
        self._report = report
        self._clock = clock
        self._backoff = 0.0
        self._reported_at: float | None = None
        self._unreported: dict[str, int] = {}
        self.refused = 0  # connections closed at once: MAX_CONNECTIONS were open
        self.timed_out = 0  # connections cut at REQUEST_DEADLINE_S
        self.evicted = 0  # connections cut to make room: their request was too slow
        self.accept_errors = 0  # accept() failures (file descriptors, memory)
        super().__init__(address, handler)

    # -- connections --

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            request = self.socket.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The connection stays queued and select() says so again at once: pause,
                # longer each time, rather than spin.
                self._backoff = min(ACCEPT_BACKOFF_MAX_S, max(0.01, self._backoff * 2))
                self._degraded("accept-errors")
                time.sleep(self._backoff)
            raise
        self._backoff = 0.0
        return request

    def verify_request(self, request: Any, client_address: Any) -> bool:
        now = self._clock()
        victim = None
        with self._lock:
            full = (len(self._open) >= MAX_CONNECTIONS
                    and len(self._closing) < MAX_CONNECTIONS)
        # Only a newcomer that has sent its whole request may take a slow one's place:
        # connections that send nothing, however many, never cut each other (or a
        # scraper) out.
        if full and sent_request(request, NEWCOMER_WAIT_S):
            with self._lock:
                slow = [(t, i, s) for i, (s, t) in enumerate(self._open.items())
                        if s not in self._requested and not sent_request(s)]
                if slow and len(self._closing) < MAX_CONNECTIONS:
                    victim = min(slow)[2]
                    del self._open[victim]
                    self._closing.add(victim)
        with self._lock:
            if (len(self._open) < MAX_CONNECTIONS
                    and len(self._open) + len(self._closing) < 2 * MAX_CONNECTIONS):
                self._open[request] = now
                admitted = True
            else:
                admitted = False
        if victim is not None:
            self._degraded("evicted")
            with contextlib.suppress(OSError):
                victim.shutdown(socket.SHUT_RDWR)  # its thread sees the end and closes it
        if not admitted:
            self._degraded("refused")
        return admitted

    def request_read(self, request: Any) -> None:
        """The handler read the whole request of this connection: it is served, no longer
        one that may be cut to make room."""
        with self._lock:
            if request in self._open:
                self._requested.add(request)

    def process_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(IO_TIMEOUT_S)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.pop(request, None)
            self._requested.discard(request)
            self._closing.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up or is cut off is no news; the counters say the rest

    def service_actions(self) -> None:
        """Between connections (at least every half second): cut the connections that
        are past their deadline, and report what was refused."""
        now = self._clock()
        with self._lock:
            late = [s for s, t in self._open.items() if now - t > REQUEST_DEADLINE_S]
        for s in late:
            self._degraded("timed-out")
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # its thread sees the end and closes it
            with self._lock:
                if self._open.pop(s, None) is not None:
                    self._closing.add(s)
                self._requested.discard(s)
        self._flush_report(now)

    @property
    def connections(self) -> int:
        """Connections that hold a thread: served, or cut and not closed yet."""
        with self._lock:
            return len(self._open) + len(self._closing)

    # -- what it serves --

    def scrape(self) -> bytes:
        """The exposition; concurrent scrapes wait for one reading of the host."""
        with self._scrape_lock:
            now = self._clock()
            if self._last_scrape is not None and now - self._last_scrape[0] < SCRAPE_REUSE_S:
                return self._last_scrape[1]
            data = self._scrape()
            self._last_scrape = (now, data)
            return data

    def families(self) -> list[Family]:
        """The endpoint's own state: cerulean_metrics_*."""
        fams = []
        for name, kind, text, value in (
                ("cerulean_metrics_connections", "gauge", "Connections to the metrics "
                 f"endpoint open now, cut ones not closed yet included (at most "
                 f"{2 * MAX_CONNECTIONS}).", self.connections),
                ("cerulean_metrics_connections_refused_total", "counter",
                 "Connections closed at once because the endpoint was at its limit.",
                 self.refused),
                ("cerulean_metrics_connections_timed_out_total", "counter",
                 f"Connections cut after {REQUEST_DEADLINE_S:g} s.", self.timed_out),
                ("cerulean_metrics_connections_evicted_total", "counter",
                 "Connections cut to make room for one that had sent its whole request: "
                 "theirs had not arrived.", self.evicted),
                ("cerulean_metrics_accept_errors_total", "counter",
                 "Connections the endpoint could not accept (no file descriptors).",
                 self.accept_errors)):
            fams.append(Family(name, kind, text, [({}, float(value))]))
        return fams

    # -- saying so --

    def _degraded(self, what: str) -> None:
        with self._lock:
            if what == "refused":
                self.refused += 1
            elif what == "timed-out":
                self.timed_out += 1
            elif what == "evicted":
                self.evicted += 1
            else:
                self.accept_errors += 1
            self._unreported[what] = self._unreported.get(what, 0) + 1
        self._flush_report(self._clock())

    def _flush_report(self, now: float) -> None:
        with self._lock:
            if not self._unreported or (self._reported_at is not None
                                        and now - self._reported_at < REPORT_EVERY_S):
                return
            if self._report is None:
                self._unreported = {}
                return
            counts, self._unreported = self._unreported, {}
            self._reported_at = now
        words = {"refused": "connections refused (the limit of "
                            f"{MAX_CONNECTIONS} was reached)",
                 "timed-out": f"connections cut after {REQUEST_DEADLINE_S:g} s",
                 "evicted": "connections cut to make room (their request was too slow)",
                 "accept-errors": "connections not accepted (no file descriptors left)"}
        message = "The metrics endpoint is under load: " + ", ".join(
            f"{n} {words[k]}" for k, n in sorted(counts.items())) + "."
        host, port = self.server_address[:2]
        try:
            self._report(message, {"metrics.listen": f"{host!s}:{port}",
                                   **{f"metrics.{k}": n for k, n in counts.items()}})
        except Exception:  # reporting must not stop serving: it is tried again later
            with self._lock:
                for k, n in counts.items():
                    self._unreported[k] = self._unreported.get(k, 0) + n
                self._reported_at = now - REPORT_EVERY_S + REPORT_RETRY_S
