"""The on-host updater against a real GPT disk file, a real TUF repository over HTTP
and a directory standing in for the ESP (the QEMU tests do the same on a booted host)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cerulean.agent.audit import AuditLog
from cerulean.agent.update import boot, disk, health
from cerulean.agent.update.errors import UpdateError
from cerulean.agent.update.host import Host, load_state, save_state
from cerulean.agent.update.updater import Updater
from cerulean.protocol.update import ReleaseDoc, verity_uuids
from cerulean.protocol.window import DAYS
from cerulean.release.build import pack_payload
from cerulean.release.publish import publish
from cerulean.release.repo import Repository
from cerulean.release.serve import serving

MIB = 1 << 20
USR, VERITY = disk.USR_TYPES["amd64"]
V1, V2, V3 = "13.20261125.0", "13.20261126.0", "13.20261127.0"


def roothash(version: str) -> str:
    return hashlib.sha256(version.encode()).hexdigest()


def make_disk(path: Path, v1_usr: bytes, v1_verity: bytes) -> None:
    a_data, a_hash = verity_uuids(roothash(V1))
    script = (
        "label: gpt\n"
        "size=1MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP\n"
        f"size=8MiB, type={USR}, uuid={a_data}, name=usr-A\n"
        f"size=1MiB, type={VERITY}, uuid={a_hash}, name=usr-A-verity\n"
        f"size=8MiB, type={USR}, name=_empty\n"
        f"size=1MiB, type={VERITY}, name=_empty\n"
        "size=2MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root\n"
    )
    with path.open("wb") as f:
        f.truncate(24 * MIB)
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True)
    parts = {p.label: p for p in disk.read_table(str(path))}
    with path.open("r+b") as f:
        f.seek(parts["usr-A"].start)
        f.write(v1_usr)
        f.seek(parts["usr-A-verity"].start)
        f.write(v1_verity)


def release_dir(tmp: Path, version: str, usr: bytes, verity: bytes, uki: bytes) -> Path:
    src = tmp / f"src-{version}"
    src.mkdir()
    (src / "usr.erofs").write_bytes(usr)
    (src / "usr.verity").write_bytes(verity)
    (src / "uki.efi").write_bytes(uki)
    (src / "usrhash").write_text(roothash(version))
    out = tmp / "releases" / version
    ar = pack_payload(src, out / "amd64", "vm", version, "amd64")
    doc = ReleaseDoc("vm", version, "2026-11-26T00:00:00Z", None, {"amd64": ar})
    (out / "release.json").write_text(json.dumps(doc.to_json()))
    return out


@dataclass
class World:
    tmp: Path
    repo: Repository
    url: str
    host: Host
    disk: Path
    esp: Path
    content: dict[str, tuple[bytes, bytes, bytes]]
    reboots: list[str] = field(default_factory=list)
    blessed: list[str] = field(default_factory=list)
    status: str = "good"
    messages: list[str] = field(default_factory=list)
    network: bool = True  # whether the host has a default route

    def updater(self, **kw: object) -> Updater:
        return Updater(host=self.host, url=self.url, disk_path=str(self.disk), esp_path=self.esp,
                       arch="amd64", say=self.messages.append,
                       bless_status=lambda: self.status, bless_cmd=self.blessed.append,
                       reboot_cmd=lambda: self.reboots.append("reboot"), **kw)  # type: ignore[arg-type]

    def publish(self, version: str, channel: str = "stable") -> None:
        usr, verity, uki = self.content[version]
        publish(self.repo, release_dir(self.tmp, version, usr, verity, uki), channel, [(0, 1.0)])

    def boot_into(self, version: str) -> None:
        """What a reboot does: the other slot's /usr, the entry's count goes down."""
        (self.host.root / "usr/lib/os-release").write_text(
            f'IMAGE_ID="vm"\nIMAGE_VERSION="{version}"\n')
        data_uuid, _ = verity_uuids(roothash(version))
        (self.host.root / "proc/cmdline").write_text(
            f"usrhash={roothash(version)} systemd.verity_usr_data=PARTUUID={data_uuid} rw\n")
        for e in boot.entries(self.esp):
            if e.version == version and e.left is not None:
                new = e.path.with_name(f"cerulean_{version}+{e.left - 1}-{e.done + 1}.efi")
                e.path.rename(new)

    def slot(self, name: str) -> disk.Slot:
        lay = disk.layout(str(self.disk), "amd64", (self.host.root / "proc/cmdline").read_text())
        return next(s for s in lay.slots if s.name == name)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    rng = random.Random(7)
    usr1 = bytes(rng.getrandbits(8) for _ in range(3 * MIB))
    ver1 = bytes(rng.getrandbits(8) for _ in range(64 * 1024))
    uki1 = b"UKI-1" * 20000
    # v2 changes a little of /usr (a delta is much smaller); v3 changes it more.
    usr2 = usr1[:MIB] + b"new package" * 1000 + usr1[MIB + 11000:]
    usr3 = usr2[: 2 * MIB] + bytes(rng.getrandbits(8) for _ in range(MIB))
    content = {
        V1: (usr1, ver1, uki1),
        V2: (usr2, bytes(rng.getrandbits(8) for _ in range(64 * 1024)), b"UKI-2" * 20000),
        V3: (usr3, bytes(rng.getrandbits(8) for _ in range(64 * 1024)), b"UKI-3" * 20000),
    }
    repo = Repository.create(tmp_path / "repo", tmp_path / "keys")
    host = Host(tmp_path / "host")
    (host.root / "proc").mkdir(parents=True)
    (host.root / "usr/lib").mkdir(parents=True)
    host.trusted_root.parent.mkdir(parents=True)
    host.trusted_root.write_bytes((repo.meta / "1.root.json").read_bytes())
    esp = tmp_path / "esp"
    (esp / "EFI/Linux").mkdir(parents=True)
    (esp / "EFI/Linux" / f"cerulean_{V1}.efi").write_bytes(uki1)
    d = tmp_path / "disk.raw"
    make_disk(d, usr1, ver1)
    with serving(repo.path) as url:
        w = World(tmp_path, repo, url, host, d, esp, content)
        monkeypatch.setattr(health, "default_route", lambda: w.network)
        w.boot_into(V1)
        w.publish(V1)
        yield w


def read_slot(w: World, name: str, version: str) -> tuple[bytes, bytes]:
    s = w.slot(name)
    usr, verity, _ = w.content[version]
    with w.disk.open("rb") as f:
        f.seek(s.data.start)
        a = f.read(len(usr))
        f.seek(s.hash.start)
        b = f.read(len(verity))
    return a, b


def test_update_writes_the_other_slot_then_the_boot_entry(world: World) -> None:
    world.publish(V2)
    up = world.updater()
    assert up.check().result == "available"
    out = up.run()
    assert out.result == "rebooting" and world.reboots == ["reboot"]
    assert read_slot(world, "B", V2) == world.content[V2][:2]
    b = world.slot("B")
    assert (b.data.uuid, b.hash.uuid) == verity_uuids(roothash(V2))
    assert (b.data.label, b.hash.label) == ("usr-B", "usr-B-verity")
    names = sorted(p.name for p in (world.esp / "EFI/Linux").iterdir())
    assert names == [f"cerulean_{V1}.efi", f"cerulean_{V2}+3.efi"]
    assert (world.esp / "EFI/Linux" / f"cerulean_{V2}+3.efi").read_bytes() == world.content[V2][2]
    # Only the deltas were downloaded: the repository had v1 when v2 was published.
    assert any(m.startswith("usr: a ") and "delta" in m for m in world.messages), world.messages
    uki = world.content[V2][2]
    assert load_state(world.host).staged == {
        "version": V2, "slot": "B", "from": V1, "uki_size": str(len(uki)),
        "uki_sha256": hashlib.sha256(uki).hexdigest(), "network": "yes"}
    assert not world.updater().network_expected()  # v1's boots do not judge v2

    # The reboot: v2 boots from slot B. The timer may fire before its health check has
    # passed: nothing happens then (a reboot would spend one of v2's tries).
    world.boot_into(V2)
    world.status = "indeterminate"
    assert world.updater().run().result == "waiting"
    # v1 had a network, so v2's health check requires one.
    assert world.updater().network_expected()
    assert world.reboots == ["reboot"] and load_state(world.host).staged is not None
    # Its health check passes, it is marked good.
    world.status = "good"
    assert world.slot("B").data.uuid == disk.booted_usr_uuid(
        (world.host.root / "proc/cmdline").read_text())
    out = world.updater().run()
    assert out.result == "up-to-date"
    st = load_state(world.host)
    assert st.staged is None and any(h["result"] == "updated" for h in st.history)
    assert not world.updater().network_expected()
    # Every result went into the audit trail too, chained.
    trail = AuditLog(world.host.audit_log)
    assert trail.verify().ok
    actions = [e["action"] for e in trail.entries()]
    assert actions[0] == "update.staged" and actions[-1] == "update.updated", actions


def test_a_boot_entry_emptied_by_a_power_cut_is_installed_again(world: World) -> None:
    # FAT without the file's own sync: the renamed entry is there, but empty.
    world.publish(V2)
    assert world.updater().run(reboot=False).result == "staged"
    entry = world.esp / "EFI/Linux" / f"cerulean_{V2}+3.efi"
    entry.write_bytes(b"")
    # The boot loader could not use it, so v1 came up again: the entry goes, and the
    # next run installs v2 afresh instead of rebooting into nothing forever.
    out = world.updater().run(reboot=False)
    assert any("was damaged" in m for m in world.messages), world.messages
    assert out.result == "staged"
    assert entry.read_bytes() == world.content[V2][2]
    assert V2 not in load_state(world.host).bad


def test_a_release_that_fails_is_never_applied_again(world: World) -> None:
    world.publish(V2)
    world.updater().run()
    world.boot_into(V2)
    world.updater().run()
    world.publish(V3)
    assert world.updater().run().result == "rebooting"
    # v3 uses up its tries (say its kernel never comes up); systemd-boot falls back to v2.
    entry = next(e for e in boot.entries(world.esp) if e.version == V3)
    entry.path.rename(entry.path.with_name(f"cerulean_{V3}+0-3.efi"))
    world.boot_into(V2)
    out = world.updater().run()
    assert out.result == "up-to-date" and "failed on this host before" in out.message
    st = load_state(world.host)
    assert V3 in st.bad and st.staged is None
    assert any(h["result"] == "rolled-back" for h in st.history)
    assert [e.version for e in boot.entries(world.esp)] == [V2]


def test_health_failure_marks_the_boot_bad_and_reboots(world: World) -> None:
    world.publish(V2)
    world.updater().run()
    world.boot_into(V2)
    world.status = "indeterminate"  # a counted boot, not yet blessed
    out = world.updater().health_failed(["failed units: app.service"])
    assert out.result == "rebooting" and world.blessed == ["bad"] and world.reboots
    assert "app.service" in load_state(world.host).bad[V2]


def test_health_failure_on_a_good_boot_does_not_reboot(world: World) -> None:
    out = world.updater().health_failed(["no default route"])
    assert out.result == "unhealthy" and not world.blessed and not world.reboots


def test_a_tampered_payload_leaves_the_host_bootable_as_it_was(world: World) -> None:
    world.publish(V2)
    # The other slot holds a good earlier release that must stay bootable.
    (world.esp / "EFI/Linux" / "cerulean_13.20261101.0.efi").write_bytes(b"older")
    b = world.slot("B")
    disk.set_partition(str(world.disk), b.data, label="usr-B")
    doc = ReleaseDoc.from_json(json.loads(world.repo.read_target(
        f"releases/vm/{V2}/release.json")))
    for part in doc.arches["amd64"].parts.values():
        for p in [part.full, *(d.payload for d in part.deltas.values())]:
            f = world.repo.target_file(p.path)
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 1
            f.write_bytes(bytes(data))
    with pytest.raises(UpdateError, match="does not match its signed length and hash"):
        world.updater().run()
    assert sorted(p.name for p in (world.esp / "EFI/Linux").iterdir()) == [
        "cerulean_13.20261101.0.efi", f"cerulean_{V1}.efi"]
    assert world.slot("B").data.label == "usr-B"
    assert read_slot(world, "A", V1) == world.content[V1][:2]
    assert not world.reboots
    # The refusal is in the audit trail once, however often the timer meets it again.
    with pytest.raises(UpdateError):
        world.updater().run()
    trail = [e for e in AuditLog(world.host.audit_log).entries()]
    assert [e["action"] for e in trail] == ["update.failed"], trail
    assert "does not match its signed length and hash" in trail[0]["detail"]["message"]


def test_a_delta_whose_base_differs_falls_back_to_the_full_payload(world: World) -> None:
    world.publish(V2)
    a = world.slot("A")
    with world.disk.open("r+b") as f:  # slot A no longer holds exactly v1 (say, a bit rot)
        f.seek(a.data.start + 5)
        f.write(b"X")
    world.updater().run()
    assert any("delta could not be used" in m for m in world.messages), world.messages
    assert read_slot(world, "B", V2) == world.content[V2][:2]


def test_nothing_happens_from_an_unblessed_boot_or_when_switched_off(world: World) -> None:
    world.publish(V2)
    world.status = "indeterminate"
    assert world.updater().run().result == "waiting"
    world.status = "good"
    conf = world.host.root / "etc/cerulean/update.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text("never = true\n")
    assert world.updater().run().result == "disabled"
    # One clock: the release was published at the real time, so the window is placed
    # against the real time too, on a day that is not today.
    day = DAYS[(datetime.now(UTC).weekday() + 3) % 7].capitalize()
    conf.write_text(f"window = \"{day} 02:00-03:00\"\nnever = false\n")
    out = world.updater().run()
    assert out.result == "staged" and f"window opens at {day} 02:00" in out.message, out.message
    assert not world.reboots
    # Switched off while a release is staged, with the window open: no reboot into it.
    conf.write_text("never = true\n")
    out = world.updater().run(ignore_window=True)
    assert (out.result, world.reboots) == ("disabled", []), out.message
    assert "stays staged and is not rebooted into" in out.message
    conf.write_text("chanel = \"lts\"\n")
    with pytest.raises(UpdateError, match="unknown key 'chanel'"):
        world.updater()


def test_rollback_boots_the_other_release_and_skips_this_one(world: World) -> None:
    world.publish(V2)
    world.updater().run()
    world.boot_into(V2)
    world.updater().run()
    out = world.updater().rollback()
    assert out.version == V1 and world.reboots == ["reboot", "reboot"]
    names = sorted(p.name for p in (world.esp / "EFI/Linux").iterdir())
    assert names == [f"cerulean_{V1}.efi", f"cerulean_{V2}+0-1.efi"]
    assert V2 in load_state(world.host).bad


def test_waves_keep_a_late_host_waiting(world: World) -> None:
    world.publish(V2)
    chan = world.repo.channel("stable")
    chan.find("vm", V2).waves = [(0, 0.0), (3600, 1.0)]  # type: ignore[union-attr]
    world.repo.save_channel(chan)
    out = world.updater().run()
    assert out.result == "up-to-date" and "wave" in out.message
    assert os.listdir(world.esp / "EFI/Linux") == [f"cerulean_{V1}.efi"]


def test_wave_seed_is_drawn_once_and_kept(tmp_path: Path) -> None:
    from cerulean.agent.update.host import seed

    host = Host(tmp_path)
    first = seed(host)
    assert 0 <= first < 1 and seed(host) == first
    assert (host.state_dir / "seed").read_text().strip()


def test_host_cli_errors_are_one_sentence() -> None:
    import sys

    # This machine is not a Cerulean host: the command says so, without a traceback.
    r = subprocess.run([sys.executable, "-m", "cerulean.agent", "update", "status"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "cerulean.agent", "update", "--help"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "rollback" in r.stdout


def test_a_host_without_network_is_not_judged_by_it(world: World,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An isolated host (no default route when it installs an update) keeps a release
    that comes up without one; a networked host's new release must bring it up."""
    world.network = False
    world.publish(V2)
    assert world.updater().run().result == "rebooting"
    assert load_state(world.host).staged["network"] == "no"  # type: ignore[index]
    world.boot_into(V2)
    world.status = "indeterminate"
    assert not world.updater().network_expected()

    active = {"systemctl is-active --quiet cerulean-update.timer": 0}

    def run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, active.get(" ".join(argv), 0), "", "")

    monkeypatch.setattr(health, "_run", run)
    said: list[str] = []
    assert health.check(world.host, network=False, network_wait=0, say=said.append) == []
    problems = health.check(world.host, network=True, network_wait=0, say=said.append)
    assert problems == ["no default route (the network is not up)"], problems
    assert said == ["unhealthy: no default route (the network is not up)"]


