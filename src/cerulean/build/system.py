"""Full-system composition: a root filesystem where maintainer scripts ran for real.

System images need what a container image can skip: users made by postinst,
alternatives, kernel hooks, enabled units. The rootfs is built the way
debootstrap and mmdebstrap do it, with Cerulean's own pieces:

1. the Essential packages and their dependency closure are unpacked safely
   (through :class:`~cerulean.build.tree.Tree`) so that dpkg and a shell exist;
2. ``dpkg --install`` runs inside a namespaced chroot, first for that closure,
   then for every other locked package (maintainer scripts run; services are
   kept from starting by a policy-rc.d);
3. Python's compiled modules are made hash-based (see :data:`HASH_PYCS`);
4. what must differ per host is removed (machine-id, SSH host keys, logs).

For a foreign architecture the chroot runs through qemu-user-static. Python's
modules are then compiled by a Python of the host's architecture and the same
version (the tools tree's), not by the target's under emulation, where it took
minutes (see :func:`native_python`); likewise the hardware database, the kernel
modules' index and the CA certificate links are made in the tools tree, on the
target's files (see :data:`DEFERRED`). The result is cached, keyed by the exact
packages, so a rebuild copies it instead of installing again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cerulean.arch import host_arch
from cerulean.build.chroot import ensure_binfmt, run_in
from cerulean.build.tree import Tree
from cerulean.build.unpack import load_package, unpack_into
from cerulean.debian.cache import Cache
from cerulean.debian.deb import parse_control
from cerulean.debian.lock import LockedPackage
from cerulean.debian.packages import Package
from cerulean.debian.resolve import Universe, resolve
from cerulean.errors import CeruleanError

SYSTEM_FORMAT = 6  # bump when the way a rootfs is composed changes
DEBS_INSIDE = "/run/cerulean-debs"
# Dependencies are the lock's business (its order is not dpkg's); a changed conffile takes
# the package's version; no fsync per file (a composition cut short is thrown away).
DPKG_FORCE = ("--force-depends", "--force-confnew", "--force-unsafe-io")
POLICY_RC_D = "usr/sbin/policy-rc.d"

Progress = Callable[[str], None]

# Debian compiles Python modules with the source's modification time in each .pyc. The
# /usr image gives every file one fixed time (a reproducible erofs), so those would all
# be stale: Python would compile each module it imports again, on every start, and could
# not save the result on the read-only /usr. The target's own Python rewrites each
# header to "checked-hash" (PEP 552): valid while the source's hash matches, whatever its
# time. The compiled code after the header is the same in both kinds.
HASH_PYCS = """
import importlib.util, os, sys
magic = importlib.util.MAGIC_NUMBER
for top in sys.argv[1:]:
    for d, _, files in os.walk(top):
        if os.path.basename(d) != "__pycache__":
            continue
        for f in files:
            p = os.path.join(d, f)
            if not f.endswith(".pyc") or os.path.islink(p):
                continue
            src = os.path.join(os.path.dirname(d), f.split(".")[0] + ".py")
            with open(p, "rb") as fh:
                data = fh.read()
            if data[:4] != magic or len(data) < 16 or not os.path.isfile(src):
                continue
            with open(src, "rb") as fh:
                digest = importlib.util.source_hash(fh.read())
            tmp = p + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(magic + (3).to_bytes(4, "little") + digest + data[16:])
            os.chmod(tmp, os.stat(p).st_mode & 0o7777)
            os.replace(tmp, p)
"""


# Where Debian's packages have their Python modules compiled when they are configured
# (python3.X's postinst: the standard library; py3compile: dist-packages and debpython).
PYTHON_DIRS = ("usr/lib/{python}", "usr/lib/python3/dist-packages", "usr/share/python3")
# The compilers the packages' scripts call: hidden while they run when the modules are
# compiled natively afterwards. py3compile's callers skip it when it is missing; python's
# own postinst runs py_compile.py, which a no-op takes the place of.
PY3COMPILE = "usr/bin/py3compile"
PY_COMPILE = "usr/lib/{python}/py_compile.py"
HELD = ".cerulean-held"
# Run as a script (python's postinst) it does nothing; imported, it compiles nothing.
PY_COMPILE_STUB = b"""\
# Modules are compiled after configuration, by cerulean (build/system.py).
import enum
class PyCompileError(Exception):
    pass
class PycInvalidationMode(enum.Enum):
    TIMESTAMP = 1
    CHECKED_HASH = 2
    UNCHECKED_HASH = 3
