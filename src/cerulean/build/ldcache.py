"""glibc's /etc/ld.so.cache, generated in pure Python from an in-memory rootfs.

This module owns everything ``ldconfig -X -r ROOT`` would do to produce the
cache of a Debian image: reading /etc/ld.so.conf (with its ``include`` globs),
adding Debian's built-in multiarch directories, scanning them and their
glibc-hwcaps subdirectories, filing each candidate by its ELF header and
DT_SONAME (read by :mod:`cerulean.build.elf`), sorting the entries as the
loader expects, and writing the "glibc-ld.so.cache1.1" format byte for byte as
glibc 2.41's ldconfig does. No host tool runs, so an arm64 image gets the
right flags on an x86_64 build host without emulation.

It also parses caches back (:func:`parse_ld_so_cache`), for tests and
inspection.

Like ldconfig, it also files the 32-bit libraries of the architecture's
companion ABIs (i386 and x32 on amd64, armhf/armel on arm64) under their own
flags, for their own loaders. Where it knowingly differs (each a case
ldconfig gets wrong or that does not occur in a Debian image): a file whose
ELF machine does not belong to the architecture is skipped, where arm64's
ldconfig files any 64-bit ELF as AArch64; a.out and big-endian files are not
libraries here; and directories are read in sorted order, not readdir order,
which only matters for two names that glibc's version comparison finds equal,
or two glibc-hwcaps names for one directory (the real directory's name wins).
"""

from __future__ import annotations

import fnmatch
import functools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from cerulean.build.elf import (
    EF_ARM_ABI_FLOAT_HARD,
    EF_ARM_ABI_FLOAT_SOFT,
    EF_ARM_EABI_MASK,
    EF_ARM_EABI_VER5,
    ELFCLASS32,
    ELFCLASS64,
    EM_386,
    EM_AARCH64,
    EM_ARM,
    EM_X86_64,
    ET_DYN,
    read_dynamic_info,
    read_header,
)
from cerulean.build.tree import Tree
from cerulean.errors import CeruleanError

# -- file format constants (glibc sysdeps/generic/dl-cache.h, ldconfig.h) --------

CACHE_MAGIC = b"glibc-ld.so.cache1.1"
OLD_CACHE_MAGIC = b"ld.so-1.7.0"
_HEADER = struct.Struct("<20sIIB3xI12x")  # magic+version, nlibs, len_strings, flags, ext offset
_ENTRY = struct.Struct("<iIIIQ")  # flags, key, value, osversion (unused), hwcap
_EXT_HEADER = struct.Struct("<II")  # magic, section count
_EXT_SECTION = struct.Struct("<IIII")  # tag, flags, offset, size
ENDIAN_LITTLE = 2  # cache_file_new_flags_endian_little
EXTENSION_MAGIC = 0xEAA42174  # cache_extension_magic, (uint32_t) -358342284
TAG_GENERATOR = 0
TAG_GLIBC_HWCAPS = 1
HWCAP_EXTENSION = 1 << 62  # DL_CACHE_HWCAP_EXTENSION
ISA_LEVEL_MASK = (1 << 10) - 1  # DL_CACHE_HWCAP_ISA_LEVEL_MASK

FLAG_ELF_LIBC6 = 0x0003
FLAG_X8664_LIB64 = 0x0300
FLAG_X8664_LIBX32 = 0x0800
FLAG_ARM_LIBHF = 0x0900
FLAG_AARCH64_LIB64 = 0x0A00
FLAG_ARM_LIBSF = 0x0B00

DEFAULT_GENERATOR = "cerulean ldcache"
LD_SO_CONF = "/etc/ld.so.conf"
GLIBC_HWCAPS = "glibc-hwcaps"

# -- architectures, and the cache flags of their ELF files (readelflib.c) ---------


