"""Cerulean itself as packages a container image can hold (``packages.cerulean``).

Two packages, both built here rather than taken from the archive:

* ``cerulean`` (architecture ``all``): the whole :mod:`cerulean` package from
  this tree, the ``cerulean`` command and the built-in image definitions with
  their locks (in ``/usr/share/cerulean/images``, where
  :data:`cerulean.build.definition.BUILTIN_IMAGES` finds them outside a checkout).
  Its Debian dependencies (:data:`CERULEAN_DEPENDS`) join the image's lock.
* ``python3-pysat``: the SAT solver the lock resolver uses, which Debian does
  not package. It is repacked from python-sat's binary wheel for the image's
  architecture and Python, pinned below by name and sha256; pip fetches it
  from the index this machine's pip is configured for, once, into the cache.

Both are written bit for bit reproducibly, so the same tree and lock give the
same image. The image's SBOM names them with their own purls: python-sat as
the PyPI package it is, not as a Debian one.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cerulean
from cerulean.build.agent import MAINTAINER, PY_DEST, content_version
from cerulean.debian.cache import Cache
from cerulean.debian.deb import write_deb
from cerulean.debian.lock import Lock, LockedPackage
from cerulean.errors import CeruleanError, VerificationError

SRC = Path(cerulean.__file__).resolve().parent
IMAGES_DEST = "usr/share/cerulean/images"

# What the cerulean package needs from Debian: the Python libraries of the build, release
# and publisher code, gpgv for the archive's signatures, the shell, coreutils, unshare and
# mount that set up the chroots system images are built in, zstd for release payloads
# and their deltas, and what the pysat wheel links against.
CERULEAN_DEPENDS = ("python3", "python3-debian", "python3-httpx", "python3-rich",
                    "python3-zstandard", "python3-tuf", "python3-securesystemslib",
                    "python3-cryptography", "python3-yaml", "python3-six", "libstdc++6",
                    "libgcc-s1", "gpgv", "dash", "coreutils", "util-linux", "mount", "zstd",
                    "ca-certificates")


@dataclass(frozen=True)
class Wheel:
    filename: str
    sha256: str
    size: int


PYSAT_VERSION = "1.9.dev24"
PYSAT_PYTHON = "3.13"  # the wheels' CPython ABI: Debian 13's python3
PYSAT_WHEELS = {
    "amd64": Wheel("python_sat-1.9.dev24-cp313-cp313-manylinux_2_24_x86_64."
                   "manylinux_2_28_x86_64.whl",
                   "563233558a022dff674e5199ca419b824a3c598f0c2c4393f99e1d4bc3608195", 4147569),
    "arm64": Wheel("python_sat-1.9.dev24-cp313-cp313-manylinux_2_24_aarch64."
                   "manylinux_2_28_aarch64.whl",
                   "aeb250f065085bf3f163eff70091f200040115d3408415a127d715e7a17bc465", 4004672),
}
WHEEL_MAX_BYTES = 64 << 20  # unpacked; the pinned wheels hold about 13 MiB

LAUNCHER = b"""#!/usr/bin/python3
# Cerulean: build, release and publish (cerulean package).
import sys

from cerulean.cli import main