def compile(*args, **kwargs):
    return None
def main():
    return 0
"""

# Compile every module under ROOT/DIR... for the tree at ROOT, checked-hash (PEP 552), the
# way the packages' own scripts would have, with the paths the target sees in the code
# objects. A symlinked module is read as the target resolves it: absolute links from
# ROOT, ".." never above it. A module that does not compile fails the run, as it fails
# the postinst of the package under Debian's own compile.
COMPILE_PYCS = """
import importlib.util, os, py_compile, sys
root, tops = sys.argv[1].rstrip("/"), sys.argv[2:]
mode = py_compile.PycInvalidationMode.CHECKED_HASH

def inside(path):
    done, todo, hops = [], [p for p in path.split("/") if p], 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            done = done[:-1]
            continue
        here = root + "/" + "/".join(done + [part])
        if os.path.islink(here):
            hops += 1
            if hops > 40:
                return None
            link = os.readlink(here)
            if link.startswith("/"):
                done = []
            todo = [p for p in link.split("/") if p] + todo
            continue
        done.append(part)
    return root + "/" + "/".join(done)

failed = []
for top in tops:
    for d, dirs, files in os.walk(root + "/" + top):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        if os.path.islink(os.path.join(d, "__pycache__")):
            continue
        for f in sorted(files):
            src = os.path.join(d, f)
            if not f.endswith(".py"):
                continue
            real = inside(src[len(root):])
            if real is None or not os.path.isfile(real):
                continue
            try:
                py_compile.compile(real, cfile=importlib.util.cache_from_source(src),
                                   dfile=src[len(root):], doraise=True, invalidation_mode=mode)
            except py_compile.PyCompileError as e:
                failed.append(src[len(root):])
                print(f"not compiled: {src[len(root):]}: {e.msg}", file=sys.stderr)
if failed:
    sys.exit(f"{len(failed)} modules do not compile, the first {failed[0]}")
