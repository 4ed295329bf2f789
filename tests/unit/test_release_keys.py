"""Key custody of the update repository: offline root keys, ceremonies, sealed keys,
keys that are never served, and hosts that stay on the right root chain."""

from __future__ import annotations

import shutil
import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from test_update_repo import client as host  # a host whose image shipped root v1
from tuf.api.metadata import Metadata, Root

from cerulean.agent.update.client import UpdateError
from cerulean.cli import main
from cerulean.errors import CeruleanError
from cerulean.protocol.update import ChannelDoc
from cerulean.release.keys import generate_key, key_files, load_signer
from cerulean.release.publish import publish
from cerulean.release.repo import Repository
from cerulean.release.serve import serving


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.create(tmp_path / "repo", tmp_path / "keys")


def trusted_root_version(tmp_path: Path, name: str = "host") -> int:
    md = Metadata[Root].from_file(str(tmp_path / name / "metadata" / "root.json"))
    return int(md.signed.version)


def fork(repo: Repository, tmp_path: Path, stolen: list[Path]) -> Path:
    """An attacker's copy of the repository whose root v2 trusts only the attacker's key
    for every role, signed by the *stolen* root keys and the attacker's own."""
    evil = tmp_path / "evil-repo"
    shutil.rmtree(evil, ignore_errors=True)
    (evil / "metadata").mkdir(parents=True)
    shutil.copyfile(repo.meta / "1.root.json", evil / "metadata" / "1.root.json")
    md = Metadata[Root].from_file(str(repo.meta / "1.root.json"))
    root = md.signed
    public, mine = generate_key(tmp_path / "evil-keys", "root")
    for role in ("root", "targets", "snapshot", "timestamp"):
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(public, role)
        root.roles[role].threshold = 1
    root.version = 2
    signers: list[CryptoSigner] = [load_signer(p, "root") for p in stolen] + [mine]
    for s in signers:
        md.sign(s, append=True)
    (evil / "metadata" / "2.root.json").write_bytes(md.to_bytes())
    # The attacker's own chain: an empty targets, snapshot and timestamp signed by mine.
    evil_repo = Repository(evil, tmp_path / "evil-keys", tmp_path / "evil-keys")
    targets = Metadata.from_bytes((repo.meta / "1.targets.json").read_bytes())
    now = datetime.now(UTC).replace(microsecond=0)
    evil_repo._write("targets", targets, [mine])
    evil_repo._commit({"snapshot": [mine], "timestamp": [mine]}, now, targets.signed.version)
    return evil


def test_a_stolen_retired_root_key_cannot_fork_a_host_that_ships_the_old_root(
        repo: Repository, tmp_path: Path) -> None:
    keys = key_files(repo.root_keys)
    stolen = [tmp_path / f"stolen-{i}.pem" for i in range(2)]
    for k, dest in zip(keys, stolen, strict=False):
        shutil.copyfile(k.path, dest)
    # One root key is replaced (say it was on a lost laptop); 2 of 3 still needed.
    done = repo.rotate_key("root", keys[0].keyid[:12])
    assert any("destroyed" in line for line in done)
    assert not keys[0].path.exists() and keys[1].path.exists()

    # The thief holds the retired key: one signature of the old root's threshold of two.
    evil = fork(repo, tmp_path, stolen[:1])
    with serving(evil) as url, pytest.raises(UpdateError,
                                             match="not signed by the keys this host trusts"):
        host(tmp_path, url, repo).refresh()
    assert trusted_root_version(tmp_path) == 1
    # The same host then meets the real repository and walks to the real root v2.
    with serving(repo.path) as url:
        host(tmp_path, url, repo).refresh()
    assert trusted_root_version(tmp_path) == 2
    assert Metadata.from_file(str(tmp_path / "host/metadata/root.json")).signed == \
        repo.load("root").signed

    assert repo.forkable_roots() == []
    # What the threshold protects against: with two old keys, the fork is accepted by a
    # host that never saw the real v2. (A 1-of-1 root would fall to one stolen key.)
    evil = fork(repo, tmp_path, stolen)
    with serving(evil) as url:
        host(tmp_path, url, repo, "other").refresh()
    assert trusted_root_version(tmp_path, "other") == 2
    # A second key retired later: root v1 is now forkable, and the ceremony says so.
    repo.rotate_key("root", keys[1].keyid)
    assert repo.forkable_roots() == [1]


