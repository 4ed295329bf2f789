"""What a system image need not carry or do at every boot.

Debian packages are made for every kind of machine; a Cerulean image knows what it
holds. Each step here removes work from the boot without removing a protection:

- :func:`prune_apparmor_profiles`: the ``apparmor`` package ships about a hundred
  profiles for programs (browsers, chat clients, sbuild...) that a server image does
  not have. ``apparmor.service`` compiles every profile on every boot that finds no
  policy cache (each first boot, each boot of a new release) before anything else
  may start; a profile whose program is absent confines nothing. Profiles for
  programs in the image, and profiles with no path (entered by name), stay and are
  enforced as before.
- :func:`mask_units`: units that only cost time on a server (``modprobe@drm``, which
  systemd-logind waits for, loads the graphics core with no graphics device).
- :func:`mask_generators`: systemd runs every generator on every boot (and again on
  each reload). Those for features a Cerulean image does not use are masked:
  ``systemd-ssh-generator`` (sshd over AF_VSOCK and AF_UNIX: it loads the vsock
  modules on every boot, and a host's sshd is reached over the network only),
  hibernation, ``systemd.run=`` commands on the kernel command line, offline system
  updates, and rc.local, integritytab and SysV scripts when the image has none (or
  only scripts whose services have systemd units).
- :func:`mark_updated`: ``ConditionNeedsUpdate=`` units (ldconfig, the journal's
  message catalog, hwdb, ...) rebuild on the first boot of a new ``/usr`` what the
  build has just made from that very ``/usr``; ``/etc/.updated`` and
  ``/var/.updated`` stamped with ``/usr``'s time say it is done, as systemd intends
  for images. They still run on the first boot of the next release.
- :func:`defer_boot_random_seed` and :func:`repart_in_initrd_only`: two units that
  hold back ``sysinit.target`` (and so everything) are moved off that path: the boot
  loader's random seed is refreshed once the system is up (systemd-boot itself
  refreshes the seed file on every boot before using it), and the root partition,
  which the initrd has already grown, is not repartitioned a second time.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from cerulean.errors import CeruleanError

APPARMOR_DIR = "etc/apparmor.d"
# `profile NAME [ATTACHMENT] [flags=(...)] {`, or the older `ATTACHMENT [flags=(...)] {`.
_PROFILE = re.compile(r'^\s*profile\s+("[^"]*"|\S+)(?:\s+("[^"]*"|/\S*))?')
_OLD_STYLE = re.compile(r'^\s*("/[^"]*"|/\S+)\s+(?:flags=\([^)]*\)\s*)?\{')

# Units masked in every system image (each one with its reason in docs/system-images.md).
MASKED_UNITS = ("modprobe@drm.service",)
GENERATORS = "usr/lib/systemd/system-generators"
# Generators masked always, and those masked when what they read is absent.
MASKED_GENERATORS = ("systemd-ssh-generator", "systemd-hibernate-resume-generator",
                     "systemd-run-generator", "systemd-system-update-generator")
GENERATOR_INPUTS = {"systemd-rc-local-generator": "etc/rc.local",
                    "systemd-integritysetup-generator": "etc/integritytab"}


def _expand_braces(pattern: str) -> list[str]:
    """AppArmor's ``{a,b}`` alternation (nestable) expanded into plain patterns."""
    depth, start = 0, -1
    for i, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                inner, parts, level, last = pattern[start + 1:i], [], 0, 0
                for j, c in enumerate(inner):
                    level += (c == "{") - (c == "}")
                    if c == "," and level == 0:
                        parts.append(inner[last:j])
                        last = j + 1
                parts.append(inner[last:])
                return [x for part in parts
                        for x in _expand_braces(pattern[:start] + part + pattern[i + 1:])]
    return [pattern]


def _attachment_present(root: Path, attachment: str) -> bool | None:
    """Whether something in *root* matches the profile's attachment; None: cannot tell."""
    attachment = attachment.strip('"')
    if "@{" in attachment or not attachment.startswith("/"):
        return None  # a variable (from tunables) or not a path: keep the profile
    for pattern in _expand_braces(attachment):
        if "**" in pattern.replace("/**/", "/").removesuffix("/**"):
            return None  # ** inside a name: more than glob can say
        if any(c in pattern for c in "*?["):
            if glob.glob(str(root) + pattern, recursive=True):
                return True
        elif os.path.lexists(str(root) + pattern):
            return True
    return False


def profile_attachments(text: str) -> list[str | None]:
    """The attachment of each top-level profile in an AppArmor policy file (None: the
    profile has no path and is entered by name)."""
    found: list[str | None] = []
    depth = 0
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        if depth == 0:
            if m := _PROFILE.match(code):
                found.append(m.group(2))
            elif m := _OLD_STYLE.match(code):
                found.append(m.group(1))
        depth = max(0, depth + code.count("{") - code.count("}"))
    return found


