"""VM fixtures: system images built from the real archive, once per test session.

Definitions are copied into a temporary directory and locked afresh (the
archive moves on; committed locks may name versions it has dropped). The
cache is the run's own, as on a fresh CI machine; with pytest-xdist the workers
share it (downloads, the tools tree, composed trees, initrds), and a worker that
needs a tree another is composing waits for it. CERULEAN_VM_CACHE names a cache
to use instead (a warm one, to try one test by hand).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cerulean.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def vm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if os.geteuid() != 0:
        pytest.skip("building system images needs root")
    for tool in ("qemu-img", "qemu-system-x86_64", "qemu-system-aarch64"):
        assert shutil.which(tool), f"{tool} is not installed (make test installs it)"
    work = tmp_path_factory.mktemp("vm-work")
    (work / "images").mkdir()
    for p in (ROOT / "images").glob("*.toml"):
        shutil.copy(p, work / "images" / p.name)
    if os.environ.get("CERULEAN_VM_CACHE"):
        cache = Path(os.environ["CERULEAN_VM_CACHE"])
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        # The workers' base directories are popen-gwN inside this run's own directory.
        cache = tmp_path_factory.getbasetemp().parent / "vm-cache"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("vm-cache")
    return {"work": work, "cache": cache,
            "out": tmp_path_factory.mktemp("vm-out")}


BuildVm = Callable[[str, str], Path]


@pytest.fixture(scope="session")
def build_system(vm_env: dict[str, Path]) -> BuildVm:
    built: dict[tuple[str, str], Path] = {}

    def build(name: str, arch: str) -> Path:
        if (name, arch) not in built:
            old = Path.cwd()
            # images/tools.toml is found through ./images, as in a checkout.
            os.chdir(vm_env["work"])
            try:
                rc = main(["build", f"images/{name}.toml", "--arch", arch, "--format", "qcow2",
                           "--out", str(vm_env["out"]), "--cache", str(vm_env["cache"])])
            finally:
                os.chdir(old)
            assert rc == 0, f"building {name} for {arch} failed"
            built[(name, arch)] = vm_env["out"] / f"{name}-{arch}.qcow2"
        return built[(name, arch)]

    return build

