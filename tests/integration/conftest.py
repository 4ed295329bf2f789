"""Integration fixtures: real archive, real tools, one shared download cache.

Image definitions are copied into a temporary directory and locked afresh, so
the tests follow the archive as it moves instead of depending on committed
locks whose package versions the archive may since have dropped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cerulean.cli import main

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

RunCli = Callable[..., int]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for p in (ROOT / "images").glob("*.toml"):
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="session")
def run_cli() -> RunCli:
    def run(*args: str | Path) -> int:
        return main([str(a) for a in args])

    return run


@pytest.fixture(scope="session")
def python_build(images: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                 run_cli: RunCli) -> Path:
    out = tmp_path_factory.mktemp("out-python")
    rc = run_cli("build", images / "python.toml", "--arch", "amd64,arm64", "--out", out,
                 "--cache", cache_dir)
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def binfmt_aarch64() -> None:
    """Make arm64 binaries runnable through qemu-user-static (as root)."""
    node = Path("/proc/sys/fs/binfmt_misc")
    if not (node / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(node)], check=True)
    if not (node / "qemu-aarch64").exists():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=True)
    state = (node / "qemu-aarch64").read_text()
    assert state.startswith("enabled"), state


@pytest.fixture(scope="session")
def root_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, umoci unpack)")
    for tool in ("skopeo", "umoci"):
        assert shutil.which(tool), f"{tool} is not installed (make test installs it)"
