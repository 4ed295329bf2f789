"""What the agent gives up once its marks are set (cerulean.agent.confine), checked in a
child process: a seccomp filter cannot be taken back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r'''
import ctypes, errno, json, os, resource, subprocess, sys, threading, time
sys.path.insert(0, sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))  # room above it
from cerulean.agent import confine, watch
root = sys.argv[2]
libc = watch.load_libc()
marks = watch.FsMarks([root])
if not marks.groups:
    print(json.dumps({"skip": marks.failed})); sys.exit(0)
# a handle of root, made before: what the marks decode
handle = ctypes.create_string_buffer(8 + 128)
ctypes.memmove(handle, (128).to_bytes(4, "little"), 4)
mnt = ctypes.c_int()
assert libc.name_to_handle_at(-100, root.encode(), handle, ctypes.byref(mnt), 0) == 0
size = 8 + int.from_bytes(handle.raw[:4], "little")
h = handle.raw[:size]
other = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
seen = {}
threading.Thread(target=lambda: seen.setdefault("thread_cap", open(
    "/proc/thread-self/status").read()), daemon=True)
confine.confine(marks)
(mount,) = marks.mounts()
limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
def call(name, *args):
    r = getattr(libc, name)(*args)
    e = ctypes.get_errno() if r < 0 else 0
    if r >= 0 and name == "open_by_handle_at":
        os.close(r)
    return errno.errorcode.get(e, "ok")
out = {
    "path_on_mark": call("open_by_handle_at", mount, h, confine.HANDLE_FLAGS),
    "read_on_mark": call("open_by_handle_at", mount, h, os.O_RDONLY | os.O_DIRECTORY),
    "path_elsewhere": call("open_by_handle_at", other, h, confine.HANDLE_FLAGS),
    "mark_above_limit": mount >= limit,
    "dup_onto_mark": call("dup3", other, mount, 0),  # past the limit: EBADF
    "raise_limit": call("prlimit", 0, resource.RLIMIT_NOFILE,
                        (ctypes.c_uint64 * 2)(hard, hard), None),
    "read_limit": call("prlimit", 0, resource.RLIMIT_NOFILE, None,
                       (ctypes.c_uint64 * 2)()),
    "fanotify_init": call("fanotify_init", 0, 0),
    "subprocess": subprocess.run(["true"], timeout=30).returncode,
}
status = open("/proc/self/status").read()
cap_eff = int(next(l.split()[1] for l in status.splitlines() if l.startswith("CapEff:")), 16)
out["sys_admin"] = bool(cap_eff & (1 << 21))
out["dac_read_search"] = bool(cap_eff & (1 << 2))
t = {}
th = threading.Thread(target=lambda: t.update(r=call("open_by_handle_at", other, h,
                                                       confine.HANDLE_FLAGS)))
th.start(); th.join()
out["thread_after"] = t["r"]
# the marks still report
watch.MAX_WATCHED = 1
os.makedirs(f"{root}/blind", exist_ok=True)
with watch.Watcher([root], marks=marks) as w:
    f = f"{root}/blind/sh"
    open(f, "w").close(); os.chmod(f, 0o4755)
    got = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not any(e.get("file.setuid") for e in got):
        got += w.read(0.2)
    out["reported"] = [e["file.path"] for e in got if e.get("file.setuid")]
print(json.dumps(out))
'''


def test_once_confined_the_agent_decodes_handles_only_as_the_marks_do(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_SYS_ADMIN for the marks)")
    src = str(Path(__file__).resolve().parents[2] / "src")
    run = subprocess.run([sys.executable, "-c", CHILD, src, str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    if "skip" in out:
        pytest.skip(f"no marks here: {out['skip']}")
    assert out == {
        "path_on_mark": "ok", "read_on_mark": "EPERM", "path_elsewhere": "EPERM",
        "mark_above_limit": True, "dup_onto_mark": "EBADF", "raise_limit": "EPERM",
        "read_limit": "ok", "fanotify_init": "EPERM", "subprocess": 0,
        "sys_admin": False, "dac_read_search": True,
        "thread_after": "EPERM", "reported": [f"{tmp_path}/blind/sh"]}


def test_the_filter_refuses_what_it_cannot_express() -> None:
    from cerulean.agent import confine

    with pytest.raises(confine.ConfineError):
        confine.program("x86_64", list(range(300)))  # jumps past 255 instructions
    prog = confine.program("aarch64", [5])
    assert len(prog) < 64 and all(0 <= jt <= 255 and 0 <= jf <= 255 for _c, jt, jf, _k in prog)
