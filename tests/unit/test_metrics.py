"""Host metrics in the Prometheus text format (cerulean.agent.metrics)."""

from __future__ import annotations

import errno
import http.server
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cerulean.agent import metrics
from cerulean.agent.audit import AuditLog
from cerulean.agent.update.host import Host, State, save_state

STAT = """cpu  100 0 50 1000 5 0 1 0 0 0
cpu0 60 0 30 500 3 0 1 0 0 0
cpu1 40 0 20 500 2 0 0 0 0 0
intr 12345
ctxt 987654
btime 1764194400
processes 4242
"""
MEMINFO = """MemTotal:        2014256 kB
MemFree:          812344 kB
MemAvailable:    1500000 kB
Buffers:           10240 kB
Cached:           400000 kB
SwapTotal:             0 kB
SwapFree:              0 kB
Shmem:              1234 kB
"""
NETDEV = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs "
    "drop fifo colls carrier compressed\n"
    "    lo:    1000      10    0    0    0     0          0         0     1000      10    0"
    "    0    0     0       0          0\n"
    "enp0s3: 5242880    4000    1    2    0     0          0         0   123456     900    0"
    "    3    0     0       0          0\n"
)
MOUNTS = """/dev/mapper/usr /usr erofs ro,relatime 0 0
/dev/vda6 / ext4 ro,relatime 0 0
/dev/vda7 /var ext4 rw,relatime 0 0
proc /proc proc rw 0 0
/dev/vda7 /var ext4 rw,relatime 0 0
/dev/vdb /mnt/with\\040space ext4 rw 0 0
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "stat").write_text(STAT)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "net/dev").write_text(NETDEV)
    (proc / "mounts").write_text(MOUNTS)
    (proc / "loadavg").write_text("0.52 0.58 0.59 1/123 4567\n")
    return tmp_path


def statvfs(path: str) -> os.statvfs_result:
    if path == "/mnt/with space":
        raise PermissionError(path)
    blocks = {"/usr": 30000, "/": 16000, "/var": 300000}[path]
    # f_bsize f_frsize f_blocks f_bfree f_bavail f_files f_ffree f_favail f_flag f_namemax
    return os.statvfs_result((4096, 4096, blocks, blocks // 2, blocks // 4, 0, 0, 0, 0, 255))


def units() -> list[dict[str, str]]:
    return [{"unit": "ssh.service", "active": "active"},
            {"unit": "broken.service", "active": "failed"},
            {"unit": "dev-vda.device", "active": "active"}]


def samples(text: str) -> dict[str, float]:
    """name{labels} -> value, checking every line is valid exposition syntax."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+", line), line
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)', line)
        assert m, line
        out[m.group(1)] = float(m.group(2))
    return out


def test_node_metrics_from_proc(root: Path) -> None:
    fams = [*metrics.cpu(root / "proc"), *metrics.memory(root / "proc"),
            *metrics.network(root / "proc"), *metrics.filesystems(root / "proc", statvfs),
            *metrics.systemd_units(units)]
    s = samples(metrics.render(fams))
    hz = metrics.USER_HZ
    assert s['node_cpu_seconds_total{cpu="0",mode="user"}'] == 60 / hz
    assert s['node_cpu_seconds_total{cpu="1",mode="idle"}'] == 500 / hz
    assert 'node_cpu_seconds_total{cpu="",mode="user"}' not in s  # the "cpu" total line
    assert s["node_boot_time_seconds"] == 1764194400
    assert s["node_context_switches_total"] == 987654
    assert s["node_load1"] == 0.52 and s["node_load15"] == 0.59
    assert s["node_memory_MemTotal_bytes"] == 2014256 * 1024
    assert s["node_memory_MemAvailable_bytes"] == 1500000 * 1024
    assert s['node_network_receive_bytes_total{device="enp0s3"}'] == 5242880
    assert s['node_network_transmit_drop_total{device="enp0s3"}'] == 3
    assert s['node_filesystem_size_bytes{device="/dev/vda7",fstype="ext4",mountpoint="/var"}'] \
        == 300000 * 4096
    assert s['node_filesystem_readonly{device="/dev/mapper/usr",fstype="erofs",'
             'mountpoint="/usr"}'] == 1
    assert not any("proc" in k or "space" in k for k in s)  # pseudo fs; unreadable mount
    assert s['node_systemd_unit_state{name="broken.service",state="failed"}'] == 1
    assert s['node_systemd_unit_state{name="broken.service",state="active"}'] == 0
    assert s["cerulean_systemd_units_failed"] == 1
    assert not any("dev-vda.device" in k for k in s)


