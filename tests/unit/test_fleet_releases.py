"""The fleet reads the update repository through python-tuf's client, from the root it was
given, as hosts do: a directory (its own file fetcher) or an http(s) URL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api import exceptions as tx
from tuf.api.metadata import Metadata, Root

from cerulean.errors import CeruleanError
from cerulean.fleet import releases
from cerulean.fleet.releases import DirectoryFetcher, Source, offered
from cerulean.fleet.server import FleetConfigError, init, load_config
from cerulean.protocol.update import (
    ChannelEntry,
    PackageChange,
    ReleaseDoc,
    release_path,
    utc_iso,
)
from cerulean.release.repo import Repository, generate_key
from cerulean.release.serve import serving

V1, V2 = "1.20261101.0", "1.20261120.0"


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(releases, "_cache", {})
    monkeypatch.setattr(releases, "_documents", {})


def publish(repo: Repository, version: str, cves: tuple[str, ...] = (),
            channel: str = "stable") -> None:
    doc = ReleaseDoc("vm", version, "2026-11-20T00:00:00Z", None, {},
                     (PackageChange("openssl", "3.5.1-1", "3.5.1-2", cves),))
    chan = repo.channel(channel)
    chan.entries.append(ChannelEntry("vm", version, utc_iso(datetime.now(UTC)), [(0, 1.0)]))
    repo.add_targets({release_path("vm", version): json.dumps(doc.to_json()).encode()})
    repo.save_channel(chan)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository.create(tmp_path / "repo", tmp_path / "keys")
    publish(r, V1, ("CVE-2026-1111",))
    publish(r, V2, ("CVE-2026-2222", "CVE-2026-3333"))
    return r


def source(repo: Repository, tmp_path: Path) -> Source:
    anchor = tmp_path / "trusted-root.json"
    if not anchor.exists():
        anchor.write_bytes((repo.meta / "1.root.json").read_bytes())
    return Source(str(repo.path), anchor, tmp_path / "fleet")


def trusted_root_version(src: Source) -> int:
    root: Root = Metadata.from_file(str(releases.trust_dir(src) / "root.json")).signed
    return int(root.version)


def test_releases_come_verified_with_their_cves(repo: Repository, tmp_path: Path) -> None:
    src = source(repo, tmp_path)
    assert [(r.channel, r.version, r.cves) for r in offered(src)] == [
        ("stable", V2, ("CVE-2026-2222", "CVE-2026-3333")),
        ("stable", V1, ("CVE-2026-1111",))]
    # What it verified is kept under the data directory, for the next rollback check.
    kept = releases.trust_dir(src)
    assert kept.parent == tmp_path / "fleet/update-trust"
    assert {p.name for p in kept.glob("*.json")} == {
        "root.json", "timestamp.json", "snapshot.json", "targets.json"}


def test_a_forged_newer_root_is_refused(repo: Repository, tmp_path: Path) -> None:
    """A root version 2 signed by a key the trusted root does not know (which the old
    reader, trusting the newest N.root.json it found, took as it was)."""
    src = source(repo, tmp_path)
    offered(src)
    md = repo.load("root")
    root: Root = md.signed
    public, signer = generate_key(tmp_path / "attacker", "root")
    for role in ("root", "targets"):
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(public, role)
    root.version += 1
    md.signatures.clear()
    md.sign(signer)
    (repo.meta / "2.root.json").write_bytes(md.to_bytes())
    releases._cache.clear()
    with pytest.raises(CeruleanError, match=r"^The update repository's metadata is not signed "
                       r"by the keys the fleet trusts \(.*root.*\); refusing it\.$"):
        offered(src)
    assert trusted_root_version(src) == 1


def test_an_expired_timestamp_is_refused(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo", tmp_path / "keys",
                             now=datetime.now(UTC).replace(microsecond=0) - timedelta(days=2))
    with pytest.raises(CeruleanError, match=r"^The update repository's metadata has expired "
                       r"\(.*timestamp.*\); the publisher must refresh it"):
        offered(source(repo, tmp_path))


def test_a_tampered_channel_document_is_refused(repo: Repository, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = source(repo, tmp_path)
    assert len(offered(src)) == 2
    tampered = repo.target_file("channels/stable.json")
    tampered.write_bytes(tampered.read_bytes().replace(V2.encode(), b"1.20261199.0"))
    # The result is kept until the timestamp changes, or for RECHECK seconds.
    assert len(offered(src)) == 2
    monkeypatch.setattr(releases, "RECHECK", 0.0)
    with pytest.raises(CeruleanError, match=r"^The update repository's channels/stable\.json "
                       r"does not match its signed length and hash; refusing it\.$"):
        offered(src)


def test_a_tampered_release_document_is_refused(repo: Repository, tmp_path: Path) -> None:
    target = repo.target_file(release_path("vm", V1))
    target.write_bytes(target.read_bytes().replace(b"CVE-2026-1111", b"CVE-2026-1112"))
    with pytest.raises(CeruleanError, match=r"releases/vm/1\.20261101\.0/release\.json does "
                       "not match its signed length and hash"):
        offered(source(repo, tmp_path))


def test_older_metadata_is_refused_as_a_rollback(repo: Repository, tmp_path: Path) -> None:
    src = source(repo, tmp_path)
    old = (repo.meta / "timestamp.json").read_bytes()
    publish(repo, "1.20261121.0")
    assert offered(src)[0].version == "1.20261121.0"
    (repo.meta / "timestamp.json").write_bytes(old)  # a stale mirror, or an attacker
    with pytest.raises(CeruleanError, match=r"^The update repository offered older metadata "
                       r"than the fleet already trusts \(a rollback: .*\); refusing it\.$"):
        offered(src)


def test_rotated_roots_are_followed_and_retired_keys_refused(repo: Repository,
                                                             tmp_path: Path) -> None:
    src = source(repo, tmp_path)
    offered(src)
    stolen = tmp_path / "stolen-targets.pem"  # copied before the rotation destroys it
    stolen.write_bytes(next(repo.keys.glob("targets-*.pem")).read_bytes())
    repo.rotate_key("targets")
    repo.rotate_key("root")
    publish(repo, "1.20261122.0", ("CVE-2026-4444",))
    rel = offered(src)
    assert (rel[0].version, rel[0].cves) == ("1.20261122.0", ("CVE-2026-4444",))
    assert trusted_root_version(src) == 3
    # A fleet that starts now, from root 1, walks the same chain.
    fresh = Source(src.repo, src.root, tmp_path / "other-fleet")
    releases._cache.clear()
    assert [r.version for r in offered(fresh)] == [r.version for r in rel]
    # Targets metadata signed with the retired key is refused.
    retired = stolen
    md = repo.load("targets")
    md.signed.version += 1
    md.signatures.clear()
    md.sign(releases_signer(retired))
    (repo.meta / f"{md.signed.version}.targets.json").write_bytes(md.to_bytes())
    snap = repo.load("snapshot")
    snap.signed.meta["targets.json"].version = md.signed.version
    snap.signed.version += 1
    snap.sign(releases_signer(next(repo.keys.glob("snapshot-*.pem"))), append=False)
    (repo.meta / f"{snap.signed.version}.snapshot.json").write_bytes(snap.to_bytes())
    ts = repo.load("timestamp")
    ts.signed.snapshot_meta.version = snap.signed.version
    ts.signed.version += 1
    ts.sign(releases_signer(next(repo.keys.glob("timestamp-*.pem"))), append=False)
    (repo.meta / "timestamp.json").write_bytes(ts.to_bytes())
    with pytest.raises(CeruleanError, match="not signed by the keys the fleet trusts"):
        offered(src)


def releases_signer(path: Path):  # type: ignore[no-untyped-def]
    from cerulean.release.repo import load_signer

    return load_signer(path)


def test_over_http_as_well(repo: Repository, tmp_path: Path) -> None:
    with serving(repo.path) as url:
        src = Source(url, source(repo, tmp_path).root, tmp_path / "fleet")
        assert [r.version for r in offered(src)] == [V2, V1]
    releases._cache.clear()
    with pytest.raises(CeruleanError, match=rf"^The update repository {url} cannot be read: "):
        offered(src)


def test_what_the_fleet_cannot_trust_is_one_sentence(repo: Repository, tmp_path: Path) -> None:
    src = source(repo, tmp_path)
    with pytest.raises(CeruleanError, match=r"^The fleet has an update-repo but no update-root"
                       r".*\(cerulean fleet init --update-root FILE\)\.$"):
        offered(Source(src.repo, None, src.data))
    with pytest.raises(CeruleanError, match=r"is targets metadata, not root metadata"):
        offered(Source(src.repo, repo.meta / "2.targets.json", src.data))
    with pytest.raises(CeruleanError, match=r"^The update root .*/nothing\.json cannot be read"):
        offered(Source(src.repo, tmp_path / "nothing.json", src.data))
    with pytest.raises(CeruleanError, match=r"^The update repository .*/elsewhere cannot be "
                       "read: No such file or directory\\.$"):
        offered(Source(str(tmp_path / "elsewhere"), src.root, src.data))
    # The root of another repository: its signatures do not verify this one's.
    other = Repository.create(tmp_path / "other", tmp_path / "other-keys",
                              root_keys_dir=tmp_path / "other-root-keys")
    with pytest.raises(CeruleanError, match="not signed by the keys the fleet trusts"):
        offered(Source(src.repo, other.meta / "1.root.json", src.data))


def test_a_release_without_its_document_is_refused(repo: Repository, tmp_path: Path) -> None:
    chan = repo.channel("lts")
    chan.entries.append(ChannelEntry("vm", "1.20261123.0", utc_iso(datetime.now(UTC)),
                                     [(0, 1.0)]))
    repo.save_channel(chan)
    with pytest.raises(CeruleanError, match=r"^The update repository offers vm 1\.20261123\.0 "
                       r"but has no releases/vm/1\.20261123\.0/release\.json; hosts could not "
                       r"install it\.$"):
        offered(source(repo, tmp_path))


def test_a_release_document_of_another_release_is_refused(repo: Repository,
                                                          tmp_path: Path) -> None:
    doc = ReleaseDoc("vm", V2, "2026-11-20T00:00:00Z", None, {})
    repo.add_targets({release_path("vm", V1): json.dumps(doc.to_json()).encode()})
    with pytest.raises(CeruleanError, match=r"^The update repository's releases/vm/"
                       r"1\.20261101\.0/release\.json describes vm 1\.20261120\.0; refusing "
                       r"it\.$"):
        offered(source(repo, tmp_path))


def test_the_file_fetcher_stays_in_the_repository(repo: Repository, tmp_path: Path) -> None:
    fetch = DirectoryFetcher(repo.path)
    data = fetch.download_bytes((repo.meta / "1.root.json").as_uri(), 1 << 20)
    assert data == (repo.meta / "1.root.json").read_bytes()
    with pytest.raises(tx.DownloadHTTPError) as missing:
        fetch.download_bytes((repo.meta / "9.root.json").as_uri(), 1 << 20)
    assert missing.value.status_code == 404
    (tmp_path / "secret").write_text("s3cret")
    (repo.meta / "link.json").symlink_to(tmp_path / "secret")
    for url in ((repo.meta / "link.json").as_uri(),
                repo.meta.as_uri() + "/../../secret",
                "http://example.invalid/metadata/root.json"):
        with pytest.raises(tx.DownloadError) as e:
            fetch.download_bytes(url, 1 << 20)
        assert not isinstance(e.value, tx.DownloadHTTPError), url
    # A file longer than allowed is not read to its end.
    with pytest.raises(tx.DownloadLengthMismatchError):
        fetch.download_bytes((repo.meta / "1.root.json").as_uri(), 10)


def test_fleet_toml_names_the_root_it_trusts(repo: Repository, tmp_path: Path) -> None:
    data = tmp_path / "d"
    with pytest.raises(FleetConfigError, match="'update-repo' needs 'update-root'"):
        init(data, {"update-repo": str(repo.path)})
    with pytest.raises(FleetConfigError, match="'update-root' is set but 'update-repo' is not"):
        init(data, {"update-root": str(repo.meta / "1.root.json")})
    with pytest.raises(CeruleanError, match="is not TUF root metadata"):
        (tmp_path / "junk.json").write_text("{}")
        init(data, {"update-repo": str(repo.path), "update-root": str(tmp_path / "junk.json")})
    data.mkdir()
    (data / "root.json").write_bytes((repo.meta / "1.root.json").read_bytes())
    cfg, _ = init(data, {"update-repo": str(repo.path), "update-root": "root.json"})
    src = load_config(data).update_source
    assert src == Source(str(repo.path), data / "root.json", data)
    assert [r.version for r in offered(src)] == [V2, V1]
    assert cfg.update_root == "root.json"


def test_a_host_is_shown_the_cves_its_release_fixes(repo: Repository, tmp_path: Path) -> None:
    src = source(repo, tmp_path)
    assert releases.release_cves(src, {"image": "vm", "version": V2}) == [
        "CVE-2026-2222", "CVE-2026-3333"]
    assert releases.release_cves(src, {"image": "vm", "version": V1}) == ["CVE-2026-1111"]
    assert releases.release_cves(src, {"image": "edge", "version": V2}) == []
    assert releases.release_cves(src, {}) == []
    assert releases.release_cves(None, {"image": "vm", "version": V2}) == []
    # A repository that cannot be verified now: nothing is claimed as fixed.
    (repo.meta / "timestamp.json").write_text("{}")
    releases._cache.clear()
    assert releases.release_cves(src, {"image": "vm", "version": V2}) == []