sys.exit(main())
"""


@dataclass(frozen=True)
class LocalPackage:
    """A package this module wrote, as the build unpacks it."""

    locked: LockedPackage  # suite and filename are empty: it is not from the archive
    purl: str


def _deb_version(pep440: str) -> str:
    """PEP 440 → Debian order: 1.9.dev24 sorts before 1.9 in both."""
    for tag in ("dev", "a", "b", "rc"):
        head, sep, tail = pep440.partition(f".{tag}" if tag == "dev" else tag)
        if sep and tail.isdigit():
            return f"{head}~{tag}{tail}"
    return pep440


def _files(top: Path) -> list[Path]:
    """The files under *top* that belong to the package: in a git checkout, those git
    tracks (so editor backups, caches and untracked files stay out); elsewhere (an
    installed copy), every file but hidden ones, backups and bytecode. Symbolic links are
    never followed: their targets could be any file of the building machine."""
    r = subprocess.run(["git", "-C", str(top), "ls-files", "-z", "--", "."],
                       capture_output=True, check=False) if shutil.which("git") else None
    if r is not None and r.returncode == 0:
        names = sorted(top / n for n in r.stdout.decode("utf-8", "surrogateescape").split("\0")
                       if n)
    else:
        names = sorted(f for f in top.rglob("*")
                       if not any(part.startswith(".") or part == "__pycache__"
                                  for part in f.relative_to(top).parts)
                       and not f.name.endswith(("~", ".pyc", ".pyo")))
    return [f for f in names if f.is_file() and not f.is_symlink()]


def cerulean_contents() -> dict[str, tuple[bytes, int]]:
    """Every file of the cerulean package: path → (bytes, mode)."""
    files: dict[str, tuple[bytes, int]] = {}
    for f in _files(SRC):
        files[f"{PY_DEST}/{f.relative_to(SRC).as_posix()}"] = (f.read_bytes(), 0o644)
    from cerulean.build.definition import BUILTIN_IMAGES

    for f in _files(BUILTIN_IMAGES):
        if f.suffix in (".toml", ".lock") and f.parent == BUILTIN_IMAGES:
            files[f"{IMAGES_DEST}/{f.name}"] = (f.read_bytes(), 0o644)
    files["usr/bin/cerulean"] = (LAUNCHER, 0o755)
    licence = SRC.parents[1] / "LICENSE"
    if licence.is_file() and not licence.is_symlink():
        files["usr/share/doc/cerulean/copyright"] = (licence.read_bytes(), 0o644)
    return files


def cerulean_deb() -> tuple[str, bytes]:
    """(version, .deb bytes) of the cerulean package."""
    files = cerulean_contents()
    ver = content_version(files)
    control = (
        f"Package: cerulean\nVersion: {ver}\nArchitecture: all\nMaintainer: {MAINTAINER}\n"
        f"Depends: {', '.join(CERULEAN_DEPENDS)}, python3-pysat\n"
        "Conflicts: cerulean-agent\nSection: admin\nPriority: optional\n"
        "Description: Cerulean: build, release and publish images from Debian packages\n"
        " The cerulean command: locks image definitions against the Debian archive,\n"
        " builds container and system images, signs and publishes releases, and runs\n"
        " the publisher service that does all of it when a security fix appears.\n"
    )
    return ver, write_deb(control, files)


def _fetch_wheel(wheel: Wheel, arch: str, cache: Cache) -> bytes:
    """The pinned wheel's bytes: from the cache, else through pip, checked either way."""
    try:
        return cache.read_verified(wheel.sha256, wheel.size, f"The wheel {wheel.filename}")
    except VerificationError as e:
        # The cached copy was altered: said, removed, and fetched again below.
        print(f"warning: {e}", file=sys.stderr)
        cache.blob_path(wheel.sha256).unlink(missing_ok=True)
    except CeruleanError:
        pass  # not in the cache yet
    dropped = cache.root / "wheels" / wheel.filename  # a copy brought by hand, offline
    if dropped.is_file():
        data = dropped.read_bytes()
        if hashlib.sha256(data).hexdigest() != wheel.sha256:
            raise CeruleanError(f"{dropped} is not the pinned wheel (sha256 {wheel.sha256}).")
        cache.put(data)
        return data
    platform_tag = {"amd64": "x86_64", "arm64": "aarch64"}[arch]
    with tempfile.TemporaryDirectory(prefix="cerulean-wheel-") as tmp:
        argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                "--only-binary=:all:", "--implementation", "cp",
                "--python-version", PYSAT_PYTHON, "--abi", "cp" + PYSAT_PYTHON.replace(".", ""),
                "--platform", f"manylinux_2_28_{platform_tag}",
                "--dest", tmp, f"python-sat=={PYSAT_VERSION}"]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            r = subprocess.CompletedProcess(argv, 1, "", str(e))
        got = Path(tmp) / wheel.filename
        if r.returncode == 0 and not got.is_file():
            others = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise CeruleanError(f"pip fetched {others} instead of the pinned {wheel.filename}.")
        if r.returncode != 0:
            detail = ((r.stderr or r.stdout).strip() or "no output").splitlines()[-1]
            raise CeruleanError(
                f"The python-sat wheel {wheel.filename} could not be downloaded with pip "
                f"({detail}). Copy that file (sha256 {wheel.sha256}) into {dropped.parent}, "
                "or give pip an index it can reach.")
        data = got.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != wheel.sha256 or len(data) != wheel.size:
        raise CeruleanError(
            f"The downloaded {wheel.filename} has sha256 {digest}, not the pinned "
            f"{wheel.sha256}: it is refused.")
    cache.put(data)
    return data


