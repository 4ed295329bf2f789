"""Tests for cerulean.build.licenses: SPDX expressions from Debian copyright files.

Everything is hermetic: the copyright files are written here and in
copyright_samples. The check of the curated ids against the SPDX list runs only
when cyclonedx-python-lib is installed, and skips otherwise.
"""

from __future__ import annotations

import json

import pytest
from copyright_samples import COREUTILS_LIKE, FORMAT, FREE_FORM_GPL, dep5

from cerulean.build import licenses
from cerulean.build.licenses import licenses_from_copyright


def test_dep5_collects_files_paragraphs_sorted_and_mapped() -> None:
    assert licenses_from_copyright(COREUTILS_LIKE) == (
        "GPL-3.0-or-later AND LGPL-2.1-or-later AND LicenseRef-public-domain AND MIT"
    )


def test_standalone_license_paragraphs_are_texts_not_uses() -> None:
    # BSD-4-clause only has a stand-alone License paragraph in the sample.
    assert "BSD-4-Clause" not in licenses_from_copyright(COREUTILS_LIKE)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("GPL-2+", "GPL-2.0-or-later"),
        ("GPL-2", "GPL-2.0-only"),
        ("GPL-3.0+", "GPL-3.0-or-later"),
        ("LGPL-2.1+", "LGPL-2.1-or-later"),
        ("LGPL-2", "LGPL-2.0-only"),
        ("BSD-3-clause", "BSD-3-Clause"),
        ("Expat", "MIT"),
        ("Apache-2.0", "Apache-2.0"),
        ("Apache-2", "Apache-2.0"),
        ("MPL-2.0", "MPL-2.0"),
        ("MPL-1.1+", "MPL-1.1+"),
        ("PSF-2", "PSF-2.0"),
        ("Zlib", "Zlib"),
        ("zlib", "Zlib"),
        ("ISC", "ISC"),
        ("OpenSSL", "OpenSSL"),
        ("CC0-1.0", "CC0-1.0"),
        ("GFDL-NIV-1.3+", "GFDL-1.3-no-invariants-or-later"),
        ("public-domain", "LicenseRef-public-domain"),
        ("Perl", "Artistic-1.0-Perl OR GPL-1.0-or-later"),
        # The compound form perl's own copyright file uses.
        ("GPL-1+ or Artistic", "Artistic-1.0-Perl OR GPL-1.0-or-later"),
        ("GPL-2+ or Artistic", "Artistic-1.0-Perl OR GPL-2.0-or-later"),
        ("GPL-2+ and BSD-3-clause", "BSD-3-Clause AND GPL-2.0-or-later"),
        # DEP-5: "and" binds tighter than "or" unless a comma comes first.
        ("MIT or GPL-2 and BSD-3-clause", "(BSD-3-Clause AND GPL-2.0-only) OR MIT"),
        (
            "GPL-2+ or Artistic-2.0, and BSD-3-clause",
            "(Artistic-2.0 OR GPL-2.0-or-later) AND BSD-3-Clause",
        ),
        ("GPL-2, LGPL-2.1", "GPL-2.0-only AND LGPL-2.1-only"),
        ("GPL-3+ with GCC-runtime exception", "GPL-3.0-or-later WITH GCC-exception-3.1"),
        ("GPL-2+ with GCC-runtime exception", "GPL-2.0-or-later WITH GCC-exception-2.0"),
        ("GPL-3+ with Autoconf exception", "GPL-3.0-or-later WITH Autoconf-exception-3.0"),
        ("GPL-2 with Linux-syscall-note exception", "GPL-2.0-only WITH Linux-syscall-note"),
        ("Apache-2.0 with LLVM exception", "Apache-2.0 WITH LLVM-exception"),
        ("APACHE-2-LLVM-EXCEPTIONS", "Apache-2.0 WITH LLVM-exception"),
        # The exception glued on with dashes, as perl's copyright file has it.
        ("GPL-3+-WITH-BISON-EXCEPTION", "GPL-3.0-or-later WITH Bison-exception-2.2"),
        ("GPL-2+ with Classpath-exception-2.0", "GPL-2.0-or-later WITH Classpath-exception-2.0"),
        # An exception SPDX does not list: the whole term is one reference.
        ("GPL-2+ with OpenSSL exception", "LicenseRef-gpl-2-plus-with-openssl-exception"),
        ("Some_Odd Licence!", "LicenseRef-some-odd-licence"),
        ("Vendor-Special+", "LicenseRef-vendor-special-plus"),
    ],
)
def test_dep5_license_field_to_spdx(field: str, expected: str) -> None:
    assert licenses_from_copyright(dep5(field)) == expected


