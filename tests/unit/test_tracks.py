"""The suite's two tracks really run on one worker each (tests/conftest.py + xdist)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RECORD = '''
import os


def rec(name):
    with open(os.environ["TRACK_LOG"], "a") as f:
        f.write(f"{os.environ['PYTEST_XDIST_WORKER']} {name}\\n")
'''
UPDATES = '''
import time
import pytest
from record import rec


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_host_updates_itself_and_falls_back_from_a_broken_release(arch):
    rec(arch)
    time.sleep(1)
'''
IMAGES = '''
import pytest
from record import rec


@pytest.mark.parametrize("name", ["container-host", "metal"])
def test_builtin_system_image_boots(name):
    rec(name)


def test_inside_the_booted_vm():
    rec("inside")


def test_usr_slot_too_small_fails_cleanly():
    rec("slot")


@pytest.mark.parametrize("fmt", ["vhd", "raw"])
def test_disk_formats(fmt):
    rec(fmt)
'''
UNIT = '''
import pytest
from record import rec


@pytest.mark.parametrize("i", range(4))
def test_u(i):
    rec(f"unit{i}")
'''


def test_each_track_runs_on_one_worker(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    (tests / "vm").mkdir(parents=True)
    (tests / "unit").mkdir()
    shutil.copy(ROOT / "tests/conftest.py", tests / "conftest.py")
    for d in (tests / "vm", tests / "unit"):
        (d / "record.py").write_text(RECORD)
    (tests / "vm/test_updates.py").write_text(UPDATES)
    (tests / "vm/test_system_images.py").write_text(IMAGES)
    (tests / "unit/test_u.py").write_text(UNIT)
    log = tmp_path / "log"
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2",
                        "--dist", "loadgroup", "--no-loadscope-reorder", "-q", "tests",
                        "--rootdir", str(tmp_path), "--basetemp", str(tmp_path / "basetemp")],
                       cwd=tmp_path, capture_output=True, text=True, check=False,
                       env={"PATH": "/usr/bin:/bin", "TRACK_LOG": str(log)})
    assert r.returncode == 0, r.stdout + r.stderr
    worker = dict(reversed(line.split()) for line in log.read_text().splitlines())
    one = {worker[n] for n in ("arm64", "inside")}
    two = {worker[n] for n in ("amd64", "container-host", "metal", "slot", "vhd", "raw")}
    assert len(one) == 1 and len(two) == 1 and one != two, worker
