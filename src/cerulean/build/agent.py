"""The ``cerulean-agent`` Debian package: the host side of Cerulean, built from this tree.

It holds :mod:`cerulean.agent`, :mod:`cerulean.protocol` and
:mod:`cerulean.errors` (all standard library or Debian-packaged libraries),
the ``cerulean`` command for hosts and the agent's systemd units, written bit
for bit reproducibly by :func:`cerulean.debian.deb.write_deb`. Every system
image installs it with dpkg; on other Debian and Ubuntu servers ``apt install
./cerulean-agent_*.deb`` does the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cerulean
from cerulean.build.definition import AGENT_DEPENDS, AGENT_REQUIRES, ImageDefinition
from cerulean.debian.deb import write_deb

PACKAGE = "cerulean-agent"
SRC = Path(cerulean.__file__).resolve().parent
PY_DEST = "usr/lib/python3/dist-packages/cerulean"
UNITS = ("cerulean-update.service", "cerulean-update.timer", "cerulean-health.service",
         "cerulean-agent.service", "cerulean-policy.service", "cerulean-policy.timer")
MAINTAINER = "Cerulean Linux <security@cerulean-linux.invalid>"

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


def content_version(files: dict[str, tuple[bytes, int]]) -> str:
    """A package version that changes with every change of its files."""
    h = hashlib.sha256()
    for path, (data, mode) in sorted(files.items()):
        h.update(f"{path}\0{mode}\0".encode() + hashlib.sha256(data).digest())
    return f"{cerulean.__version__}+{h.hexdigest()[:12]}"


def version() -> str:
    return content_version(contents())


@dataclass(frozen=True)
class AgentDeb:
    path: Path
    version: str


def build_deb(out_dir: Path) -> AgentDeb:
    """Write ``cerulean-agent_VERSION_all.deb`` into *out_dir*."""
    ver = version()
    recommends = [d for d in AGENT_DEPENDS if d.split()[0] not in
                  {r.split()[0] for r in AGENT_REQUIRES}]
    control = (
        f"Package: {PACKAGE}\nVersion: {ver}\nArchitecture: all\n"
        f"Maintainer: {MAINTAINER}\n"
        f"Depends: {', '.join(AGENT_REQUIRES)}\n"
        f"Recommends: {', '.join(recommends)}\n"
        "Section: admin\nPriority: optional\n"
        "Description: Cerulean host agent: updates, detection, compliance, audit trail\n"
        " Applies signed A/B updates on Cerulean disks and rolls back on a failed\n"
        " health check; watches the host with detection rules and integrity scans;\n"
        " checks and fixes compliance profiles (CIS Debian 12 Level 1 - Server among\n"
        " them); keeps a hash-chained audit trail of its actions; serves the host's\n"
        " metrics in the Prometheus text format.\n"
    )
    deb = write_deb(control, contents())
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
