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
  systemd-logind waits for, loads the graphics core with no graphics device), and
  e2scrub's when the image has no LVM to check through.
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
  for images. They run again on the first boot of a release whose ``/usr`` has
  another time (one built from a changed lock).
- :func:`defer_boot_random_seed` and :func:`repart_in_initrd_only`: two units that
  hold back ``sysinit.target`` (and so everything) are moved off that path: the boot
  loader's random seed is refreshed once the system is up (systemd-boot itself
  refreshes the seed file on every boot before using it), and the root partition,
  which the initrd has already grown, is not repartitioned a second time.
- :func:`networkd_without_bpf`: ``systemd-networkd`` loads a BPF program at start
  whose only job is to log other programs' writes to the sysctls it manages. Loading
  it (libbpf reading the kernel's type information, then the verifier) is the bulk
  of networkd's start, which the network waits for; without ``bpf()`` networkd says
  so once and carries on, with one privilege fewer.

Masks, unit changes and drop-ins go into ``/usr`` (the vendor unit and generator
directories), never ``/etc``: ``/usr`` is what each release replaces, while ``/etc``
is written once when a host is installed, so a later release can undo any of them.
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
# Units masked when the image lacks what they work on: e2scrub checks ext4 volumes
# through LVM snapshots, and does nothing without LVM; its reaper holds
# multi-user.target back (a oneshot it wants, in the idle scheduling class) all the same.
LVM = "usr/sbin/lvm"
MASKED_WITHOUT = {"e2scrub_reap.service": LVM, "e2scrub_all.timer": LVM,
                  "e2scrub_all.service": LVM}
UNITS = "usr/lib/systemd/system"
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
            # AppArmor negates a set with [^...], Python's glob with [!...].
            if glob.glob(glob.escape(str(root)) + pattern.replace("[^", "[!"),
                         recursive=True):
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


def _in_usr(attachment: str) -> bool:
    """Whether every path the attachment names is in /usr (merged: /bin, /sbin, /lib
    too), which only a release changes."""
    return all(re.match(r"/(usr|bin|sbin|lib[a-z0-9]*)/", p)
               for p in _expand_braces(attachment.strip('"')))


def _unconfined(text: str) -> bool:
    """Whether the file's profiles are ``flags=(unconfined)``: they confine nothing."""
    flags = re.findall(r"flags\s*=\s*\(([^)]*)\)", text)
    return bool(flags) and all(re.search(r"\bunconfined\b", f) for f in flags)


def prune_apparmor_profiles(root: Path) -> list[str]:
    """Remove the profiles of programs *root* does not have; returns their file names.

    A file is kept if any of its profiles has no path, a path that is present, or a
    path this cannot judge (variables); files with no profile at all (abstractions,
    tunables, includes) and the subdirectories are never touched. A confining profile
    for a path outside /usr is kept too: a program may be put there after the build.
    """
    policy = root / APPARMOR_DIR
    if not policy.is_dir():
        return []
    removed = []
    for f in sorted(policy.iterdir()):
        if not f.is_file() or f.is_symlink():
            continue
        text = f.read_text(errors="replace")
        attachments = profile_attachments(text)
        if not attachments:
            continue
        if any(a is None or _attachment_present(root, a) is not False for a in attachments):
            continue
        if not (_unconfined(text) or all(_in_usr(a) for a in attachments if a)):
            continue  # the program may come later where a host can write (/opt, /srv...)
        f.unlink()
        for extra in (policy / "local" / f.name, policy / "force-complain" / f.name,
                      policy / "disable" / f.name):
            if extra.is_file() or extra.is_symlink():
                extra.unlink()
        removed.append(f.name)
    return removed


def mask_units(root: Path, units: tuple[str, ...] = MASKED_UNITS) -> list[str]:
    """Mask *units* that exist in *root*, and those of :data:`MASKED_WITHOUT` whose
    subject *root* lacks: a link to /dev/null among the vendor units in ``/usr`` (as
    Debian's systemd package masks units itself), so the next release can unmask it."""
    masked = []
    absent = [u for u, needs in MASKED_WITHOUT.items() if not (root / needs).exists()]
    for unit in (*units, *absent):
        template = unit.split("@", 1)[0] + "@.service" if "@" in unit else unit
        if _unit_file(root, template) is None:
            continue
        _null_link(root / UNITS / unit)
        masked.append(unit)
    return masked


def _null_link(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to("/dev/null")


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
    """Change ``systemd-boot-random-seed.service`` (in ``/usr``) to run after
    ``multi-user.target`` instead of before ``sysinit.target``; False if the image has
    none. (A drop-in cannot take an ordering away, so the unit itself is changed.)"""
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
    unit.write_text(text)  # in /usr: the next release brings its own
    return True


def repart_in_initrd_only(root: Path) -> bool:
    """``systemd-repart.service`` runs in the initrd (which grows the root or /var
    partition) and not again in the booted system; False if the image has no repart."""
    if _unit_file(root, "systemd-repart.service") is None:
        return False
    dropin = root / UNITS / "systemd-repart.service.d/50-cerulean-initrd-only.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("# Cerulean: the initrd has grown the partition; once is enough.\n"
                      "[Unit]\nConditionPathExists=/etc/initrd-release\n")
    return True


NETWORKD = "systemd-networkd.service"


def networkd_without_bpf(root: Path) -> bool:
    """A drop-in (in ``/usr``) that denies ``systemd-networkd`` the ``bpf()`` system
    call, so it skips its sysctl monitor; False if the image has no networkd."""
    if _unit_file(root, NETWORKD) is None:
        return False
    dropin = root / UNITS / f"{NETWORKD}.d/50-cerulean-no-bpf.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("# Cerulean: no sysctl monitor (a BPF program that only logs other\n"
                      "# programs' sysctl writes); its loading was most of networkd's start.\n"
                      "[Service]\nSystemCallFilter=~bpf\n")
    return True


def _unit_file(root: Path, unit: str) -> Path | None:
    for d in ("usr/lib/systemd/system", "lib/systemd/system"):
        if (root / d / unit).is_file():
            return root / d / unit
    return None


def mask_generators(root: Path) -> list[str]:
    """Mask the generators an image does not need (the program in ``/usr`` replaced by
    a link to /dev/null, which systemd skips); returns their names."""
    present = {p.name for p in (root / GENERATORS).iterdir()} if (root / GENERATORS).is_dir() \
        else set()
    off = [g for g in MASKED_GENERATORS if g in present]
    off += [g for g, needs in GENERATOR_INPUTS.items()
            if g in present and not (root / needs).exists()]
    if "systemd-sysv-generator" in present and not _sysv_only_services(root):
        off.append("systemd-sysv-generator")
    for g in off:
        _null_link(root / GENERATORS / g)
    return sorted(off)


def _sysv_only_services(root: Path) -> list[str]:
    """SysV init scripts without a systemd unit of the same name (what the generator is for)."""
    initd = root / "etc/init.d"
    if not initd.is_dir():
        return []
    return sorted(f.name for f in initd.iterdir()
                  if f.is_file() and _unit_file(root, f"{f.name}.service") is None)
