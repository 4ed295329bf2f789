"""Real boots in QEMU: a timeout leaves nothing running and says where the guest stopped
(healthy boots: test_system_images).

The disk is the amd64 `vm` image built by the session fixture (or
CERULEAN_TEST_DISK if set). """

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cerulean.errors import CeruleanError
from cerulean.testbed import checks
from cerulean.testbed.checks import Outcome
from cerulean.testbed.machine import Machine
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


def test_a_machine_that_stops_printing_says_where_its_vcpu_is(tmp_path: Path) -> None:
    """A wait that times out quotes the console's last lines and asks QEMU's monitor where
    the vCPU is: here the firmware, which found nothing to boot and sits in its shell."""
    blank = tmp_path / "blank.raw"
    with blank.open("wb") as f:
        f.truncate(64 << 20)
    esp = "start=2048, size=100000, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
    subprocess.run(["sfdisk", "-q", str(blank)], input=f"label: gpt\n{esp}", text=True,
                   check=True)
    with Machine(blank, tmp_path / "machine", QemuConfig(arch="amd64")) as m:
        m.start()
        m.expect(r"Shell>", 300)
        m.mark(m.restart_pos)
        with pytest.raises(CeruleanError) as e:
            m.expect(r"Linux version", 1)
    msg = str(e.value)
    assert "did not show on the console within 1 s" in msg, msg
    assert "the vCPU is at RIP=" in msg and "in the firmware" in msg, msg
    assert "| Shell>" in msg, msg
    assert "RIP=" in (tmp_path / "machine" / "registers.txt").read_text()
