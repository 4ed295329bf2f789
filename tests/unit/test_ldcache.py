"""Tests for the pure-Python ld.so.cache generator.

Where the host has glibc's ldconfig (x86_64 Debian), the same tree is also
written to disk and run through ``ldconfig -X -r``, and the two caches must
be identical byte for byte (the only free text, the generator string, is
taken from the host's cache). The arm64 cases use synthetic ELF files.
"""

from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cerulean.build.ldcache import (
    DEFAULT_GENERATOR,
    CacheEntry,
    build_ld_so_cache,
    cache_generator,
    libcmp,
    parse_ld_so_cache,
)
from cerulean.build.tree import Tree
from cerulean.errors import CeruleanError

EM_386, EM_ARM, EM_X86_64, EM_AARCH64 = 3, 40, 62, 183
ET_EXEC, ET_DYN = 2, 3
AMD64 = "/lib/x86_64-linux-gnu"
ARM64 = "/lib/aarch64-linux-gnu"
DEBIAN_CONF = {
    "etc/ld.so.conf": b"include /etc/ld.so.conf.d/*.conf\n\n",
    "etc/ld.so.conf.d/libc.conf": b"# libc default configuration\n/usr/local/lib\n",
}


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def elf_so(
    machine: int,
    soname: bytes | None,
    *,
    bits: int = 64,
    e_type: int = ET_DYN,
    e_flags: int = 0,
    isa_needed: int | None = None,
) -> bytes:
    """A minimal little-endian ELF object: PT_LOAD, PT_DYNAMIC, a string table.

    The load address is not zero, so reading DT_STRTAB needs the mapping
    from address to file offset; *isa_needed* adds an x86 ISA property note.
    """
    wide = bits == 64
    ehdr = struct.Struct("<16sHHIQQQIHHHHHH" if wide else "<16sHHIIIIIHHHHHH")
    phdr = struct.Struct("<IIQQQQQQ" if wide else "<IIIIIIII")
    dyn = struct.Struct("<qQ" if wide else "<iI")
    word, base = (8, 0x400000) if wide else (4, 0x8000)
    nph = 2 if isa_needed is None else 3
    note = b""
    if isa_needed is not None:
        prop = struct.pack("<III", 0xC0008002, 4, isa_needed)
        prop += bytes(_align(len(prop), word) - len(prop))
        note = struct.pack("<III", 4, len(prop), 5) + b"GNU\0" + prop
    note_off = _align(ehdr.size + nph * phdr.size, word)
    strtab_off = note_off + len(note)
    strtab = b"\0" + (soname + b"\0" if soname is not None else b"")
    dyn_off = _align(strtab_off + len(strtab), word)
    tags = [(5, base + strtab_off)] + ([(14, 1)] if soname is not None else []) + [(0, 0)]
    dynamic = b"".join(dyn.pack(t, v) for t, v in tags)
    size = dyn_off + len(dynamic)

    def ph(p_type: int, off: int, filesz: int, align: int) -> bytes:
        if wide:
            return phdr.pack(p_type, 4, off, base + off, base + off, filesz, filesz, align)
        return phdr.pack(p_type, off, base + off, base + off, filesz, filesz, 4, align)

    phs = ph(1, 0, size, 0x1000) + ph(2, dyn_off, len(dynamic), word)
    if note:
        phs += ph(0x6474E553, note_off, len(note), word)
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1, 1]) + bytes(9)
    out = ehdr.pack(
        ident, e_type, machine, 1, 0, ehdr.size, 0, e_flags, ehdr.size, phdr.size, nph, 0, 0, 0
    )
    out += phs
    out += bytes(note_off - len(out)) + note + strtab
    return out + bytes(dyn_off - len(out)) + dynamic


def make_tree(files: dict[str, bytes | str]) -> Tree:
    """A merged-/usr tree: bytes are files, str are symlink targets."""
    tree = Tree()
    for path, content in files.items():
        if isinstance(content, str):
            tree.add_symlink(path, content)
        else:
            tree.add_file(path, content)
    tree.add_merged_usr_links()
    return tree


def materialize(tree: Tree, root: Path) -> None:
    for e in tree:
        p = root / e.path
        if e.kind == "dir":
            p.mkdir(exist_ok=True)
        elif e.kind == "symlink":
            p.symlink_to(e.target)
        else:
            p.write_bytes(e.data)


