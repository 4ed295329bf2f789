"""The ``cerulean-agent`` Debian package: the host side of Cerulean, built from this tree.

It holds :mod:`cerulean.agent`, :mod:`cerulean.protocol` and
:mod:`cerulean.errors` (all standard library or Debian-packaged libraries),
the ``cerulean`` command for hosts and the agent's systemd units. The package
is written directly (ar + tar, like dpkg-deb), bit-for-bit reproducible: every
file is owned by root with a fixed mtime, in sorted order. Every system image
installs it with dpkg; on other Debian and Ubuntu servers ``apt install
./cerulean-agent_*.deb`` does the same.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import cerulean
from cerulean.build.definition import AGENT_DEPENDS, AGENT_REQUIRES, ImageDefinition

PACKAGE = "cerulean-agent"
SRC = Path(cerulean.__file__).resolve().parent
PY_DEST = "usr/lib/python3/dist-packages/cerulean"
UNITS = ("cerulean-update.service", "cerulean-update.timer", "cerulean-health.service",
         "cerulean-agent.service", "cerulean-policy.service", "cerulean-policy.timer")
MTIME = 1700000000

LAUNCHER = b"""#!/usr/bin/python3
# The Cerulean host agent (cerulean-agent package).
import sys

from cerulean.agent.cli import main

sys.exit(main())
"""


def _sources() -> dict[str, Path]:
    """Python files of the agent package, by path relative to the cerulean package."""
    out = {"__init__.py": SRC / "__init__.py", "errors.py": SRC / "errors.py"}
    for sub in ("protocol", "agent"):
        for f in sorted((SRC / sub).rglob("*.py")):
            out[str(f.relative_to(SRC))] = f
    return out


def contents() -> dict[str, tuple[bytes, int]]:
    """Every file of the package: path → (bytes, mode)."""
    files: dict[str, tuple[bytes, int]] = {}
    for rel, src in _sources().items():
        files[f"{PY_DEST}/{rel}"] = (src.read_bytes(), 0o644)
    for unit in UNITS:
        files[f"usr/lib/systemd/system/{unit}"] = ((SRC / "agent/units" / unit).read_bytes(),
                                                   0o644)
    for data in sorted((SRC / "agent/data").rglob("*.yaml")):
        files[f"usr/lib/cerulean/{data.relative_to(SRC / 'agent/data')}"] = (data.read_bytes(),
                                                                             0o644)
    files["usr/bin/cerulean"] = (LAUNCHER, 0o755)
    files["usr/lib/cerulean/health.d/README"] = (
        b"Executables here (and in /etc/cerulean/health.d/) run in the boot health check;\n"
        b"a non-zero exit marks the boot bad and falls back to the previous release.\n", 0o644)
    return files


def version() -> str:
    h = hashlib.sha256()
    for path, (data, mode) in sorted(contents().items()):
        h.update(f"{path}\0{mode}\0".encode() + hashlib.sha256(data).digest())
    return f"{cerulean.__version__}+{h.hexdigest()[:12]}"


def _tar(entries: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        dirs: set[str] = set()
        for path in sorted(entries):
            parts = path.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
        items = [("", None)] + [(d, None) for d in dirs] + [(p, entries[p]) for p in entries]
        for path, entry in sorted(items, key=lambda x: x[0]):
            info = tarfile.TarInfo("./" + path)
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "root", "root"
            if entry is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                data, mode = entry
                info.size, info.mode = len(data), mode
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members:
        header = (f"{name:<16}{MTIME:<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}").encode()
        out.append(header + b"`\n" + data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


@dataclass(frozen=True)
class AgentDeb:
    path: Path
    version: str


def build_deb(out_dir: Path) -> AgentDeb:
    """Write ``cerulean-agent_VERSION_all.deb`` into *out_dir*."""
    import lzma

    files = contents()
    ver = version()
    installed = sum(len(d) for d, _ in files.values()) // 1024 + 1
    recommends = [d for d in AGENT_DEPENDS if d.split()[0] not in
                  {r.split()[0] for r in AGENT_REQUIRES}]
    control = (
        f"Package: {PACKAGE}\nVersion: {ver}\nArchitecture: all\n"
        f"Maintainer: Cerulean Linux <security@cerulean-linux.invalid>\n"
        f"Installed-Size: {installed}\nDepends: {', '.join(AGENT_REQUIRES)}\n"
        f"Recommends: {', '.join(recommends)}\n"
        "Section: admin\nPriority: optional\n"
        "Description: Cerulean host agent: updates, detection, compliance, audit trail\n"
        " Applies signed A/B updates on Cerulean disks and rolls back on a failed\n"
        " health check; watches the host with detection rules and integrity scans;\n"
        " checks and fixes compliance profiles (CIS Debian 12 Level 1 - Server among\n"
        " them); keeps a hash-chained audit trail of its actions; serves the host's\n"
        " metrics in the Prometheus text format.\n"
    ).encode()
    md5 = "".join(f"{hashlib.md5(d).hexdigest()}  {p}\n"  # dpkg md5sums format
                  for p, (d, _) in sorted(files.items())).encode()
    control_tar = _tar({"control": (control, 0o644), "md5sums": (md5, 0o644)})
    data_tar = _tar(files)

    def xz(b: bytes) -> bytes:
        return lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)

    deb = _ar([("debian-binary", b"2.0\n"), ("control.tar.xz", xz(control_tar)),
               ("data.tar.xz", xz(data_tar))])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{PACKAGE}_{ver}_all.deb"
    path.write_bytes(deb)
    return AgentDeb(path, ver)


def update_config(defn: ImageDefinition) -> str:
    """/usr/lib/cerulean/update.toml: the image's defaults (hosts override in /etc)."""
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return (
        "# From the image definition's [update]; override in /etc/cerulean/update.toml.\n"
        f"url = {q(defn.update_url)}\nchannel = {q(defn.update_channel)}\n"
        f"window = {q(defn.update_window)}\nreboot = {'true' if defn.update_reboot else 'false'}\n"
        f"boot-tries = {defn.system_boot_tries or 3}\n"
    )


def install_agent(rootfs: Path, defn: ImageDefinition, work: Path) -> AgentDeb:
    """Install the agent package into a system image's tree with dpkg, and its settings."""
    from cerulean.build.chroot import run_in

    deb = build_deb(work / "agent")
    run_in(rootfs, ["sh", "-c", f"dpkg --install /work/agent/{deb.path.name} >/dev/null && "
                    f"python3 -m compileall -q --invalidation-mode checked-hash /{PY_DEST}"],
           binds={work: "/work"}, what="Installing the cerulean-agent package")
    conf = rootfs / "usr/lib/cerulean/update.toml"
    conf.write_text(update_config(defn))
    root = defn.update_root_path
    if root is not None:
        dest = rootfs / "usr/share/cerulean/update/root.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(root.read_bytes())
    return deb