def _x86_flag(ei_class: int, machine: int, e_flags: int) -> int | None:
    # sysdeps/x86/readelflib.c: x32 is EM_X86_64 in a 32-bit file; i386 keeps
    # the generic FLAG_ELF_LIBC6.
    if machine == EM_X86_64:
        return FLAG_ELF_LIBC6 | (FLAG_X8664_LIB64 if ei_class == ELFCLASS64 else FLAG_X8664_LIBX32)
    if machine == EM_386 and ei_class == ELFCLASS32:
        return FLAG_ELF_LIBC6
    return None


def _arm_flag(ei_class: int, machine: int, e_flags: int) -> int | None:
    # sysdeps/unix/sysv/linux/arm/readelflib.c, also used for aarch64.
    if ei_class == ELFCLASS64:
        return FLAG_AARCH64_LIB64 | FLAG_ELF_LIBC6 if machine == EM_AARCH64 else None
    if machine != EM_ARM:
        return None
    if e_flags & EF_ARM_EABI_MASK == EF_ARM_EABI_VER5:
        if e_flags & EF_ARM_ABI_FLOAT_HARD:
            return FLAG_ARM_LIBHF | FLAG_ELF_LIBC6
        if e_flags & EF_ARM_ABI_FLOAT_SOFT:
            return FLAG_ARM_LIBSF | FLAG_ELF_LIBC6
    return FLAG_ELF_LIBC6


@dataclass(frozen=True)
class _Arch:
    triplet: str
    flag: Callable[[int, int, int], int | None]
    signed_char: bool  # `char` is signed on x86 and unsigned on aarch64
    x86_isa_level: bool  # ldconfig reads GNU_PROPERTY_X86_ISA_1_NEEDED only on x86


ARCHES: dict[str, _Arch] = {
    "amd64": _Arch("x86_64-linux-gnu", _x86_flag, signed_char=True, x86_isa_level=True),
    "arm64": _Arch("aarch64-linux-gnu", _arm_flag, signed_char=False, x86_isa_level=False),
}


class CacheEntry(NamedTuple):
    """One record of ld.so.cache: the name looked up, the file it maps to."""

    key: str
    value: str
    flags: int
    hwcap: int = 0


# -- the comparison the dynamic loader binary-searches with ---------------------


def _int32(v: int) -> int:
    return (v + 0x8000_0000) % 0x1_0000_0000 - 0x8000_0000


def libcmp(a: bytes, b: bytes, *, signed_char: bool = True) -> int:
    """glibc's ``_dl_cache_libcmp``: digit runs compare as numbers, above non-digits.

    Its sign is what matters; C ``int`` overflow and the signedness of
    ``char`` on the target are reproduced, since the loader on the target
    must agree with the order the cache was written in.
    """

    def ch(s: bytes, i: int) -> int:
        c = s[i] if i < len(s) else 0
        return c - 256 if signed_char and c >= 0x80 else c

    def isdigit(c: int) -> bool:
        return 0x30 <= c <= 0x39

    i = j = 0
    while (c1 := ch(a, i)) != 0:
        c2 = ch(b, j)
        if isdigit(c1):
            if not isdigit(c2):
                return 1
            v1 = v2 = 0
            while isdigit(ch(a, i)):
                v1 = _int32(v1 * 10 + ch(a, i) - 0x30)
                i += 1
            while isdigit(ch(b, j)):
                v2 = _int32(v2 * 10 + ch(b, j) - 0x30)
                j += 1
            if v1 != v2:
                return _int32(v1 - v2)
        elif isdigit(c2):
            return -1
        elif c1 != c2:
            return c1 - c2
        else:
            i += 1
            j += 1
    return -ch(b, j)


# -- reading ELF files ------------------------------------------------------------


@dataclass(frozen=True)
class _ElfInfo:
    flag: int
    soname: bytes | None
    isa_level: int


def _read_elf(data: bytes, arch: _Arch) -> _ElfInfo | None:
    """The cache flag, soname and ISA level of a shared object for *arch*, if it is one."""
    header = read_header(data)
    if header is None:
        return None
    flag = arch.flag(header.ei_class, header.machine, header.e_flags)
    if header.e_type != ET_DYN or flag is None:
        return None
    info = read_dynamic_info(data, header, x86_isa_level=arch.x86_isa_level)
    if info is None:
        return None
    return _ElfInfo(flag, info.soname, info.isa_level)


