"""Updates end to end: a host booted in QEMU updates itself from a TUF repository
served on the host's loopback, and falls back by itself from a broken release.

The machine keeps its disk across reboots (cerulean.testbed.machine); the guest
reaches the repository at 10.0.2.2 (QEMU's user network maps it to the host's
127.0.0.1). Credentials make the updater's timer fire quickly and copy the
agent's output to the console, where the test reads it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cerulean.cli import main
from cerulean.protocol.update import ReleaseDoc
from cerulean.release.publish import publish
from cerulean.release.repo import Repository, load_signer
from cerulean.release.serve import serving
from cerulean.testbed.console import ReadyReport
from cerulean.testbed.machine import Machine
from cerulean.testbed.qemu import QemuConfig

pytestmark = pytest.mark.vm

# The host runs the edge image (read-only root, no cloud-init: the quickest boot,
# which counts most on arm64, emulated and slowest of all).
BASE = "edge"
TIMEOUT = {"amd64": 900.0, "arm64": 2400.0}
# Scenario (d): CERULEAN_POWER_CUTS sets the number of cuts, CERULEAN_POWER_CUT_SEED
# makes their moments repeatable.
POWER_CUTS = int(os.environ.get("CERULEAN_POWER_CUTS", "20"))
VERITY_TYPES = {"77ff5f63-e7b6-4633-acf4-1565b864c0e6", "6e11a4e7-fbca-4ded-b9e9-e1a512bb664e"}
CONSOLE = "[Service]\nStandardOutput=journal+console\nStandardError=journal+console\n"


def credentials(url: str, first_check: int = 5) -> dict[str, str]:
    return {
        # Two tries for a new release (instead of 3) keep the failing boots of (e) short.
        "cerulean.update": f'url = "{url}"\nboot-tries = 2\n',
        # Check *first_check* s after the timer starts, then 10 s after each run, no
        # jitter. (An empty OnBootSec= would reset every monotonic setting, so the
        # drop-in sets them all.)
        "systemd.unit-dropin.cerulean-update.timer":
            f"[Timer]\nOnBootSec=\nOnActiveSec={first_check}s\nOnUnitInactiveSec=10s\n"
            "RandomizedDelaySec=0\n",
        "systemd.unit-dropin.cerulean-update.service": CONSOLE,
        "systemd.unit-dropin.cerulean-health.service": CONSOLE,
    }


@dataclass
class Releases:
    work: Path
    cache: Path
    out: Path
    repo: Repository
    arch: str

    @property
    def image(self) -> str:
        return f"upd-{BASE}"

    def definition(self, *, cmdline: tuple[str, ...] = (), variant: str = "") -> str:
        """The arch's base image under the test's name, trusting the test repository,
        with *cmdline* on its kernel command line (a *variant* is another file of it)."""
        text = (self.work / "images" / f"{BASE}.toml").read_text()
        text = text.replace("[image]\n", f'[image]\nname = "{self.image}"\n', 1)
        if cmdline:
            quoted = ", ".join(f'"{c}"' for c in cmdline)
            text = text.replace("[system]\n", f"[system]\nkernel-cmdline = [{quoted}]\n", 1)
        text += f'\n[update]\nroot = "{self.repo.meta / "1.root.json"}"\n'
        name = self.image + variant
        (self.work / "images" / f"{name}.toml").write_text(text)
        return f"images/{name}.toml"

    def build(self, definition: str, version: str, disk: bool = False) -> Path:
        old = Path.cwd()
        os.chdir(self.work)
        try:
            rc = main(["release", "build", definition, "--arch", self.arch, "--out",
                       str(self.out), "--version", version, "--level", "3", "--cache",
                       str(self.cache), *(["--disk", "raw"] if disk else [])])
        finally:
            os.chdir(old)
        assert rc == 0, f"building {definition} {version} failed"
        return self.out / self.image / version

    def publish(self, release: Path) -> None:
        publish(self.repo, release, "stable", [(0, 1.0)], level=3)

    def host_disk(self, release: Path, dest: Path) -> Path:
        """A copy of the release's disk, grown as a cloud grows a VM's disk."""
        shutil.copyfile(release / f"{self.image}-{self.arch}.raw", dest)
        subprocess.run(["qemu-img", "resize", "-q", "-f", "raw", str(dest), "2G"], check=True)
        return dest


def make_releases(vm_env: dict[str, Path], tmp_path: Path, arch: str) -> Releases:
    repo = Repository.create(tmp_path / "repo", tmp_path / "keys")
    return Releases(vm_env["work"], vm_env["cache"], tmp_path / "releases", repo, arch)


def version(n: int) -> str:
    return f"13.20261126.{n}"


def next_ready(m: Machine, version: str, timeout: float) -> ReadyReport:
    """READY reports until one from *version* (a failed release may print its own first)."""
    while True:
        r = m.ready(timeout)
        if r.get("version") == version:
            return r
        assert r.get("bless") != "good", f"{r.get('version')} was marked good: {r.values}"


def corrupt_hash_tree(disk: Path, slot: int) -> None:
    """Overwrite the hash tree (not the superblock) of slot *slot*'s verity partition."""
    out = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                         check=True).stdout
    table = json.loads(out)["partitiontable"]
    verity = sorted((p for p in table["partitions"] if p["type"].lower() in VERITY_TYPES),
                    key=lambda p: p["start"])
    start = verity[slot]["start"] * table.get("sectorsize", 512)
    with disk.open("r+b") as f:
        f.seek(start + 4096)
        f.write(random.Random(4).randbytes(256 * 1024))