def test_rotation_keeps_the_threshold_and_can_archive_outside_the_repository(
        repo: Repository, tmp_path: Path) -> None:
    old = next(k for k in key_files(repo.keys) if k.role == "snapshot")
    with pytest.raises(CeruleanError, match="inside the served repository"):
        repo.rotate_key("snapshot", archive=repo.path / "old-keys")
    assert old.path.exists()  # nothing was changed by the refused ceremony…
    assert repo.root_version() == 1
    assert len([k for k in key_files(repo.keys) if k.role == "snapshot"]) == 1  # …or made
    done = repo.rotate_key("snapshot", archive=tmp_path / "vault")
    assert f"archived {old.path.name} in {tmp_path / 'vault'}" in done
    assert (tmp_path / "vault" / old.path.name).stat().st_mode & 0o777 == 0o600
    assert not old.path.exists()
    root = repo.load("root").signed
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 3
    assert root.roles["snapshot"].keyids != [old.keyid]
    with pytest.raises(CeruleanError, match="names no snapshot key"):
        repo.rotate_key("snapshot", "ffff")
    # An archive that is a key directory, or lies in one, or is a file: refused up front.
    for bad in (repo.root_keys, repo.keys / "old", tmp_path / "afile"):
        (tmp_path / "afile").write_text("x")
        with pytest.raises(CeruleanError, match=r"apart from the key directory|cannot be "
                                                r"made|not a writable directory"):
            repo.rotate_key("root", archive=bad)
    assert repo.root_version() == 2 and repo.stray_keys() == []
    # A ceremony cut short after root was written leaves the retired key: status says so.
    retired = next(k for k in key_files(repo.root_keys))
    keep = retired.path.read_bytes()
    repo.rotate_key("root", retired.keyid)
    retired.path.write_bytes(keep)
    assert [k.keyid for k in repo.stray_keys()] == [retired.keyid]


