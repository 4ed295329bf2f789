"""A program run from memory (memfd) is its own case, not "a deleted file"."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cerulean.agent import sensors
from cerulean.agent.detect import load_rule_files, match

SHIPPED = Path(sensors.__file__).parent / "data/rules.d"


def _proc(root: Path, pid: str, exe: str) -> None:
    d = root / "proc" / pid
    d.mkdir(parents=True)
    os.symlink(exe, d / "exe")
    (d / "cmdline").write_bytes(b"payload\0")
    (d / "comm").write_text("payload\n")
    (d / "status").write_text("Name:\tpayload\nUid:\t1000\t1000\t1000\t1000\n")


def test_a_memfd_program_is_not_a_deleted_file(tmp_path: Path) -> None:
    _proc(tmp_path, "77", "/memfd:payload (deleted)")
    _proc(tmp_path, "78", "/tmp/gone (deleted)")
    procs = {p["proc.pid"]: p for p in sensors.processes(tmp_path)}
    mem, gone = procs[77], procs[78]
    assert (mem["proc.exe"], mem["proc.exe_memfd"], mem["proc.exe_deleted"]) == \
        ("/memfd:payload", True, False)
    assert (gone["proc.exe_memfd"], gone["proc.exe_deleted"]) == (False, True)
    rules = load_rule_files([SHIPPED])
    assert {a.rule for a in match(rules, "process", mem, 0.0)} == {"program-from-memory"}
    assert "program-from-deleted-file" in {a.rule for a in match(rules, "process", gone, 0.0)}


@pytest.mark.skipif(not hasattr(os, "memfd_create") or shutil.which("sleep") is None,
                    reason="needs memfd_create and sleep")
def test_a_real_program_run_from_a_memfd() -> None:
    fd = os.memfd_create("payload", 0)
    with open(shutil.which("sleep") or "", "rb") as f:
        os.write(fd, f.read())
    child = subprocess.Popen([f"/proc/self/fd/{fd}", "30"], pass_fds=(fd,))
    try:
        os.close(fd)
        for _ in range(50):  # until the exec is done
            if os.readlink(f"/proc/{child.pid}/exe").startswith("/memfd:"):
                break
            time.sleep(0.05)
        p = next(p for p in sensors.processes() if p["proc.pid"] == child.pid)
        assert p["proc.exe"] == "/memfd:payload"
        assert p["proc.exe_memfd"] is True and p["proc.exe_deleted"] is False
    finally:
        child.kill()
        child.wait()
