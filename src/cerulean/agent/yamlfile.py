"""YAML files of the agent (rules, policies): safe loading only, errors in one sentence.

Only plain data (mappings, lists, strings, numbers, booleans) is built; YAML
tags that would make Python objects are refused by the safe loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cerulean.errors import CeruleanError

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlError(CeruleanError):
    pass


def load(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise YamlError(f"{path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise YamlError(f"{path} cannot be read: {e}.") from None
    try:
        return yaml.load(text, Loader=Loader)  # a safe loader: plain data only
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YamlError(f"{path} is not valid YAML{where}: {problem}.") from None


def layered(dirs: list[Path]) -> list[Path]:
    """The *.yaml files of *dirs*, a later directory's file replacing an earlier one of the
    same name; an empty file turns the name off. Sorted by name."""
    chosen: dict[str, Path] = {}
    for d in dirs:
        for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            chosen[f.name] = f
    return [chosen[n] for n in sorted(chosen) if chosen[n].stat().st_size > 0]