def _fake_block(root: Path, parts: list[tuple[str, int, str, str]]) -> None:
    """sysfs partitions of vda (name, start, GPT type, PARTUUID) and udev's records."""
    for n, (name, start, kind, uuid) in enumerate(parts, start=1):
        d = root / "sys/devices/pci0/virtio1/block/vda" / name
        d.mkdir(parents=True)
        (d / "partition").write_text(f"{n}\n")
        (d / "dev").write_text(f"254:{n}\n")
        (d / "start").write_text(f"{start}\n")
        link = root / "sys/class/block" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(d)
        data = root / f"run/udev/data/b254:{n}"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(f"S:disk/by-partuuid/{uuid}\nE:ID_PART_ENTRY_TYPE={kind}\n"
                        f"E:ID_PART_ENTRY_UUID={uuid}\nE:ID_PART_ENTRY_NUMBER={n}\n")


def test_the_booted_slot_is_told_without_opening_a_device(tmp_path: Path) -> None:
    usr, hsh = disk.USR_TYPES["amd64"]
    a, b = "0a0a0a0a-0000-4000-8000-00000000000a", "0b0b0b0b-0000-4000-8000-00000000000b"
    # Slot B's partition comes first in sysfs order but last on the disk.
    _fake_block(tmp_path, [("vda4", 900, usr, b), ("vda1", 10, "esp", "1" * 8),
                           ("vda2", 100, usr, a), ("vda3", 500, hsh, "3" * 8)])
    assert disk.booted_slot_name(f"ro systemd.verity_usr_data=PARTUUID={a} quiet",
                                 tmp_path) == "A"
    assert disk.booted_slot_name(f"systemd.verity_usr_data=PARTUUID={b}", tmp_path) == "B"
    with pytest.raises(UpdateError, match="known to udev"):
        disk.booted_slot_name(f"systemd.verity_usr_data=PARTUUID={'c' * 8}-0000-4000-8000-"
                              f"{'0' * 12}", tmp_path)


