"""Layered TOML settings of the agent: later files win key by key, every key checked."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cerulean.errors import CeruleanError


def read_layers(paths: Iterable[Path], keys: Mapping[str, type],
                error: type[CeruleanError]) -> tuple[dict[str, Any], list[str]]:
    """The merged values of the files in *paths* that exist, and those files.

    An unknown key, a value of the wrong type or a file that is not TOML raises
    *error* with one sentence naming the file and the key.
    """
    merged: dict[str, Any] = {}
    sources: list[str] = []
    for path in paths:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise error(f"{path} is not valid TOML: {e}.") from e
        for k, v in data.items():
            if k not in keys:
                raise error(f"{path}: unknown key {k!r}; valid: {', '.join(keys)}.")
            if not isinstance(v, keys[k]) or (keys[k] is int and isinstance(v, bool)):
                raise error(f"{path}: {k!r} must be a {keys[k].__name__}.")
            merged[k] = v
        sources.append(str(path))
    return merged, sources
