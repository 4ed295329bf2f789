"""What the agent gives up once its file-system marks are set (seccomp and capabilities,
through ctypes: standard library only).

The fanotify marks (:class:`cerulean.agent.watch.FsMarks`) need ``CAP_SYS_ADMIN`` to
be set, and ``open_by_handle_at`` for as long as they report. Both reach further than
the marks need: ``CAP_SYS_ADMIN`` opens many privileged operations (freezing a file
system, say), and ``open_by_handle_at`` decodes a handle on whichever mount it is
given, a writable one included, past the read-only view of the system the service
runs in. :func:`confine`, called once the marks are set, drops ``CAP_SYS_ADMIN`` from
the process's effective and permitted sets (with no new privileges, no program it runs
gets it back) and adds a seccomp filter, for every thread, that

- refuses ``fanotify_init`` and ``fanotify_mark`` (no new marks, no permission events);
- allows ``open_by_handle_at`` only on the marks' own directories (on the read-only
  view) and only as ``O_PATH | O_DIRECTORY | O_CLOEXEC``;
- refuses to close those directories, or to put another file in their place
  (``close``, ``dup2``, ``dup3`` onto their numbers; ``close_range`` altogether,
  which the C library falls back from to closing one by one).

A refused call fails with ``EPERM``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from cerulean.agent.watch import O_PATH, load_libc

CAP_SYS_ADMIN = 21
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
HANDLE_FLAGS = O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

# The system calls the filter looks at, by machine: (audit architecture, numbers).
SYSCALLS: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {"seccomp": 317, "fanotify_init": 300, "fanotify_mark": 301,
                            "open_by_handle_at": 304, "close": 3, "dup2": 33, "dup3": 292,
                            "close_range": 436}),
    "aarch64": (0xC00000B7, {"seccomp": 277, "fanotify_init": 262, "fanotify_mark": 263,
                             "open_by_handle_at": 265, "close": 57, "dup3": 24,
                             "close_range": 436}),
}

# classic BPF
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_NR, _ARCH = 0, 4


def _arg(i: int) -> int:
    """Where the low 32 bits of argument *i* are in struct seccomp_data (little-endian;
    the calls looked at take ints, of which the kernel uses those bits only)."""
    return 16 + 8 * i


class ConfineError(OSError):
    pass


def program(machine: str, fds: list[int]) -> list[tuple[int, int, int, int]]:
    """The filter, as (code, jt, jf, k) instructions, for *machine* and the marks'
    directories *fds*."""
    arch, nr = SYSCALLS[machine]
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    body: list[tuple[int, int, int, int]] = []

    def check_fds(arg: int) -> list[tuple[int, int, int, int]]:
        """Deny when argument *arg* is one of *fds*, else allow."""
        out = [(_LD_W_ABS, 0, 0, _arg(arg))]
        for fd in fds:
            out.append((_JEQ_K, 0, 1, fd))
            out.append((_RET_K, 0, 0, deny))
        out.append((_RET_K, 0, 0, SECCOMP_RET_ALLOW))
        return out

    def handle_rule() -> list[tuple[int, int, int, int]]:
        """open_by_handle_at: one of *fds*, and exactly HANDLE_FLAGS."""
        out = [(_LD_W_ABS, 0, 0, _arg(0))]
        for i, fd in enumerate(fds):  # a match jumps to the flags' check, past the rest
            out.append((_JEQ_K, len(fds) - i, 0, fd))
        out.append((_RET_K, 0, 0, deny))
        out += [(_LD_W_ABS, 0, 0, _arg(2)), (_JEQ_K, 0, 1, HANDLE_FLAGS),
                (_RET_K, 0, 0, SECCOMP_RET_ALLOW), (_RET_K, 0, 0, deny)]
        return out

    # Each call's rule is a block; the dispatch jumps to it (forward jumps only).
    blocks: list[tuple[int, list[tuple[int, int, int, int]]]] = []
    for name in ("fanotify_init", "fanotify_mark", "close_range"):
        blocks.append((nr[name], [(_RET_K, 0, 0, deny)]))
    blocks.append((nr["open_by_handle_at"], handle_rule()))
    blocks.append((nr["close"], check_fds(0)))
    for name in ("dup2", "dup3"):
        if name in nr:
            blocks.append((nr[name], check_fds(1)))
    dispatch = len(blocks) + 1  # the jumps, then "allow"
    at = 0  # where each block starts, counted after the dispatch and its "allow"
    for i, (number, block) in enumerate(blocks):
        body.append((_JEQ_K, dispatch - i - 1 + at, 0, number))
        at += len(block)
    body.append((_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    for _number, block in blocks:
        body += block
    # Another architecture's calls, and x32's numbers (bit 30) on x86_64, are refused.
    head = [(_LD_W_ABS, 0, 0, _ARCH), (_JEQ_K, 1, 0, arch), (_RET_K, 0, 0, deny),
            (_LD_W_ABS, 0, 0, _NR), (_JGE_K, 0, 1, 0x40000000), (_RET_K, 0, 0, deny)]
    if any(jt > 255 or jf > 255 for _c, jt, jf, _k in body):
        raise ConfineError(errno.E2BIG, "the filter's jumps are too long")
    return head + body


def drop_capability(libc: ctypes.CDLL, cap: int) -> None:
    """Drop *cap* from this thread's effective and permitted sets (capset, which may
    always lower them)."""
    header = ctypes.create_string_buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0))
    data = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) x 2 words
    if libc.capget(header, data) != 0:
        e = ctypes.get_errno()
        raise ConfineError(e, f"capget: {os.strerror(e)}")
    word, bit = divmod(cap, 32)
    for i in (0, 1):  # effective, permitted
        data[3 * word + i] &= ~(1 << bit) & 0xFFFFFFFF
    if libc.capset(header, data) != 0:
        e = ctypes.get_errno()
        raise ConfineError(e, f"capset: {os.strerror(e)}")


def confine(fds: list[int]) -> None:
    """Drop CAP_SYS_ADMIN and install the filter (see the module's text) for every
    thread of this process, the marks' directories being *fds*. Raises ConfineError
    when either cannot be done (an unknown machine, a kernel without seccomp)."""
    machine = platform.machine()
    if machine not in SYSCALLS:
        raise ConfineError(errno.ENOSYS, f"no system call table for {machine}")
    libc = load_libc()
    instructions = program(machine, fds)
    # The calls it installs itself set this too; without it, only a privileged
    # process may add a filter.
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise ConfineError(e, f"no_new_privs: {os.strerror(e)}")
    drop_capability(libc, CAP_SYS_ADMIN)
    filters = b"".join(struct.pack("=HBBI", *i) for i in instructions)
    buf = ctypes.create_string_buffer(filters, len(filters))
    prog = ctypes.create_string_buffer(
        struct.pack("=HxxxxxxQ", len(instructions), ctypes.addressof(buf)))
    nr = SYSCALLS[machine][1]["seccomp"]
    if libc.syscall(ctypes.c_long(nr), SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC,
                    prog) != 0:
        e = ctypes.get_errno()
        raise ConfineError(e, f"seccomp: {os.strerror(e)}")
