"""`cerulean lock --refresh security` against the real archive.

The lock starts as it would have been before the security suite's current
updates (resolved with the security suite left out); the refresh must move
exactly the packages the security suite has newer versions of, and nothing
else, and name the CVEs from their changelogs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from debian.debian_support import Version

from cerulean.build.definition import load_definition
from cerulean.build.plan import resolve_lock
from cerulean.debian.cache import Cache
from cerulean.debian.lock import read_lock, write_lock

pytestmark = pytest.mark.integration

RunCli = Callable[..., int]


def test_security_refresh_moves_only_security_updates(images: Path, cache_dir: Path,
                                                      run_cli: RunCli,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    defn = load_definition(images / "edge.toml")
    cache = Cache(cache_dir)
    before = resolve_lock(defn, cache, keep=lambda _arch, p: not p.suite.endswith("-security"))
    write_lock(defn.lock_path, before)
    current = resolve_lock(defn, cache)  # what a full refresh would give

    capsys.readouterr()
    assert run_cli("lock", "--refresh", "security", defn.path, "--json",
                   "--cache", cache_dir) == 0
    out = json.loads(capsys.readouterr().out)
    after = read_lock(defn.lock_path)
    for arch in defn.image_architectures:
        old = {p.name: p for p in before.packages[arch]}
        new = {p.name: p for p in after.packages[arch]}
        full = {p.name: p for p in current.packages[arch]}
        for name, p in new.items():
            if name in old and p.version != old[name].version:
                # Moved: only ever forward, and only to the security suite.
                assert p.suite.endswith("-security"), p
                assert Version(p.version) > Version(old[name].version)
            elif name not in old:
                assert name in full, f"{name} came from nowhere"
        for name, p in old.items():
            # Left alone although a security version exists? Only if it is not newer.
            if name in new and new[name].version == p.version and name in full \
                    and full[name].suite.endswith("-security"):
                assert Version(full[name].version) <= Version(p.version), name
        changed = [c["name"] for c in out["changes"][arch]]
        assert changed == sorted(changed)
        assert all(c.startswith("CVE-") for c in out["cves"])
    assert out["written"] == (before.packages != after.packages)
    # Run again: nothing left to do.
    assert run_cli("lock", "--refresh", "security", defn.path, "--cache", cache_dir) == 0
    assert "no newer security updates" in capsys.readouterr().out
