"""The publisher's logic: configuration, state that survives a torn write, steps that are
not done twice after a restart, back-off, and metadata re-signed whatever else fails.

The slow parts (refreshing a lock against the archive, building a system image) are
replaced here by small stand-ins that write what the real ones write; the real loop
runs in tests/vm/test_publisher_loop.py. The repository, its keys, publishing and
the audit trail are the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_updater import release_dir

from cerulean.agent.audit import AuditLog
from cerulean.cli import main
from cerulean.errors import CeruleanError
from cerulean.release import publisher as pub
from cerulean.release.repo import Repository

DEFINITION = """\
[image]
kind = "system"
description = "test"
[packages]
include = ["systemd-sysv"]
"""


@dataclass
class Fakes:
    """Stand-ins for the archive and the image build, counting their calls."""

    tmp: Path
    inrelease: bytes = b"v1"
    lock_text: str = "lock 1"
    mirror_down: bool = False
    build_fails: bool = False
    builds: list[str] = field(default_factory=list)
    refreshes: int = 0


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Fakes]]:
    Repository.create(tmp_path / "repo", tmp_path / "keys")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "vm.toml").write_text(DEFINITION)
    (tmp_path / "images" / "vm.lock").write_text("lock 1")
    config = tmp_path / "publisher.toml"
    config.write_text('repo = "repo"\nkeys = "keys"\nwork = "work"\npoll = "1m"\n'
                      '[[image]]\ndefinition = "images/vm.toml"\narches = ["amd64"]\n'
                      'channels = { stable = "now", preview = "0:0.5,1:1" }\n')
    f = Fakes(tmp_path)

    import cerulean.build.plan as plan
    import cerulean.debian.fetch as fetch
    import cerulean.release.build as build

    def get_bytes(_http: object, url: str, what: str, **_kw: object) -> bytes:
        if f.mirror_down:
            raise CeruleanError(f"Downloading {what} failed: connection refused.")
        return f.inrelease

    @dataclass
    class Sec:
        changes: dict[str, list[Any]]

    def refresh_security(defn: Any, _cache: Any, **_kw: Any) -> Sec:
        f.refreshes += 1
        if f.mirror_down:
            raise CeruleanError("The archive cannot be reached.")
        if defn.lock_path.read_text() != f.lock_text:
            defn.lock_path.write_text(f.lock_text)
        return Sec({})

    @dataclass
    class Built:
        path: Path
        doc: Any
        seconds: float = 1.0

    def build_release(defn: Any, _lock: Any, _cfg: Any, arches: list[str], out: Path,
                      _cache: Any, *, known_versions: list[str], **_kw: Any) -> Built:
        if f.build_fails:
            raise CeruleanError("The build failed: dpkg said no.")
        version = f"13.20261201.{len(f.builds)}"
        f.builds.append(version)
        (out / "vm").mkdir(parents=True, exist_ok=True)
        (out / "vm" / "src").mkdir(parents=True, exist_ok=True)
        made = release_dir(out / "vm" / "src", version, version.encode() * 2000, b"v" * 4096,
                           b"k" * 512)
        d = made.rename(out / "vm" / version)  # where release build puts it
        (d / "packages.json").write_text(json.dumps(
            {"amd64": {"less": {"version": defn.lock_path.read_text()}}}))
        from cerulean.release.publish import read_release_dir

        return Built(d, read_release_dir(d))

    monkeypatch.setattr(fetch, "get_bytes", get_bytes)
    monkeypatch.setattr(plan, "refresh_security", refresh_security)
    monkeypatch.setattr(plan, "read_lock", _FakeLock)
    monkeypatch.setattr("cerulean.debian.lock.read_lock", _FakeLock)
    monkeypatch.setattr(build, "build_release", build_release)
    yield config, f


class _FakeLock:
    """A lock whose one package's version is the lock file's text."""

    def __init__(self, path: Path | None = None) -> None:
        from types import SimpleNamespace

        text = path.read_text() if path is not None and path.exists() else ""
        self.packages = {"amd64": [SimpleNamespace(name="less", version=text)]}

    def snapshot_date(self, suite: str) -> datetime:
        # One clock: the fix reached the archive an hour before the real now.
        return datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def publisher(config: Path, **kw: Any) -> pub.Publisher:
    return pub.Publisher(pub.load_config(config), **kw)


def actions(config: Path) -> list[str]:
    return [e["action"] for e in AuditLog(config.parent / "work" / "audit.jsonl").entries()]


def test_a_first_release_then_only_when_the_lock_changes(world: tuple[Path, Fakes]) -> None:
    config, f = world
    out = publisher(config).run_once()
    assert out.errors == []
    assert out.published == ["vm 13.20261201.0 stable", "vm 13.20261201.0 preview"]
    repo = Repository.open(config.parent / "repo", config.parent / "keys")
    assert repo.channel("stable").find("vm", "13.20261201.0")
    # Nothing changed in the archive: nothing is looked at again, nothing built.
    out = publisher(config).run_once()
    assert (out.published, f.builds, f.refreshes) == ([], ["13.20261201.0"], 1)
    # A new InRelease whose fix moves the lock: one new release.
    f.inrelease, f.lock_text = b"v2", "lock 2"
    out = publisher(config).run_once()
    assert out.changed == ["trixie", "trixie-updates", "trixie-security"] or out.changed
    assert out.published == ["vm 13.20261201.1 stable", "vm 13.20261201.1 preview"]
    # A new InRelease that does not touch the image's packages: no release.
    f.inrelease = b"v3"
    out = publisher(config).run_once()
    assert out.published == [] and len(f.builds) == 2
    assert actions(config).count("release.published") == 4
    assert "archive.changed" in actions(config)
    assert main(["publisher", "audit", "--config", str(config)]) == 0
    st = publisher(config).status()
    assert st["images"]["vm"]["version"] == "13.20261201.1"
    assert st["published"][-1]["fix_to_release_seconds"] > 0
    assert set(st["expires"]) == {"root", "targets", "snapshot", "timestamp"}


def test_a_restart_after_the_build_does_not_build_again(world: tuple[Path, Fakes],
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    config, f = world
    import cerulean.release.publish as publish_mod

    def dies(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt  # the service is stopped right after the build

    monkeypatch.setattr(publish_mod, "publish", dies)
    with pytest.raises(KeyboardInterrupt):
        publisher(config).run_once()
    assert f.builds == ["13.20261201.0"]
    monkeypatch.undo()  # fakes gone too: put back the ones the rest needs
    monkeypatch.setattr("cerulean.debian.fetch.get_bytes", lambda *_a, **_k: f.inrelease)
    monkeypatch.setattr("cerulean.build.plan.refresh_security",
                        lambda *_a, **_k: type("S", (), {"changes": {}})())
    monkeypatch.setattr("cerulean.debian.lock.read_lock", _FakeLock)
    out = publisher(config).run_once()
    assert out.published == ["vm 13.20261201.0 stable", "vm 13.20261201.0 preview"]
    assert f.builds == ["13.20261201.0"]  # the complete build was found and used


def test_a_restart_between_channels_publishes_the_rest_once(world: tuple[Path, Fakes],
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    config, _f = world
    import cerulean.release.publish as publish_mod

    real = publish_mod.publish
    calls: list[str] = []

    def once_then_die(repo: Any, d: Path, channel: str, *a: Any, **k: Any) -> Any:
        if calls:
            raise KeyboardInterrupt
        calls.append(channel)
        return real(repo, d, channel, *a, **k)

    monkeypatch.setattr(publish_mod, "publish", once_then_die)
    with pytest.raises(KeyboardInterrupt):
        publisher(config).run_once()
    monkeypatch.setattr(publish_mod, "publish", real)
    out = publisher(config).run_once()
    assert out.published == ["vm 13.20261201.0 preview"]
    repo = Repository.open(config.parent / "repo", config.parent / "keys")
    assert [e.version for e in repo.channel("stable").entries] == ["13.20261201.0"]


def test_failures_back_off_and_never_stop_the_timestamp(world: tuple[Path, Fakes]) -> None:
    config, f = world
    clock = [datetime.now(UTC).replace(microsecond=0)]
    p = publisher(config, now=lambda: clock[0])
    f.mirror_down = True
    out = p.run_once()
    assert out.errors and "connection refused" in out.errors[0]
    st = p.state.images["vm"]
    assert st.failures == 1
    retry = datetime.fromisoformat(st.retry_at.replace("Z", "+00:00"))
    assert timedelta(minutes=4) < retry - clock[0] < timedelta(minutes=6)
    # A day later the timestamp is due: it is re-signed although the mirror is still down,
    # and the failures grow the back-off.
    clock[0] += timedelta(hours=13)
    out = p.run_once()
    assert out.refreshed == ["snapshot", "timestamp"]
    assert p.state.images["vm"].failures == 2
    repo = Repository.open(config.parent / "repo", config.parent / "keys")
    assert repo.expiries()["timestamp"] == clock[0] + timedelta(days=1)
    assert "publisher.failed" in actions(config) and "metadata.refreshed" in actions(config)
    # Within the back-off the image is left alone (the mirror is not hammered).
    clock[0] += timedelta(minutes=1)
    before = f.refreshes
    p.run_once()
    assert f.refreshes == before
    f.mirror_down = False
    clock[0] += timedelta(hours=1)
    out = p.run_once()
    assert out.errors == [] and out.published
    assert p.state.images["vm"].failures == 0
    metrics = (config.parent / "work" / "metrics.prom").read_text()
    assert 'cerulean_publisher_failures{image="vm"} 0' in metrics
    assert 'cerulean_publisher_metadata_expires_timestamp_seconds{role="timestamp"}' in metrics
    assert "cerulean_publisher_last_success_timestamp_seconds" in metrics


def test_a_failed_build_publishes_nothing(world: tuple[Path, Fakes]) -> None:
    config, f = world
    f.build_fails = True
    out = publisher(config).run_once()
    assert "dpkg said no" in out.errors[0]
    repo = Repository.open(config.parent / "repo", config.parent / "keys")
    assert repo.channels() == []


def test_a_fault_of_the_publisher_itself_is_a_failure_not_a_crash(
        world: tuple[Path, Fakes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing tool or a bug in one image's step must not end the service (and with it
    the re-signing of every image's metadata)."""
    config, _f = world
    import cerulean.release.build as build

    def crash(*_a: Any, **_kw: Any) -> None:
        raise FileNotFoundError(2, "No such file or directory", "zstd")

    monkeypatch.setattr(build, "build_release", crash)
    p = publisher(config)
    out = p.run_once()
    assert out.errors == ["releasing vm: an unexpected FileNotFoundError: [Errno 2] No such "
                          "file or directory: 'zstd'"]
    st = p.state.images["vm"]
    assert st.failures == 1 and st.retry_at
    assert actions(config)[-1] == "publisher.failed"