def prune_apparmor_profiles(root: Path) -> list[str]:
    """Remove the profiles of programs *root* does not have; returns their file names.

    A file is kept if any of its profiles has no path, a path that is present, or a
    path this cannot judge (variables); files with no profile at all (abstractions,
    tunables, includes) and the subdirectories are never touched.
    """
    policy = root / APPARMOR_DIR
    if not policy.is_dir():
        return []
    removed = []
    for f in sorted(policy.iterdir()):
        if not f.is_file() or f.is_symlink():
            continue
        attachments = profile_attachments(f.read_text(errors="replace"))
        if not attachments:
            continue
        if any(a is None or _attachment_present(root, a) is not False for a in attachments):
            continue
        f.unlink()
        for extra in (policy / "local" / f.name, policy / "force-complain" / f.name,
                      policy / "disable" / f.name):
            if extra.is_file() or extra.is_symlink():
                extra.unlink()
        removed.append(f.name)
    return removed


def mask_units(root: Path, units: tuple[str, ...] = MASKED_UNITS) -> list[str]:
    """Mask *units* that exist in *root* (a link to /dev/null in /etc/systemd/system)."""
    masked = []
    for unit in units:
        template = unit.split("@", 1)[0] + "@.service" if "@" in unit else unit
        if _unit_file(root, template) is None:
            continue
        link = root / "etc/systemd/system" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
        masked.append(unit)
    return masked


def mark_updated(root: Path, usr_time: int) -> None:
    """Stamp ``/etc/.updated`` and ``/var/.updated`` with *usr_time* (the time every file of
    the ``/usr`` image carries), as ``systemd-update-done`` would after a first boot."""
    text = ("# Written by the Cerulean build in place of systemd-update-done: what\n"
            "# ConditionNeedsUpdate= units make was made from this /usr at build time.\n"
            f"TIMESTAMP_NSEC={usr_time * 1_000_000_000}\n")
    for d in ("etc", "var"):
        stamp = root / d / ".updated"
        stamp.write_text(text)
        os.utime(stamp, (usr_time, usr_time))


RANDOM_SEED = "systemd-boot-random-seed.service"


def defer_boot_random_seed(root: Path) -> bool:
    """Install a copy of ``systemd-boot-random-seed.service`` that no longer runs before
    ``sysinit.target`` but after ``multi-user.target``; False if the image has none."""
    unit = _unit_file(root, RANDOM_SEED)
    if unit is None:
        return False
    text = unit.read_text()
    if "\nBefore=sysinit.target shutdown.target\n" not in text:
        raise CeruleanError(f"{RANDOM_SEED} in this image is not ordered as Cerulean expects "
                            "(Before=sysinit.target shutdown.target); review lean.py.")
    text = text.replace(
        "\nBefore=sysinit.target shutdown.target\n",
        "\n# Cerulean: once the system is up, not before sysinit.target (systemd-boot has\n"
        "# already refreshed the seed file before it was used).\n"
        "Before=shutdown.target\nAfter=multi-user.target boot-complete.target\n")
    dest = root / "etc/systemd/system" / RANDOM_SEED
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return True


def repart_in_initrd_only(root: Path) -> bool:
    """``systemd-repart.service`` runs in the initrd (which grows the root or /var
    partition) and not again in the booted system; False if the image has no repart."""
    if _unit_file(root, "systemd-repart.service") is None:
        return False
    dropin = root / "etc/systemd/system/systemd-repart.service.d/50-cerulean-initrd-only.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("# Cerulean: the initrd has grown the partition; once is enough.\n"
                      "[Unit]\nConditionPathExists=/etc/initrd-release\n")
    return True


def _unit_file(root: Path, unit: str) -> Path | None:
    for d in ("usr/lib/systemd/system", "lib/systemd/system"):
        if (root / d / unit).is_file():
            return root / d / unit
    return None


def mask_generators(root: Path) -> list[str]:
    """Mask the generators an image does not need (``/etc/systemd/system-generators/NAME``
    linked to /dev/null, as systemd documents); returns their names."""
    present = {p.name for p in (root / GENERATORS).iterdir()} if (root / GENERATORS).is_dir() \
        else set()
    off = [g for g in MASKED_GENERATORS if g in present]
    off += [g for g, needs in GENERATOR_INPUTS.items()
            if g in present and not (root / needs).exists()]
    if "systemd-sysv-generator" in present and not _sysv_only_services(root):
        off.append("systemd-sysv-generator")
    masks = root / "etc/systemd/system-generators"
    masks.mkdir(parents=True, exist_ok=True)
    for g in off:
        link = masks / g
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    return sorted(off)


def _sysv_only_services(root: Path) -> list[str]:
    """SysV init scripts without a systemd unit of the same name (what the generator is for)."""
    initd = root / "etc/init.d"
    if not initd.is_dir():
        return []
    return sorted(f.name for f in initd.iterdir()
                  if f.is_file() and _unit_file(root, f"{f.name}.service") is None)