# -- /etc/ld.so.conf --------------------------------------------------------------

_SPACE = b" \t\n\v\f\r"


def _glob(tree: Tree, pattern: str) -> list[str]:
    """glob(3) inside the tree: sorted matches, hidden names only matched explicitly."""
    found = [""]
    for comp in (c for c in pattern.split("/") if c):
        magic = any(ch in comp for ch in "*?[")
        step: list[str] = []
        for base in found:
            if not magic:
                step.append(f"{base}/{comp}")
                continue
            for name in tree.listdir(base or "/"):
                if fnmatch.fnmatchcase(name, comp) and (
                    not name.startswith(".") or comp.startswith(".")
                ):
                    step.append(f"{base}/{name}")
        found = step
    # Every path must exist (lstat), and glob sorts by strcmp in the C locale.
    exists = [p for p in found if _lexists(tree, p)]
    return sorted(exists, key=lambda p: p.encode("utf-8", "surrogateescape"))


def _lexists(tree: Tree, path: str) -> bool:
    """Whether *path* exists without following a final symlink (lstat)."""
    parent, _, name = path.rstrip("/").rpartition("/")
    resolved = tree.resolve(parent or "/")
    if resolved is None or not name:
        return resolved is not None
    if _join(resolved, name) in tree.entries:
        return True
    # /lib and friends on a merged-/usr tree that has no explicit link yet.
    return not resolved and tree.resolve(name) is not None


def _conf_dirs(tree: Tree, conf: str, depth: int = 0) -> Iterable[str]:
    """Directory lines of *conf* and the files it includes, in ldconfig's order."""
    if depth > 32:
        raise CeruleanError(f"The ld.so configuration {conf} is included in a loop.")
    data = tree.read(conf)
    if data is None:  # a missing file is silently skipped
        return
    for raw in data.split(b"\n"):
        line = raw.split(b"\0", 1)[0].split(b"#", 1)[0].lstrip(_SPACE)
        if not line:
            continue
        if line.startswith(b"include") and line[7:8] in (b" ", b"\t"):
            for word in line[8:].replace(b"\t", b" ").split(b" "):
                if not word:
                    continue
                pattern = word.decode("utf-8", "surrogateescape")
                if not pattern.startswith("/"):
                    # ldconfig -r run as root chroots, and then takes a
                    # relative pattern from the including file's directory.
                    pattern = f"{conf.rpartition('/')[0]}/{pattern}"
                for path in _glob(tree, pattern):
                    yield from _conf_dirs(tree, path, depth + 1)
        elif line[:5].lower() == b"hwcap" and line[5:6] in (b" ", b"\t"):
            continue  # obsolete directive, ignored by ldconfig too
        else:
            yield line.decode("utf-8", "surrogateescape")


# -- scanning directories ---------------------------------------------------------


@dataclass(frozen=True)
class _Dir:
    path: str  # as spelled in the configuration: cache values are built from it
    real: str  # resolved path inside the tree
    hwcaps: str | None  # glibc-hwcaps subdirectory name, if it is one


@dataclass
class _Lib:
    name: bytes
    soname: bytes
    flag: int
    is_link: bool
    isa_level: int


@dataclass(frozen=True)
class _Record:
    key: bytes
    value: bytes
    flags: int
    hwcaps: bytes | None
    isa_level: int


def _is_dir(tree: Tree, real: str | None) -> bool:
    if real is None:
        return False
    e = tree.entries.get(real)
    return e is not None and e.kind == "dir"


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name


