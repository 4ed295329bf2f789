"""CVE IDs from the Debian changelogs of changed packages (cerulean.debian.changelog)."""

from __future__ import annotations

import gzip
from pathlib import Path

from cerulean.debian.cache import Cache
from cerulean.debian.changelog import changelog_of, cves_between, package_changes
from cerulean.debian.lock import LockedPackage
from cerulean.release.notes import notes_markdown
from support.debfactory import make_deb

CHANGELOG = """\
krb5 (1.21.3-5+deb13u2) trixie-security; urgency=medium

  * Fix CVE-2026-11850 and CVE-2026-71199 (buffer overflows).
  * Also CVE-2026-107364.

 -- Debian Security Team <team@security.debian.org>  Mon, 23 Nov 2026 10:00:00 +0000

krb5 (1.21.3-5+deb13u1) trixie; urgency=medium

  * Fix CVE-2025-3576.

 -- Debian Maintainer <m@debian.org>  Sat, 01 Nov 2026 10:00:00 +0000

krb5 (1.21.3-5) unstable; urgency=medium

  * CVE-2024-26458 was fixed long ago.

 -- Debian Maintainer <m@debian.org>  Sat, 01 Feb 2025 10:00:00 +0000
"""


def test_only_entries_newer_than_the_old_version_count() -> None:
    assert cves_between(CHANGELOG, "1.21.3-5+deb13u1", "1.21.3-5+deb13u2") == [
        "CVE-2026-11850", "CVE-2026-71199", "CVE-2026-107364"]
    assert cves_between(CHANGELOG, "1.21.3-5", "1.21.3-5+deb13u2") == [
        "CVE-2025-3576", "CVE-2026-11850", "CVE-2026-71199", "CVE-2026-107364"]
    assert cves_between(CHANGELOG, "1.21.3-5+deb13u2", "1.21.3-5+deb13u2") == []
    assert cves_between("not a changelog", "1", "2") == []


def locked(cache: Cache, name: str, version: str, source: str,
           files: dict[str, bytes] | None = None, source_version: str = "") -> LockedPackage:
    deb = make_deb(name, version, files=files or {}, source=source)
    digest = cache.put(deb)
    return LockedPackage(name, version, "amd64", source, source_version or version, digest,
                         len(deb), "trixie", f"pool/main/{name}.deb")


def test_changes_carry_the_cves_of_their_source(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    log = {"usr/share/doc/libkrb5-3/changelog.Debian.gz": gzip.compress(CHANGELOG.encode())}
    old = {
        "libkrb5-3": locked(cache, "libkrb5-3", "1.21.3-5+deb13u1", "krb5"),
        "libk5crypto3": locked(cache, "libk5crypto3", "1.21.3-5+deb13u1", "krb5"),
        "gone": locked(cache, "gone", "1.0-1", "gone"),
        "same": locked(cache, "same", "2.0-1", "same"),
    }
    new = [
        locked(cache, "libkrb5-3", "1.21.3-5+deb13u2", "krb5", log),
        # Its doc directory is shared: the CVEs come from its sibling's changelog.
        locked(cache, "libk5crypto3", "1.21.3-5+deb13u2", "krb5"),
        locked(cache, "fresh", "1.0-1", "fresh"),
        old["same"],
    ]
    changes = {c.name: c for c in package_changes(old, new, cache)}
    assert sorted(changes) == ["fresh", "gone", "libk5crypto3", "libkrb5-3"]
    fixed = ("CVE-2026-11850", "CVE-2026-71199", "CVE-2026-107364")
    assert changes["libkrb5-3"].cves == fixed and changes["libk5crypto3"].cves == fixed
    assert (changes["fresh"].old, changes["fresh"].new, changes["fresh"].cves) == \
        (None, "1.0-1", ())
    assert (changes["gone"].old, changes["gone"].new) == ("1.0-1", None)
    notes = notes_markdown("vm", "13.20261126.1", "13.20261125.0", {"amd64": list(
        changes.values())})
    assert "3 CVEs fixed" in notes and "| libkrb5-3 | 1.21.3-5+deb13u1 | 1.21.3-5+deb13u2 |" \
        in notes


SIGNED_KERNEL = """\
linux-signed-amd64 (6.12.118+1) trixie-security; urgency=high

  * Sign kernel from linux 6.12.118-1

  * New upstream stable update:
    - smb: client: validate the data area in SMB2_read() (CVE-2026-99272)
    - rxrpc: Fix update of call->tx_pending without holding lock
      (CVE-2026-99350)

 -- Debian Security Team <team@security.debian.org>  Fri, 20 Nov 2026 17:06:00 +0000

linux-signed-amd64 (6.12.57+1) trixie-security; urgency=high

  * Sign kernel from linux 6.12.57-1
  * Fixes CVE-2025-40001.

 -- Debian Security Team <team@security.debian.org>  Sat, 01 Nov 2026 10:00:00 +0000
"""


def test_a_signed_kernel_carries_the_cves_of_its_kernel(tmp_path: Path) -> None:
    """The signed kernel is a native package (changelog.gz, not changelog.Debian.gz) whose
    name changes with its ABI: its CVEs count from the old kernel of the same source."""
    cache = Cache(tmp_path / "cache")
    new_name = "linux-image-6.12.118+deb13-cloud-amd64"
    upstream = b"2026-11-20  Upstream's own ChangeLog: CVE-2026-1 is not Debian's to claim\n"
    old = {"linux-image-6.12.57+deb13-cloud-amd64": locked(
        cache, "linux-image-6.12.57+deb13-cloud-amd64", "6.12.57-1", "linux-signed-amd64",
        source_version="6.12.57+1")}
    new = [locked(cache, new_name, "6.12.118-1", "linux-signed-amd64",
                  {f"usr/share/doc/{new_name}/changelog.gz":
                   gzip.compress(SIGNED_KERNEL.encode())}, source_version="6.12.118+1")]
    changes = {c.name: c for c in package_changes(old, new, cache)}
    assert changes[new_name].cves == ("CVE-2026-99272", "CVE-2026-99350")
    # A non-native package's changelog.gz is upstream's: its Debian changelog wins.
    tool = locked(cache, "tool", "2.0-1", "tool", {
        "usr/share/doc/tool/changelog.gz": gzip.compress(upstream),
        "usr/share/doc/tool/changelog.Debian.gz": gzip.compress(CHANGELOG.encode())})
    assert changelog_of(tool, cache) == CHANGELOG
    only_upstream = locked(cache, "tool2", "2.0-1", "tool2", {
        "usr/share/doc/tool2/changelog.gz": gzip.compress(upstream)})
    assert changelog_of(only_upstream, cache) == upstream.decode()
