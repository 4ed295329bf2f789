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
- allows ``open_by_handle_at`` only on the marks' own directories (the watched
  trees' mounts) and only as ``O_PATH | O_DIRECTORY | O_CLOEXEC``. Those are named
  by number: they are moved above the soft limit of open files first, where nothing
  opened or duplicated later can land (:func:`lift`);
- refuses ``setrlimit``, and ``prlimit64`` unless it only reads, so that the limit
  stays where it is.

A refused call fails with ``EPERM``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import resource
import struct

from cerulean.agent.watch import O_PATH, FsMarks, load_libc

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
                            "open_by_handle_at": 304, "setrlimit": 160, "prlimit64": 302}),
    "aarch64": (0xC00000B7, {"seccomp": 277, "fanotify_init": 262, "fanotify_mark": 263,
                             "open_by_handle_at": 265, "setrlimit": 164, "prlimit64": 261}),
}

# classic BPF
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_NR, _ARCH = 0, 4

Instruction = tuple[int, int, int, int]


def _arg(i: int, high: bool = False) -> int:
    """Where the low (or *high*) 32 bits of argument *i* are in struct seccomp_data
    (little-endian; of an int argument the kernel uses the low bits only)."""
    return 16 + 8 * i + (4 if high else 0)


class ConfineError(OSError):
    pass


def program(machine: str, fds: list[int]) -> list[Instruction]:
    """The filter, as (code, jt, jf, k) instructions, for *machine* and the marks'
    directories *fds*."""
    arch, nr = SYSCALLS[machine]
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    allow = SECCOMP_RET_ALLOW

    def handle_rule() -> list[Instruction]:
        """open_by_handle_at: one of *fds*, and exactly HANDLE_FLAGS."""
        out = [(_LD_W_ABS, 0, 0, _arg(0))]
        for i, fd in enumerate(fds):  # a match jumps to the flags' check, past the rest
            out.append((_JEQ_K, len(fds) - i, 0, fd))
        out.append((_RET_K, 0, 0, deny))
        out += [(_LD_W_ABS, 0, 0, _arg(2)), (_JEQ_K, 0, 1, HANDLE_FLAGS),
                (_RET_K, 0, 0, allow), (_RET_K, 0, 0, deny)]
        return out

    # prlimit64 may read a limit (new_limit NULL), never set one.
    reading_only = [(_LD_W_ABS, 0, 0, _arg(2)), (_JEQ_K, 0, 3, 0),
                    (_LD_W_ABS, 0, 0, _arg(2, high=True)), (_JEQ_K, 0, 1, 0),
                    (_RET_K, 0, 0, allow), (_RET_K, 0, 0, deny)]
    # Each call's rule is a block; the dispatch jumps to it (forward jumps only).
    blocks: list[tuple[int, list[Instruction]]] = [
        (nr[name], [(_RET_K, 0, 0, deny)])
        for name in ("fanotify_init", "fanotify_mark", "setrlimit")]
    blocks += [(nr["open_by_handle_at"], handle_rule()), (nr["prlimit64"], reading_only)]
    body: list[Instruction] = []
    at = 0  # where each block starts, counted after the dispatch and its "allow"
    for i, (number, block) in enumerate(blocks):
        body.append((_JEQ_K, len(blocks) - i + at, 0, number))
        at += len(block)
    body.append((_RET_K, 0, 0, allow))
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


def lift(fds: list[int]) -> list[int]:
    """Copies of *fds* numbered at or above the soft RLIMIT_NOFILE (raised for the
    moment, then set back; the originals are closed): no file opened, duplicated or
    received later can take those numbers, so a filter that names them names these
    files for good (with setrlimit refused)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < soft + len(fds):
        raise ConfineError(errno.EMFILE, f"no room above the file limit ({soft}, at most "
                                         f"{hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft + len(fds), hard))
    try:
        lifted = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, soft) for fd in fds]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for fd in fds:
        os.close(fd)
    return lifted


def confine(marks: FsMarks | None) -> None:
    """Drop CAP_SYS_ADMIN and install the filter (see the module's text) for every
    thread of this process, for the directories of *marks* (moved above the file limit
    first, see :func:`lift`). Raises ConfineError when it cannot (an unknown machine, a
    kernel without seccomp, a file limit with no room above it)."""
    libc = load_libc()
    # First what needs nothing else: no new privileges (without it only a privileged
    # process may add a filter), and CAP_SYS_ADMIN gone.
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise ConfineError(e, f"no_new_privs: {os.strerror(e)}")
    drop_capability(libc, CAP_SYS_ADMIN)
    machine = platform.machine()
    if machine not in SYSCALLS:
        raise ConfineError(errno.ENOSYS, f"no system call table for {machine}")
    fds = marks.lift_mounts(lift) if marks is not None else []
    instructions = program(machine, fds)
    filters = b"".join(struct.pack("=HBBI", *i) for i in instructions)
    buf = ctypes.create_string_buffer(filters, len(filters))
    prog = ctypes.create_string_buffer(
        struct.pack("=HxxxxxxQ", len(instructions), ctypes.addressof(buf)))
    nr = SYSCALLS[machine][1]["seccomp"]
    r = libc.syscall(ctypes.c_long(nr), SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC,
                     prog)
    if r > 0:  # TSYNC: that thread could not take the filter
        raise ConfineError(errno.EBUSY, f"seccomp: thread {r} cannot take the filter")
    if r != 0:
        e = ctypes.get_errno()
        raise ConfineError(e, f"seccomp: {os.strerror(e)}")
