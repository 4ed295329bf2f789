"""The cerulean-agent .deb (cerulean.build.agent): what dpkg sees in it."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from cerulean.build import agent


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> agent.AgentDeb:
    return agent.build_deb(tmp_path_factory.mktemp("deb"))


def test_dpkg_reads_the_package(deb: agent.AgentDeb) -> None:
    info = subprocess.run(["dpkg-deb", "--field", str(deb.path)], capture_output=True,
                          text=True, check=True).stdout
    fields = dict(line.split(": ", 1) for line in info.splitlines() if ": " in line)
    assert fields["Package"] == "cerulean-agent" and fields["Architecture"] == "all"
    assert fields["Version"] == deb.version and deb.path.name.endswith(f"_{deb.version}_all.deb")
    assert fields["Depends"] == "python3 (>= 3.11), python3-yaml"
    assert fields["Recommends"] == "python3-tuf, python3-cryptography, zstd, fdisk"
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb.path)], capture_output=True,
                             text=True, check=True).stdout
    paths = {line.split()[-1].removeprefix(".") for line in listing.splitlines()}
    for unit in agent.UNITS:
        assert f"/usr/lib/systemd/system/{unit}" in paths
    assert {"/usr/bin/cerulean", f"/{agent.PY_DEST}/agent/audit.py",
            f"/{agent.PY_DEST}/agent/daemon.py", f"/{agent.PY_DEST}/protocol/update.py"} <= paths
    # Only the host side: nothing of the build, release or fleet code.
    assert not any(f"/{agent.PY_DEST}/{part}/" in p for p in paths
                   for part in ("build", "release", "debian", "testbed", "cli"))
    assert all(line.split()[1] == "root/root" for line in listing.splitlines())


def test_md5sums_match_and_builds_are_identical(deb: agent.AgentDeb, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "--raw-extract", str(deb.path), str(tree)], check=True)
    sums = (tree / "DEBIAN/md5sums").read_text().splitlines()
    assert len(sums) == len(agent.contents())
    for line in sums:
        digest, path = line.split("  ", 1)
        assert hashlib.md5((tree / path).read_bytes()).hexdigest() == digest, path
    again = agent.build_deb(tmp_path / "again")
    assert again.path.read_bytes() == deb.path.read_bytes()


def test_cli_writes_the_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cerulean.cli import main

    assert main(["agent-deb", "--out", str(tmp_path / "out")]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.parent == tmp_path / "out"
    assert path.name == f"cerulean-agent_{agent.version()}_all.deb"
    assert path.read_bytes().startswith(b"!<arch>\n")
