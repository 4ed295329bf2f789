"""The whole loop, in QEMU: a Debian security fix reaches a fleet host with nobody in it.

A local, signed archive on loopback stands in for trixie-security
(tests/support/security_archive.py: a copy of the real suite, signed with a
test key the image's definition trusts beside Debian's). A `vm` host, booted
from the first release and enrolled in a fleet server on this machine, updates
from a repository the publisher service writes and this machine serves. The
publisher runs as the container `cerulean build images/publisher.toml` makes,
started as a privileged container runtime would (tests/support/container.py).

Once the host is up and in the fleet, the test adds a fixed version of a
package the image holds, with a changelog entry naming a CVE, to the archive.
From then on it types no command: it only watches. The running publisher
notices the new InRelease, refreshes the lock, builds, signs and publishes
the release; the host takes it in its wave, reboots into it and reports the
new version; the fleet shows the host updated and the CVE fixed on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cerulean.cli import main
from cerulean.debian.archive import host_mirrors
from cerulean.debian.cache import Cache
from cerulean.debian.lock import read_lock
from cerulean.release.publish import publish
from cerulean.release.repo import Repository
from cerulean.release.serve import serving
from cerulean.testbed.machine import Machine
from cerulean.testbed.qemu import QemuConfig
from support import container
from support.fleet_server import Fleet, launch
from support.loopback import no_proxy
from support.openpgp import make_keys, stop_agent
from support.security_archive import SecurityArchive

pytestmark = pytest.mark.vm

ARCH = "amd64"
PACKAGE = "less"  # in the vm image; nothing there pins its version
CVE = "CVE-2026-99999"
TIMEOUT = 900.0
CONSOLE = "[Service]\nStandardOutput=journal+console\nStandardError=journal+console\n"


@pytest.fixture
def publisher_proc() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        container.stop(p)


def wait(what: str, check: Any, timeout: float, every: float = 2.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def fleet_host(fleet: Fleet) -> dict[str, Any] | None:
    _, page = fleet.api("GET", "/api/v1/hosts?group=edge-sites")
    if not page or page.get("total") != 1:
        return None
    _, h = fleet.api("GET", f"/api/v1/hosts/{page['hosts'][0]['id']}")
    return h if isinstance(h, dict) else None


def publisher_state(work: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((work / "state.json").read_bytes()))
    except (OSError, ValueError):
        return {}


def test_a_security_fix_reaches_a_fleet_host_with_nobody_in_the_loop(
        vm_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        publisher_proc: list[subprocess.Popen[bytes]]) -> None:
    if shutil.which("gpg") is None:
        pytest.skip("gpg is needed to sign the local archive (make test installs gnupg)")
    no_proxy(monkeypatch)  # the archive, the repository and the fleet are on loopback
    keys = make_keys(tmp_path / "gnupg")
    cache = Cache(vm_env["cache"])
    try:
        # Both architectures: the lock resolves every architecture of the image.
        with SecurityArchive(tmp_path / "security", keys, cache=cache,
                             arches=("amd64", "arm64")) as archive:
            loop(vm_env, tmp_path, cache, archive, publisher_proc)
    finally:
        stop_agent(keys.home)


def loop(vm_env: dict[str, Path], tmp: Path, cache: Cache, archive: SecurityArchive,
         procs: list[subprocess.Popen[bytes]]) -> None:
    work = vm_env["work"]
    repo = Repository.create(tmp / "repo", tmp / "keys")
    # The publisher's image: vm, its security suite from the local archive, trusting the
    # test repository. Its lock is written beside it.
    pub = tmp / "publisher"
    (pub / "images").mkdir(parents=True)
    defn = pub / "images" / "vm.toml"
    defn.write_text((work / "images" / "vm.toml").read_text()
                    + f'\n[archive]\nsecurity-mirror = "{archive.url}"\n'
                      f'keyring = "{archive.keyring}"\n'
                      f'\n[update]\nroot = "{repo.meta / "1.root.json"}"\n')

    # The operator's first release, with a disk to install the host from.
    old = Path.cwd()
    os.chdir(work)  # images/tools.toml is found through ./images, as in a checkout
    try:
        assert main(["release", "build", str(defn), "--arch", ARCH, "--out", str(tmp / "first"),
                     "--disk", "raw", "--level", "3", "--cache", str(cache.root)]) == 0
    finally:
        os.chdir(old)
    (v1,) = [p.name for p in (tmp / "first" / "vm").iterdir() if not p.name.startswith(".")]
    publish(repo, tmp / "first" / "vm" / v1, "stable", [(0, 1.0)], level=3)
    # The publisher's container, from the checkout's definition (locked afresh, as the
    # archive moves).
    assert main(["build", str(work / "images" / "publisher.toml"), "--arch", ARCH,
                 "--out", str(tmp / "publisher-image"), "--cache", str(cache.root)]) == 0
    rootfs = container.unpack(tmp / "publisher-image" / "publisher.oci", f"latest-{ARCH}",
                              tmp / "publisher-bundle")
    disk = tmp / "host.raw"
    shutil.copyfile(tmp / "first" / "vm" / v1 / f"vm-{ARCH}.raw", disk)
    subprocess.run(["qemu-img", "resize", "-q", "-f", "raw", str(disk), "4G"], check=True)

    fleet = launch(tmp, names=("localhost", "10.0.2.2"), public_url=False,
                   init_args=("--update-repo", str(repo.path),
                              "--update-root", str(repo.meta / "1.root.json")))
    try:
        with serving(repo.path) as url:
            port = url.rsplit(":", 1)[1]
            # The publisher service, in its container: a round every 10 s.
            config = pub / "publisher.toml"
            config.write_text(
                f'repo = "{repo.path}"\nkeys = "{repo.keys}"\nwork = "{pub / "work"}"\n'
                f'cache = "{cache.root}"\npoll = "10s"\nlevel = 3\n'
                f'[[image]]\ndefinition = "{defn}"\narches = ["{ARCH}"]\n'
                'channels = { stable = "now" }\n')
            mirror, security = host_mirrors()
            env = {k: v for k, v in (("CERULEAN_MIRROR", os.environ.get("CERULEAN_MIRROR")
                                      or mirror),
                                     ("CERULEAN_SECURITY_MIRROR", security)) if v}
            argv = container.command(
                rootfs, ["cerulean", "publisher", "run", "--config", str(config)],
                shared=[tmp, work, cache.root], env=env, cwd=work)
            with open(tmp / "publisher.log", "ab") as log:
                procs.append(container.start(argv, log))
            # Its first round takes the repository's release as the published one.
            wait("the publisher's first round",
                 lambda: publisher_state(pub / "work").get("images", {}).get("vm", {})
                 .get("version") == v1, 600)

            token = fleet.enrollment_token("edge-sites", uses=1, environment="cloud")
            enroll = json.dumps({"server": f"https://10.0.2.2:{fleet.url.rsplit(':', 1)[1]}",
                                 "token": token, "ca-sha256": fleet.ca_sha256})
            m = Machine(disk, tmp / "machine", QemuConfig(arch=ARCH), {
                "cerulean.update": f'url = "http://10.0.2.2:{port}"\n',
                "cerulean.fleet": enroll,
                "systemd.unit-dropin.cerulean-update.timer":
                    "[Timer]\nOnBootSec=\nOnActiveSec=5s\nOnUnitInactiveSec=10s\n"
                    "RandomizedDelaySec=0\n",
                "systemd.unit-dropin.cerulean-update.service": CONSOLE,
            })
            with m:
                m.start()
                first = m.ready(TIMEOUT)
                assert (first.get("version"), first.get("bless")) == (v1, "good"), \
                    first.values
                h = wait("the host in the fleet", lambda: (
                    (x := fleet_host(fleet)) and x["update"].get("version") == v1 and x), 300)

                # The archive changes. From here on the test only watches.
                lock = read_lock(defn.with_suffix(".lock"))
                fix = archive.add_fix(PACKAGE, (ARCH,), CVE, lock=lock)
                changed = time.monotonic()
                m.mark()
                installing = m.expect(r"Installing (\d+\.\d{8}\.\d+)", TIMEOUT)
                v2 = installing.group(1)
                installing_s = time.monotonic() - changed
                m.expect(rf"Rebooting into {v2}", TIMEOUT)
                while (r := m.ready(TIMEOUT)).get("version") != v2:
                    assert r.get("bless") != "good", r.values
                assert (r.get("bless"), r.get("verity")) == ("good", "verified"), r.values
                booted_s = time.monotonic() - changed
                h = wait("the fleet to show the new release", lambda: (
                    (x := fleet_host(fleet)) and x["update"].get("version") == v2 and x), 600)
                reported_s = time.monotonic() - changed

        # The fleet: the host runs the new release, which fixes the CVE, with the fixed
        # package.
        assert h["release_cves"] == [CVE], h
        _, pkgs = fleet.api("GET", f"/api/v1/hosts/{h['id']}/packages")
        assert {p["name"]: p["version"] for p in pkgs}[PACKAGE] == fix.version
        _, rel = fleet.api("GET", "/api/v1/releases")
        assert [(r["version"], r["cves"]) for r in rel if r["version"] == v2] == [(v2, [CVE])]
    finally:
        fleet.stop()

    # The publisher: what it did, in its audit trail, and how long the fix took.
    st = publisher_state(pub / "work")
    entry = st["published"][-1]
    assert (entry["version"], entry["channel"], entry["cves"]) == (v2, "stable", [CVE]), st
    assert main(["publisher", "audit", "--config", str(config)]) == 0
    print(f"{PACKAGE} {fix.version} ({CVE}) in {v2}: published "
          f"{entry['fix_to_release_seconds']} s after the new InRelease's date; after the "
          f"archive changed, the host was installing it at {installing_s:.0f} s, booted it "
          f"at {booted_s:.0f} s, and the fleet showed it at {reported_s:.0f} s")

