"""Reading ELF shared objects: the header, and DT_SONAME through the program headers.

This module owns the ELF side of :mod:`cerulean.build.ldcache`, and only what
ldconfig looks at:

* the elf.h constants it needs (classes, machines, segment and dynamic tags,
  the ARM ABI flags),
* the header of a little-endian ELF32 or ELF64 file (:func:`read_header`),
* through the program headers, the DT_SONAME of the dynamic section, whose
  DT_STRTAB address is mapped to a file offset through its PT_LOAD segment,
  and the x86 ISA level of a PT_GNU_PROPERTY note (:func:`read_dynamic_info`).

It reads files as glibc 2.41's ldconfig does (elf/readelflib.c), quirks
included; which files are libraries, and for which ABI, is ldcache's to say.
Big-endian files are not read. A file ldconfig would not read gives None.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- constants (elf.h) ------------------------------------------------------------

ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2MSB = 2
ET_DYN = 3
EM_386, EM_ARM, EM_X86_64, EM_AARCH64 = 3, 40, 62, 183
PT_LOAD, PT_DYNAMIC, PT_GNU_PROPERTY = 1, 2, 0x6474E553
DT_NULL, DT_STRTAB, DT_SONAME = 0, 5, 14
NT_GNU_PROPERTY_TYPE_0 = 5
GNU_PROPERTY_X86_ISA_1_NEEDED = 0xC0008002
EF_ARM_EABI_MASK, EF_ARM_EABI_VER5 = 0xFF000000, 0x05000000
EF_ARM_ABI_FLOAT_SOFT, EF_ARM_ABI_FLOAT_HARD = 0x200, 0x400


# -- layouts of the two ELF classes -----------------------------------------------


@dataclass(frozen=True)
class _ElfLayout:
    """Header, program header and dynamic entry layouts of one ELF class."""

    ehdr: struct.Struct  # e_type, e_machine, e_phoff, e_flags, e_phnum (after e_ident)
    phdr: struct.Struct
    phdr_order: tuple[int, int, int, int, int]  # indices of type, offset, vaddr, filesz, align
    dyn: struct.Struct
    word: int  # sizeof (ElfW(Addr)): property alignment

    def read_phdr(self, data: bytes, off: int) -> tuple[int, int, int, int, int]:
        f = self.phdr.unpack_from(data, off)
        t, o, v, s, a = self.phdr_order
        return f[t], f[o], f[v], f[s], f[a]


_ELF32 = _ElfLayout(
    ehdr=struct.Struct("<16xHHIIIIIHHHHHH"),
    phdr=struct.Struct("<IIIIIIII"),  # type, offset, vaddr, paddr, filesz, memsz, flags, align
    phdr_order=(0, 1, 2, 4, 7),
    dyn=struct.Struct("<iI"),
    word=4,
)
_ELF64 = _ElfLayout(
    ehdr=struct.Struct("<16xHHIQQQIHHHHHH"),
    phdr=struct.Struct("<IIQQQQQQ"),  # type, flags, offset, vaddr, paddr, filesz, memsz, align
    phdr_order=(0, 2, 3, 5, 7),
    dyn=struct.Struct("<qQ"),
    word=8,
)
# ldconfig (a 64-bit program on both architectures) refuses files smaller than
# sizeof (Elf64_Ehdr) before it looks at them.
_MIN_FILE_SIZE = 64
_LAYOUTS = {ELFCLASS32: _ELF32, ELFCLASS64: _ELF64}


# -- the header -------------------------------------------------------------------


@dataclass(frozen=True)
class ElfHeader:
    """The fields of an ELF header that say what the file is and where to read on."""

    ei_class: int  # ELFCLASS32 or ELFCLASS64
    e_type: int  # ET_DYN for a shared object
    machine: int  # e_machine, one of the EM_ values
    e_flags: int
    phoff: int  # file offset of the program headers
    phnum: int


def read_header(data: bytes) -> ElfHeader | None:
    """The header of a little-endian ELF file, or None if *data* is not one ldconfig reads."""
    if len(data) < _MIN_FILE_SIZE or data[:4] != b"\x7fELF" or data[5] == ELFDATA2MSB:
        return None
    ei_class = data[4]
    elf = _LAYOUTS.get(ei_class)
    if elf is None:
        return None
    e_type, machine, _, *rest = elf.ehdr.unpack_from(data, 0)
    _entry, phoff, _shoff, e_flags, _ehsize, _phentsize, phnum = rest[:7]
    return ElfHeader(ei_class, e_type, machine, e_flags, phoff, phnum)


# -- program headers and the dynamic section --------------------------------------


@dataclass(frozen=True)
class DynamicInfo:
    """What ldconfig reads through the program headers of a shared object."""

    soname: bytes | None  # DT_SONAME, if the file has one
    isa_level: int  # x86 ISA level needed (baseline 0, v2 1, v3 2, v4 3); 0 if not read


def _in_file(data: bytes, off: int, size: int = 0) -> bool:
    return off >= 0 and off + size <= len(data)


def _x86_isa_level(data: bytes, elf: _ElfLayout, off: int, size: int, align: int) -> int | None:
    """GNU_PROPERTY_X86_ISA_1_NEEDED of a PT_GNU_PROPERTY segment, as ldconfig reads it."""
    # Only the first NT_GNU_PROPERTY_TYPE_0 note is read; a malformed one gives nothing.
    pos = 0
    while pos + 12 < size:
        at = off + pos
        if not _in_file(data, at, 12):
            return None
        namesz, descsz, ntype = struct.unpack_from("<III", data, at)
        if namesz == 4 and ntype == NT_GNU_PROPERTY_TYPE_0 and data[at + 12 : at + 16] == b"GNU\0":
            if descsz < 8 or descsz % elf.word:
                return None
            ptr, end, last = at + 16, at + 16 + descsz, 0
            while True:
                if not _in_file(data, ptr, 8):
                    return None
                ptype, datasz = struct.unpack_from("<II", data, ptr)
                ptr += 8
                if ptype < last or ptr + datasz > end or ptype > GNU_PROPERTY_X86_ISA_1_NEEDED:
                    return None
                last = ptype
                if ptype == GNU_PROPERTY_X86_ISA_1_NEEDED:
                    if datasz != 4 or not _in_file(data, ptr, 4):
                        return None
                    needed: int = struct.unpack_from("<I", data, ptr)[0]
                    # The index of the highest bit: baseline 0, v2 1, v3 2, v4 3.
                    return needed.bit_length() - 1 if needed else None
                ptr += -(-datasz // elf.word) * elf.word
                if end - ptr < 8:
                    return None
        desc = -(-(12 + namesz) // align) * align
        pos += -(-(desc + descsz) // align) * align
    return None


def read_dynamic_info(data: bytes, header: ElfHeader, *, x86_isa_level: bool) -> DynamicInfo | None:
    """DT_SONAME and the x86 ISA level of the file *header* was read from.

    The ISA level is only read when *x86_isa_level* is set (ldconfig reads it
    on x86 only). None when the file has no dynamic section or DT_STRTAB, or
    when a program header, the string table or the soname lies outside the file.
    """
    elf = _LAYOUTS[header.ei_class]
    dynamic: tuple[int, int] | None = None
    loads: list[tuple[int, int, int]] = []
    isa_level = 0
    for i in range(header.phnum):
        # Like ldconfig, step by sizeof (ElfW(Phdr)) whatever e_phentsize says.
        at = header.phoff + i * elf.phdr.size
        if not _in_file(data, at, elf.phdr.size):
            return None
        p_type, p_offset, p_vaddr, p_filesz, p_align = elf.read_phdr(data, at)
        if p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)  # the last one wins, as in ldconfig
        elif p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_GNU_PROPERTY and x86_isa_level and p_align == elf.word:
            level = _x86_isa_level(data, elf, p_offset, p_filesz, p_align)
            isa_level = isa_level if level is None else level
    if dynamic is None or dynamic[1] == 0:
        return None

    # The dynamic section runs to DT_NULL (or, in a truncated file, its end).
    tags: list[tuple[int, int]] = []
    at = dynamic[0]
    while _in_file(data, at, elf.dyn.size):
        d_tag, d_val = elf.dyn.unpack_from(data, at)
        if d_tag == DT_NULL:
            break
        tags.append((d_tag, d_val))
        at += elf.dyn.size
    strtab = next((v for t, v in tags if t == DT_STRTAB), None)
    if strtab is None:
        return None
    # DT_STRTAB is an address: map it to a file offset through its PT_LOAD.
    load_bias = next((va - fo for va, fo, sz in loads if 0 <= strtab - va < sz), 0)
    strings = strtab - load_bias
    if not _in_file(data, strings):
        return None
    soname: bytes | None = None
    for t, v in tags:
        if t == DT_SONAME:
            start = strings + v
            if not _in_file(data, start):
                return None
            end = data.find(b"\0", start)
            soname = data[start : end if end >= 0 else len(data)]
            break
    return DynamicInfo(soname, isa_level)
