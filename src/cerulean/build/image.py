"""Building an image definition into its outputs, all architectures at once.

Outputs (for an image NAME, in the output directory):

- ``NAME.oci/``          OCI image layout: one image index with a manifest per architecture
- ``NAME.oci.tar``       the same layout as an ``oci-archive`` tarball
- ``NAME.ARCH.spdx.json``  SPDX 2.3 SBOM
- ``NAME.ARCH.cdx.json``   CycloneDX 1.6 SBOM
- ``NAME.ARCH.files.json`` the file manifest (integrity baseline)

Everything is written into a temporary directory beside the outputs and moved
into place only when the whole build succeeded, so a failed build never leaves
half-written output behind.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cerulean.build.compose import Context, compose
from cerulean.build.definition import ImageDefinition
from cerulean.build.manifest import manifest_document
from cerulean.build.oci import (
    Blob,
    Compression,
    ImageConfig,
    LayoutWriter,
    layer_tar,
    write_oci_archive,
)
from cerulean.build.sbom import SbomPackage, SbomSubject, cyclonedx_document, spdx_document
from cerulean.debian.archive import ArchiveConfig
from cerulean.debian.cache import Cache
from cerulean.debian.deb import parse_control
from cerulean.debian.fetch import Download, fetch_all
from cerulean.debian.lock import Lock
from cerulean.errors import CeruleanError


@dataclass
class ArchResult:
    arch: str
    packages: int
    files: int
    size: int  # uncompressed bytes of regular files
    manifest_digest: str = ""


@dataclass
class BuildResult:
    image: str
    version: str
    index_digest: str
    layout: Path
    archive: Path
    outputs: list[Path] = field(default_factory=list)
    arches: list[ArchResult] = field(default_factory=list)
    seconds: float = 0.0


def lock_downloads(cfg: ArchiveConfig, lock: Lock, arches: Sequence[str]) -> list[Download]:
    out: list[Download] = []
    for arch in arches:
        for p in lock.packages[arch]:
            url = f"{cfg.base_url(p.suite)}/{p.filename}"
            out.append(Download(url, p.sha256, p.size, p.label))
    return out


def _sbom_packages(ctx: Context) -> list[SbomPackage]:
    pkgs: list[SbomPackage] = []
    purls = ctx.notes.get("purls")
    for u in ctx.unpacked:
        p = u.package
        fields = parse_control(u.control["control"])
        pkgs.append(
            SbomPackage(
                name=p.name,
                version=p.version,
                arch=p.arch,
                source=p.source,
                source_version=p.source_version,
                sha256=p.sha256,
                maintainer=fields.get("Maintainer", ""),
                homepage=fields.get("Homepage", ""),
                description=fields.get("Description", "").split("\n", 1)[0],
                copyright=ctx.tree.read(f"usr/share/doc/{p.name}/copyright"),
                purl=purls.get(p.name, "") if isinstance(purls, dict) else "",
            )
        )
    return pkgs


def _replace(tmp: Path, final: Path) -> None:
    """Move *tmp* onto *final*, replacing what was there."""
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.replace(final)


def build_image(
    defn: ImageDefinition,
    lock: Lock,
    cfg: ArchiveConfig,
    arches: Sequence[str],
    out_dir: Path,
    cache: Cache,
    *,
    offline: bool = False,
    show_progress: bool = True,
    compression: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> BuildResult:
    started = time.monotonic()
    missing = [a for a in arches if a not in lock.packages]
    if missing:
        raise CeruleanError(
            f"The lock {defn.lock_path} has no packages for {', '.join(missing)} "
            f"(it covers {', '.join(lock.arches)})."
        )
    fetch_all(cache, lock_downloads(cfg, lock, arches), offline=offline,
              show_progress=show_progress)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CeruleanError(f"The output directory {out_dir} cannot be created: {e}.") from e
    comp = Compression(compression or defn.output_compression)
    layers_cache = cache.root  # compressed layers share the content-addressed store
    name = defn.name
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=out_dir) as tmp_s:
        tmp = Path(tmp_s)
        writer = LayoutWriter(tmp / f"{name}.oci")
        manifests: list[Blob] = []
        results: list[ArchResult] = []
        version = ""
        contexts: list[Context] = []
        for arch in arches:
            if on_step:
                on_step(f"composing {name} for {arch}")
            ctx = compose(defn, arch, lock, cache)
            contexts.append(ctx)
            version = ctx.image_version
            tar = layer_tar(ctx.tree, ctx.source_date_epoch)
            layer = writer.add_layer(tar, comp, cache_dir=layers_cache)
            labels = {
                "org.opencontainers.image.title": name,
                "org.opencontainers.image.description": defn.image_description,
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.created": ctx.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "org.opencontainers.image.vendor": "Cerulean Linux",
                "org.opencontainers.image.licenses": "MIT AND (see SBOM)",
                "org.opencontainers.image.base.name": f"debian:{ctx.codename}",
                **defn.config_labels,
            }
            config = ImageConfig(
                arch=arch,
                created=ctx.created,
                user=defn.config_user,
                workdir=defn.config_workdir,
                env=tuple(f"{k}={v}" for k, v in defn.config_env.items()),
                entrypoint=defn.config_entrypoint,
                cmd=defn.config_cmd,
                labels=labels,
                history_comment=f"cerulean build {name} ({len(ctx.unpacked)} packages)",
            )
            manifest = writer.add_image([layer], config, labels)
            manifests.append(manifest)
            files = sum(1 for _ in ctx.tree.files())
            results.append(
                ArchResult(arch, len(ctx.unpacked), files, ctx.tree.total_size, manifest.digest)
            )
        ref = "latest"
        index_labels = {
            "org.opencontainers.image.title": name,
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.created": contexts[0].created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        index_digest = writer.finish(manifests, ref, index_labels)
        outputs = [tmp / f"{name}.oci"]
        write_oci_archive(tmp / f"{name}.oci", tmp / f"{name}.oci.tar",
                          contexts[0].source_date_epoch)
        outputs.append(tmp / f"{name}.oci.tar")
        for ctx, res in zip(contexts, results, strict=True):
            subject = SbomSubject(name, ctx.image_version, ctx.arch, ctx.created,
                                  res.manifest_digest)
            pkgs = _sbom_packages(ctx)
            for suffix, data in (
                ("spdx.json", spdx_document(subject, pkgs)),
                ("cdx.json", cyclonedx_document(subject, pkgs)),
                ("files.json", manifest_document(name, ctx.arch, ctx.image_version,
                                                 ctx.source_date_epoch, ctx.tree)),
            ):
                p = tmp / f"{name}.{ctx.arch}.{suffix}"
                p.write_bytes(data)
                outputs.append(p)
        final: list[Path] = []
        for p in outputs:
            dest = out_dir / p.name
            _replace(p, dest)
            final.append(dest)
    return BuildResult(
        image=name,
        version=version,
        index_digest=index_digest,
        layout=out_dir / f"{name}.oci",
        archive=out_dir / f"{name}.oci.tar",
        outputs=final,
        arches=results,
        seconds=time.monotonic() - started,
    )