def host_ldconfig() -> str:
    if platform.machine() != "x86_64":
        pytest.skip("comparing with the host's ldconfig needs an x86_64 host")
    for candidate in (shutil.which("ldconfig"), "/usr/sbin/ldconfig", "/sbin/ldconfig"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("the host has no ldconfig")


def ldconfig_cache(tree: Tree, root: Path) -> bytes:
    ldconfig = host_ldconfig()
    materialize(tree, root)
    subprocess.run(
        [ldconfig, "-X", "-r", str(root), "-C", "/etc/ld.so.cache"],
        check=True,
        capture_output=True,
    )
    return (root / "etc/ld.so.cache").read_bytes()


def loader_lookup(cache: bytes, name: str, *, signed_char: bool) -> int | None:
    """Index of the entry the dynamic loader's binary search starts from (dl-cache.c)."""
    entries = parse_ld_so_cache(cache)
    key = name.encode()
    left, right = 0, len(entries) - 1
    while left <= right:
        middle = (left + right) // 2
        res = libcmp(key, entries[middle].key.encode(), signed_char=signed_char)
        if res == 0:
            while middle > 0 and entries[middle - 1].key == name:
                middle -= 1
            return middle
        if res < 0:
            left = middle + 1
        else:
            right = middle - 1
    return None


# -- against the host's ldconfig --------------------------------------------------


def test_real_host_libraries_match_ldconfig(tmp_path: Path) -> None:
    host_ldconfig()
    libdir = Path("/usr/lib/x86_64-linux-gnu")
    zreal = Path(os.path.realpath(libdir / "libz.so.1")).name
    names = ["libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2", zreal]
    if not all((libdir / n).is_file() for n in names):
        pytest.skip("the host lacks the glibc and zlib libraries this test copies")
    lib = "usr/lib/x86_64-linux-gnu"
    files: dict[str, bytes | str] = {f"{lib}/{n}": (libdir / n).read_bytes() for n in names}
    files |= {
        f"{lib}/libz.so.1": zreal,
        f"{lib}/libz.so": "libz.so.1",
        "usr/lib64/ld-linux-x86-64.so.2": "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "usr/local/lib/libz.so.1": (libdir / zreal).read_bytes(),  # same soname, 2nd dir
        "etc/ld.so.conf.d/x86_64-linux-gnu.conf": b"# Multiarch support\n"
        b"/usr/local/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu\n",
        **DEBIAN_CONF,
    }
    tree = make_tree(files)

    expected = ldconfig_cache(tree, tmp_path)
    ours = build_ld_so_cache(tree, "amd64", generator=cache_generator(expected))

    assert parse_ld_so_cache(ours) == parse_ld_so_cache(expected)
    assert ours == expected
    # libc.conf sorts before x86_64-linux-gnu.conf, so /usr/local/lib comes first.
    assert parse_ld_so_cache(ours) == [
        CacheEntry("libz.so.1", "/usr/local/lib/libz.so.1", 0x303),
        CacheEntry("libz.so.1", f"{AMD64}/libz.so.1", 0x303),
        CacheEntry("libz.so", f"{AMD64}/libz.so", 0x303),
        CacheEntry("libm.so.6", f"{AMD64}/libm.so.6", 0x303),
        CacheEntry("libc.so.6", f"{AMD64}/libc.so.6", 0x303),
        CacheEntry("ld-linux-x86-64.so.2", f"{AMD64}/ld-linux-x86-64.so.2", 0x303),
    ]


def test_synthetic_tree_matches_ldconfig(tmp_path: Path) -> None:
    """Version ordering, link rules, configuration syntax, hwcaps: all as ldconfig does."""
    if os.geteuid() != 0:
        pytest.skip("ldconfig -r takes relative includes only when it can chroot (as root)")
    lib = "usr/lib/x86_64-linux-gnu"
    sonames = [
        "libfoo.so.1", "libfoo.so.10", "libfoo.so.9", "libfoo.so.1.2", "libfoo2.so.1",
        "libfoo-1.2.so", "libFoo.so.3", "lib_a.so.0", "liba.so.0", "libz9.so.1",
        "libz10.so.1", "libx.so.4294967297", "ld-linux-x86-64.so.2",
    ]  # fmt: skip
    files: dict[str, bytes | str] = {f"{lib}/{s}": elf_so(EM_X86_64, s.encode()) for s in sonames}
    files |= {
        # libbar.so -> libbar.so.2 -> libbar.so.2.0.1: the usual chain.
        f"{lib}/libbar.so.2.0.1": elf_so(EM_X86_64, b"libbar.so.2"),
        f"{lib}/libbar.so.2": "libbar.so.2.0.1",
        f"{lib}/libbar.so": "libbar.so.2",
        # A link named neither the soname nor its .so stem counts as a file.
        f"{lib}/libodd.so.1.0.4": elf_so(EM_X86_64, b"libodd.so.1.0"),
        f"{lib}/libodd.so.1": "libodd.so.1.0.4",
        f"{lib}/libnosoname.so.7": elf_so(EM_X86_64, None),
        f"{lib}/libx32.so.1": elf_so(EM_X86_64, b"libx32.so.1", bits=32),
        f"{lib}/libarm.so.1": elf_so(EM_AARCH64, b"libarm.so.1"),
        f"{lib}/libexe.so.1": elf_so(EM_X86_64, b"libexe.so.1", e_type=ET_EXEC),
        f"{lib}/libjunk.so": b"GROUP ( /lib/x86_64-linux-gnu/libjunk.so.1 )\n" * 3,
        f"{lib}/libtiny.so.1": b"\x7fELF",
        f"{lib}/libgone.so.1": "libgone.so.1.0",
        f"{lib}/libdir.so": "../x86_64-linux-gnu",
        f"{lib}/notalib.so.1": elf_so(EM_X86_64, b"notalib.so.1"),
        f"{lib}/glibc-hwcaps/x86-64-v3/libfoo.so.1.0": elf_so(
            EM_X86_64, b"libfoo.so.1", isa_needed=0b101
        ),
        f"{lib}/glibc-hwcaps/x86-64-v3/README": b"not a library",
        f"{lib}/glibc-hwcaps/x86-64-v4/.keep": b"",
        f"{lib}/glibc-hwcaps/.hidden/libfoo.so.1": elf_so(EM_X86_64, b"libfoo.so.1"),
        f"{lib}/glibc-hwcaps/file": b"",
        "opt/one/libfoo.so.1": elf_so(EM_X86_64, b"libfoo.so.1"),
        "opt/two/libbar.so.2": elf_so(EM_X86_64, b"libbar.so.2"),
        "etc/ld.so.conf.d/x86_64-linux-gnu.conf": b"/lib/x86_64-linux-gnu\n"
        b"/usr/lib/x86_64-linux-gnu\n",
        "etc/ld.so.conf.d/zz-local.conf": b"  /opt/one/  # trailing slash, comment\n"
        b"hwcap 0 nosegneg\ninclude local.d/*.conf\t/etc/missing/*.conf\n/opt/nowhere\n",
        "etc/ld.so.conf.d/local.d/a.conf": b"/opt/two\n/opt/one\n",
        "etc/ld.so.conf.d/.hidden.conf": b"/opt/hidden\n",
        "opt/hidden/libhidden.so.1": elf_so(EM_X86_64, b"libhidden.so.1"),
        **DEBIAN_CONF,
    }
    tree = make_tree(files)

    expected = ldconfig_cache(tree, tmp_path)
    ours = build_ld_so_cache(tree, "amd64", generator=cache_generator(expected))

    assert parse_ld_so_cache(ours) == parse_ld_so_cache(expected)
    assert ours == expected
    entries = parse_ld_so_cache(ours)
    by_key = {(e.key, e.value): e for e in entries}
    assert by_key["libbar.so", f"{AMD64}/libbar.so"].flags == 0x303
    assert ("libodd.so.1.0", f"{AMD64}/libodd.so.1.0") in by_key
    assert ("libnosoname.so.7", f"{AMD64}/libnosoname.so.7") in by_key
    assert by_key["libx32.so.1", f"{AMD64}/libx32.so.1"].flags == 0x803
    hwcaps = by_key["libfoo.so.1", f"{AMD64}/glibc-hwcaps/x86-64-v3/libfoo.so.1.0"]
    assert hwcaps.hwcap == (1 << 62) | (2 << 32)  # extension bit, ISA level 2 (v3), index 0
    assert not {e.key for e in entries} & {"libarm.so.1", "libexe.so.1", "libjunk.so"}
    assert "libhidden.so.1" not in {e.key for e in entries}
    # glibc-hwcaps entries first, then the rest in directory order.
    assert [e.value for e in entries if e.key == "libfoo.so.1"] == [
        f"{AMD64}/glibc-hwcaps/x86-64-v3/libfoo.so.1.0",
        f"{AMD64}/libfoo.so.1",
        "/opt/one/libfoo.so.1",
    ]


def test_glibc_2_41_behaviour() -> None:
    """Two things trixie's ldconfig 2.41 does that bookworm's 2.36 does not.

    It skips the temporary files of dpkg, rpm and prelink, and files every ELF
    library as libc6 (2.36 still wrote FLAG_ELF, 0x001, for an i386 library
    not linked against libc.so.6). Checked against 2.41's own output.
    """
    lib = "usr/lib/x86_64-linux-gnu"
    tree = make_tree(
        {
            f"{lib}/libi386.so.1": elf_so(EM_386, b"libi386.so.1", bits=32),
            f"{lib}/libnew.so.1.dpkg-new": elf_so(EM_X86_64, b"libnew.so.1"),
            f"{lib}/libtmp.so.1.dpkg-tmp": elf_so(EM_X86_64, b"libtmp.so.1"),
            f"{lib}/librpm.so.1;5f3a": elf_so(EM_X86_64, b"librpm.so.1"),
            f"{lib}/libpre.so.1.#prelink#.a1B2c3": elf_so(EM_X86_64, b"libpre.so.1"),
        }
    )
    assert parse_ld_so_cache(build_ld_so_cache(tree, "amd64")) == [
        CacheEntry("libi386.so.1", f"{AMD64}/libi386.so.1", 0x003)
    ]


# -- arm64 and the other checks ---------------------------------------------------


def test_arm64_flags_and_foreign_machines() -> None:
    lib = "usr/lib/aarch64-linux-gnu"
    tree = make_tree(
        {
            f"{lib}/libhello.so.1.0.0": elf_so(EM_AARCH64, b"libhello.so.1"),
            f"{lib}/libhello.so.1": "libhello.so.1.0.0",
            f"{lib}/libintel.so.1": elf_so(EM_X86_64, b"libintel.so.1"),
            f"{lib}/libi386.so.1": elf_so(EM_386, b"libi386.so.1", bits=32),
            f"{lib}/libhf.so.1": elf_so(EM_ARM, b"libhf.so.1", bits=32, e_flags=0x05000400),
            f"{lib}/libsf.so.1": elf_so(EM_ARM, b"libsf.so.1", bits=32, e_flags=0x05000200),
            "etc/ld.so.conf.d/aarch64-linux-gnu.conf": b"/lib/aarch64-linux-gnu\n",
            **DEBIAN_CONF,
        }
    )
    assert parse_ld_so_cache(build_ld_so_cache(tree, "arm64")) == [
        CacheEntry("libsf.so.1", f"{ARM64}/libsf.so.1", 0x0B03),
        CacheEntry("libhf.so.1", f"{ARM64}/libhf.so.1", 0x0903),
        CacheEntry("libhello.so.1", f"{ARM64}/libhello.so.1", 0x0A03),
    ]
    # The same files seen by an amd64 build: only the x86 ones count.
    assert parse_ld_so_cache(build_ld_so_cache(tree, "amd64")) == [
        CacheEntry("libi386.so.1", f"{ARM64}/libi386.so.1", 0x003),
        CacheEntry("libintel.so.1", f"{ARM64}/libintel.so.1", 0x303),
    ]


def test_non_elf_files_and_dangling_links_are_ignored() -> None:
    lib = "usr/lib/x86_64-linux-gnu"
    tree = make_tree(
        {
            f"{lib}/libok.so.1": elf_so(EM_X86_64, b"libok.so.1"),
            f"{lib}/libscript.so": b"/* GNU ld script */\nGROUP ( libok.so.1 )\n",
            f"{lib}/libtext.so.2": b"just some text that is long enough to be read " * 4,
            f"{lib}/libempty.so.3": b"",
            f"{lib}/libtrunc.so.4": elf_so(EM_X86_64, b"libtrunc.so.4")[:80],
            f"{lib}/libdangling.so.1": "libnothere.so.1",
            f"{lib}/libloop.so.1": "libloop.so.1",
            f"{lib}/libescape.so.1": "../../../../../../../etc/passwd",
            "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
            "etc/ld.so.conf": b"include /etc/ld.so.conf.d/*.conf\n",
        }
    )
    tree.add_dir(f"{lib}/libadir.so.5")
    assert parse_ld_so_cache(build_ld_so_cache(tree, "amd64")) == [
        CacheEntry("libok.so.1", f"{AMD64}/libok.so.1", 0x303)
    ]


def test_same_tree_gives_same_bytes() -> None:
    lib = "usr/lib/aarch64-linux-gnu"
    files: dict[str, bytes | str] = {
        f"{lib}/lib{n}.so.{v}": elf_so(EM_AARCH64, f"lib{n}.so.{v}".encode())
        for n, v in [("a", 1), ("b", 2), ("c", 10), ("c", 9)]
    }
    files[f"{lib}/libd.so"] = "liba.so.1"
    one = build_ld_so_cache(make_tree(files), "arm64")
    two = build_ld_so_cache(make_tree(dict(reversed(files.items()))), "arm64")
    assert one == two == build_ld_so_cache(make_tree(files), "arm64")
    assert cache_generator(one) == DEFAULT_GENERATOR


def test_order_lets_the_loader_find_every_name() -> None:
    """The loader binary-searches with _dl_cache_libcmp; every key must be reachable."""
    names = ["libé.so.1", "libz.so.1", "libz.so.10", "libz.so.2", "libA.so.1", "libz1.so"]
    names += [f"libm{i}.so.{j}" for i in range(12) for j in (1, 11, 3)]
    for arch, triplet, machine in [
        ("amd64", "x86_64-linux-gnu", EM_X86_64),
        ("arm64", "aarch64-linux-gnu", EM_AARCH64),
    ]:
        tree = make_tree({f"usr/lib/{triplet}/{n}": elf_so(machine, n.encode()) for n in names})
        cache = build_ld_so_cache(tree, arch)
        keys = [e.key for e in parse_ld_so_cache(cache)]
        assert sorted(keys) == sorted(names)
        for n in names:
            assert loader_lookup(cache, n, signed_char=arch == "amd64") == keys.index(n)
    # `char` is signed on x86-64, unsigned on aarch64: é sorts below or above z.
    assert libcmp("é".encode(), b"z", signed_char=True) < 0
    assert libcmp("é".encode(), b"z", signed_char=False) > 0


def test_libcmp_compares_digit_runs_as_numbers() -> None:
    assert libcmp(b"libz.so.10", b"libz.so.9") > 0
    assert libcmp(b"libz.so.1", b"libz.so.1.2") < 0
    assert libcmp(b"libz9.so", b"libzz.so") > 0  # digits sort above everything else
    assert libcmp(b"libz.so.01", b"libz.so.1") == 0
    assert libcmp(b"libc.so.6", b"libc.so.6") == 0


def test_without_generator_there_is_no_extension() -> None:
    lib = "usr/lib/x86_64-linux-gnu"
    tree = make_tree({f"{lib}/libok.so.1": elf_so(EM_X86_64, b"libok.so.1")})
    cache = build_ld_so_cache(tree, "amd64", generator=None)
    assert struct.unpack_from("<I", cache, 32) == (0,)  # extension_offset
    assert cache_generator(cache) is None
    assert parse_ld_so_cache(cache) == [CacheEntry("libok.so.1", f"{AMD64}/libok.so.1", 0x303)]


def test_empty_tree_gives_an_empty_cache() -> None:
    cache = build_ld_so_cache(Tree(), "arm64")
    assert parse_ld_so_cache(cache) == []
    assert cache[:20] == b"glibc-ld.so.cache1.1"


def test_unknown_architecture_and_bad_caches_are_refused() -> None:
    with pytest.raises(CeruleanError, match="armhf"):
        build_ld_so_cache(Tree(), "armhf")
    with pytest.raises(CeruleanError):
        parse_ld_so_cache(b"not a cache at all, not even close to one......")
    good = build_ld_so_cache(
        make_tree({"usr/lib/libok.so.1": elf_so(EM_X86_64, b"libok.so.1")}), "amd64"
    )
    with pytest.raises(CeruleanError):
        parse_ld_so_cache(good[:60])