"""


@dataclass(frozen=True)
class Bind:
    """A path of the target (*rel*) mounted at *inside* in the tools tree for a replay;
    *optional*: if the target has none, an empty directory takes its place (so the tools
    tree's own files are never read instead)."""

    rel: str
    inside: str
    optional: bool = False


@dataclass(frozen=True)
class Deferred:
    """A program the packages' scripts run whose work is the same on every architecture
    and slow under emulation. For a foreign composition, a stub that records each call
    takes its place while dpkg configures; afterwards each call is replayed in the tools
    tree, with *native* before the recorded arguments and the target's *binds* mounted
    where the program reads and writes, so that it works on the target's files under the
    names the target sees. *package* must be installed in the same version in both
    trees (the same program); with *package* empty the target's own script runs, with
    the tools tree's shell and the programs in *needs*. With *links_within*, every link
    in the bound directories must point into them (the script follows links).

    A call that the tools tree cannot make the way the target would (an argument that
    is a path, a bound path the target lacks or reaches through a link) is made by the
    target's own program under emulation instead. A replayed call that fails fails the
    build (the stub had let the caller go on)."""

    path: str
    package: str
    native: tuple[str, ...]
    binds: tuple[Bind, ...]
    needs: tuple[str, ...] = ()
    links_within: bool = False


DEFERRED = (
    # udev's postinst and trigger: the 13 MB hardware database, from the target's hwdb.d
    # (it records each entry's file name: the target's own names).
    Deferred("usr/bin/systemd-hwdb", "udev", ("systemd-hwdb",),
             (Bind("usr/lib/udev", "/usr/lib/udev"),
              Bind("etc/udev", "/etc/udev", optional=True))),
    # The kernel's postinst: the modules' dependency index, with the target's settings.
    Deferred("usr/sbin/depmod", "kmod", ("depmod",),
             (Bind("usr/lib/modules", "/usr/lib/modules"),
              Bind("etc/depmod.d", "/etc/depmod.d", optional=True),
              Bind("usr/lib/depmod.d", "/usr/lib/depmod.d", optional=True),
              Bind("usr/local/lib/depmod.d", "/usr/local/lib/depmod.d", optional=True))),
    # ca-certificates' postinst and triggers: a shell loop over ~150 certificates
    # (a sed, readlink and ln each, every one a program started under emulation). The
    # script's own "#!/bin/sh -e": -e.
    Deferred("usr/sbin/update-ca-certificates", "",
             ("sh", "-e", "/mnt/usr/sbin/update-ca-certificates"),
             (Bind("etc/ssl", "/etc/ssl"), Bind("etc/ca-certificates.conf",
                                                "/etc/ca-certificates.conf"),
              Bind("etc/ca-certificates", "/etc/ca-certificates", optional=True),
              Bind("usr/share/ca-certificates", "/usr/share/ca-certificates"),
              Bind("usr/local/share/ca-certificates", "/usr/local/share/ca-certificates",
                   optional=True)),
             needs=("usr/bin/openssl", "usr/bin/run-parts"), links_within=True),
)
DEFERRED_CALLS = "var/lib/cerulean-deferred"
# Each argument as "A" + the argument + NUL, then "E" + NUL: the call's end (an argument
# cannot hold a NUL).
DEFERRED_STUB = """#!/bin/sh
# Recorded while dpkg configures, and run afterwards by cerulean (build/system.py).
{{ for a in "$@"; do printf 'A%s\\000' "$a"; done; printf 'E\\000'; }} >> /{calls}/{name}
"""


def rootfs_key(arch: str, packages: Sequence[LockedPackage]) -> str:
    h = hashlib.sha256(f"system-v{SYSTEM_FORMAT}:{arch}\n".encode())
    for p in sorted(packages, key=lambda p: p.name):
        h.update(f"{p.name} {p.version} {p.sha256}\n".encode())
    return h.hexdigest()[:32]


def _package_of(p: LockedPackage, control: bytes) -> Package:
    f = parse_control(control)
    return Package(
        name=p.name, version=p.version, arch=p.arch, suite=p.suite, base_url="",
        filename=p.filename, sha256=p.sha256, size=p.size, source=p.source,
        source_version=p.source_version, depends=f.get("Depends", ""),
        pre_depends=f.get("Pre-Depends", ""), provides=f.get("Provides", ""),
        conflicts=f.get("Conflicts", ""), breaks=f.get("Breaks", ""),
        multi_arch=f.get("Multi-Arch", "no"), essential=f.get("Essential") == "yes",
        priority=f.get("Priority", "optional"),
    )


def essential_closure(arch: str, locked: Sequence[LockedPackage], cache: Cache
                      ) -> tuple[list[LockedPackage], list[LockedPackage]]:
    """Split the locked packages into (Essential + their dependencies, the rest)."""
    pkgs = [_package_of(p, load_package(cache, p).control["control"]) for p in locked]
    universe = Universe.build(pkgs, arch, sorted({p.suite for p in pkgs}))
    essential = sorted(p.name for p in pkgs if p.essential)
    if not essential:
        raise CeruleanError(
            f"The lock for {arch} has no Essential packages, so it cannot make a system image "
            "(set image.kind = \"system\" and lock again)."
        )
    # A dependency the definition excluded is not in the lock: count it as met here too.
    unmet = {
        rel["name"]
        for p in pkgs
        for group in universe.relations(p)["depends"]
        if not any(universe.candidates(r) for r in group)
        for rel in group
    }
    names = {p.name for p in resolve(universe, essential, unmet)}
    first = [p for p in locked if p.name in names]
    rest = [p for p in locked if p.name not in names]
    return first, rest


def export_tree(tree: Tree, root: Path) -> None:
    """Write *tree* under *root* (already validated paths; root must be empty)."""
    for e in tree:
        dst = root / e.path
        if e.kind == "dir":
            dst.mkdir(exist_ok=True)
            os.chown(dst, e.uid, e.gid)
            os.chmod(dst, e.mode)
        elif e.kind == "file":
            dst.write_bytes(e.data)
            os.chown(dst, e.uid, e.gid)
            os.chmod(dst, e.mode)
        else:
            os.symlink(e.target, dst)
            os.lchown(dst, e.uid, e.gid, )


def _dpkg(root: Path, arch: str, cache: Cache, pkgs: Sequence[LockedPackage], what: str,
          action: str) -> None:
    if not pkgs:
        return
    debs = [f"{DEBS_INSIDE}/{p.sha256}" for p in pkgs]
    # INITRD=No: the kernel's postinst hooks build no initrd of their own (the image's
    # is made later, once; under emulation dracut takes minutes).
    doing = "Unpacking" if action == "--unpack" else "Installing"
    run_in(root, ["dpkg", action, *DPKG_FORCE, *debs],
           ro_binds={cache.blob_path("x").parent: DEBS_INSIDE}, env={"INITRD": "No"},
           what=f"{doing} the {what} packages for {arch} with dpkg", timeout=3600)


def install_rootfs(root: Path, arch: str, locked: Sequence[LockedPackage], cache: Cache,
                   progress: Progress | None = None, native: Path | None = None) -> None:
    """Compose a configured rootfs from *locked* into the empty directory *root*; for a
    foreign *arch*, *native* (a tree of the host's architecture, such as the tools tree)
    compiles Python's modules if it has the same Python."""
    say = progress or (lambda _m: None)
    ensure_binfmt(arch)
    for p in locked:
        cache.verify_file(p.sha256, p.size, f"The package {p.label}")
    first, rest = essential_closure(arch, locked, cache)
    say(f"unpacking {len(first)} essential packages")
    tree = Tree()
    for p in sorted(first, key=lambda p: p.name):
        unpack_into(tree, load_package(cache, p))
    tree.add_merged_usr_links()
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "etc", "tmp"):
        tree.add_dir(d, 0o1777 if d == "tmp" else 0o755)
    tree.add_file("var/lib/dpkg/status", b"")
    tree.add_file("var/lib/dpkg/available", b"")
    tree.add_file("var/lib/dpkg/arch", f"{arch}\n".encode())
    # Packages' scripts must not start services in the build environment.
    tree.add_file(POLICY_RC_D, b"#!/bin/sh\nexit 101\n", 0o755)
    export_tree(tree, root)
    say(f"installing {len(first)} essential packages with dpkg")
    _dpkg(root, arch, cache, first, "essential", "--install")
    say(f"installing {len(rest)} packages with dpkg")
    if rest and arch != host_arch() and native is not None:
        # Unpack first: what the packages ship tells whether the native Python fits.
        _dpkg(root, arch, cache, rest, "remaining", "--unpack")
        compiler = native_python(root, native)
        with held_back_compilers(root, compiler), deferred_tools(root, native) as deferred:
            run_in(root, ["dpkg", "--configure", "--pending", *DPKG_FORCE],
                   env={"INITRD": "No"},
                   what=f"Configuring the remaining packages for {arch} with dpkg",
                   timeout=3600)
        replay_deferred(root, native, deferred, say)
    else:
        compiler = None
        _dpkg(root, arch, cache, rest, "remaining", "--install")
    audit = run_in(root, ["dpkg", "--audit"], check=False)
    if audit.stdout.strip():
        first_line = audit.stdout.strip().splitlines()[0]
        raise CeruleanError(f"dpkg left packages unconfigured for {arch}: {first_line}")
    if compiler is not None and native is not None:
        # Checked-hash from the start: HASH_PYCS has nothing left to do (and run here it
        # would read absolute symlinks in the tools tree).
        say(f"compiling Python's modules with the tools tree's {compiler}")
        dirs = [d.format(python=compiler) for d in PYTHON_DIRS]
        run_in(native, [compiler, "-c", COMPILE_PYCS, "/mnt", *dirs], binds={root: "/mnt"},
               what="Compiling Python's modules")
    elif (root / "usr/bin/python3").exists():
        say("making Python's compiled modules hash-based")
        run_in(root, ["python3", "-c", HASH_PYCS, "/usr/lib"],
               what="Making Python's compiled modules hash-based")
    clean_host_specific(root)