def test_threshold_and_added_keys(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(CeruleanError, match="between 1 and its number of keys"):
        repo.set_threshold("root", 4)
    # One signature for root: refused unless asked for in so many words.
    with pytest.raises(CeruleanError, match=r"at least 2 .*--one-root-signature"):
        repo.set_threshold("root", 1)
    with pytest.raises(CeruleanError, match="at least 2"):
        Repository.create(tmp_path / "r1", tmp_path / "k1", root_keys=1, root_threshold=1)
    Repository.create(tmp_path / "r2", tmp_path / "k2", root_keys_dir=tmp_path / "rk2",
                      root_keys=1, root_threshold=1, one_root_signature=True)
    assert repo.root_version() == 1
    repo.set_threshold("root", 3, add_keys=2)
    root = repo.load("root").signed
    assert (root.roles["root"].threshold, len(root.roles["root"].keyids)) == (3, 5)
    with serving(repo.path) as url:
        host(tmp_path, url, repo).refresh()
    assert trusted_root_version(tmp_path) == 2


def test_root_is_renewed_in_a_ceremony_and_never_online(repo: Repository,
                                                        tmp_path: Path) -> None:
    expires = repo.load("root").signed.expires
    offline = tmp_path / "usb"
    repo.root_keys.rename(offline)
    publisher = Repository.open(repo.path, repo.keys)  # the publishing host: no root keys
    assert publisher.refresh() == ["snapshot", "timestamp"]
    with pytest.raises(CeruleanError, match="Root keys are kept offline"):
        publisher.renew_root()
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(days=300)
    ceremony = Repository.open(repo.path, repo.keys, offline)
    ceremony.renew_root(now=later)
    assert repo.load("root").signed.expires == later + timedelta(days=365) > expires
    assert repo.root_version() == 2


def test_online_rotation_signed_offline_is_finished_by_the_publisher(
        repo: Repository, tmp_path: Path) -> None:
    # The ceremony machine has the root keys and an empty transfer directory only.
    transfer = tmp_path / "transfer"
    ceremony = Repository.open(repo.path, transfer, repo.root_keys)
    done = ceremony.rotate_key("timestamp")
    assert any("run `cerulean release refresh`" in line for line in done)
    # Root v2 names a timestamp key the repository's timestamp.json is not signed with:
    # hosts refuse it until the publisher re-signs.
    with serving(repo.path) as url, pytest.raises(UpdateError):
        host(tmp_path, url, repo).refresh()
    (new,) = key_files(transfer)
    for k in key_files(repo.keys):
        if k.role == "timestamp":
            k.path.unlink()
    shutil.copyfile(new.path, repo.keys / new.path.name)
    repo.refresh()
    with serving(repo.path) as url:
        host(tmp_path, url, repo).refresh()
    assert trusted_root_version(tmp_path) == 2


def test_key_files_are_sealed_with_a_passphrase_from_the_environment_or_a_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERULEAN_KEYS_PASSPHRASE", "online secret")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "cerulean.root-keys-passphrase").write_text("root secret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    repo = Repository.create(tmp_path / "repo", tmp_path / "keys")
    for d in (repo.keys, repo.root_keys):
        for k in key_files(d):
            assert b"ENCRYPTED PRIVATE KEY" in k.path.read_bytes()
    repo.refresh()
    repo.renew_root()

    monkeypatch.delenv("CERULEAN_KEYS_PASSPHRASE")
    with pytest.raises(CeruleanError, match="sealed with a passphrase: give it in "
                                            "CERULEAN_KEYS_PASSPHRASE"):
        repo.refresh()
    monkeypatch.setenv("CERULEAN_KEYS_PASSPHRASE", "wrong")
    with pytest.raises(CeruleanError, match="the passphrase is wrong"):
        repo.refresh()
    monkeypatch.setenv("CERULEAN_KEYS_PASSPHRASE", "")
    with pytest.raises(CeruleanError, match="is empty"):
        repo.refresh()
    # A new key among sealed ones is sealed too, or not made at all.
    monkeypatch.delenv("CERULEAN_KEYS_PASSPHRASE")
    with pytest.raises(CeruleanError, match="would not be"):
        repo.rotate_key("targets")
    assert repo.root_version() == 2


def test_keys_are_never_written_under_the_served_repository(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    with pytest.raises(CeruleanError, match="inside the served repository"):
        Repository.create(repo_dir, repo_dir / "keys")
    with pytest.raises(CeruleanError, match=r"root keys directory .* inside the served"):
        Repository.create(repo_dir, tmp_path / "keys", root_keys_dir=repo_dir / "metadata/rk")
    (tmp_path / "link").symlink_to(repo_dir)
    with pytest.raises(CeruleanError, match="inside the served repository"):
        Repository.create(repo_dir, tmp_path / "link" / "keys")
    assert not list(tmp_path.rglob("*.pem"))


def test_a_directory_holding_keys_is_not_served(repo: Repository, tmp_path: Path) -> None:
    with serving(repo.path) as url:
        for path in ("/.lock", "/%2elock", "/metadata/../.lock", "/x.pem"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + path)
            assert e.value.code == 404
        assert urllib.request.urlopen(url + "/metadata/timestamp.json").status == 200
    # Keys copied into the tree by mistake, under any name: the server will not start.
    k = key_files(repo.keys)[0]
    (repo.path / "targets").mkdir(exist_ok=True)
    shutil.copyfile(k.path, repo.path / "targets" / "backup.key")
    with pytest.raises(CeruleanError, match="holds private keys"), serving(repo.path):
        pass
    (repo.path / "targets" / "backup.key").unlink()
    # Links count as the server follows them: a directory of keys, a key under a
    # harmless name.
    for link, to in ((repo.path / "keys", repo.keys), (repo.path / "notes.txt", k.path)):
        link.symlink_to(to)
        with pytest.raises(CeruleanError, match="holds private keys"), serving(repo.path):
            pass
        link.unlink()
    # A link out of the tree is not followed by the server, nor is a directory listed.
    outside = tmp_path / "outside.txt"
    outside.write_text("not for you")
    (repo.path / "out.txt").symlink_to(outside)
    with serving(repo.path) as url:
        for path in ("/out.txt", "/metadata/"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + path)
            assert e.value.code == 404, path
    shutil.copyfile(k.path, repo.path / "metadata" / k.path.name)
    assert main(["release", "serve", "--repo", str(repo.path), "--port", "0"]) == 1


def test_concurrent_publications_keep_every_entry(repo: Repository, tmp_path: Path) -> None:
    from test_updater import release_dir

    for i in range(4):
        (tmp_path / f"r{i}").mkdir()
    dirs = [release_dir(tmp_path / f"r{i}", f"13.20261201.{i}", b"u" * 4096 * (i + 1),
                        b"v" * 4096, b"k" * 1024) for i in range(4)]
    errors: list[BaseException] = []

    def run(d: Path) -> None:
        try:
            # Each run opens the repository itself, as separate processes would.
            publish(Repository.open(repo.path, repo.keys), d, "stable", [(0, 1.0)],
                    deltas=False)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(d,)) for d in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    chan: ChannelDoc = repo.channel("stable")
    assert sorted(e.version for e in chan.entries) == [f"13.20261201.{i}" for i in range(4)]


def test_cli_init_and_root_ceremony(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["release", "init"]) == 0
    out = capsys.readouterr().out
    assert "releases/root-keys" in out and "removable media" in out
    assert [k.role for k in key_files(Path("releases/root-keys"))] == ["root"] * 3
    assert main(["release", "root", "status"]) == 0
    out = capsys.readouterr().out
    assert "root: 2 of 3" in out and "timestamp: 1 of 1" in out
    assert main(["release", "root", "rotate", "targets"]) == 0
    out = capsys.readouterr().out
    assert "Root v2 written" in out and "Destroyed targets-" in out
    assert main(["release", "root", "threshold", "root", "4"]) == 1
    assert "between 1 and its number of keys (3)" in capsys.readouterr().err
    key = next(Path("releases/root-keys").iterdir())
    shutil.copyfile(key, Path("releases/repo/metadata") / key.name)
    assert main(["release", "serve"]) == 1
    assert "holds private keys" in capsys.readouterr().err
