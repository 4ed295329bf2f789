"""Reading .deb files: the ar container, the control archive and the data archive.

Only reading happens here; where the data archive's entries go is decided by
:class:`cerulean.build.tree.Tree`, which refuses unsafe paths.
"""

from __future__ import annotations

import gzip
import io
import lzma
import tarfile
from dataclasses import dataclass

import zstandard

from cerulean.errors import CeruleanError

AR_MAGIC = b"!<arch>\n"


class DebError(CeruleanError):
    """A .deb file is malformed."""


@dataclass(frozen=True)
class DebContents:
    control: dict[str, bytes]  # files of the control archive: "control", "md5sums", "conffiles"...
    data_tar: bytes  # the uncompressed data archive


def ar_members(data: bytes, what: str) -> dict[str, bytes]:
    if not data.startswith(AR_MAGIC):
        raise DebError(f"{what} is not a Debian package (no ar header).")
    members: dict[str, bytes] = {}
    pos = len(AR_MAGIC)
    while pos < len(data):
        header = data[pos : pos + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise DebError(f"{what} has a damaged ar member header.")
        name = header[:16].decode("ascii", errors="replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise DebError(f"{what} has a damaged ar member size.") from None
        start = pos + 60
        if start + size > len(data):
            raise DebError(f"{what} is truncated.")
        members[name] = data[start : start + size]
        pos = start + size + (size & 1)
    return members


def decompress(name: str, blob: bytes, what: str) -> bytes:
    try:
        if name.endswith(".xz"):
            return lzma.decompress(blob)
        if name.endswith(".zst"):
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)) as r:
                return r.read()
        if name.endswith(".gz"):
            return gzip.decompress(blob)
        if name.endswith(".tar"):
            return blob
    except (lzma.LZMAError, zstandard.ZstdError, OSError, EOFError) as e:
        raise DebError(f"{what}: the member {name} cannot be decompressed ({e}).") from None
    raise DebError(f"{what}: the member {name} uses an unsupported compression.")


def _member(members: dict[str, bytes], prefix: str, what: str) -> tuple[str, bytes]:
    for name, blob in members.items():
        if name.startswith(prefix):
            return name, blob
    raise DebError(f"{what} has no {prefix}* member.")


def read_deb(data: bytes, what: str) -> DebContents:
    members = ar_members(data, what)
    if members.get("debian-binary", b"").strip() != b"2.0":
        raise DebError(f"{what} is not a version 2.0 Debian package.")
    cname, cblob = _member(members, "control.tar", what)
    dname, dblob = _member(members, "data.tar", what)
    control: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(decompress(cname, cblob, what))) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    f = tf.extractfile(m)
                    if f is not None:
                        control[m.name.removeprefix("./")] = f.read()
    except tarfile.TarError as e:
        raise DebError(f"{what} has a damaged control archive ({e}).") from None
    if "control" not in control:
        raise DebError(f"{what} has no control file.")
    return DebContents(control, decompress(dname, dblob, what))


def parse_control(text: bytes) -> dict[str, str]:
    """A control paragraph as an ordered dict (continuation lines kept, joined with \\n)."""
    fields: dict[str, str] = {}
    key = ""
    for line in text.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and key:
            fields[key] += "\n" + line
            continue
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


# Writing: Cerulean's own packages (cerulean-agent, cerulean, python3-pysat) are written
# directly, the way dpkg-deb lays them out, and bit for bit reproducibly: every entry is
# owned by root with one fixed mtime, in sorted order.
DEB_MTIME = 1700000000


def _deb_tar(entries: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        dirs: set[str] = set()
        for path in entries:
            parts = path.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        items = [("", None)] + [(d, None) for d in dirs] + [(p, entries[p]) for p in entries]
        for path, entry in sorted(items, key=lambda x: x[0]):
            info = tarfile.TarInfo("./" + path)
            info.mtime, info.uid, info.gid, info.uname, info.gname = DEB_MTIME, 0, 0, "root", "root"
            if entry is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                data, mode = entry
                info.size, info.mode = len(data), mode
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = [AR_MAGIC]
    for name, data in members:
        header = f"{name:<16}{DEB_MTIME:<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}".encode()
        out.append(header + b"`\n" + data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


def write_deb(control: str, files: dict[str, tuple[bytes, int]]) -> bytes:
    """A .deb holding *files* (path → (bytes, mode)) with the *control* paragraph.

    ``Installed-Size`` is added here, and ``md5sums`` is written as dpkg expects.
    """
    import hashlib

    installed = sum(len(d) for d, _ in files.values()) // 1024 + 1
    paragraph = control.rstrip("\n") + f"\nInstalled-Size: {installed}\n"
    md5 = "".join(f"{hashlib.md5(d).hexdigest()}  {p}\n"  # dpkg's md5sums format
                  for p, (d, _) in sorted(files.items())).encode()
    control_tar = _deb_tar({"control": (paragraph.encode(), 0o644), "md5sums": (md5, 0o644)})

    def xz(b: bytes) -> bytes:
        return lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)

    return _ar([("debian-binary", b"2.0\n"), ("control.tar.xz", xz(control_tar)),
                ("data.tar.xz", xz(_deb_tar(files)))])