def native_python(root: Path, native: Path) -> str | None:
    """The ``python3.X`` that *root* (unpacked) has and the host-architecture tree
    *native* has in exactly the same Debian version, or None: then the target's own
    Python compiles its modules (another patch release could compile differently)."""
    def versions(tree: Path) -> dict[str, str]:
        status = installed_versions(tree)
        return {p.parent.name: status.get(f"{p.parent.name}-minimal", "")
                for p in (tree / "usr/lib").glob("python3.*/py_compile.py")
                if (tree / "usr/bin" / p.parent.name).exists()}
    mine, theirs = versions(root), versions(native)
    if len(mine) != 1:
        return None
    (name, version), = mine.items()
    return name if version and theirs.get(name) == version else None


def installed_versions(tree: Path) -> dict[str, str]:
    """Package → version from *tree*'s dpkg status (unpacked or configured)."""
    out: dict[str, str] = {}
    try:
        text = (tree / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return out
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if "Package" in fields and "Version" in fields:
            out[fields["Package"]] = fields["Version"]
    return out


@contextmanager
def held_back_compilers(root: Path, python: str | None) -> Iterator[None]:
    """While dpkg configures, the packages' scripts compile nothing (when *python* is
    set): ``py3compile`` is moved aside and ``py_compile.py`` is a no-op. Both are put
    back as they were, whatever happens."""
    if python is None:
        yield
        return
    moved: list[tuple[Path, Path]] = []
    try:
        for rel in (PY3COMPILE, PY_COMPILE.format(python=python)):
            path = root / rel
            if path.is_file() and not path.is_symlink():
                aside = path.with_name(path.name + HELD)
                os.replace(path, aside)
                moved.append((aside, path))
                if rel.endswith("py_compile.py"):
                    path.write_bytes(PY_COMPILE_STUB)
        yield
    finally:
        for aside, path in moved:
            os.replace(aside, path)


def plain_path(root: Path, rel: str, last_may_link: bool = False) -> bool:
    """Whether *rel* is reached in *root* without following a link (its last part may be
    one with *last_may_link*): such a path cannot lead out of the tree."""
    here, parts = root, Path(rel).parts
    for i, part in enumerate(parts):
        here = here / part
        if here.is_symlink() and not (last_may_link and i == len(parts) - 1):
            return False
    return True


def _deferrable(root: Path, native: Path, d: Deferred, versions: tuple[dict[str, str],
                dict[str, str]]) -> bool:
    target = root / d.path
    if not plain_path(root, d.path, last_may_link=True) or \
            not (target.is_file() or target.is_symlink()):
        return False
    if d.package:
        mine, theirs = versions
        tool = native / "usr/bin" / d.native[0]
        return bool(mine.get(d.package)) and mine.get(d.package) == theirs.get(d.package) \
            and (tool.exists() or (native / "usr/sbin" / d.native[0]).exists())
    if not all((native / n).exists() for n in d.needs):
        return False
    # Hooks would be run by the tools tree: keep the target's own program then.
    hooks = root / "etc/ca-certificates/update.d"
    return not (hooks.is_dir() and any(hooks.iterdir()))


@contextmanager
def deferred_tools(root: Path, native: Path) -> Iterator[list[Deferred]]:
    """While dpkg configures, the :data:`DEFERRED` programs the tools tree *native* can
    stand in for only record their calls; yields those programs. The originals are put
    back as they were, whatever happens."""
    versions = (installed_versions(root), installed_versions(native))
    chosen = [d for d in DEFERRED if _deferrable(root, native, d, versions)]
    moved: list[tuple[Path, Path]] = []
    try:
        calls = root / DEFERRED_CALLS
        calls.mkdir(parents=True, exist_ok=True)
        for d in chosen:
            path = root / d.path
            aside = path.with_name(path.name + HELD)
            os.replace(path, aside)
            moved.append((aside, path))
            path.write_text(DEFERRED_STUB.format(calls=DEFERRED_CALLS, name=path.name))
            path.chmod(0o755)
        yield chosen
    finally:
        for aside, path in moved:
            path.unlink(missing_ok=True)
            os.replace(aside, path)


def recorded_calls(data: bytes) -> list[tuple[str, ...]]:
    """The calls a stub recorded (see :data:`DEFERRED_STUB`), each once, where it was
    made last."""
    calls: list[tuple[str, ...]] = []
    args: list[str] = []
    tokens = data.split(b"\0")
    if tokens[-1]:
        raise CeruleanError("A recorded call was cut short.")
    for token in tokens[:-1]:
        if token == b"E":
            call = tuple(args)
            if call in calls:
                calls.remove(call)
            calls.append(call)
            args = []
        elif token.startswith(b"A"):
            args.append(os.fsdecode(token[1:]))
        else:
            raise CeruleanError(f"A recorded call could not be read back: {token[:80]!r}")
    if args:
        raise CeruleanError("A recorded call was cut short.")
    return calls


def _links_within(root: Path, dirs: Sequence[str]) -> bool:
    """Whether every link under *dirs* (of *root*) points, as the target sees it, into
    one of *dirs*."""
    tops = [Path("/", d) for d in dirs]
    for d in dirs:
        for here, subdirs, files in os.walk(root / d):
            for name in subdirs + files:
                link = Path(here, name)
                if not link.is_symlink():
                    continue
                seen = Path("/", link.relative_to(root)).parent
                to = Path(os.path.normpath(seen / os.readlink(link)))
                if not any(to == t or t in to.parents for t in tops):
                    return False
    return True


def native_refusal(root: Path, d: Deferred, args: Sequence[str]) -> str:
    """Why the tools tree cannot make this call as the target would ("" if it can)."""
    if any(a.startswith("/") or "=/" in a for a in args):
        return "an argument is a path"
    for b in d.binds:
        if not plain_path(root, b.rel):
            return f"/{b.rel} is reached through a link"
        if not (root / b.rel).exists() and not b.optional:
            return f"the image has no /{b.rel}"
    if d.links_within and not _links_within(root, [b.rel for b in d.binds]):
        return "a link leads out of the directories it works on"
    return ""


def replay_deferred(root: Path, native: Path, deferred: Sequence[Deferred],
                    say: Progress) -> None:
    """Make the calls the packages' scripts made to the :data:`DEFERRED` programs (the
    originals are back in place): in the tools tree where it can, else under
    emulation; then remove the records."""
    calls_dir = root / DEFERRED_CALLS
    for d in deferred:
        name = Path(d.path).name
        record = calls_dir / name
        for args in recorded_calls(record.read_bytes()) if record.is_file() else []:
            shown = " ".join([name, *args])
            if why := native_refusal(root, d, args):
                say(f"running {shown} under emulation ({why})")
                run_in(root, [f"/{d.path}", *args], what=f"{name} in the image",
                       timeout=3600)
                continue
            say(f"running {shown} with the tools tree's programs")
            with tempfile.TemporaryDirectory(prefix="cerulean-empty-") as empty:
                binds = {root: "/mnt"}
                for i, b in enumerate(d.binds):
                    source = root / b.rel
                    if not source.exists():  # optional (native_refusal): an empty one
                        source = Path(empty, str(i))
                        source.mkdir()
                    binds[source] = b.inside
                run_in(native, [*d.native, *args], binds=binds,
                       what=f"{name} for the image (tools tree)", timeout=3600)
    shutil.rmtree(calls_dir, ignore_errors=True)


def clean_host_specific(root: Path) -> None:
    """Remove what each host must make for itself, and build leftovers."""
    (root / POLICY_RC_D).unlink(missing_ok=True)
    machine_id = root / "etc/machine-id"
    machine_id.write_text("")  # empty: systemd makes one on first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    for pattern in ("var/cache/debconf/*-old", "var/lib/dpkg/*-old", "var/log/*.log",
                    "var/log/apt/*", "var/cache/apt/*.bin", "boot/initrd.img*", "initrd.img*"):
        for p in root.glob(pattern):
            if p.is_file() or p.is_symlink():
                p.unlink()


