"""Debian archive access: mirrors and suites, signature checks, Packages
indexes, the content-addressed download cache, dependency resolution and
lockfiles."""

from pathlib import Path

KEYRING = Path(__file__).parent / "keys" / "debian-archive-keyring.gpg"
"""The Debian archive signing keys every InRelease must be signed with."""