def test_a_torn_state_file_is_recovered_from_its_copy(world: tuple[Path, Fakes]) -> None:
    config, f = world
    publisher(config).run_once()
    state = config.parent / "work" / "state.json"
    good = json.loads(state.read_bytes())
    state.write_bytes(state.read_bytes()[:40])  # a torn write
    p = publisher(config)
    assert p.state.images["vm"].version == good["images"]["vm"]["version"]
    assert "publisher.state-recovered" in actions(config)
    # Both copies wrongly typed: start afresh, say so, and publish nothing twice.
    for path in (state, state.with_name("state.json.bak")):
        path.write_text('{"images": {"vm": {"failures": "many"}}}')
    p = publisher(config)
    assert p.state.images == {}
    out = p.run_once()
    assert out.errors == [] and out.published == [] and f.builds == ["13.20261201.0"]


@pytest.mark.parametrize(("text", "message"), [
    ('repo = "r"\nkeys = "k"\n', "name at least one [[image]]"),
    ('repo = "r"\nkeys = "k"\nsurprise = 1\n', "unknown key 'surprise'"),
    ('repo = "r"\nkeys = "k"\npoll = "soon"\n[[image]]\ndefinition = "x.toml"\n',
     "'poll' must be seconds or a duration"),
    ('repo = "r"\nkeys = "k"\n[[image]]\ndefinition = "x.toml"\nchannels = {beta = "now"}\n',
     "channel 'beta' is not one of"),
    ('repo = "r"\nkeys = "k"\n[[image]]\ndefinition = "x.toml"\n'
     'channels = {stable = "0:0.5"}\n', "never reaches every host"),
    ('repo = "r"\nkeys = "k"\n[[image]]\ndefinition = "x.toml"\nrefresh = "some"\n',
     "'refresh' must be"),
    ('repo = \n', "cannot be read"),
])
def test_configuration_mistakes_are_one_sentence(tmp_path: Path, text: str, message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "publisher.toml"
    config.write_text(text)
    assert main(["publisher", "status", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_work_directory_may_not_be_served(tmp_path: Path) -> None:
    Repository.create(tmp_path / "repo", tmp_path / "keys")
    config = tmp_path / "publisher.toml"
    config.write_text('repo = "repo"\nkeys = "keys"\nwork = "repo/work"\n'
                      '[[image]]\ndefinition = "vm.toml"\n')
    with pytest.raises(CeruleanError, match="inside the served repository"):
        publisher(config)


def test_install_writes_the_unit_and_an_example(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "etc" / "publisher.toml"
    assert main(["publisher", "install", "--config", str(config),
                 "--unit-dir", str(tmp_path / "units")]) == 0
    assert "edit it before starting" in capsys.readouterr().out
    unit = (tmp_path / "units" / "cerulean-publisher.service").read_text()
    assert f"publisher run --config {config}" in unit
    assert "@" not in unit.replace("@EXEC@", "")
    assert "ReadWritePaths=-/srv/cerulean/repo -/var/lib/cerulean-publisher " in unit
    assert pub.load_config(config).images[0].channels == {"stable": "default", "preview": "now"}


def test_a_frozen_mirror_is_an_error_not_silence(world: tuple[Path, Fakes]) -> None:
    config, f = world
    until = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=3)
    f.inrelease = (b"-----BEGIN PGP SIGNED MESSAGE-----\n\nOrigin: Debian\n"
                   + f"Valid-Until: {until:%a, %d %b %Y %H:%M:%S} UTC\n".encode())
    p = publisher(config)
    out = p.run_once()
    assert any(f"expired on {until:%Y-%m-%d %H:%M} UTC: the mirror seems frozen" in e
               for e in out.errors), out.errors
    assert p.state.last_success == "" and p.state.images["vm"].failures == 1


def test_a_trickling_mirror_is_given_up_at_the_deadline() -> None:
    import socket
    import threading
    import time as _time

    from cerulean.debian.fetch import client, get_bytes
    from cerulean.errors import NetworkError

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def trickle() -> None:
        conn, _ = srv.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        try:
            for _ in range(400):
                conn.sendall(b"x")
                _time.sleep(0.02)
        except OSError:
            pass
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    began = _time.monotonic()
    with client() as http, pytest.raises(NetworkError, match="took longer than 1 s"):
        get_bytes(http, f"http://127.0.0.1:{srv.getsockname()[1]}/InRelease", "InRelease",
                  deadline=1.0)
    assert _time.monotonic() - began < 3
    srv.close()


def test_two_publishers_on_one_work_directory(world: tuple[Path, Fakes]) -> None:
    config, _f = world
    a, b = publisher(config), publisher(config)
    with a.only_one(), pytest.raises(CeruleanError, match="Another publisher runs"), \
            b.only_one():
        pass


def test_a_state_with_a_bad_time_is_damage(world: tuple[Path, Fakes]) -> None:
    config, _f = world
    publisher(config).run_once()
    state = config.parent / "work" / "state.json"
    d = json.loads(state.read_bytes())
    d["images"]["vm"]["retry_at"] = "later"
    state.write_text(json.dumps(d))
    p = publisher(config)  # recovered from the copy, no traceback
    assert p.state.images["vm"].retry_at == "" and "publisher.state-recovered" in actions(config)


def test_a_lost_state_does_not_lose_a_fix_already_in_the_lock(world: tuple[Path, Fakes]
                                                              ) -> None:
    config, f = world
    publisher(config).run_once()
    # The lock moves (a fix), then the state and its copy are lost before the release.
    f.lock_text = "lock 2"
    (config.parent / "images" / "vm.lock").write_text("lock 2")
    for name in ("state.json", "state.json.bak"):
        (config.parent / "work" / name).unlink()
    out = publisher(config).run_once()
    assert out.published == ["vm 13.20261201.1 stable", "vm 13.20261201.1 preview"], out


def test_the_previous_packages_come_from_the_repository(tmp_path: Path) -> None:
    """A release built elsewhere still gets its notes: the previous release's
    packages.json is published with it, and the next build reads it from there."""
    from cerulean.release.build import _previous_packages
    from cerulean.release.publish import publish as publish_release

    repo = Repository.create(tmp_path / "repo", tmp_path / "keys")
    (tmp_path / "r").mkdir()
    d = release_dir(tmp_path / "r", "13.20261201.0", b"u" * 4096, b"v" * 4096, b"k" * 512)
    pkg = {"name": "less", "version": "668-1", "arch": "amd64", "source": "less",
           "source_version": "668-1", "suite": "trixie",
           "filename": "pool/main/l/less/less_668-1_amd64.deb", "size": 1, "sha256": "0" * 64}
    (d / "packages.json").write_text(json.dumps({"amd64": {"less": pkg}}))
    publish_release(repo, d, "stable", [(0, 1.0)], deltas=False)
    old = _previous_packages(None, repo, "vm", "13.20261201.0")
    assert old["amd64"]["less"].version == "668-1"
    assert _previous_packages(None, repo, "vm", "13.20261130.0") == {}


def test_sigterm_stops_the_service_and_is_audited(world: tuple[Path, Fakes]) -> None:
    """systemctl stop and podman stop send SIGTERM; as a container's PID 1 the publisher
    would ignore it without a handler of its own."""
    import os
    import signal
    import threading
    import time

    config, f = world
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def after_the_first_round() -> None:
        end = time.monotonic() + 60
        while not f.builds and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.5)  # into the wait before the next round (poll is 1 minute)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=after_the_first_round, daemon=True).start()
    try:
        assert main(["publisher", "run", "--config", str(config)]) == 0
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert len(f.builds) == 1
    got = actions(config)
    assert got[-1] == "publisher.stopped" and "release.published" in got, got


class _Cut(BaseException):
    """A stop (SIGTERM) at an exact point."""


def test_a_stop_right_after_the_build_does_not_build_again(world: tuple[Path, Fakes],
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    config, f = world
    import cerulean.release.build as build

    real = build.build_release

    def then_stop(*a: Any, **kw: Any) -> Any:
        real(*a, **kw)
        raise _Cut  # the build is in place; the state does not say so yet

    monkeypatch.setattr(build, "build_release", then_stop)
    with pytest.raises(_Cut):
        publisher(config).run_once()
    monkeypatch.setattr(build, "build_release", real)
    publisher(config).run_once()
    assert len(f.builds) == 1, f.builds
    repo = Repository.open(config.parent / "repo", config.parent / "keys")
    assert repo.channel("stable").find("vm", f.builds[0])


def test_a_stop_right_after_publishing_is_said_after_the_restart(
        world: tuple[Path, Fakes], monkeypatch: pytest.MonkeyPatch) -> None:
    config, _f = world
    import cerulean.release.publish as publish_mod

    real = publish_mod.publish
    calls: list[str] = []

    def then_stop(repo: Any, rdir: Path, channel: str, *a: Any, **kw: Any) -> Any:
        out = real(repo, rdir, channel, *a, **kw)
        calls.append(channel)
        if len(calls) == 1:
            raise _Cut  # in the channel; no audit entry, no state yet
        return out

    monkeypatch.setattr(publish_mod, "publish", then_stop)
    with pytest.raises(_Cut):
        publisher(config).run_once()
    p = publisher(config)
    p.run_once()
    published = [(e["channel"], e.get("recovered", False)) for e in p.state.published]
    assert set(published) == {(calls[0], True), (calls[1], False)}
    assert actions(config).count("release.published") == 2


def test_a_fault_in_one_definition_stops_only_its_own_image(
        world: tuple[Path, Fakes], monkeypatch: pytest.MonkeyPatch) -> None:
    config, f = world
    (config.parent / "images" / "bad.toml").write_text(DEFINITION)
    config.write_text(config.read_text() + '[[image]]\ndefinition = "images/bad.toml"\n'
                      'channels = { stable = "now" }\n')
    real = pub.Publisher._definition

    def faulty(self: pub.Publisher, job: pub.ImageJob) -> Any:
        if job.definition.name == "bad.toml":
            raise KeyError("packages")  # a bug, not a CeruleanError
        return real(self, job)

    monkeypatch.setattr(pub.Publisher, "_definition", faulty)
    p = publisher(config)
    out = p.run_once()
    assert any("bad.toml" in e and "unexpected KeyError" in e for e in out.errors), out.errors
    assert f.builds, "the vm image was not released"
    assert p.state.images["bad"].failures >= 1
