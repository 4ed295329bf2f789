"""Real boots in QEMU: a timeout leaves nothing running (healthy boots: test_system_images).

The disk is the amd64 `vm` image built by the session fixture (or
CERULEAN_TEST_DISK if set). """

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cerulean.testbed import checks
from cerulean.testbed.checks import Outcome
from cerulean.testbed.qemu import QemuConfig, run_test

pytestmark = pytest.mark.vm

@pytest.fixture(scope="module")
def disk(build_system: Callable[[str, str], Path]) -> Path:
    env = os.environ.get("CERULEAN_TEST_DISK")
    return Path(env) if env else build_system("vm", "amd64")


def test_timeout_stops_qemu(disk: Path, tmp_path: Path) -> None:
    res = run_test(disk, QemuConfig(), timeout_s=5, log_dir=tmp_path)
    assert not res.passed
    assert res.outcome is Outcome.TIMEOUT
    assert "timed out" in res.check(checks.NO_TIMEOUT).detail
    assert res.elapsed_s < 30
    # QEMU was stopped and reaped: its exit status is known and its pid is gone.
    assert res.qemu_returncode is not None
    assert not Path(f"/proc/{res.qemu_pid}").exists()
    assert res.console_log.exists()