def _staged_with_a_failed_release(world: World) -> Path:
    """v2 staged (no reboot) and v3 given up before: what state.json must not forget."""
    world.publish(V2)
    assert world.updater().run(reboot=False).result == "staged"
    st = load_state(world.host)
    st.bad[V3] = "its health check failed: app.service"
    save_state(world.host, st)
    path = world.host.state_dir / "state.json"
    assert json.loads((world.host.state_dir / "state.json.bak").read_bytes()) == \
        json.loads(path.read_bytes())
    return path


def _recoveries(world: World) -> list[str]:
    return [e["detail"]["message"] for e in AuditLog(world.host.audit_log).entries()
            if e["action"] == "update.recovered"]


def test_a_torn_state_file_is_recovered_from_its_copy(world: World) -> None:
    path = _staged_with_a_failed_release(world)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a cut in the middle of a write
    st = load_state(world.host)  # read-only callers (status, metrics) get the copy
    assert st.staged is not None and st.staged["version"] == V2 and V3 in st.bad
    # The next run keeps going with the staged release and the failed one remembered,
    # says so in the audit trail, and writes both copies whole again.
    out = world.updater().run(reboot=False)
    assert out.result == "staged" and out.version == V2
    assert [m for m in _recoveries(world)] == [
        f"{path} was not valid JSON (cut short?); recovered it from state.json.bak."]
    assert json.loads(path.read_bytes())["bad"] == {V3: "its health check failed: app.service"}
    assert not load_state(world.host).repairs
    assert AuditLog(world.host.audit_log).verify().ok


