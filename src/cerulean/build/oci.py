"""OCI output: image layers, the OCI image layout directory and the ``oci-archive`` tar.

This module owns every byte of an image that leaves the build: it turns composed
rootfs :class:`~cerulean.build.tree.Tree` objects into layer tars, compresses them,
writes the content-addressed blobs, image configs, manifests, the image index and
``index.json``, and packs the layout into a tar. Everything is deterministic: the
same trees, configs and ``SOURCE_DATE_EPOCH`` give the same digests on any host
(given the same zlib / zstd library versions, which the compressed bytes depend on).

Refs in a layout written by :class:`LayoutWriter` (``ref_name`` is e.g. ``latest``)::

    index.json
      ├─ image index     ref "latest"        ─┬─ amd64 manifest
      │                                       └─ arm64 manifest (variant v8)
      ├─ amd64 manifest  ref "latest-amd64"  (the same blob as in the index)
      └─ arm64 manifest  ref "latest-arm64"

Why this shape (tested with skopeo 1.9.3 and umoci 0.4.7 from Debian 12):

* ``skopeo inspect|copy oci:DIR:latest`` resolves the nested image index and picks
  the host's architecture from it; ``--override-arch arm64`` and ``--all`` work.
* umoci resolves a ref by collecting every manifest below the matching top-level
  entry, so it rejects ``latest`` as "tag is ambiguous", and it never looks at ref
  names below ``index.json``. ``umoci unpack --image DIR:latest-arm64`` needs the
  per-architecture manifests listed at the top level with their own refs.
* The price: ``skopeo inspect oci:DIR`` without a ref only works when ``index.json``
  has exactly one entry (skopeo says "more than one image in oci, choose an
  image"), so users name ``:latest``. ``finish(arch_refs=False)`` writes the
  one-entry shape instead, for consumers that want an untagged reference and
  no umoci.

umoci 0.4.7 cannot unpack zstd layers ("blob is not correct mediatype"), which
is why gzip is the default; skopeo handles both.

JSON documents are canonical: sorted keys, no insignificant whitespace, UTF-8.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import zstandard

from cerulean.agent.fileio import write_atomic
from cerulean.build.tree import Tree
from cerulean.errors import CeruleanError

MEDIA_TYPE_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = "1.0.0"

# Default compression levels. gzip 6 is zlib's own default; 9 costs 2.6x the time
# for 0.5% less. zstd 3 is what skopeo and buildkit use, already smaller than gzip 9.
DEFAULT_GZIP_LEVEL = 6
DEFAULT_ZSTD_LEVEL = 3

# gzip is compressed in independent slices (see _gzip). The slice size is part of
# the output format: changing it changes every compressed digest, so it is fixed
# here, not derived from the host's CPU count.
_GZIP_SLICE = 1 << 20
_DEFLATE_WINDOW = 1 << 15

# Bumped whenever the compressed bytes for a given input would change, so that a
# layer cache written by an older compressor is never mixed with a new one.
_CACHE_SCHEME = "1"

_HEX64 = re.compile(r"[0-9a-f]{64}")
# A tag as Docker spells it: skopeo, umoci and registries all accept these.
_REF_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class Compression(enum.Enum):
    """How a layer blob is compressed."""

    GZIP = "gzip"
    ZSTD = "zstd"

    @property
    def media_type(self) -> str:
        return f"{MEDIA_TYPE_LAYER_TAR}+{self.value}"

    @property
    def default_level(self) -> int:
        return DEFAULT_GZIP_LEVEL if self is Compression.GZIP else DEFAULT_ZSTD_LEVEL


@dataclass(frozen=True)
class Platform:
    """An OCI platform object (``os`` is always linux for Cerulean)."""

    architecture: str
    os: str = "linux"
    variant: str = ""

    def to_json(self) -> dict[str, str]:
        d = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        return d


# Debian architecture -> OCI platform. arm64 carries variant v8 because that is
# what registries and `docker buildx` publish, so platform matching finds it.
PLATFORMS: Mapping[str, Platform] = MappingProxyType(
    {
        "amd64": Platform("amd64"),
        "arm64": Platform("arm64", variant="v8"),
    }
)


def platform_for(arch: str) -> Platform:
    """The OCI platform of a Debian architecture name."""
    try:
        return PLATFORMS[arch]
    except KeyError:
        raise CeruleanError(
            f"The architecture '{arch}' is not supported; use one of: {', '.join(PLATFORMS)}."
        ) from None


@dataclass(frozen=True)
class Blob:
    """An OCI descriptor of a blob in the layout.

    ``platform`` is set on image manifests only, so that the image index can list
    each manifest with the platform it runs on.
    """

    digest: str  # "sha256:<hex>"
    size: int
    media_type: str
    platform: Platform | None = None

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def descriptor(self, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform is not None:
            d["platform"] = self.platform.to_json()
        if annotations:
            d["annotations"] = dict(annotations)
        return d


@dataclass(frozen=True)
class ImageConfig:
    """What goes into an image's config blob, besides the layers' diff_ids."""

    arch: str  # Debian architecture: amd64 | arm64
    created: datetime  # SOURCE_DATE_EPOCH, timezone-aware
    user: str = ""
    workdir: str = "/"
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    history_comment: str = ""


def canonical_json(obj: object) -> bytes:
    """The one serialisation used for every JSON document: sorted keys, compact, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rfc3339(when: datetime) -> str:
    """``when`` in UTC as ``YYYY-MM-DDTHH:MM:SSZ`` (fractions kept only if present)."""
    if when.tzinfo is None:
        # A naive datetime would silently mean local time somewhere: refuse it.
        raise ValueError("The image creation time must be timezone-aware.")
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- layers ---------------------------------------------------------------


