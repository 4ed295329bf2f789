"""The agent's YAML files (cerulean.agent.yamlfile): hostile documents are refused in one
sentence, never expanded."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cerulean.agent import yamlfile
from cerulean.agent.detect import load_rule_files
from cerulean.agent.yamlfile import YamlError

SHIPPED = Path(__file__).parents[2] / "src/cerulean/agent/data"

LAUGHS = """\
- rule: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
- &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
- &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
- &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
- &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
- &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
- &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
- &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
- &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_nested_aliases_are_refused_before_anything_expands_them(tmp_path: Path) -> None:
    """A 414-byte rules file that str() turned into 312 MB: refused, at once, naming it."""
    f = tmp_path / "rules.d/laughs.yaml"
    f.parent.mkdir()
    f.write_text(LAUGHS)
    assert len(LAUGHS) < 500
    start = time.monotonic()
    with pytest.raises(YamlError, match=r"laughs.yaml grows past 16 MiB once its aliases are "
                       r"expanded; write it without nested aliases\.$"):
        yamlfile.load(f)
    with pytest.raises(YamlError, match="grows past"):
        load_rule_files([f.parent])
    assert time.monotonic() - start < 2.0


def test_a_document_that_contains_itself_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "loop.yaml"
    f.write_text("&a [1, *a]\n")
    with pytest.raises(YamlError, match=r"loop.yaml cannot be used: it contains itself "
                       r"through an alias\."):
        yamlfile.load(f)


def test_the_shipped_files_with_their_aliases_still_load() -> None:
    for f in sorted(SHIPPED.glob("*/*.yaml")):
        assert yamlfile.load(f)
        assert yamlfile.expanded_size(yamlfile.load(f)) < yamlfile.MAX_EXPANDED // 10


def test_a_fifo_or_a_huge_file_is_refused_without_waiting(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    errors: list[str] = []

    def load() -> None:
        try:
            yamlfile.load(fifo)
        except YamlError as e:
            errors.append(str(e))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("loading a FIFO blocked")
    assert errors == [f"{fifo} is not a regular file."]
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(yamlfile.MAX_BYTES + 1)
    with pytest.raises(YamlError, match=r"big.yaml is larger than 4 MiB\."):
        yamlfile.load(big)


def test_a_chain_of_merge_keys_is_refused_before_it_grows(tmp_path: Path) -> None:
    """kN: &kN {<<: *kN-1, aN: 1} grows with the square of the file's size while it is
    built, before any size could be measured."""
    lines = ["k0: &k0 {a0: 1}"] + [f"k{i}: &k{i} {{<<: *k{i - 1}, a{i}: 1}}"
                                   for i in range(1, 3000)]
    f = tmp_path / "merge.yaml"
    f.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(YamlError, match=r"merge keys \('<<'\) are not accepted"):
        yamlfile.load(f)
    assert time.monotonic() - started < 5