def test_wrongly_typed_fields_are_taken_from_the_copy(world: World) -> None:
    path = _staged_with_a_failed_release(world)
    d = json.loads(path.read_bytes())
    d["bad"] = [V3]
    d["staged"] = V2
    d["history"] = [*d["history"], "staged", 3]
    path.write_text(json.dumps(d))
    st = load_state(world.host)
    assert st.bad == {V3: "its health check failed: app.service"}
    assert st.staged is not None and st.staged["version"] == V2
    assert all(isinstance(h, dict) for h in st.history)
    assert st.repairs == [f"{path} had damaged fields (bad, staged, history); recovered them "
                          "from state.json.bak."]
    world.publish(V3)  # v3 is offered, but it failed here before: never again
    assert world.updater().run(reboot=False).result == "staged"
    assert [e.version for e in boot.entries(world.esp)] == [V1, V2]
    assert len(_recoveries(world)) == 1


def test_fields_missing_from_one_copy_come_from_the_other(world: World) -> None:
    path = _staged_with_a_failed_release(world)
    d = json.loads(path.read_bytes())
    path.write_text("{}")  # every field gone: not an older file, the copy has them
    st = load_state(world.host)
    assert st.bad == d["bad"] and st.staged == d["staged"] and st.repairs
    # A staged release whose numbers are not numbers is damage too, not a traceback.
    path.write_text(json.dumps({**d, "staged": {**d["staged"], "uki_size": "12k"}}))
    st = load_state(world.host)
    assert st.staged == d["staged"] and "staged" in st.repairs[0]
    assert world.updater().run(reboot=False).result == "staged"