def cached_rootfs(arch: str, locked: Sequence[LockedPackage], cache: Cache,
                  progress: Progress | None = None, native: Path | None = None
                  ) -> tuple[Path, bool]:
    """The cached configured rootfs for *locked*, composing it first if needed (*native*:
    see :func:`install_rootfs`).

    Returns (its directory, whether it was already cached). Callers must not
    change it: they work on an overlay (see :func:`overlay`).
    """
    key = rootfs_key(arch, locked)
    store = cache.subdir("systems")
    entry = store / key
    # One composition per key at a time: a second build of the same packages (another
    # process on this cache) waits for the first and then uses its tree.
    with (store / f".{key}.lock").open("w") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress("waiting for another build that composes the same packages")
            fcntl.flock(guard, fcntl.LOCK_EX)
        hit = (entry / "complete").is_file()
        if not hit:
            tmp = store / f".{key}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rootfs").mkdir(parents=True)
            try:
                install_rootfs(tmp / "rootfs", arch, locked, cache, progress, native)
                # dpkg ran with --force-unsafe-io: the tree reaches the disk before it is
                # marked complete, or a crash could leave a "complete" one with empty files.
                os.sync()
                (tmp / "complete").write_text(json.dumps({"arch": arch,
                                                          "packages": len(locked)}))
                shutil.rmtree(entry, ignore_errors=True)  # an incomplete one
                tmp.rename(entry)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return entry / "rootfs", hit


@contextmanager
def overlay(lower: Path, work: Path) -> Iterator[Path]:
    """A writable view of *lower* (changes land in *work*/upper; *lower* stays as it was)."""
    upper, scratch, merged = work / "upper", work / "overlay-work", work / "merged"
    for d in (upper, scratch, merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={lower.resolve()},upperdir={upper.resolve()},workdir={scratch.resolve()}"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise CeruleanError(f"Mounting an overlay on {lower} failed: {r.stderr.strip()}")
    try:
        yield merged
    finally:
        subprocess.run(["umount", "--lazy", str(merged)], capture_output=True, check=False)
