"""The publisher's container image (images/publisher.toml): Cerulean inside an image
Cerulean built, doing real work against the real archive.

The whole publisher loop runs in this container in tests/vm/test_publisher_loop.py;
here the image itself is checked: what it holds, what its SBOM says, and that the
tool inside it resolves and locks a definition exactly as the host's does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import cerulean
from cerulean.build.cerulean_deb import PYSAT_VERSION
from cerulean.debian.archive import host_mirrors
from cerulean.debian.lock import read_lock
from support import container

pytestmark = pytest.mark.integration

RunCli = Callable[..., int]


@pytest.fixture(scope="module")
def rootfs(images: Path, cache_dir: Path, run_cli: RunCli, root_user: None,
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("publisher-image")
    assert run_cli("build", images / "publisher.toml", "--arch", "amd64", "--out", out,
                   "--cache", cache_dir) == 0
    return container.unpack(out / "publisher.oci", "latest-amd64", out / "bundle")


def inside(rootfs: Path, *argv: str, shared: tuple[Path, ...] = ()) -> str:
    mirror, security = host_mirrors()
    env = {k: v for k, v in (("CERULEAN_MIRROR", os.environ.get("CERULEAN_MIRROR") or mirror),
                             ("CERULEAN_SECURITY_MIRROR", security)) if v}
    r = subprocess.run(container.command(rootfs, argv, shared=shared, env=env),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{argv} failed in the container:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_the_image_runs_the_publisher_and_names_what_it_holds(rootfs: Path) -> None:
    assert inside(rootfs, "cerulean", "--version").split()[-1] == cerulean.__version__
    assert "run until stopped" in inside(rootfs, "cerulean", "publisher", "--help")
    # The built-in definitions ship with it (the tools tree of system builds needs them).
    assert "tools" in inside(rootfs, "cerulean", "images")
    solved = inside(rootfs, "python3", "-c", "from pysat.solvers import Solver\n"
                    "with Solver(name='minisat22', bootstrap_with=[[1, 2], [-1]]) as s:\n"
                    "    print(s.solve(), s.get_model())")
    assert solved.split() == ["True", "[-1,", "2]"]
    sbom = json.loads((rootfs.parents[1] / "publisher.amd64.cdx.json").read_text())
    purls = {c["name"]: c.get("purl", "") for c in sbom["components"]}
    assert purls["python3-pysat"] == f"pkg:pypi/python-sat@{PYSAT_VERSION}"
    assert purls["cerulean"].startswith(f"pkg:generic/cerulean@{cerulean.__version__}")
    assert purls["gpgv"].startswith("pkg:deb/debian/gpgv@")


def test_the_container_locks_as_the_host_does(rootfs: Path, images: Path, cache_dir: Path,
                                              run_cli: RunCli, tmp_path: Path) -> None:
    defs = tmp_path / "defs"
    defs.mkdir()
    for where in ("host", "container"):
        shutil.copy(images / "static.toml", defs / f"{where}.toml")
    inside(rootfs, "cerulean", "lock", str(defs / "container.toml"), "--cache",
           str(cache_dir), shared=(defs, cache_dir))
    assert run_cli("lock", defs / "host.toml", "--cache", cache_dir) == 0
    host, ours = read_lock(defs / "host.lock"), read_lock(defs / "container.lock")
    assert ours.packages["amd64"], "the container's lock is empty"
    if ours.snapshot == host.snapshot:  # the archive did not move in between
        assert ours.packages == host.packages