def test_both_copies_damaged_start_afresh_and_keep_the_fallback(world: World) -> None:
    path = _staged_with_a_failed_release(world)
    world.boot_into(V2)
    world.status = "indeterminate"  # v2's first boot, judged by its health check
    path.write_bytes(b'{"bad": {"13.2026')
    (path.parent / "state.json.bak").write_text(json.dumps({"bad": [V3], "staged": "B",
                                                            "last": {}, "history": [1]}))
    st = load_state(world.host)
    assert (st.bad, st.staged, st.history) == ({}, None, [])
    assert not world.updater().network_expected()  # no traceback, no network required
    # The health check fails: the fallback still marks the boot bad, reboots into v1,
    # and remembers v2 as failed from then on.
    out = world.updater().health_failed(["failed units: app.service"])
    assert out.result == "rebooting" and world.blessed == ["bad"] and world.reboots
    assert V2 in load_state(world.host).bad
    msgs = _recoveries(world)
    assert len(msgs) == 1 and "are both damaged; started afresh without the failed " \
        "releases, the staged release, the history" in msgs[0], msgs
    assert "not valid JSON" in msgs[0] and "(bad, staged, history)" in msgs[0]


def test_a_refused_repository_is_recorded_for_the_audit_trail_and_the_fleet(
        world: World) -> None:
    from datetime import timedelta

    from cerulean.agent.fleetlink import update_state

    # A mirror frozen three days ago: its timestamp has expired since.
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    world.repo.save_channel(world.repo.channel("stable"), now=past)
    for _ in range(2):
        with pytest.raises(UpdateError, match="metadata has expired") as info:
            world.updater().run()
        assert len(str(info.value).splitlines()) == 1
    st = load_state(world.host)
    assert st.last["result"] == "refused" and "expired" in st.last["message"]
    refused = [e for e in AuditLog(world.host.audit_log).entries()
               if e["action"] == "update.refused"]
    assert len(refused) == 1 and "expired" in refused[0]["detail"]["message"]  # once
    report = update_state(world.host.root)
    assert report["last"]["result"] == "refused" and report["version"] == V1
    # The fleet takes the report as it is, and refuses one whose update state is not typed.
    from cerulean.fleet.ingest import BadReport, _update

    assert _update({"update": report})["last"]["result"] == "refused"
    for bad in ({"last": "refused"}, {"last": {"result": 3}}, {"failed_releases": [V2]},
                {"staged": {"version": V2}}, {"hold": "yes"}):
        with pytest.raises(BadReport, match=r"'update\."):
            _update({"update": bad})
    # A repository that is merely unreachable is said in the state, not in the audit trail.
    world.url = "http://127.0.0.1:9"  # discard: nobody listens
    with pytest.raises(UpdateError, match=r"Downloading the metadata .* failed"):
        world.updater().run()
    assert load_state(world.host).last["result"] == "unreachable"
    assert [e["action"] for e in AuditLog(world.host.audit_log).entries()] == [
        "update.refused"]


