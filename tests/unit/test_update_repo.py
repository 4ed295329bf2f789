"""The TUF update repository (release side) read by the host's client (agent side)."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, TargetFile

from cerulean.agent.update.client import Limits, RepoClient, UpdateError
from cerulean.agent.update.errors import TransientError
from cerulean.errors import CeruleanError
from cerulean.protocol.update import ChannelDoc, ChannelEntry, utc_iso
from cerulean.release.repo import Repository, key_files, load_signer
from cerulean.release.serve import serving


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.create(tmp_path / "repo", tmp_path / "keys")


def client(tmp_path: Path, url: str, repo: Repository, name: str = "host") -> RepoClient:
    # The trusted root an image would carry: version 1, taken at build time.
    trusted = tmp_path / f"{name}-root.json"
    if not trusted.exists():
        shutil.copyfile(repo.meta / "1.root.json", trusted)
    return RepoClient(url, tmp_path / name, trusted)


def test_create_writes_every_role_and_keeps_keys_private(repo: Repository) -> None:
    names = sorted(p.name for p in repo.meta.iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "root.json",
                     "timestamp.json"]
    # The online keys on one side, the root keys (2 of 3 by default) on the other.
    assert sorted(k.role for k in key_files(repo.keys)) == ["snapshot", "targets", "timestamp"]
    assert [k.role for k in key_files(repo.root_keys)] == ["root"] * 3
    assert repo.root_keys == repo.keys.parent / "root-keys"
    assert repo.load("root").signed.roles["root"].threshold == 2
    for d in (repo.keys, repo.root_keys):
        assert d.stat().st_mode & 0o777 == 0o700
        assert all(k.path.stat().st_mode & 0o777 == 0o600 for k in key_files(d))
        assert all(b"ENCRYPTED" not in k.path.read_bytes() for k in key_files(d))
    # Private keys never land in the served tree.
    assert not list(repo.path.rglob("*.pem"))


def test_create_refuses_an_existing_repository(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(CeruleanError, match="already holds an update repository"):
        Repository.create(repo.path, tmp_path / "other-keys")
    with pytest.raises(CeruleanError, match="threshold"):
        Repository.create(tmp_path / "r2", tmp_path / "k2", root_keys=1, root_threshold=2)
    with pytest.raises(CeruleanError, match="directory of their own"):
        Repository.create(tmp_path / "r3", tmp_path / "k3", root_keys_dir=tmp_path / "k3")


def test_client_reads_a_published_channel_and_payload(repo: Repository, tmp_path: Path) -> None:
    payload = tmp_path / "usr.erofs.zst"
    payload.write_bytes(b"erofs" * 1000)
    repo.add_targets({"releases/vm/13.20261126.0/amd64/usr.erofs.zst": payload})
    doc = ChannelDoc("stable", [ChannelEntry("vm", "13.20261126.0", utc_iso(datetime.now(UTC)),
                                             [(0, 1.0)])])
    repo.save_channel(doc)
    with serving(repo.path) as url:
        c = client(tmp_path, url, repo)
        got = c.channel("stable")
        assert [(e.image, e.version) for e in got.entries] == [("vm", "13.20261126.0")]
        out = c.fetch("releases/vm/13.20261126.0/amd64/usr.erofs.zst", tmp_path / "dl" / "p")
        assert out.read_bytes() == payload.read_bytes()
        with pytest.raises(UpdateError, match="no channel 'lts'"):
            c.channel("lts")


def test_a_tampered_payload_is_refused_and_not_kept(repo: Repository, tmp_path: Path) -> None:
    payload = tmp_path / "uki.efi.zst"
    payload.write_bytes(b"A" * 4096)
    target = "releases/vm/13.20261126.0/amd64/uki.efi.zst"
    repo.add_targets({target: payload})
    served = repo.target_file(target)
    served.write_bytes(b"B" * 4096)  # same length, other content
    with serving(repo.path) as url:
        c = client(tmp_path, url, repo)
        dest = tmp_path / "dl" / "uki"
        with pytest.raises(UpdateError, match="does not match its signed length and hash"):
            c.fetch(target, dest)
        assert not dest.exists() and not list(dest.parent.iterdir())


def test_expired_timestamp_is_refused(tmp_path: Path) -> None:
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    repo = Repository.create(tmp_path / "repo", tmp_path / "keys", now=past)
    with serving(repo.path) as url:
        c = client(tmp_path, url, repo)
        with pytest.raises(UpdateError, match="expired"):
            c.refresh()
        # Re-signing the timestamp (`cerulean release refresh`) makes it usable again.
        assert repo.refresh() == ["snapshot", "timestamp"]
        c.refresh()


def test_older_metadata_is_refused_as_a_rollback(repo: Repository, tmp_path: Path) -> None:
    old = tmp_path / "old-repo"
    shutil.copytree(repo.path, old)
    repo.save_channel(ChannelDoc("stable"))
    with serving(repo.path) as url:
        client(tmp_path, url, repo).refresh()  # the host now trusts the newer timestamp
    trusted = json.loads((tmp_path / "host/metadata/timestamp.json").read_bytes())
    with serving(old) as url:
        c = client(tmp_path, url, repo)
        with pytest.raises(UpdateError, match="rollback"):
            c.refresh()
    # The host's trusted state did not move backwards.
    assert json.loads((tmp_path / "host/metadata/timestamp.json").read_bytes()) == trusted


def test_key_rotation_is_followed_and_the_revoked_key_refused(repo: Repository,
                                                              tmp_path: Path) -> None:
    old_targets = next(k for k in key_files(repo.keys) if k.role == "targets")
    # The thief copied the key before it was rotated: rotation destroys it on disk.
    stolen = tmp_path / "stolen.pem"
    shutil.copyfile(old_targets.path, stolen)
    done = repo.rotate_key("targets")
    assert f"destroyed {old_targets.path.name}" in done
    assert not old_targets.path.exists()
    assert not list(repo.keys.rglob(f"*{old_targets.keyid}*"))
    new_id = next(k.keyid for k in key_files(repo.keys) if k.role == "targets")
    assert new_id != old_targets.keyid
    assert repo.root_version() == 2
    repo.save_channel(ChannelDoc("stable"))
    with serving(repo.path) as url:
        c = client(tmp_path, url, repo)  # trusts root v1 only
        assert c.channel("stable").entries == []
    assert json.loads((tmp_path / "host/metadata/root.json").read_bytes())["signed"]["version"] == 2

    # Someone holding the revoked key signs a new targets version with a payload of theirs.
    evil = tmp_path / "evil"
    evil.write_bytes(b"evil")
    md = repo.load("targets")
    md.signed.targets["releases/vm/99.20991231.0/amd64/uki.efi.zst"] = TargetFile.from_file(
        "releases/vm/99.20991231.0/amd64/uki.efi.zst", str(evil), ["sha256"])
    md.signed.version += 1
    root = repo.load("root").signed
    repo._write("targets", md, [load_signer(stolen, "targets")])
    signers = {r: repo.signers(r, root) for r in ("snapshot", "timestamp")}
    repo._commit(signers, datetime.now(UTC).replace(microsecond=0), md.signed.version)
    with serving(repo.path) as url:
        c = client(tmp_path, url, repo)
        with pytest.raises(UpdateError, match="not signed by the keys this host trusts"):
            c.refresh()


def test_root_rotation_is_signed_by_old_and_new_root_keys(repo: Repository,
                                                          tmp_path: Path) -> None:
    old = {k.keyid for k in key_files(repo.root_keys)}
    repo.rotate_key("root")
    v2 = Metadata.from_file(str(repo.meta / "2.root.json"))
    v1 = Metadata.from_file(str(repo.meta / "1.root.json"))
    v1.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # old keys vouch
    v2.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # and the new keys
    # Every key replaced, the threshold kept (2 of 3), the old keys gone.
    assert v2.signed.roles["root"].threshold == 2
    assert len(v2.signed.roles["root"].keyids) == 3
    assert not old & set(v2.signed.roles["root"].keyids)
    assert not old & {k.keyid for k in key_files(repo.root_keys)}
    with serving(repo.path) as url:
        client(tmp_path, url, repo).refresh()


def test_signing_without_the_keys_fails_clearly(repo: Repository, tmp_path: Path) -> None:
    for k in key_files(repo.keys):
        if k.role == "timestamp":
            k.path.unlink()
    with pytest.raises(CeruleanError, match="needs 1 of its keys"):
        repo.refresh()


@contextmanager
def trickling(root: Path, slow: str, delay: float) -> Iterator[str]:
    """Serve *root*, but send any file whose name ends in *slow* a byte every *delay*
    seconds: a mirror that is not down, only hopelessly slow."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            path = Path(self.translate_path(self.path))
            if not path.name.endswith(slow) or not path.is_file():
                return super().do_GET()
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(delay)
            except OSError:
                pass  # the client gave up

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_trickling_mirror_cannot_hold_a_download_for_ever(repo: Repository,
                                                            tmp_path: Path) -> None:
    payload = tmp_path / "usr.erofs.zst"
    payload.write_bytes(b"erofs" * 2000)
    target = "releases/vm/13.20261126.0/amd64/usr.erofs.zst"
    repo.add_targets({target: payload})
    trusted = tmp_path / "root.json"
    shutil.copyfile(repo.meta / "1.root.json", trusted)
    # A byte every 20 ms: 10 000 bytes take 200 s, and no read ever waits 30 s.
    with trickling(repo.path, "usr.erofs.zst", 0.02) as url:
        # Each download's own deadline: 1 s plus its length at 1 GB/s.
        c = RepoClient(url, tmp_path / "a", trusted,
                       Limits(slack=1.0, min_rate=1e9, read_timeout=30.0))
        c.refresh()  # the metadata comes at full speed
        start = time.monotonic()
        with pytest.raises(UpdateError, match=r"^Downloading [0-9a-f]{64}\.usr\.erofs\.zst "
                           r"took longer than its deadline of 1 s \(a download must average "
                           r"976562 KiB/s, with 1 s to spare\); giving up\.$"):
            c.fetch(target, tmp_path / "dl" / "usr")
        assert time.monotonic() - start < 3
        assert not (tmp_path / "dl" / "usr").exists()
        # The run's deadline, when it comes first.
        c = RepoClient(url, tmp_path / "b", trusted, Limits(run_budget=1.5))
        c.refresh()
        start = time.monotonic()
        with pytest.raises(UpdateError, match=r"^The downloads of this update run took "
                           r"longer than 0 minutes together \(stopped at [0-9a-f]{64}\.usr"
                           r"\.erofs\.zst\); giving up, the next run starts afresh\.$") as e:
            c.fetch(target, tmp_path / "dl" / "usr")
        assert isinstance(e.value, TransientError)
        assert time.monotonic() - start < 3
        # Once the budget is spent, nothing more is even asked for.
        with pytest.raises(UpdateError, match="The downloads of this update run"):
            c.fetch(target, tmp_path / "dl" / "usr")


def test_http_errors_are_one_sentence_and_a_missing_root_ends_the_chain(
        repo: Repository, tmp_path: Path) -> None:
    repo.save_channel(ChannelDoc("stable"))
    with serving(repo.path) as url:
        c = client(tmp_path, url, repo)
        assert c.channel("stable").entries == []  # 2.root.json: 404, the chain ends there
        (repo.path / "targets").rename(repo.path / "gone")
        c = client(tmp_path, url, repo, name="other")
        with pytest.raises(TransientError, match=r"^Downloading channels/stable\.json from "
                           r"the update repository failed: HTTP 404 File not found\.$"):
            c.channel("stable")