def _search_dirs(tree: Tree, a: _Arch) -> tuple[list[_Dir], set[bytes]]:
    """The directories ldconfig scans, in order, and every glibc-hwcaps name seen."""
    lines = [
        *_conf_dirs(tree, LD_SO_CONF),
        # Debian's ldconfig adds these itself (no lib64/libx32/libilp32 variants).
        f"/lib/{a.triplet}",
        f"/usr/lib/{a.triplet}",
        "/lib",
        "/usr/lib",
    ]
    dirs: list[_Dir] = []
    seen: set[str] = set()
    hwcaps_names: set[bytes] = set()
    for line in lines:
        path = line.rstrip(" \t\n\v\f\r").rstrip("/")
        real = tree.resolve(path) if path else None
        if real is None or not _is_dir(tree, real) or real in seen:
            continue  # missing, or a directory already listed under another name
        seen.add(real)
        dirs.append(_Dir(path, real, None))
        sub = tree.resolve(_join(real, GLIBC_HWCAPS))
        if sub is None or not _is_dir(tree, sub):
            continue
        # ldconfig takes these in readdir order, which only decides which of
        # two names for one directory wins; prefer the real directory's name.
        names = tree.listdir(sub)
        names.sort(key=lambda n: _is_dir(tree, _join(sub, n)), reverse=True)
        for name in names:
            # Hidden names and ':' (the loader's list separator) are skipped,
            # and so are regular files; symlinks to directories count.
            e = tree.entries.get(_join(sub, name))
            if name.startswith(".") or ":" in name or e is None or e.kind == "file":
                continue
            target = tree.resolve(_join(sub, name))
            if target is None or not _is_dir(tree, target):
                continue
            # ldconfig interns the name before checking for a duplicate directory.
            hwcaps_names.add(name.encode("utf-8", "surrogateescape"))
            if target not in seen:
                seen.add(target)
                dirs.append(_Dir(f"{path}/{GLIBC_HWCAPS}/{name}", target, name))
    return dirs, hwcaps_names


def _looks_like_dso(name: str) -> bool:
    # elf/dl-is_dso.h
    return (
        (name.startswith(("lib", "ld-")) and ".so" in name)
        or name.startswith("ld.so.")
        or name.startswith("ld64.so.")
    )


def _skipped_temp_name(name: str) -> bool:
    # Files that prelink, rpm and dpkg write while they work.
    return (
        name.endswith(".#prelink#")
        or (len(name) >= 17 and name[-17:-6] == ".#prelink#.")
        or ";" in name
        or name.endswith((".dpkg-new", ".dpkg-tmp"))
    )


def _scan_dir(tree: Tree, d: _Dir, arch: _Arch) -> list[_Lib]:
    """The libraries ldconfig files from one directory, in its insertion order."""
    libs: dict[bytes, _Lib] = {}
    order: list[bytes] = []
    for name in tree.listdir(d.real):
        entry = tree.entries.get(_join(d.real, name))
        if entry is None:
            continue
        if not _looks_like_dso(name) and (entry.kind == "file" or d.hwcaps is None):
            continue
        if _skipped_temp_name(name) or entry.kind == "dir":
            continue
        is_link = entry.kind == "symlink"
        if is_link:
            target = tree.resolve(_join(d.real, name))
            t = tree.entries.get(target) if target is not None else None
            if t is None or t.kind != "file":
                continue  # dangling, or a link to a directory
            data = t.data
        else:
            data = entry.data
        info = _read_elf(data, arch)
        if info is None:
            continue
        bname = name.encode("utf-8", "surrogateescape")
        soname = info.soname if info.soname is not None else bname
        # A link keeps its own name only if it is the soname link or the
        # libfoo.so development link to it; any other link counts as a file.
        if (
            is_link
            and bname != soname
            and not (bname.endswith(b".so") and soname.startswith(bname))
        ):
            is_link = False
        if is_link:
            soname = bname
        known = libs.get(soname)
        if known is None:
            libs[soname] = _Lib(bname, soname, info.flag, is_link, info.isa_level)
            order.append(soname)
        elif (not is_link and known.is_link) or (
            is_link == known.is_link and libcmp(known.name, bname, signed_char=arch.signed_char) < 0
        ):
            # Prefer a file to a link, then the newer name; the flag stays.
            known.name, known.is_link, known.isa_level = bname, is_link, info.isa_level
    # ldconfig keeps this list newest-first.
    return [libs[s] for s in reversed(order)]