def test_the_service_is_stopped_after_the_downloads_deadline_with_room_to_write() -> None:
    import configparser

    from cerulean.agent.update.client import Limits

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(Path(__file__).resolve().parents[2]
              / "src/cerulean/agent/units/cerulean-update.service")
    value = unit["Service"]["TimeoutStartSec"]
    assert value.endswith("h")
    budget = Limits().run_budget
    # The downloads stop first, with one sentence; a stop by systemd is the last resort.
    assert budget + 20 * 60 <= float(value.removesuffix("h")) * 3600 <= 4 * 3600
    # ~300 MB of payloads at the slowest rate allowed still fit in one run.
    assert Limits().slack + 300e6 / Limits().min_rate < budget


def test_a_damaged_trusted_root_is_seeded_again_and_the_chain_walked(world: World) -> None:
    world.repo.rotate_key("root")  # root v2, signed by v1's key and its own
    world.repo.rotate_key("targets")  # root v3: what v1 trusted for targets is revoked
    world.publish(V2)
    assert world.updater().check().result == "available"
    trusted = world.host.state_dir / "metadata/root.json"
    assert json.loads(trusted.read_bytes())["signed"]["version"] == 3
    for n, damage in enumerate((trusted.read_bytes()[:100],  # torn
                                b'{"signed": {}, "signatures": []}'), start=1):  # not a root
        trusted.write_bytes(damage)
        assert world.updater().check().result == "available"
        assert json.loads(trusted.read_bytes())["signed"]["version"] == 3
        msgs = [e["detail"]["message"] for e in AuditLog(world.host.audit_log).entries()
                if e["action"] == "update.recovered"]
        assert len(msgs) == n
        assert msgs[-1].startswith(f"The trusted {trusted} was damaged (")
        assert msgs[-1].endswith(f"it was seeded again from the image's "
                                 f"{world.host.trusted_root} and the chain of newer roots "
                                 "is followed again from there."), msgs[-1]
    # Whole again: nothing more is repaired, and the release installs.
    assert world.updater().run(reboot=False).result == "staged"
    assert len([e for e in AuditLog(world.host.audit_log).entries()
                if e["action"] == "update.recovered"]) == 2


