"""Options and look-ups shared by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from cerulean.build.definition import ImageDefinition, images_dir, load_definition
from cerulean.debian.cache import DEFAULT_CACHE, Cache
from cerulean.errors import CeruleanError


def add_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help=f"download cache (default: {DEFAULT_CACHE})")
    p.add_argument("--offline", action="store_true",
                   help="use only what is already in the cache; never touch the network")


def find_definition(arg: str) -> ImageDefinition:
    """A definition from a path, or a built-in image's name such as 'base'."""
    path = Path(arg)
    if not path.suffix and not path.exists():
        candidate = images_dir() / f"{arg}.toml"
        if not candidate.exists():
            raise CeruleanError(
                f"There is no image definition {arg!r} (see `cerulean images`)."
            )
        path = candidate
    return load_definition(path)


def open_cache(args: argparse.Namespace) -> Cache:
    return Cache(args.cache)


def parse_arches(value: str | None, defn: ImageDefinition) -> tuple[str, ...]:
    if not value:
        return defn.image_architectures
    arches = tuple(dict.fromkeys(a.strip() for a in value.split(",") if a.strip()))
    unknown = [a for a in arches if a not in defn.image_architectures]
    if unknown or not arches:
        raise CeruleanError(
            f"--arch {value!r} is not valid for {defn.name}: choose from "
            f"{', '.join(defn.image_architectures)}."
        )
    return arches
