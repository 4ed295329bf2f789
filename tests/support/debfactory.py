"""Synthetic Debian binary packages for tests, built in Python (no dpkg-deb needed).

``make_deb`` returns the bytes of a real ``.deb``: an ar archive holding
``debian-binary`` ("2.0\\n"), ``control.tar.gz`` and ``data.tar.xz``. The output is
deterministic (fixed mtimes, owners and compression headers), so the same
arguments always give the same sha256. ``index_entry`` writes the Packages
index paragraph an archive would publish for such a file.

Import it as ``from support.debfactory import make_deb``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import tarfile
from collections.abc import Mapping

import zstandard

MTIME = 1_700_000_000


def _ar_member(name: str, data: bytes) -> bytes:
    if len(name) > 16:
        raise ValueError(f"ar member name {name!r} is longer than 16 bytes")
    header = (
        f"{name:<16}{MTIME:<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}".encode("ascii") + b"`\n"
    )
    assert len(header) == 60
    return header + data + (b"\n" if len(data) % 2 else b"")


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    """An ar archive (the .deb container) of *members*, in order."""
    return b"!<arch>\n" + b"".join(_ar_member(n, d) for n, d in members)


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def make_tar(
    files: Mapping[str, bytes],
    *,
    modes: Mapping[str, int] | None = None,
    symlinks: Mapping[str, str] | None = None,
    dirs: tuple[str, ...] = (),
) -> bytes:
    """An uncompressed tar in dpkg's layout: "./"-prefixed, parents first, root-owned."""
    modes = modes or {}
    symlinks = symlinks or {}
    entries: dict[str, tuple[str, bytes | str]] = {}
    for d in dirs:
        for p in [*_parents(d.strip("/")), d.strip("/")]:
            entries.setdefault(p, ("dir", b""))
    for path, target in symlinks.items():
        for p in _parents(path.strip("/")):
            entries.setdefault(p, ("dir", b""))
        entries[path.strip("/")] = ("link", target)
    for path, data in files.items():
        for p in _parents(path.strip("/")):
            entries.setdefault(p, ("dir", b""))
        entries[path.strip("/")] = ("file", data)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        root = tarfile.TarInfo("./")
        root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o755, MTIME
        root.uname = root.gname = "root"
        tf.addfile(root)
        for path in sorted(entries):
            kind, payload = entries[path]
            info = tarfile.TarInfo(f"./{path}" + ("/" if kind == "dir" else ""))
            info.mtime = MTIME
            info.uname = info.gname = "root"
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, modes.get(path, 0o755)
                tf.addfile(info)
            elif kind == "link":
                assert isinstance(payload, str)
                info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, payload
                tf.addfile(info)
            else:
                assert isinstance(payload, bytes)
                info.mode = modes.get(path, 0o755 if "/bin/" in f"/{path}" else 0o644)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    """*data* compressed as a .deb member named ``*.tar.<kind>`` expects."""
    if kind == "gz":
        return gzip.compress(data, mtime=0)
    if kind == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)
    if kind == "zst":
        return zstandard.ZstdCompressor().compress(data)
    if kind == "":
        return data
    raise ValueError(f"unknown compression {kind!r}")


def control_text(
    name: str,
    version: str,
    arch: str,
    *,
    depends: str = "",
    pre_depends: str = "",
    source: str | None = None,
    installed_size: int = 1,
    extra: Mapping[str, str] | None = None,
) -> str:
    """The control paragraph of a package (ends with a newline)."""
    fields: dict[str, str] = {
        "Package": name,
        "Version": version,
        "Architecture": arch,
        "Maintainer": "Cerulean Tests <tests@example.invalid>",
        "Installed-Size": str(installed_size),
    }
    if source:
        fields["Source"] = source
    if pre_depends:
        fields["Pre-Depends"] = pre_depends
    if depends:
        fields["Depends"] = depends
    fields["Section"] = "misc"
    fields["Priority"] = "optional"
    fields.update(extra or {})
    fields.setdefault("Description", f"test package {name}\n {name} exists only in tests.")
    return "".join(f"{k}: {v}\n" for k, v in fields.items())


def make_deb(
    name: str,
    version: str,
    arch: str = "amd64",
    depends: str = "",
    files: Mapping[str, bytes] | None = None,
    *,
    pre_depends: str = "",
    source: str | None = None,
    extra_control: Mapping[str, str] | None = None,
    control_files: Mapping[str, bytes] | None = None,
    modes: Mapping[str, int] | None = None,
    symlinks: Mapping[str, str] | None = None,
    dirs: tuple[str, ...] = (),
    control_compression: str = "gz",
    data_compression: str = "xz",
) -> bytes:
    """The bytes of a .deb for package *name* holding *files* ({path: content}).

    *source* is the Source field ("src" or "src (version)"), *extra_control* adds
    control fields (e.g. {"Multi-Arch": "same"}), *control_files* adds files to the
    control archive (conffiles, postinst, ...), *modes* overrides file modes and
    *symlinks* maps link paths to targets.
    """
    if files is None:
        files = {f"usr/share/doc/{name}/copyright": f"{name}: test copyright\n".encode()}
    data_tar = make_tar(files, modes=modes, symlinks=symlinks, dirs=dirs)
    installed = max(1, (sum(len(b) for b in files.values()) + 1023) // 1024)
    control = control_text(
        name, version, arch, depends=depends, pre_depends=pre_depends, source=source,
        installed_size=installed, extra=extra_control,
    ).encode()
    md5sums = "".join(
        f"{hashlib.md5(data).hexdigest()}  {path.strip('/')}\n"
        for path, data in sorted(files.items())
    ).encode()
    cfiles: dict[str, bytes] = {"control": control, "md5sums": md5sums, **(control_files or {})}
    ctl_modes = {n: 0o755 for n in cfiles if n in ("preinst", "postinst", "prerm", "postrm")}
    control_tar = make_tar(cfiles, modes=ctl_modes)
    dot = "." if control_compression else ""
    ddot = "." if data_compression else ""
    return ar_archive([
        ("debian-binary", b"2.0\n"),
        (f"control.tar{dot}{control_compression}", compress(control_tar, control_compression)),
        (f"data.tar{ddot}{data_compression}", compress(data_tar, data_compression)),
    ])


def index_entry(deb: bytes, filename: str) -> str:
    """The Packages index paragraph for *deb* stored at *filename* (pool path); no blank line.

    The fields come from the package's own control file, plus Filename, Size and
    the hashes, in the order Debian's archive uses.
    """
    from cerulean.debian.deb import parse_control, read_deb

    control = parse_control(read_deb(deb, filename).control["control"])
    out = [f"{k}: {v}" for k, v in control.items()]  # continuation lines keep their indent
    out += [
        f"Filename: {filename}",
        f"Size: {len(deb)}",
        f"MD5sum: {hashlib.md5(deb).hexdigest()}",
        f"SHA256: {hashlib.sha256(deb).hexdigest()}",
    ]
    return "\n".join(out) + "\n"