@pytest.mark.parametrize("how", ["withdrawn", "removed"])
def test_a_release_withdrawn_after_it_was_staged_is_not_booted(world: World,
                                                               how: str) -> None:
    from cerulean.release.publish import set_state

    world.publish(V2)
    assert world.updater().run(reboot=False).result == "staged"
    assert world.slot("B").data.label == "usr-B"
    if how == "withdrawn":
        set_state(world.repo, "stable", "vm", V2, "withdrawn")
        why = "it was withdrawn from the stable channel"
    else:  # gone from the channel altogether
        chan = world.repo.channel("stable")
        chan.entries = [e for e in chan.entries if e.version != V2]
        world.repo.save_channel(chan)
        why = "the stable channel no longer offers it"
    # The maintenance window is open: without the check, this run would reboot into v2.
    out = world.updater().run()
    assert out.result == "withdrawn" and not world.reboots
    assert out.message == (f"{V2} is not booted: {why} after it was staged; its boot entry is "
                           "removed and slot B invalidated.")
    assert [e.version for e in boot.entries(world.esp)] == [V1]
    assert (world.slot("B").data.label, world.slot("B").hash.label) == (disk.EMPTY, disk.EMPTY)
    st = load_state(world.host)
    assert st.staged is None and st.last["result"] == "withdrawn" and V2 not in st.bad
    assert [e["action"] for e in AuditLog(world.host.audit_log).entries()][-1] == \
        "update.withdrawn"
    # Nothing newer is offered, and v2 is not installed again.
    out = world.updater().run()
    assert out.result == "up-to-date" and not world.reboots
    assert [e.version for e in boot.entries(world.esp)] == [V1]