def _safe_member(name: str) -> str | None:
    """The member's path under dist-packages, None to skip it; anything but what
    python-sat's wheel holds (its package, its three extension modules, its metadata)
    fails: defence in depth behind the pin."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name or not p.parts:
        raise CeruleanError(f"The python-sat wheel has an unsafe member name {name!r}.")
    if name.endswith("/") or p.parts[0].endswith(".data"):
        return None  # directories; scripts that duplicate pysat/examples
    top = p.parts[0]
    package = top == "pysat" and len(p.parts) > 1
    module = (len(p.parts) == 1 and top.endswith(".so")
              and top.startswith(("pysolvers.", "pycard.", "pyformula.")))
    metadata = top.startswith("python_sat-") and top.endswith(".dist-info")
    if not (package or module or metadata):
        raise CeruleanError(f"The python-sat wheel has an unexpected member {name!r}.")
    return p.as_posix()


def pysat_deb(arch: str, cache: Cache) -> tuple[str, bytes, str]:
    """(version, .deb bytes, homepage) of python3-pysat for *arch*."""
    wheel = PYSAT_WHEELS.get(arch)
    if wheel is None:
        raise CeruleanError(f"No python-sat wheel is pinned for {arch}.")
    data = _fetch_wheel(wheel, arch, cache)
    files: dict[str, tuple[bytes, int]] = {}
    metadata = b""
    total = 0
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise CeruleanError(f"The python-sat wheel is not a valid zip file ({e}).") from None
    with z:
        for info in z.infolist():
            rel = _safe_member(info.filename)
            if rel is None:
                continue
            if f"usr/lib/python3/dist-packages/{rel}" in files:
                raise CeruleanError(f"The python-sat wheel holds {rel!r} twice.")
            if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):
                raise CeruleanError(f"The python-sat wheel's member {rel!r} is not a file.")
            total += info.file_size
            if total > WHEEL_MAX_BYTES:
                raise CeruleanError(f"The python-sat wheel unpacks to more than "
                                    f"{WHEEL_MAX_BYTES >> 20} MiB.")
            body = z.read(info)
            files[f"usr/lib/python3/dist-packages/{rel}"] = (body, 0o644)
            if rel.endswith(".dist-info/METADATA"):
                metadata = body
            if "/licenses/" in rel and rel.endswith(".dist-info/licenses/LICENSE.txt"):
                files["usr/share/doc/python3-pysat/copyright"] = (body, 0o644)
    homepage = next((line.split(":", 1)[1].strip() for line in
                     metadata.decode("utf-8", "replace").splitlines()
                     if line.startswith("Home-page:")), "")
    ver = _deb_version(PYSAT_VERSION)
    py_next = f"3.{int(PYSAT_PYTHON.split('.')[1]) + 1}"
    control = (
        f"Package: python3-pysat\nVersion: {ver}\nArchitecture: {arch}\n"
        f"Maintainer: {MAINTAINER}\nSource: python-sat\n"
        f"Depends: python3 (>= {PYSAT_PYTHON}), python3 (<< {py_next}), python3-six, "
        "libstdc++6, libgcc-s1\n"
        + (f"Homepage: {homepage}\n" if homepage else "")
        + "Section: python\nPriority: optional\n"
        f"Description: SAT solvers for Python (python-sat {PYSAT_VERSION}, from its wheel)\n"
        f" Repacked from {wheel.filename} (its scripts left out)\n"
        f" (sha256 {wheel.sha256}).\n"
    )
    return ver, write_deb(control, files), homepage


def check_python(lock: Lock, arch: str) -> None:
    """The pinned wheels are for one CPython: the lock's python3 must be that one."""
    have = {p.name: p.version for p in lock.packages[arch]}
    minimal = have.get(f"python{PYSAT_PYTHON}-minimal") or have.get(f"python{PYSAT_PYTHON}")
    if minimal is None:
        found = sorted(n for n in have if n.startswith("python3.") and "-" not in n)
        raise CeruleanError(
            f"packages.cerulean needs Python {PYSAT_PYTHON} (the pinned python-sat wheel's), "
            f"but the lock for {arch} has {', '.join(found) or 'no python3.x'}.")


def local_packages(lock: Lock, arch: str, cache: Cache) -> list[LocalPackage]:
    """The cerulean and python3-pysat packages for *arch*, stored in *cache*."""
    check_python(lock, arch)
    out: list[LocalPackage] = []
    pv, pdeb, _ = pysat_deb(arch, cache)
    cv, cdeb = cerulean_deb()
    for name, ver, a, deb, purl in (
        ("cerulean", cv, "all", cdeb, f"pkg:generic/cerulean@{cv.replace('+', '%2B')}"),
        ("python3-pysat", pv, arch, pdeb, f"pkg:pypi/python-sat@{PYSAT_VERSION}"),
    ):
        sha = cache.put(deb)
        source = "python-sat" if name == "python3-pysat" else name
        out.append(LocalPackage(LockedPackage(name, ver, a, source, ver, sha, len(deb), "", ""),
                                purl))
    return out