def layer_tar(tree: Tree, mtime: int) -> bytes:
    """The uncompressed layer tar of *tree*, byte-for-byte deterministic.

    PAX format (so long or non-ASCII names and big ids are exact), entries in the
    tree's sorted path order, which puts every directory before its contents.
    Names are relative without ``./``; directories end in ``/``. Owners are
    numeric only (empty uname/gname, so nothing is remapped through a host's
    passwd), every mtime is *mtime*, and no atime/ctime records are written.
    """
    if mtime < 0:
        raise ValueError("The layer mtime must not be negative.")
    chunks: list[bytes] = []
    for e in tree:
        info = tarfile.TarInfo(e.path)
        info.mode = e.mode
        info.uid = e.uid
        info.gid = e.gid
        info.uname = ""
        info.gname = ""
        info.mtime = mtime
        if e.kind == "dir":
            info.type = tarfile.DIRTYPE
        elif e.kind == "symlink":
            info.type = tarfile.SYMTYPE
            info.linkname = e.target
        else:
            info.type = tarfile.REGTYPE
            info.size = len(e.data)
        # tobuf() rather than TarFile.addfile(): the header bytes are identical, and
        # skipping the file-object copy makes a 25 MB layer several times faster.
        chunks.append(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if e.kind == "file" and e.data:
            chunks.append(e.data)
            pad = -len(e.data) % tarfile.BLOCKSIZE
            if pad:
                chunks.append(bytes(pad))
    # End of archive: two zero blocks, padded to a whole record as tar(1) does.
    used = sum(len(c) for c in chunks) + 2 * tarfile.BLOCKSIZE
    chunks.append(bytes(2 * tarfile.BLOCKSIZE + (-used % tarfile.RECORDSIZE)))
    return b"".join(chunks)


def _deflate_slice(data: bytes, start: int, level: int, last: bool) -> bytes:
    end = min(start + _GZIP_SLICE, len(data))
    zdict = data[max(0, start - _DEFLATE_WINDOW) : start]
    if zdict:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, zdict=zdict)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
    out = c.compress(data[start:end])
    # A sync flush ends the slice on a byte boundary with a non-final block, so
    # the raw deflate streams of consecutive slices concatenate into one stream.
    return out + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _gzip(data: bytes, level: int) -> bytes:
    """gzip *data* deterministically, using all CPUs.

    The input is cut into fixed 1 MiB slices; each is deflated on its own, primed
    with the 32 KiB before it as a preset dictionary (as pigz does), so the ratio
    is close to a single stream. Every slice depends only on the input, so the
    output is the same whatever the number of threads. The header is fixed: no
    name, mtime 0, OS "unknown".
    """
    if not 0 <= level <= 9:
        raise ValueError("The gzip level must be between 0 and 9.")
    starts = list(range(0, len(data), _GZIP_SLICE)) or [0]
    last = starts[-1]
    workers = min(len(starts), os.cpu_count() or 1)
    if workers > 1:
        # zlib releases the GIL while deflating, so threads really run in parallel.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(lambda s: _deflate_slice(data, s, level, s == last), starts))
    else:
        parts = [_deflate_slice(data, s, level, s == last) for s in starts]
    xfl = 2 if level == 9 else 4 if level == 1 else 0
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + bytes([xfl, 255])
    trailer = zlib.crc32(data).to_bytes(4, "little") + (len(data) & 0xFFFFFFFF).to_bytes(
        4, "little"
    )
    return b"".join([header, *parts, trailer])


