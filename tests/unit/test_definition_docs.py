"""The settings reference in the docs is the one the code generates."""

from __future__ import annotations

from pathlib import Path

from cerulean.build.definition import SETTINGS, settings_reference

ROOT = Path(__file__).resolve().parents[2]


def test_docs_carry_the_generated_settings_table() -> None:
    doc = (ROOT / "docs" / "image-definitions.md").read_text()
    assert settings_reference() in doc, (
        "run: python -m cerulean.build.definition docs/image-definitions.md")
    for s in SETTINGS:
        assert f"`{s.section}.{s.key}`" in doc
