"""The health check proves the release can still update: a real TUF refresh against a
repository served over HTTP, and what is (and is not) held against the release."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cerulean.agent.update import client, health
from cerulean.agent.update.host import Host
from cerulean.release.repo import Repository
from cerulean.release.serve import serving


@dataclass
class Box:
    host: Host
    repo: Repository
    url: str
    said: list[str] = field(default_factory=list)
    route: bool = True

    def configure(self, **keys: object) -> None:
        (self.host.root / "etc/cerulean").mkdir(parents=True, exist_ok=True)
        (self.host.root / "etc/cerulean/update.toml").write_text(
            "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))

    def check(self, wait: float = 60) -> list[str]:
        return health.check(self.host, network=False, network_wait=0, repo_wait=wait,
                            say=self.said.append)

    @property
    def trusted(self) -> Path:
        return self.host.state_dir / "metadata"


def make_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo: Repository,
             url: str) -> Box:
    host = Host(tmp_path / "host")
    host.trusted_root.parent.mkdir(parents=True)
    host.trusted_root.write_bytes((repo.meta / "1.root.json").read_bytes())
    box = Box(host, repo, url)
    box.configure(url=url)
    # systemd answers that the timer is active and that no unit failed.
    monkeypatch.setattr(health, "_run", lambda argv, timeout=30: subprocess.CompletedProcess(
        argv, 0, "", ""))
    monkeypatch.setattr(health, "default_route", lambda: box.route)
    return box


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Box]:
    repo = Repository.create(tmp_path / "repo", tmp_path / "keys")
    with serving(repo.path) as url:
        yield make_box(tmp_path, monkeypatch, repo, url)


def test_a_release_that_can_refresh_is_healthy(box: Box) -> None:
    assert box.check() == [] and box.said == []
    # It was a real refresh: the verified metadata is there now.
    assert {p.name for p in box.trusted.glob("*.json")} == {
        "root.json", "timestamp.json", "snapshot.json", "targets.json"}


def test_no_update_repository_no_update_check(box: Box,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "HAVE_TUF", False)
    box.configure(url="")
    assert box.check() == []
    box.configure(url=box.url, never=True)
    assert box.check() == []
    assert not box.trusted.exists()


def test_without_a_working_python3_tuf_the_release_is_unhealthy(
        box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    box.route = False  # found out without asking the repository
    monkeypatch.setattr(client, "HAVE_TUF", False)
    assert box.check() == ["the update client cannot be set up: Updates need python3-tuf, "
                           "which is not installed on this host."]
    assert box.said == ["unhealthy: the update client cannot be set up: Updates need "
                        "python3-tuf, which is not installed on this host."]
    monkeypatch.setattr(client, "HAVE_TUF", True)
    monkeypatch.setitem(sys.modules, "tuf.ngclient", None)
    [problem] = box.check()
    assert problem.startswith("the update client cannot be set up: Updates need python3-tuf, "
                              "which does not load here:"), problem


def test_a_root_this_release_cannot_verify_is_unhealthy(box: Box) -> None:
    # The image's root, copied in on the first run, is not what it should be.
    box.host.trusted_root.write_text("{}")
    [problem] = box.check()
    assert problem.startswith("the update client cannot verify the root this host trusts "
                              f"({box.trusted / 'root.json'}): "), problem
    # A trusted root whose signature does not verify (here: changed after signing).
    root = json.loads((box.repo.meta / "1.root.json").read_bytes())
    root["signed"]["expires"] = "2099-01-01T00:00:00Z"
    (box.trusted / "root.json").write_text(json.dumps(root))
    [problem] = box.check()
    assert "cannot verify the root this host trusts" in problem and "root" in problem, problem
    assert not (box.trusted / "timestamp.json").exists()  # never got as far as asking


def test_a_torn_trusted_copy_is_the_updaters_to_mend_not_the_releases(box: Box) -> None:
    """The first boot: the updater seeds the trusted root while the health check reads
    it. A damaged copy is not held against a release that verifies the image's root."""
    box.check()
    (box.trusted / "root.json").write_text('{"signed": {')  # half a file
    assert box.check() == []
    assert any("the image's root verifies" in m for m in box.said), box.said