def test_render_escapes_labels_and_skips_empty_families() -> None:
    f = metrics.Family("x_info", "gauge", "Help with a \\ backslash.")
    f.add(1, path='a "quoted"\\path\nnext')
    empty = metrics.Family("y", "gauge", "Never sampled.")
    text = metrics.render([f, empty])
    assert text == ('# HELP x_info Help with a \\\\ backslash.\n# TYPE x_info gauge\n'
                    'x_info{path="a \\"quoted\\"\\\\path\\nnext"} 1\n')
    assert metrics.render([metrics.Family("z", "gauge", "h", [({}, 0.25)])]).endswith("z 0.25\n")


def test_cerulean_state(tmp_path: Path) -> None:
    host = Host(tmp_path)
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text(
        'IMAGE_ID="edge"\nIMAGE_VERSION="13.20261126.2"\n')
    state = State(bad={"13.20261126.3": "its health check failed"},
                  staged={"version": "13.20261126.4", "slot": "A"})
    state.record("staged", "13.20261126.4 is written to slot A and verified.")
    save_state(host, state)
    for _ in range(3):
        AuditLog(host.audit_log).append("updater", "update.staged")
    s = samples(metrics.render(metrics.cerulean_state(tmp_path, slot="B")))
    assert s['cerulean_update_info{image="edge",slot="B",version="13.20261126.2"}'] == 1
    assert s["cerulean_update_staged"] == 1 and s["cerulean_update_failed_releases"] == 1
    assert s["cerulean_audit_entries"] == 3
    (when,) = [v for k, v in s.items() if k.startswith("cerulean_update_last_run")]
    assert when > 1.7e9


def test_collect_on_this_machine() -> None:
    """The real /proc of the machine running the tests parses, and says sensible things."""
    s = samples(metrics.render(metrics.collect(list_units=lambda: [])))
    assert s["node_memory_MemTotal_bytes"] > 64 * 1024 * 1024
    assert any(k.startswith("node_cpu_seconds_total{") for k in s)
    assert any(k.startswith('node_filesystem_size_bytes{') for k in s)
    assert s["node_time_seconds"] > s["node_boot_time_seconds"] > 1e9


# The endpoint under load: every local user may connect to it.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes *s* within *seconds* (we only ever send, never read)."""
    s.settimeout(seconds)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _until(condition: Any, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def serving(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, list[str], int]]:
    from cerulean.agent import daemon

    # Short timeouts for the test (raising=False: the test must also run where these
    # limits do not exist, and fail there).
    monkeypatch.setattr(metrics, "IO_TIMEOUT_S", 1.0, raising=False)
    monkeypatch.setattr(metrics, "REQUEST_DEADLINE_S", 1.5, raising=False)
    reports: list[str] = []
    port = _free_port()
    try:
        server = daemon.metrics_server(f"127.0.0.1:{port}", lambda: b"up 1\n",
                                       lambda message, evidence: reports.append(message))
    except TypeError:  # no way to report: still check the limits
        server = daemon.metrics_server(f"127.0.0.1:{port}", lambda: b"up 1\n")
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True)
    t.start()
    yield server, reports, port
    server.shutdown()
    server.server_close()