# -- writing the cache ------------------------------------------------------------


def _string_table(strings: Iterable[bytes]) -> tuple[bytes, dict[bytes, int]]:
    """elf/stringtable.c: strings sorted by their reversed bytes, suffixes shared."""
    ordered = sorted(set(strings), key=lambda s: s[::-1], reverse=True)
    offsets: dict[bytes, int] = {}
    prev, prev_off = b"", 0
    for i, s in enumerate(ordered):
        if i == 0:
            off = 0
        elif len(prev) >= len(s) and prev.endswith(s):
            off = prev_off + len(prev) - len(s)
        else:
            off = prev_off + len(prev) + 1
        offsets[s] = off
        prev, prev_off = s, off
    size = prev_off + len(prev) + 1 if ordered else 0
    table = bytearray(size)
    for s, off in offsets.items():
        table[off : off + len(s)] = s
    return bytes(table), offsets


def _record_order(signed_char: bool) -> Callable[[_Record, _Record], int]:
    def compare(e1: _Record, e2: _Record) -> int:
        # elf/cache.c compare(): names descending, then flags descending, then
        # glibc-hwcaps entries first, by subdirectory name.
        res = libcmp(e2.key, e1.key, signed_char=signed_char)
        if res != 0:
            return res
        if e1.flags != e2.flags:
            return 1 if e1.flags < e2.flags else -1
        if (e1.hwcaps is None) != (e2.hwcaps is None):
            return -1 if e1.hwcaps is not None else 1
        if e1.hwcaps is not None and e2.hwcaps is not None and e1.hwcaps != e2.hwcaps:
            return -1 if e1.hwcaps < e2.hwcaps else 1
        return 0

    return compare


def _arch(arch: str) -> _Arch:
    spec = ARCHES.get(arch)
    if spec is None:
        known = ", ".join(sorted(ARCHES))
        raise CeruleanError(
            f"The architecture '{arch}' has no ld.so.cache support (known: {known})."
        )
    return spec