def _zstd(data: bytes, level: int) -> bytes:
    # Single-threaded: zstd's multi-threaded mode produces different frames.
    c = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    return bytes(c.compress(data))


def compress(data: bytes, compression: Compression, level: int | None = None) -> bytes:
    """Compress a layer tar; the result depends only on the input, level and library."""
    lvl = compression.default_level if level is None else level
    if compression is Compression.GZIP:
        return _gzip(data, lvl)
    return _zstd(data, lvl)


def _compressor_id(compression: Compression, level: int) -> str:
    """Names the exact compressor, so a cache never serves bytes another one made."""
    if compression is Compression.GZIP:
        lib = f"zlib{zlib.ZLIB_RUNTIME_VERSION}"
    else:
        lib = "zstd" + ".".join(str(v) for v in zstandard.ZSTD_VERSION)
    return f"v{_CACHE_SCHEME}-{compression.value}{level}-{lib}"


# -- files ----------------------------------------------------------------


class LayoutWriter:
    """Writes one OCI image layout directory.

    Call :meth:`add_layer` / :meth:`add_image` for each architecture, then
    :meth:`finish` once. Blobs the writer did not write in this session are
    removed by :meth:`finish`, so rebuilding into an existing layout leaves no
    stale blobs behind (and its archive is the same as a fresh build's).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs_dir = path / "blobs" / "sha256"
        if path.exists():
            if not path.is_dir():
                raise CeruleanError(f"The output '{path}' exists and is not a directory.")
            if any(path.iterdir()) and not (path / "oci-layout").is_file():
                raise CeruleanError(
                    f"The output directory '{path}' is not empty and not an OCI layout."
                )
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self._written: set[str] = set()

    def add_blob(self, data: bytes, media_type: str) -> Blob:
        """Store *data* as ``blobs/sha256/<hex>`` (skipped if already there) and describe it."""
        blob = Blob(sha256_digest(data), len(data), media_type)
        target = self.blobs_dir / blob.hex
        # Blobs are written through a rename, so one of the right size is complete.
        if not (target.is_file() and target.stat().st_size == blob.size):
            write_atomic(target, data)
        self._written.add(blob.hex)
        return blob

    def add_layer(
        self,
        tar: bytes,
        compression: Compression,
        level: int | None = None,
        cache_dir: Path | None = None,
    ) -> tuple[Blob, str]:
        """Compress and store a layer tar; returns (compressed blob, diff_id of *tar*).

        With *cache_dir*, a blob compressed earlier from the same tar with the same
        compressor is reused, so a warm rebuild costs a hash instead of a compress.
        """
        lvl = compression.default_level if level is None else level
        diff_id = sha256_digest(tar)
        data: bytes | None = None
        key_file: Path | None = None
        if cache_dir is not None:
            key = diff_id.removeprefix("sha256:")
            key_file = cache_dir / "layers" / _compressor_id(compression, lvl) / key
            data = _cache_get(cache_dir, key_file)
        if data is None:
            data = compress(tar, compression, lvl)
            if cache_dir is not None and key_file is not None:
                _cache_put(cache_dir, key_file, data)
        return self.add_blob(data, compression.media_type), diff_id

    def add_image(
        self,
        layers: Sequence[tuple[Blob, str]],
        config: ImageConfig,
        annotations: Mapping[str, str],
    ) -> Blob:
        """Write the config and the image manifest; returns the manifest's descriptor."""
        platform = platform_for(config.arch)
        config_blob = self.add_blob(
            canonical_json(_config_json(config, platform, layers)), MEDIA_TYPE_CONFIG
        )
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": config_blob.descriptor(),
            "layers": [blob.descriptor() for blob, _ in layers],
        }
        if annotations:
            manifest["annotations"] = dict(annotations)
        blob = self.add_blob(canonical_json(manifest), MEDIA_TYPE_MANIFEST)
        return Blob(blob.digest, blob.size, blob.media_type, platform)

    def finish(
        self,
        manifests: Sequence[Blob],
        ref_name: str,
        annotations: Mapping[str, str],
        *,
        arch_refs: bool = True,
    ) -> str:
        """Write the image index, ``oci-layout`` and ``index.json``; returns the index digest.

        ``index.json`` names the image index *ref_name* and, with *arch_refs*, each
        manifest ``<ref_name>-<arch>`` as well (see the module docstring for why).
        """
        if not _REF_NAME.fullmatch(ref_name):
            raise CeruleanError(
                f"The image ref name {ref_name!r} is invalid: "
                "use letters, digits, '.', '_' and '-'."
            )
        if not manifests:
            raise CeruleanError("An image needs at least one architecture.")
        platforms = [m.platform for m in manifests]
        if None in platforms or len(set(platforms)) != len(platforms):
            raise CeruleanError("Each image manifest must have its own, distinct platform.")
        index: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [m.descriptor() for m in manifests],
        }
        if annotations:
            index["annotations"] = dict(annotations)
        index_blob = self.add_blob(canonical_json(index), MEDIA_TYPE_INDEX)
        entries = [index_blob.descriptor({ANNOTATION_REF_NAME: ref_name})]
        if arch_refs:
            for m in manifests:
                assert m.platform is not None  # checked above
                arch_ref = f"{ref_name}-{m.platform.architecture}"
                entries.append(m.descriptor({ANNOTATION_REF_NAME: arch_ref}))
        top = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": entries}
        layout = canonical_json({"imageLayoutVersion": LAYOUT_VERSION})
        write_atomic(self.path / "oci-layout", layout)
        # Prune only once index.json names the new image: a crash in between leaves
        # unused blobs (removed next time), never an index pointing at missing ones.
        write_atomic(self.path / "index.json", canonical_json(top))
        self._prune()
        return index_blob.digest

    def _prune(self) -> None:
        for p in self.blobs_dir.iterdir():
            if p.name not in self._written:
                if p.is_dir() and not p.is_symlink():
                    raise CeruleanError(f"The layout has an unexpected directory '{p}'.")
                p.unlink()