def test_held_connections_cannot_take_the_agents_file_descriptors(
        serving: tuple[Any, list[str], int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Half-sent requests: those over the limit are closed at once, the server holds no
    more descriptors than its limit, the rest are cut at the deadline, a scrape then
    works, and the refusals are a metric and one report."""
    server, reports, port = serving
    # None of them sends a whole request: none is cut to make room for another (a
    # scraper's is the next test).
    limit = getattr(metrics, "MAX_CONNECTIONS", 16)
    fds_before = len(os.listdir("/proc/self/fd"))
    held = []
    for _ in range(limit + 24):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /metr")
        held.append(s)
    time.sleep(0.3)
    server_fds = len(os.listdir("/proc/self/fd")) - fds_before - len(held)
    assert server_fds <= limit + 2, f"the server holds {server_fds} descriptors"
    refused = [s for s in held[limit:] if _closed_within(s, 1.0)]
    assert len(refused) >= 20
    assert server.request_queue_size >= 64
    # The ones it took are cut once their time is up, without a byte more from us.
    assert all(_closed_within(s, 4.0) for s in held[:limit])
    for s in held:
        s.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.read() == b"up 1\n"
    s = samples(metrics.render(server.families()))
    assert s["cerulean_metrics_connections_refused_total"] >= 20
    assert len(reports) == 1 and "refused" in reports[0], reports


def test_a_client_that_keeps_every_slot_half_open_cannot_stop_scrapes(
        serving: tuple[Any, list[str], int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Any local user can reconnect as fast as connections are cut, holding every slot
    with half-sent requests: a scraper that sends its request at once still gets in,
    in place of the oldest of them."""
    server, _reports, port = serving
    # Ample: no held connection reaches it in this test.
    monkeypatch.setattr(metrics, "REQUEST_DEADLINE_S", 5.0)
    limit = getattr(metrics, "MAX_CONNECTIONS", 16)
    held = []
    for _ in range(limit):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /metr")
        held.append(s)
    assert _until(lambda: server.connections == limit)  # all accepted
    time.sleep(0.6)  # younger than REQUEST_DEADLINE_S
    for _ in range(2):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.read() == b"up 1\n"
        # The first took the place of the oldest half-sent one, the second the slot the
        # first left; the others are still open (the deadline is seconds away). (The
        # server ends a connection just after the client has read the answer.)
        assert _until(lambda: server.connections == limit - 1)
        assert samples(metrics.render(server.families()))[
            "cerulean_metrics_connections_evicted_total"] == 1
    assert _closed_within(held[0], 0.05)
    for h in held:
        h.close()


def test_a_request_of_huge_headers_is_not_held(serving: tuple[Any, list[str], int]) -> None:
    """Python's header parser keeps a hundred lines of 64 KiB each: sixteen such
    connections would take 100 MiB of the agent's 128."""
    import tracemalloc

    _server, _reports, port = serving
    tracemalloc.start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(2)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            try:
                for i in range(40):  # 2.4 MB of headers, never ended
                    s.sendall(b"X-%d: " % i + b"a" * 60_000 + b"\r\n")
            except (TimeoutError, OSError):
                pass  # the server stopped reading: what it was sent waits in buffers
            _closed_within(s, 3.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_a_trickled_request_is_cut_at_its_deadline(serving: tuple[Any, list[str], int]) -> None:
    _server, _reports, port = serving
    s = socket.create_connection(("127.0.0.1", port))
    started = time.monotonic()
    closed = False
    with s:
        while time.monotonic() - started < 6:
            try:
                s.sendall(b"X")  # one byte every 0.2 s: each read is quick, the whole is not
            except OSError:
                closed = True
                break
            if _closed_within(s, 0.2):
                closed = True
                break
    assert closed and time.monotonic() - started < 4


def test_accept_out_of_descriptors_pauses_instead_of_spinning() -> None:
    from cerulean.agent import daemon

    port = _free_port()
    server = daemon.metrics_server(f"127.0.0.1:{port}", lambda: b"")
    real = server.socket
    calls = []

    class NoDescriptors:
        def fileno(self) -> int:
            return real.fileno()

        def accept(self) -> Any:
            calls.append(1)
            raise OSError(errno.EMFILE, "Too many open files")

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    server.socket = NoDescriptors()
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True)
    t.start()
    with socket.create_connection(("127.0.0.1", port)):  # now accept() is always due
        time.sleep(1.5)
        server.shutdown()
    server.socket = real
    server.server_close()
    assert 0 < len(calls) <= 30, f"accept() was tried {len(calls)} times in 1.5 s"
    s = samples(metrics.render(server.families()))
    assert s["cerulean_metrics_accept_errors_total"] == len(calls)


def test_cut_connections_count_until_their_thread_has_closed_them() -> None:
    """Evicting a connection frees its slot for a scraper, but its thread and file live
    until the thread sees the end: a client reconnecting faster than threads end must
    not grow them without bound. And a connection whose whole request waits unread
    (its thread has not run yet) is not a slow one."""
    now = [1000.0]
    server = metrics.MetricsServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler,
                                   lambda: b"", clock=lambda: now[0])
    pairs: list[tuple[socket.socket, socket.socket]] = []

    def connect(sent: bytes) -> tuple[socket.socket, bool]:
        ours, theirs = socket.socketpair()
        pairs.append((ours, theirs))
        theirs.sendall(sent)
        return ours, server.verify_request(ours, ("127.0.0.1", 1))

    try:
        limit = metrics.MAX_CONNECTIONS
        served, admitted = connect(b"GET /metrics HTTP/1.0\r\n\r\n")  # its thread is late
        assert admitted
        assert all(connect(b"GET /metr")[1] for _ in range(limit - 1))
        now[0] += 60
        # Each newcomer takes the place of a half-sent one (never the one that sent it
        # all), until as many cut ones wait for their threads as are served.
        taken = [connect(b"GET /metrics HTTP/1.0\r\n\r\n")[1] for _ in range(2 * limit)]
        assert taken == [True] * (limit - 1) + [False] * (limit + 1)
        assert server.connections == 2 * limit - 1
        assert served in server._open
        # A thread that ends frees what its connection held.
        for s in list(server._closing)[:3]:
            server.shutdown_request(s)
        assert server.connections == 2 * limit - 4
        assert connect(b"GET /metr")[1] is False  # no slow one to cut: all sent theirs
        server.shutdown_request(served)  # answered
        assert connect(b"GET /metr")[1] and server.connections == 2 * limit - 4
    finally:
        server.server_close()
        for a, b in pairs:
            a.close()
            b.close()


def test_half_open_connections_made_as_fast_as_they_are_cut_never_keep_a_scraper_out(
        ) -> None:
    """A user who keeps making connections that send nothing (190 a second, in an
    outside review) held every slot with young ones: a scraper was refused 48 times in
    48. Now only a newcomer whose whole request is there cuts a slow one out, and
    newcomers that send nothing never do, however old the ones open."""
    now = [1000.0]
    server = metrics.MetricsServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler,
                                   lambda: b"", clock=lambda: now[0])
    pairs: list[tuple[socket.socket, socket.socket]] = []

    def connect(sent: bytes) -> bool:
        ours, theirs = socket.socketpair()
        pairs.append((ours, theirs))
        if sent:
            theirs.sendall(sent)
        return server.verify_request(ours, ("127.0.0.1", 1))

    try:
        limit = metrics.MAX_CONNECTIONS
        assert all(connect(b"") for _ in range(limit))  # just made: young
        assert connect(b"GET /metrics HTTP/1.0\r\n\r\n")  # a scraper gets in at once
        assert server.evicted == 1
        now[0] += 3600  # old, and the attacker's newcomers still cut no one
        assert not any(connect(b"GET /met") for _ in range(20))
        assert not any(connect(b"") for _ in range(20))
        assert server.evicted == 1 and server.refused == 40
        assert connect(b"GET /metrics HTTP/1.0\r\n\r\n")
    finally:
        server.server_close()
        for a, b in pairs:
            a.close()
            b.close()