def test_an_unreachable_repository_is_not_held_against_the_release(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.create(tmp_path / "repo", tmp_path / "keys")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    box = make_box(tmp_path, monkeypatch, repo, closed)
    assert box.check() == []
    [note] = box.said
    assert note.startswith("note: Downloading the metadata from the update repository "
                           "failed") and note.endswith(
        "This release is not judged by what the repository answers."), note
    # One that accepts the connection and never answers: the check does not wait for it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        box.said.clear()
        box.configure(url=f"http://127.0.0.1:{s.getsockname()[1]}")
        assert box.check(wait=0.5) == []
        assert box.said == ["note: the update repository did not answer within 0.5 s; this "
                            "release is not judged by it"]


def test_no_network_the_repository_is_not_asked(box: Box) -> None:
    box.route = False
    assert box.check() == []
    assert box.said == ["note: no network, so the update repository was not asked"]
    assert not (box.trusted / "timestamp.json").exists()


def test_what_the_repository_refuses_is_not_held_against_the_release(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An expired timestamp (the publisher's timer stopped, or a replay): the previous
    release would refuse it just the same."""
    repo = Repository.create(tmp_path / "repo", tmp_path / "keys",
                             now=datetime.now(UTC).replace(microsecond=0) - timedelta(days=2))
    with serving(repo.path) as url:
        box = make_box(tmp_path, monkeypatch, repo, url)
        assert box.check() == []
    [note] = box.said
    assert note.startswith("note: The update repository's metadata has expired"), note


def test_an_error_inside_the_client_is_unhealthy(box: Box,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a download or a repository error: this release's TUF client itself fails (a
    python3-tuf whose API no longer fits, say)."""
    from tuf.ngclient import Updater

    def broken(self: Updater) -> None:
        raise TypeError("refresh() got an unexpected keyword argument 'bootstrap'")

    monkeypatch.setattr(Updater, "refresh", broken)
    assert box.check() == [
        "the update client fails on this release: Reading the metadata from the update "
        "repository failed: refresh() got an unexpected keyword argument 'bootstrap'."]


def test_a_configuration_this_release_cannot_read_is_unhealthy(box: Box) -> None:
    box.configure(url=box.url, channel="nightly")
    [problem] = box.check()
    assert problem.startswith("the update configuration cannot be read: The update channel "
                              "'nightly' is not one of"), problem


def test_the_check_waits_for_the_refresh_not_longer(box: Box,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A refresh that hangs is left behind after the wait, in a daemon thread."""
    from tuf.ngclient import Updater

    release = threading.Event()
    monkeypatch.setattr(Updater, "refresh", lambda self: release.wait(30))
    try:
        assert box.check(wait=0.2) == []
        assert box.said == ["note: the update repository did not answer within 0.2 s; this "
                            "release is not judged by it"]
    finally:
        release.set()


def test_a_release_withdrawn_since_it_was_installed_is_not_kept(box: Box) -> None:
    """An unplanned reboot into a staged release its channel has withdrawn since: the
    boot that judges it finds it withdrawn, and the fallback gives it up."""
    from cerulean.agent.update.host import State, save_state
    from cerulean.protocol.update import ChannelDoc, ChannelEntry, utc_iso
    from cerulean.release.publish import set_state

    v = "13.20261201.1"
    (box.host.root / "usr/lib").mkdir(parents=True)
    (box.host.root / "usr/lib/os-release").write_text(f"IMAGE_ID=vm\nIMAGE_VERSION={v}\n")
    box.repo.save_channel(ChannelDoc("stable", [ChannelEntry(
        "vm", v, utc_iso(datetime.now(UTC)), [(0, 1.0)])]))
    save_state(box.host, State(staged={"version": v, "slot": "B"}))
    assert box.check() == []
    set_state(box.repo, "stable", "vm", v, "withdrawn")
    assert box.check() == [f"{v} was withdrawn from the stable channel after it was "
                           "installed"]
    # A boot that judges nothing (the release was kept long ago) is not asked this.
    save_state(box.host, State())
    assert box.check() == []