def _config_json(
    config: ImageConfig, platform: Platform, layers: Sequence[tuple[Blob, str]]
) -> dict[str, Any]:
    created = rfc3339(config.created)
    runtime: dict[str, Any] = {}
    if config.user:
        runtime["User"] = config.user
    if config.workdir:
        runtime["WorkingDir"] = config.workdir
    if config.env:
        runtime["Env"] = list(config.env)
    if config.entrypoint:
        runtime["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        runtime["Cmd"] = list(config.cmd)
    if config.labels:
        runtime["Labels"] = dict(config.labels)
    history: dict[str, Any] = {"created": created, "created_by": "cerulean build"}
    if config.history_comment:
        history["comment"] = config.history_comment
    doc: dict[str, Any] = {
        "created": created,
        **platform.to_json(),
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
        # One history entry per layer: tools pair non-empty history entries with layers.
        "history": [history for _ in layers],
    }
    return doc


def _cache_get(cache_dir: Path, key_file: Path) -> bytes | None:
    """The cached compressed blob for *key_file*, or None (a damaged entry counts as a miss)."""
    try:
        digest = key_file.read_text().strip()
        hexd = digest.removeprefix("sha256:")
        if not _HEX64.fullmatch(hexd):
            return None
        data = (cache_dir / "blobs" / "sha256" / hexd).read_bytes()
    except OSError:
        return None
    return data if sha256_digest(data) == digest else None


def _cache_put(cache_dir: Path, key_file: Path, data: bytes) -> None:
    digest = sha256_digest(data)
    try:
        write_atomic(cache_dir / "blobs" / "sha256" / digest.removeprefix("sha256:"), data)
        write_atomic(key_file, digest.encode() + b"\n")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CeruleanError(
            f"The layer cache '{cache_dir}' could not be written ({reason})."
        ) from exc


# -- archive --------------------------------------------------------------


def _layout_members(layout: Path) -> list[tuple[str, Path]]:
    """(archive name, path) of the layout's parts, in sorted order, directories first.

    Only what the image layout spec defines is packed (no temp files, no stray
    files someone left in the directory), so the archive depends on the image alone.
    """
    blobs = layout / "blobs" / "sha256"
    names = [("blobs", blobs.parent), ("blobs/sha256", blobs)]
    names += [(f"blobs/sha256/{p.name}", p) for p in blobs.iterdir() if _HEX64.fullmatch(p.name)]
    names += [("index.json", layout / "index.json"), ("oci-layout", layout / "oci-layout")]
    return sorted(names)


def _archive_index(layout: Path, ref: str | None) -> bytes:
    """The archive's index.json: only the entry named *ref*, when the layout has it.

    ``podman load`` refuses an archive whose index lists more than one image
    ("choose an image"); the per-architecture refs stay in the directory layout.
    """
    data = (layout / "index.json").read_bytes()
    index = json.loads(data)
    keep = [m for m in index.get("manifests", [])
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref]
    if ref is None or len(keep) != 1 or len(index["manifests"]) == 1:
        return data
    index["manifests"] = keep
    return json.dumps(index, sort_keys=True, separators=(",", ":")).encode()


def write_oci_archive(layout: Path, archive: Path, mtime: int = 0,
                      ref: str | None = "latest") -> None:
    """Pack *layout* into the ``oci-archive`` tar *archive*, deterministically.

    The archive's index.json names only the image *ref* (the multi-architecture
    index), so ``podman load -i`` takes it without asking which image to use.

    Entries are sorted, owned by 0:0 with no names, mode 0644 (0755 for
    directories), all with *mtime*. The tar is written next to *archive* and
    renamed into place, so a reader never sees half an archive.
    """
    parts = (layout / "index.json", layout / "oci-layout")
    if not all(p.is_file() for p in parts) or not (layout / "blobs" / "sha256").is_dir():
        raise CeruleanError(f"The directory '{layout}' is not a finished OCI layout.")
    if archive.resolve().is_relative_to(layout.resolve()):
        raise CeruleanError(f"The archive '{archive}' cannot be written inside its own layout.")
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.parent)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for name, path in _layout_members(layout):
                st = path.lstat()
                info = tarfile.TarInfo(name)
                info.mtime = mtime
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                elif name == "index.json":
                    index = _archive_index(layout, ref)
                    info.mode = 0o644
                    info.size = len(index)
                    tar.addfile(info, io.BytesIO(index))
                elif stat.S_ISREG(st.st_mode):
                    info.mode = 0o644
                    info.size = st.st_size
                    with path.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    raise CeruleanError(f"The layout holds '{path}', which is not a regular file.")
        os.chmod(tmp, 0o644)
        os.replace(tmp, archive)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "Blob",
    "Compression",
    "ImageConfig",
    "LayoutWriter",
    "Platform",
    "compress",
    "layer_tar",
    "write_oci_archive",
]