def test_a_paused_release_stays_staged_unbootable_until_resumed(world: World) -> None:
    from cerulean.release.publish import set_state

    world.publish(V2)
    assert world.updater().run(reboot=False).result == "staged"
    entry = world.esp / "EFI/Linux" / f"cerulean_{V2}+3.efi"
    set_state(world.repo, "stable", "vm", V2, "paused")
    for _ in range(2):  # and the next hourly run the same: not given up as failed
        out = world.updater().run()
        assert out.result == "paused" and not world.reboots
        assert "its boot entry is set aside until it is resumed" in out.message
        # An unplanned reboot now boots v1: the boot loader does not see v2's entry.
        assert [e.version for e in boot.entries(world.esp)] == [V1]
        assert boot.paused(world.esp, V2) == [entry.with_name(entry.name + ".paused")]
        st = load_state(world.host)
        assert st.staged is not None and st.staged["version"] == V2 and V2 not in st.bad
    assert [e["action"] for e in AuditLog(world.host.audit_log).entries()].count(
        "update.paused") == 1
    set_state(world.repo, "stable", "vm", V2, "active")
    out = world.updater().run()
    assert out.result == "rebooting" and world.reboots == ["reboot"]
    assert entry.read_bytes() == world.content[V2][2] and not boot.paused(world.esp, V2)


def test_a_staged_release_is_not_booted_unconfirmed(world: World) -> None:
    world.publish(V2)
    assert world.updater().run(reboot=False).result == "staged"
    world.url = "http://127.0.0.1:9"
    with pytest.raises(UpdateError, match=f"; {V2} stays staged and is not rebooted into "
                       "until the repository confirms it.$"):
        world.updater().run()
    assert not world.reboots and load_state(world.host).last["result"] == "unreachable"
    assert [e.version for e in boot.entries(world.esp)] == [V1, V2]


def _v2_payloads(world: World) -> list[Path]:
    doc = ReleaseDoc.from_json(json.loads(world.repo.read_target(
        f"releases/vm/{V2}/release.json")))
    return [world.repo.target_file(p.path) for part in doc.arches["amd64"].parts.values()
            for p in [part.full, *(d.payload for d in part.deltas.values())]]


def test_a_release_that_fails_to_install_three_times_is_given_up(world: World) -> None:
    world.publish(V2)
    for f in _v2_payloads(world):  # a bad mirror: every payload of v2 is corrupt
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    for n in (1, 2):
        with pytest.raises(UpdateError, match="does not match its signed length and hash"):
            world.updater().run()
        assert load_state(world.host).install_failures == {V2: n}
        assert V2 not in load_state(world.host).bad
    with pytest.raises(UpdateError, match="does not match its signed length and hash"):
        world.updater().run()
    st = load_state(world.host)
    assert st.install_failures == {} and st.bad[V2].startswith(
        "installing it failed 3 times, the last: ") and "signed length and hash" in st.bad[V2]
    assert st.last == {"time": st.last["time"], "result": "given-up", "message":
                       f"{V2} is given up: installing it failed 3 times; it is not tried "
                       "again."}
    # From then on it is skipped, not downloaded again every hour.
    out = world.updater().run()
    assert out.result == "up-to-date" and "failed on this host before" in out.message
    actions = [e["action"] for e in AuditLog(world.host.audit_log).entries()]
    assert actions == ["update.failed", "update.given-up"], actions
    assert [e.version for e in boot.entries(world.esp)] == [V1] and not world.reboots


def test_a_repository_missing_payloads_does_not_count_against_the_release(
        world: World) -> None:
    world.publish(V2)
    kept = {f: f.read_bytes() for f in _v2_payloads(world)}
    for f in kept:  # a mirror half synced: 404 for the payloads
        f.unlink()
    for _ in range(4):
        with pytest.raises(UpdateError, match="HTTP 404"):
            world.updater().run()
    st = load_state(world.host)
    assert st.last["result"] == "failed" and st.install_failures == {} and V2 not in st.bad
    # Once the mirror has them, v2 installs.
    for f, data in kept.items():
        f.write_bytes(data)
    assert world.updater().run(reboot=False).result == "staged"


def test_a_failed_install_count_ends_when_the_release_installs(world: World) -> None:
    world.publish(V2)
    st = load_state(world.host)
    st.install_failures[V2] = 2
    save_state(world.host, st)
    assert world.updater().run(reboot=False).result == "staged"
    assert load_state(world.host).install_failures == {}