class Served:
    """What the test's web server serves: a symlink switched between repository states."""

    def __init__(self, tmp: Path) -> None:
        self.link = tmp / "served"
        self.tmp = tmp

    def show(self, repo_dir: Path) -> None:
        new = self.tmp / ".served-new"
        new.unlink(missing_ok=True)
        new.symlink_to(repo_dir.resolve())
        os.replace(new, self.link)


def copy_repo(repo: Repository, dest: Path) -> Repository:
    shutil.copytree(repo.path, dest / "repo", symlinks=True)
    shutil.copytree(repo.keys, dest / "keys")
    return Repository(dest / "repo", dest / "keys")


def attack_variants(repo: Repository, image: str, v4: str, tmp: Path,
                    stolen: Path) -> dict[str, Path]:
    """Repository states an attacker (or a broken mirror) could serve, from the real one
    that has just published v4 with a rotated targets key (*stolen*: a copy of the old
    key, taken before the rotation destroyed it)."""
    tampered = copy_repo(repo, tmp / "tampered")
    doc = ReleaseDoc.from_json(json.loads(tampered.read_target(f"releases/{image}/{v4}/"
                                                               "release.json")))
    for ar in doc.arches.values():
        part = ar.parts["usr"]
        for p in [part.full, *(d.payload for d in part.deltas.values())]:
            f = tampered.target_file(p.path)
            data = bytearray(f.read_bytes())
            data[len(data) // 3] ^= 0x40
            f.write_bytes(bytes(data))
    expired = copy_repo(repo, tmp / "expired")
    expired.refresh(now=datetime.now(UTC).replace(microsecond=0) - timedelta(days=3))
    revoked = copy_repo(repo, tmp / "revoked")
    md = revoked.load("targets")
    md.signed.version += 1
    md.signed.expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    root = revoked.load("root").signed
    revoked._write("targets", md, [load_signer(stolen, "targets")])
    revoked._commit({r: revoked.signers(r, root) for r in ("snapshot", "timestamp")},
                    datetime.now(UTC).replace(microsecond=0), md.signed.version)
    return {"tampered": tampered.path, "expired": expired.path, "revoked": revoked.path}


def updates_and_falls_back(m: Machine, releases: Releases, r3: Path | None, v1: str,
                           v2: str, v3: str, timeout: float) -> tuple[ReadyReport, float]:
    """(a) v1 boots, finds v2, installs it into slot B and reboots into it; (b) with *r3*,
    v3 is installed, fails its health check, and the host comes back to v2 by itself and
    does not try v3 again. Returns v2's READY report and how long v2's apply took."""
    first = m.ready(timeout)
    assert (first.get("version"), first.get("slot"), first.get("bless")) == \
        (v1, "A", "good"), first.values
    assert first.failed_units == [] and first.get("verity") == "verified", first.values
    # The updater may start before the READY report is printed: the whole boot counts.
    m.mark(m.restart_pos)
    m.expect(rf"Installing {v2}", timeout)
    began = time.monotonic()
    m.expect(rf"Rebooting into {v2}", timeout)
    apply_s = time.monotonic() - began
    second = next_ready(m, v2, timeout)
    assert (second.get("slot"), second.get("verity"), second.get("bless")) == \
        ("B", "verified", "good"), second.values
    assert (second.get("root-options") or "").startswith("ro"), second.values
    # v1's updater wrote what it did to the audit trail (staged, rebooting) on /var.
    assert int(second.get("audit") or 0) >= 2, second.values
    if r3 is None:
        return second, apply_s

    releases.publish(r3)
    m.expect(rf"Rebooting into {v3}", timeout)
    m.expect(r"unhealthy: the updater \(cerulean-update.timer\) is not active", timeout)
    back = next_ready(m, v2, timeout)
    # "clean": v2's entry was marked good on its first boot and is not counted now.
    assert (back.get("slot"), back.get("bless")) == ("B", "clean"), back.values
    m.expect(rf"{v3} failed on this host before", timeout)
    assert m.text().count(f"]: Rebooting into {v3}") == 1, m.console_log
    return back, apply_s


def last_step(text: str) -> str:
    """What the host was doing at the end of *text* (console output since an apply began):
    the updater's last step, or booting the new release."""
    steps = [m for m in re.finditer(r"cerulean\[\d+\]: ([^\n]*)", text)
             if not m.group(1).startswith(("result:", "message:"))]
    if steps and "Linux version" in text[steps[-1].end():]:
        return "booting the new release"
    step = steps[-1].group(1).split(" (")[0] if steps else "Installing V"
    return re.sub(r"\d+\.\d{8}\.\d+", "V", step)[:40]


@dataclass
class Running:
    """The release a host runs, the slot it runs from, and the next version number."""

    version: str
    slot: str
    serial: int


def power_cuts(m: Machine, releases: Releases, good: str, running: Running, apply_s: float,
               timeout: float) -> tuple[Running, str]:
    """(d) The power is cut at a random moment of an apply, again and again: after every
    cut the host boots a good slot with verity, and carries on. Returns what the host
    runs and the newest release, which it has not installed yet (it is installing it,
    or will once it looks again)."""
    rng = random.Random(int(os.environ.get("CERULEAN_POWER_CUT_SEED", "0")) or None)
    target = version(running.serial)
    releases.publish(releases.build(good, target))
    cuts: list[str] = []
    # Stratified: cut i falls somewhere in the i-th of POWER_CUTS equal parts of the
    # span, the parts taken in a random order, so even two cuts hit both halves.
    strata = list(range(POWER_CUTS))
    rng.shuffle(strata)
    m.mark()
    for trial, stratum in enumerate(strata):
        # After a cut, the whole boot counts: the updater may start installing before
        # the READY report is printed.
        if trial:
            m.mark(m.restart_pos)
        m.expect(rf"Installing {target}", timeout)
        began = time.monotonic()
        # Anywhere in the apply, and a little past its end: cuts while the host reboots
        # into the new release count too. The apply's length is measured again whenever
        # one runs to its end before the cut.
        at = (stratum + rng.random()) / POWER_CUTS * 1.15 * apply_s
        step_pos = m.mark()
        if m.wait_for(rf"Rebooting into {target}", at) is not None:
            apply_s = time.monotonic() - began
        time.sleep(max(0.0, began + at - time.monotonic()))
        m.kill()
        step = last_step(m.text(step_pos))
        m.start()
        r = m.ready(timeout)
        where = f"cut {trial + 1}, {at:.1f} s into an apply ({step})"
        assert r.get("version") in (running.version, target), f"{where}: {r.values}"
        assert r.get("verity") == "verified" and r.failed_units == [], f"{where}: {r.values}"
        cuts.append(f"{at:5.1f} s  {step:40}  -> {r.get('version')}")
        if r.get("version") == target:
            # The cut came after the new boot entry was in place: the host runs the new
            # release, so the next cut (or what follows) needs a newer one.
            running = Running(target, r.get("slot") or "", running.serial + 1)
            target = version(running.serial)
            releases.publish(releases.build(good, target))
        else:
            running = Running(running.version, r.get("slot") or running.slot, running.serial)
    print(f"power cuts (last apply {apply_s:.0f} s): moment, last step seen, booted")
    print("\n".join(cuts))
    return running, target


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_host_updates_itself_and_falls_back_from_a_broken_release(
        vm_env: dict[str, Path], tmp_path: Path, arch: str) -> None:
    """(a) on both architectures, (b) on arm64; on amd64 then (d) power cuts during
    applies, (c) what an attacker serves is refused, (e) a release whose hash tree is
    corrupted on disk fails its tries and the host falls back."""
    releases = make_releases(vm_env, tmp_path, arch)
    good = releases.definition()
    # v3 is broken the way a bad release can be: its updater never starts, so the
    # health check fails.
    broken = releases.definition(cmdline=("systemd.mask=cerulean-update.timer",),
                                 variant="-broken")
    v1, v2, v3 = (version(n) for n in range(1, 4))
    r1 = releases.build(good, v1, disk=True)
    r2 = releases.build(good, v2)
    # (b) on arm64; amd64 checks falling back through (e), which fails a release's boots.
    r3 = releases.build(broken, v3) if arch == "arm64" else None
    repo = releases.repo
    releases.publish(r1)
    releases.publish(r2)
    old_state = copy_repo(repo, tmp_path / "old-state")  # for the rollback attack
    disk = releases.host_disk(r1, tmp_path / "host.raw")
    timeout = TIMEOUT[arch]
    served = Served(tmp_path)
    served.show(repo.path)
    with serving(served.link) as url:
        port = url.rsplit(":", 1)[1]
        m = Machine(disk, tmp_path / "machine", QemuConfig(arch=arch),
                    credentials(f"http://10.0.2.2:{port}"))
        with m:
            m.start()
            at_v2, apply_s = updates_and_falls_back(m, releases, r3, v1, v2, v3, timeout)
            if arch != "amd64":
                return  # (c), (d) and (e) check the updater's logic, the same on every arch

            running, pending = power_cuts(
                m, releases, good, Running(v2, at_v2.get("slot") or "B", 3), apply_s, timeout)

            # (e) The host installs the newest release by itself; its hash tree is then
            # corrupted on disk before it boots: its boots fail (the initrd reboots), and
            # after its two tries the host is back on the release it ran.
            m.mark(m.restart_pos)  # since the last power-on: it may be done already
            m.expect(rf"Rebooting into {pending}", timeout)
            m.kill()
            corrupt_hash_tree(disk, 1 if running.slot == "A" else 0)  # the other slot
            m.start()
            back = next_ready(m, running.version, 3 * timeout)
            assert (back.get("slot"), back.get("bless")) == (running.slot, "clean"), \
                back.values
            since_restart = m.text(m.restart_pos)
            assert since_restart.count("Linux version") >= 3, f"{pending} was not tried twice"
            assert f"version={pending}" not in since_restart
            # The updater may say so before the READY report (the agent's boot ends later).
            m.mark(m.restart_pos)
            m.expect(rf"{pending} was given up", timeout)

            # (c) What an attacker or a broken mirror serves is refused, the host stays.
            # It has given the pending release up, so the repository as it is offers it
            # nothing; vn comes with a rotated targets key.
            vn = version(running.serial + 1)
            rn = releases.build(good, vn)
            served.show(copy_repo(repo, tmp_path / "frozen").path)
            stolen = tmp_path / "stolen-targets.pem"
            shutil.copyfile(next(repo.keys.glob("targets-*.pem")), stolen)
            repo.rotate_key("targets")
            releases.publish(rn)
            attacks = attack_variants(repo, releases.image, vn, tmp_path / "attacks", stolen)
            attacks["rollback"] = old_state.path
            # The real repository moves past every version the attacks showed the host.
            repo.refresh(all_roles=True)
            repo.refresh(all_roles=True)
            # Each pattern is the run's final error: the tampered repository's delta is
            # refused first, then its full payload (switching the served state before
            # that would let the run fetch the genuine file).
            refusals = {
                "tampered": r"error: [^\n]*does not match its signed length and hash",
                "expired": r"metadata has expired",
                "rollback": r"older metadata than this host already trusts",
                "revoked": r"not signed by the keys this host trusts",
            }
            for name, pattern in refusals.items():
                served.show(attacks[name])
                m.mark()
                m.expect(pattern, 300)
            assert f"Rebooting into {vn}" not in m.text(), "an attack got through"
