"""Composing one architecture's rootfs: a flat list of small named steps.

Read ``STEPS`` to see the whole pipeline; each step takes the build context
and does one thing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cerulean.build import configure
from cerulean.build.definition import ImageDefinition
from cerulean.build.tree import Tree
from cerulean.build.unpack import Unpacked, load_package, unpack_into
from cerulean.debian.cache import Cache
from cerulean.debian.deb import parse_control
from cerulean.debian.lock import Lock, LockedPackage

log = logging.getLogger("cerulean.build")


@dataclass
class Context:
    defn: ImageDefinition
    arch: str
    lock: Lock
    cache: Cache
    tree: Tree = field(default_factory=Tree)
    unpacked: list[Unpacked] = field(default_factory=list)
    installed: list[configure.InstalledPackage] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def packages(self) -> tuple[LockedPackage, ...]:
        return self.lock.packages[self.arch]

    @property
    def source_date_epoch(self) -> int:
        return self.lock.source_date_epoch

    @property
    def created(self) -> datetime:
        return datetime.fromtimestamp(self.source_date_epoch, UTC)

    @property
    def image_version(self) -> str:
        return f"{self.defn.image_version}.{self.created:%Y%m%d}"

    @property
    def codename(self) -> str:
        return self.lock.snapshot[0].suite.split("-")[0] if self.lock.snapshot else "trixie"


def unpack(ctx: Context) -> None:
    packages = list(ctx.packages)
    if ctx.defn.packages_cerulean:
        # Cerulean's own packages, written from this tree (not from the archive).
        from cerulean.build.cerulean_deb import local_packages

        local = local_packages(ctx.lock, ctx.arch, ctx.cache)
        packages += [lp.locked for lp in local]
        ctx.notes["purls"] = {lp.locked.name: lp.purl for lp in local}
    for p in sorted(packages, key=lambda p: p.name):
        u = load_package(ctx.cache, p)
        shipped = unpack_into(ctx.tree, u)
        ctx.unpacked.append(u)
        fields = parse_control(u.control["control"])
        ctx.installed.append(
            configure.InstalledPackage(
                name=p.name,
                arch=p.arch,
                multi_arch=fields.get("Multi-Arch", "no"),
                control=u.control["control"],
                md5sums=u.control.get("md5sums", b""),
                conffiles=u.control.get("conffiles", b""),
                files=tuple(shipped),
                postinst=u.control.get("postinst", b""),
            )
        )


def merge_usr(ctx: Context) -> None:
    ctx.tree.add_merged_usr_links()


def configure_accounts(ctx: Context) -> None:
    configure.configure_accounts(ctx.tree, ctx.defn.accounts_users)


def write_os_release(ctx: Context) -> None:
    configure.write_os_release(ctx.tree, ctx.defn, ctx.image_version, ctx.codename)


def write_ca_bundle(ctx: Context) -> None:
    ctx.notes["certificates"] = configure.write_ca_bundle(ctx.tree)


def trim(ctx: Context) -> None:
    ctx.notes["trimmed"] = configure.trim(ctx.tree, ctx.defn)


def write_ldconfig(ctx: Context) -> None:
    from cerulean.build.ldcache import build_ld_so_cache

    if ctx.tree.get("etc/ld.so.conf") is not None or ctx.tree.listdir("usr/lib"):
        ctx.tree.add_file("etc/ld.so.cache", build_ld_so_cache(ctx.tree, ctx.arch), 0o644)


def write_alternatives(ctx: Context) -> None:
    full = ctx.defn.output_dpkg_database == "full"
    ctx.notes["alternatives"] = configure.write_alternatives(ctx.tree, ctx.installed, full)


def write_dpkg_db(ctx: Context) -> None:
    if ctx.defn.output_dpkg_database == "full":
        configure.write_dpkg_database(ctx.tree, ctx.installed, ctx.arch)
        configure.write_dpkg_excludes(ctx.tree, ctx.defn)
    else:
        configure.write_dpkg_status_d(ctx.tree, ctx.installed)


STEPS: tuple[Callable[[Context], None], ...] = (
    unpack,
    merge_usr,
    configure_accounts,
    write_os_release,
    write_ca_bundle,
    trim,
    write_alternatives,
    write_ldconfig,
    write_dpkg_db,
)


def compose(defn: ImageDefinition, arch: str, lock: Lock, cache: Cache) -> Context:
    ctx = Context(defn, arch, lock, cache)
    for step in STEPS:
        log.debug("%s/%s: %s", defn.name, arch, step.__name__)
        step(ctx)
    return ctx
