"""The cerulean-agent .deb on plain Debian servers (12 and 13), as an operator installs it:
apt installs its dependencies, then the host agent's commands work there."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cerulean.build import agent
from cerulean.debian.archive import default_archive

pytestmark = pytest.mark.integration


@pytest.fixture(params=["bookworm", "trixie"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A minimal Debian system of that release with the agent installed by apt, and /proc
    mounted in it."""
    if shutil.which("mmdebstrap") is None:
        pytest.fail("mmdebstrap is missing: make test installs it")
    root = tmp_path / "root"
    deb = agent.build_deb(tmp_path / "deb")
    shutil.copy(deb.path, tmp_path / "cerulean-agent.deb")
    mirror = default_archive().mirror
    r = subprocess.run(
        ["mmdebstrap", "--variant=minbase", "--mode=root", "--quiet",
         "--skip=cleanup/apt/lists",  # so that apt can install the dependencies
         "--include=ca-certificates", request.param, str(root), mirror],
        capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    (root / "tmp/cerulean-agent.deb").write_bytes((tmp_path / "cerulean-agent.deb").read_bytes())
    (root / "proc").mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        install = chroot(root, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
                         "/tmp/cerulean-agent.deb")
        assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)


def chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True,
                          check=False, timeout=600,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                               "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"})


def test_the_agent_works_on_a_plain_debian_server(server: Path) -> None:
    # Policies: both shipped profiles run; the CIS profile scores the plain system.
    listing = chroot(server, "cerulean", "policy", "list")
    assert listing.returncode == 0 and "cis-debian-l1-server" in listing.stdout, listing
    cis = chroot(server, "cerulean", "policy", "check", "-p", "cis-debian-l1-server", "--json")
    assert cis.returncode == 2, cis.stderr
    report = json.loads(cis.stdout)
    assert report["passed"] > 0 and report["failed"] > 0, report
    fixed = chroot(server, "cerulean", "policy", "fix", "-p", "cis-debian-l1-server",
                   "--check", "5.4.1.5-inactive-lock")
    assert "fixed 5.4.1.5-inactive-lock: run useradd -D -f 45" in fixed.stdout, fixed
    # Integrity: no image manifest here, so the first scan is the baseline, and says so.
    first = chroot(server, "cerulean", "integrity", "check", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["baseline"] == "first scan"
    (server / "etc/debian_version").write_text("changed\n")
    second = json.loads(chroot(server, "cerulean", "integrity", "check", "--json").stdout)
    assert [(c["path"], c["what"]) for c in second["changes"]] == [
        ("/etc/debian_version", ["content"])]
    assert second["changes"][0]["package"] == "base-files"
    # The audit trail has the policy fix, and is intact; metrics read this system.
    verify = chroot(server, "cerulean", "audit", "verify")
    assert verify.returncode == 0 and "intact: 1 entry," in verify.stdout, verify
    metrics = chroot(server, "cerulean", "agent", "metrics")
    assert metrics.returncode == 0 and "node_memory_MemTotal_bytes" in metrics.stdout
    assert 'cerulean_policy_checks{policy="cis-debian-l1-server",result="passed"}' in \
        metrics.stdout
    # Updates are for Cerulean's A/B disks: here the updater refuses in one sentence.
    update = chroot(server, "cerulean", "update", "check")
    assert update.returncode == 1 and update.stderr == (
        "error: This host is not a Cerulean system image (its os-release has no "
        "IMAGE_VERSION): the agent reports here, it does not update.\n"), update
