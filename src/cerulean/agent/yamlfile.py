"""YAML files of the agent (rules, policies): safe loading only, errors in one sentence.

Only plain data (mappings, lists, strings, numbers, booleans) is built; YAML
tags that would make Python objects are refused by the safe loader. Aliases
(``*name``) are allowed, since the shipped profiles share fix lists with them,
but they are references: ten nested aliases of ten make 10**10 nodes once walked
(by ``str()``, say). So the document is refused when it would grow past
:data:`MAX_EXPANDED` once expanded, or refers to itself.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from cerulean.errors import CeruleanError

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Loader(_Base):  # type: ignore[misc]
    """The safe loader, without merge keys (``<<: *alias``): a chain of them builds a
    document quadratic in the file's size before anything could measure it, and no rule
    or profile needs them."""

    def flatten_mapping(self, node: Any) -> None:
        for key, _value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(
                    None, None, "merge keys ('<<') are not accepted", key.start_mark)
        super().flatten_mapping(node)

# The largest rule or policy file read (the biggest shipped profile is about 120 KiB).
MAX_BYTES = 4 << 20
# The size of a document with every alias expanded: one per node plus the characters of
# its strings. Past it the file is refused (the shipped profiles are far below it).
MAX_EXPANDED = 16 << 20


class YamlError(CeruleanError):
    pass


def _read(path: Path) -> bytes:
    """*path*'s bytes: a regular file of at most MAX_BYTES, read without waiting on a
    FIFO or a device."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise YamlError(f"{path} is not a regular file.")
        if st.st_size > MAX_BYTES:
            raise YamlError(f"{path} is larger than {MAX_BYTES >> 20} MiB.")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise YamlError(f"{path} is larger than {MAX_BYTES >> 20} MiB.")
        return data
    finally:
        os.close(fd)


def expanded_size(data: Any) -> int:
    """The size of *data* with its shared parts counted each time they are reached: one per
    node plus the length of each string. Each distinct node is visited once (its size is
    remembered), so this costs what the file holds, not what it expands to. ValueError
    if *data* contains itself."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        key = id(node)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if done:
            busy.discard(key)
            sizes[key] = 1 + sum(_leaf(c) if not isinstance(c, (dict, list))
                                 else sizes[id(c)] for c in children)
            continue
        if key in sizes:
            continue
        if key in busy:
            raise ValueError("it contains itself through an alias")
        busy.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if isinstance(c, (dict, list)))
    return sizes[id(data)] if isinstance(data, (dict, list)) else _leaf(data)


def _leaf(value: Any) -> int:
    return 1 + (len(value) if isinstance(value, str) else 0)


def load(path: Path) -> Any:
    try:
        text = _read(path).decode()
    except FileNotFoundError:
        raise YamlError(f"{path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise YamlError(f"{path} cannot be read: {e}.") from None
    try:
        data = yaml.load(text, Loader=Loader)  # a safe loader: plain data only
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YamlError(f"{path} is not valid YAML{where}: {problem}.") from None
    except RecursionError:
        raise YamlError(f"{path} is nested too deeply to be read.") from None
    try:
        size = expanded_size(data)
    except ValueError as e:
        raise YamlError(f"{path} cannot be used: {e}.") from None
    if size > MAX_EXPANDED:
        raise YamlError(f"{path} grows past {MAX_EXPANDED >> 20} MiB once its aliases are "
                        "expanded; write it without nested aliases.")
    return data


def layered(dirs: list[Path]) -> list[Path]:
    """The *.yaml files of *dirs*, a later directory's file replacing an earlier one of the
    same name; an empty file turns the name off. Sorted by name."""
    chosen: dict[str, Path] = {}
    for d in dirs:
        for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            chosen[f.name] = f
    return [chosen[n] for n in sorted(chosen) if chosen[n].stat().st_size > 0]
