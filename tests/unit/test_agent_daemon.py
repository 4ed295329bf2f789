"""The long-running agent (cerulean.agent.daemon): config, the metrics endpoint, stopping."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_shipped_rules import SHIPPED

from cerulean.agent import cli, daemon
from cerulean.agent.audit import AuditLog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_config_layers_and_errors(tmp_path: Path) -> None:
    assert daemon.load_agent_config(tmp_path).metrics_listen == "127.0.0.1:9477"
    (tmp_path / "usr/lib/cerulean").mkdir(parents=True)
    (tmp_path / "etc/cerulean").mkdir(parents=True)
    (tmp_path / "usr/lib/cerulean/agent.toml").write_text('metrics-listen = "0.0.0.0:9100"\n')
    (tmp_path / "etc/cerulean/agent.toml").write_text('metrics-listen = "[::1]:9101"\n')
    cfg = daemon.load_agent_config(tmp_path)
    assert cfg.metrics_listen == "[::1]:9101" and len(cfg.sources) == 2
    assert daemon.parse_listen(cfg.metrics_listen) == ("::1", 9101)
    for text, words in (('metrics-listen = "9100"\n', "must be HOST:PORT"),
                        ('metrics-listen = "a:70000"\n', "must be HOST:PORT"),
                        ("metrics-listen = 9100\n", "must be a str"),
                        ('metric-listen = "a:1"\n', "unknown key 'metric-listen'"),
                        ("metrics-listen = \n", "is not valid TOML")):
        (tmp_path / "etc/cerulean/agent.toml").write_text(text)
        with pytest.raises(daemon.AgentError, match=words):
            daemon.load_agent_config(tmp_path)


def test_serves_metrics_until_stopped(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "etc/cerulean").mkdir(parents=True)
    (tmp_path / "etc/cerulean/agent.toml").write_text(
        f'metrics-listen = "127.0.0.1:{port}"\nwatch = ["/tmp"]\nscan-interval = 1\n')
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal:  1024 kB\n")
    (tmp_path / "tmp").mkdir()
    rules = tmp_path / "usr/lib/cerulean/rules.d"
    rules.mkdir(parents=True)
    shutil.copy(SHIPPED / "cerulean.yaml", rules)
    said: list[str] = []
    stop = threading.Event()
    t = threading.Thread(target=daemon.run, kwargs={"root": tmp_path, "say": said.append,
                                                    "stop": stop, "slot": "B"})
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
                body = r.read().decode()
                ctype = r.headers["Content-Type"]
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "the metrics endpoint never answered"
            time.sleep(0.05)
    # A set-user-ID file in the watched /tmp: the alert lands in the audit trail.
    f = tmp_path / "tmp/backdoor"
    f.write_bytes(b"#!/bin/sh\n")
    os.chmod(f, 0o6755)
    trail = AuditLog(tmp_path / "var/lib/cerulean/audit/audit.jsonl")
    deadline = time.monotonic() + 10
    while not any(e["action"] == "alert.setuid-or-setgid-file" for e in trail.entries()):
        assert time.monotonic() < deadline, f"no alert in the audit trail: {said}"
        time.sleep(0.1)
    assert trail.verify().ok
    assert ctype == daemon.CONTENT_TYPE
    assert "node_memory_MemTotal_bytes 1048576\n" in body
    assert "# TYPE node_time_seconds gauge" in body
    assert "cerulean_metrics_connections 1\n" in body and "cerulean_watch_up 1\n" in body
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{url}/", timeout=5)
    assert e.value.code == 404
    stop.set()
    t.join(10)
    assert not t.is_alive() and said[:2] == [
        f"Serving metrics on http://127.0.0.1:{port}/metrics",
        "Detecting with 11 rules, watching /tmp"] and said[-1] == "Stopped."
    assert any(line.startswith("alert [critical] setuid-or-setgid-file: set-ID file "
                               f"{f}") for line in said), said
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/metrics", timeout=2)


def test_a_busy_port_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(daemon.AgentError, match=f"Cannot listen on 127.0.0.1:{port}"):
            daemon.metrics_server(f"127.0.0.1:{port}", lambda: b"")


def test_sd_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        daemon.notify("READY=1")
        assert s.recv(100) == b"READY=1"


def test_cli_prints_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["agent", "metrics"]) == 0
    out = capsys.readouterr().out
    assert "# TYPE node_cpu_seconds_total counter" in out and "node_memory_MemTotal_bytes" in out


def test_the_fleet_is_tried_again_sooner_after_a_failure(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """A host whose network is not up yet when the agent starts enrolls seconds after it
    is, not a whole interval later; once reports go through, the interval is back."""
    from cerulean.agent import fleetlink

    results = ["network is unreachable"] * 6 + [""] * 2
    waits: list[float] = []

    class Stop:
        def wait(self, seconds: float) -> bool:
            waits.append(seconds)
            return not results

    def enrolled(root: Path) -> object:
        return object()

    def sync(root: Path) -> object:
        error = results.pop(0)
        if error:
            raise OSError(error)
        return fleetlink.SyncResult({}, 1, 0, 0, False)

    monkeypatch.setattr(fleetlink, "load_enrollment", enrolled)
    monkeypatch.setattr(fleetlink, "sync", sync)
    said: list[str] = []
    daemon._fleet_loop(tmp_path, 60, Stop(), said.append)  # type: ignore[arg-type]
    assert waits == [5, 10, 20, 40, 60, 60, 60, 60], waits
    assert said == ["fleet: network is unreachable", "fleet: reports are delivered again"]