def build_ld_so_cache(tree: Tree, arch: str, *, generator: str | None = DEFAULT_GENERATOR) -> bytes:
    """The /etc/ld.so.cache that Debian's ``ldconfig -r`` on *arch* would write for *tree*.

    *arch* is a Debian architecture name. *generator* is the free text kept in
    the cache's extension section (ldconfig puts its version there); None
    leaves it out. The result depends only on the tree's contents.
    """
    spec = _arch(arch)
    dirs, hwcaps_names = _search_dirs(tree, spec)
    records: list[_Record] = []
    for d in dirs:
        prefix = d.path.encode("utf-8", "surrogateescape") + b"/"
        hw = d.hwcaps.encode("utf-8", "surrogateescape") if d.hwcaps is not None else None
        for lib in _scan_dir(tree, d, spec):
            # Ordinary entries point at the soname link, so an upgrade that
            # renames the real file keeps the cache valid; glibc-hwcaps
            # entries point at the file itself.
            filename = lib.soname if hw is None else lib.name
            records.append(_Record(lib.soname, prefix + filename, lib.flag, hw, lib.isa_level))
    # ldconfig inserts each record after those it compares equal to, so a
    # stable sort in scanning order gives the same sequence.
    records.sort(key=functools.cmp_to_key(_record_order(spec.signed_char)))

    used_hwcaps = sorted({r.hwcaps for r in records if r.hwcaps is not None})
    hwcaps_index = {name: i for i, name in enumerate(used_hwcaps)}
    strings = {r.key for r in records} | {r.value for r in records} | hwcaps_names
    table, offsets = _string_table(strings)
    str_base = _HEADER.size + _ENTRY.size * len(records)

    entries = bytearray()
    for r in records:
        hwcap = 0
        if r.hwcaps is not None:
            if r.isa_level > ISA_LEVEL_MASK:
                raise CeruleanError(f"The library {r.value!r} needs an unknown ISA level.")
            hwcap = HWCAP_EXTENSION | (r.isa_level << 32) | hwcaps_index[r.hwcaps]
        entries += _ENTRY.pack(
            r.flags, str_base + offsets[r.key], str_base + offsets[r.value], 0, hwcap
        )

    # Extension directory after the string table, aligned to 4: the section
    # descriptors (generator first), then the hwcaps index array, then the text.
    sections: list[tuple[int, bytes]] = []
    if generator is not None:
        sections.append((TAG_GENERATOR, generator.encode()))
    if used_hwcaps:
        array = b"".join(struct.pack("<I", str_base + offsets[n]) for n in used_hwcaps)
        sections.append((TAG_GLIBC_HWCAPS, array))
    body_end = str_base + len(table)
    ext_offset = -(-body_end // 4) * 4 if sections else 0
    ext = bytearray()
    if sections:
        ext += _EXT_HEADER.pack(EXTENSION_MAGIC, len(sections))
        pos = ext_offset + _EXT_HEADER.size + _EXT_SECTION.size * len(sections)
        placed: dict[int, int] = {}
        for tag, payload in sorted(sections, key=lambda s: -s[0]):  # hwcaps data goes first
            placed[tag] = pos
            pos += len(payload)
        for tag, payload in sections:
            ext += _EXT_SECTION.pack(tag, 0, placed[tag], len(payload))
        for _tag, payload in sorted(sections, key=lambda s: -s[0]):
            ext += payload

    header = _HEADER.pack(CACHE_MAGIC, len(records), len(table), ENDIAN_LITTLE, ext_offset)
    padding = b"\0" * (ext_offset - body_end) if sections else b""
    return bytes(header + entries + table + padding + ext)


# -- reading a cache back ---------------------------------------------------------


def _cstring(data: bytes, off: int) -> str:
    end = data.find(b"\0", off)
    if off >= len(data) or end < 0:
        raise CeruleanError("The ld.so.cache has a string outside the file.")
    return data[off:end].decode("utf-8", "surrogateescape")


def parse_ld_so_cache(data: bytes) -> list[CacheEntry]:
    """The entries of a new-format ld.so.cache, in file order."""
    if data.startswith(OLD_CACHE_MAGIC):
        raise CeruleanError("The ld.so.cache uses the old libc5 format, which is not supported.")
    if len(data) < _HEADER.size or not data.startswith(CACHE_MAGIC):
        raise CeruleanError("The data is not a glibc ld.so.cache.")
    _magic, nlibs, _len_strings, flags, _ext = _HEADER.unpack_from(data, 0)
    if flags & 3 not in (0, ENDIAN_LITTLE):
        raise CeruleanError("The ld.so.cache is not little-endian.")
    if _HEADER.size + nlibs * _ENTRY.size > len(data):
        raise CeruleanError("The ld.so.cache is truncated.")
    result = []
    for i in range(nlibs):
        fl, key, value, _os, hwcap = _ENTRY.unpack_from(data, _HEADER.size + i * _ENTRY.size)
        result.append(CacheEntry(_cstring(data, key), _cstring(data, value), fl, hwcap))
    return result


def cache_generator(data: bytes) -> str | None:
    """The generator text of a cache's extension section, if it has one."""
    if len(data) < _HEADER.size or not data.startswith(CACHE_MAGIC):
        raise CeruleanError("The data is not a glibc ld.so.cache.")
    ext = _HEADER.unpack_from(data, 0)[4]
    if ext == 0 or ext + _EXT_HEADER.size > len(data):
        return None
    magic, count = _EXT_HEADER.unpack_from(data, ext)
    if magic != EXTENSION_MAGIC:
        return None
    for i in range(count):
        at = ext + _EXT_HEADER.size + i * _EXT_SECTION.size
        if at + _EXT_SECTION.size > len(data):
            return None
        tag, _flags, off, size = _EXT_SECTION.unpack_from(data, at)
        if tag == TAG_GENERATOR and off + size <= len(data):
            return data[off : off + size].decode("utf-8", "replace")
    return None