def test_licences_are_deduplicated_case_insensitively() -> None:
    text = dep5("GPL-2+", "gpl-2+", "Public-Domain", "public-domain", "Expat or GPL-2+")
    assert licenses_from_copyright(text) == (
        "GPL-2.0-or-later AND (GPL-2.0-or-later OR MIT) AND LicenseRef-public-domain"
    )


def test_order_of_alternatives_does_not_matter() -> None:
    assert licenses_from_copyright(dep5("Artistic or GPL-1+")) == licenses_from_copyright(
        dep5("GPL-1+ or Artistic")
    )


def test_dep5_header_licence_when_there_are_no_files_paragraphs() -> None:
    text = (FORMAT + "Upstream-Name: x\nLicense: BSD-2-clause\n").encode()
    assert licenses_from_copyright(text) == "BSD-2-Clause"


def test_old_dep5_format_field_is_recognised() -> None:
    text = (
        b"Format-Specification: http://svn.debian.org/wsvn/dep/web/deps/dep5.mdwn?rev=135\n"
        b"\nFiles: *\nCopyright: 2009 X\nLicense: LGPL-3+\n"
    )
    assert licenses_from_copyright(text) == "LGPL-3.0-or-later"


def test_free_form_gnu_grant_with_or_later() -> None:
    assert licenses_from_copyright(FREE_FORM_GPL) == "GPL-2.0-or-later"


def test_free_form_versions_and_phrases() -> None:
    text = b"""Parts are under the GNU Lesser General Public License, version 2.1.
Other parts: Permission is hereby granted, free of charge, to any person obtaining a copy
of this software.
The documentation: see /usr/share/common-licenses/GFDL-1.3.
"""
    assert licenses_from_copyright(text) == "GFDL-1.3-only AND LGPL-2.1-only AND MIT"


@pytest.mark.parametrize(
    "text",
    [
        None,
        b"",
        b"Copyright 1990 Nobody. All rights reserved.\n",
        # Named but unversioned: too little to assert anything.
        b"This is free software under the GNU General Public License.\n",
        # A DEP-5 header but nothing else usable, and no free-form match.
        (FORMAT + "\nFiles: *\nCopyright: x\n").encode(),
    ],
)
def test_noassertion_when_nothing_reliable(text: bytes | None) -> None:
    assert licenses_from_copyright(text) == "NOASSERTION"


def test_garbage_never_raises() -> None:
    junk = b"\xff\xfe\x00Format: copyright-format/1.0\n\n \n:\nFiles\nLicense:\n\tx\n\x80"
    assert isinstance(licenses_from_copyright(junk), str)


def test_curated_spdx_ids_are_on_the_spdx_list() -> None:
    """Every id we may emit must be a real SPDX licence/exception id (per CycloneDX's copy)."""
    resources = pytest.importorskip("cyclonedx.schema._res")
    from importlib.resources import files

    spdx_schema = files(resources).joinpath("spdx.SNAPSHOT.schema.json")
    known = set(json.loads(spdx_schema.read_text())["enum"])
    assert licenses._SPDX_LICENSES - known == set()
    assert licenses._SPDX_EXCEPTIONS - known == set()
    mapped = set(licenses._DEBIAN_ALIASES.values())
    for value in licenses._DEBIAN_EXCEPTIONS.values():
        mapped |= set(value) if isinstance(value, tuple) else {value}
    assert mapped - known == set()
