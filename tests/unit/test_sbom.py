"""Tests for cerulean.build.sbom: purls, licence detection, SPDX 2.3 and CycloneDX 1.6.

Everything is hermetic: the copyright files are written here. The schema and
validator checks run only when cyclonedx-python-lib / spdx-tools /
packageurl-python are installed, and skip otherwise.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from cerulean import __version__
from cerulean.build import sbom
from cerulean.build.sbom import (
    SbomPackage,
    SbomSubject,
    cyclonedx_document,
    deb_purl,
    licenses_from_copyright,
    spdx_document,
)

FORMAT = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"


def dep5(*licenses: str, extra: str = "") -> bytes:
    """A machine-readable copyright file with one Files paragraph per licence."""
    parts = [FORMAT + "Upstream-Name: sample\nSource: https://example.org/sample\n"]
    for i, name in enumerate(licenses):
        files = "*" if i == 0 else f"part{i}/*"
        parts.append(f"Files: {files}\nCopyright: 2024 Somebody <s@example.org>\nLicense: {name}\n")
    if extra:
        parts.append(extra)
    return "\n".join(parts).encode()


COREUTILS_LIKE = f"""{FORMAT}Upstream-Name: sample-utils
Upstream-Contact: Bug Reports <bugs@example.org>
Source: https://example.org/sample-utils/

Files: *
Copyright: 1984-2024 Free Software Foundation, Inc.
License: GPL-3+

Files: lib/*
Copyright: 2001 Someone Else
License: LGPL-2.1+
 This library is free software; you can redistribute it and/or
 modify it under the terms of the GNU Lesser General Public
 License as published by the Free Software Foundation.
 .
 On Debian systems see /usr/share/common-licenses/LGPL-2.1.

Files: src/hash.c
 src/other.c
Copyright: 2010 A. Hacker
License: public-domain

# A comment line, which deb822 ignores.
Files: debian/*
Copyright: 2020 Debian Maintainer <dm@example.org>
License: Expat

License: GPL-3+
 This program is free software: you can redistribute it and/or modify
 it under the terms of the GNU General Public License version 3 or later.

License: public-domain
 The author placed these files in the public domain.
 .
 No rights reserved.

License: BSD-4-clause
 A licence text that no Files paragraph uses.
""".encode()

FREE_FORM_GPL = b"""This package was debianized by Somebody <s@example.org> in 1999.

It was downloaded from https://example.org/

Copyright (C) 1999 The Authors

This program is free software; you can redistribute it and/or modify
it under the terms of the GNU General Public License as published by
the Free Software Foundation; either version 2 of the License, or
(at your option) any later version.

On Debian systems, the complete text of the GNU General Public License
can be found in `/usr/share/common-licenses/GPL-2'.
"""


# --------------------------------------------------------------------------
# Licence detection
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Package URLs
# --------------------------------------------------------------------------


def pkg(name: str, **kw: Any) -> SbomPackage:
    fields: dict[str, Any] = {
        "version": "1.0-1",
        "arch": "amd64",
        "source": name,
        "source_version": kw.get("version", "1.0-1"),
        "sha256": (name.encode().hex() * 64)[:64],
    }
    fields.update(kw)
    return SbomPackage(name=name, **fields)


def test_purl_epoch_and_plus_encoding() -> None:
    p = pkg("foo", version="1:2.3+dfsg-1~deb13u1")
    # ":" is never encoded (the epoch stays readable), "+" is %2B, "~" is kept.
    assert deb_purl(p) == "pkg:deb/debian/foo@1:2.3%2Bdfsg-1~deb13u1?arch=amd64&distro=debian-13"


def test_purl_upstream_when_source_name_differs() -> None:
    p = pkg("libssl3t64", version="3.5.1-1", source="openssl", arch="arm64")
    assert deb_purl(p) == (
        "pkg:deb/debian/libssl3t64@3.5.1-1?arch=arm64&distro=debian-13&upstream=openssl"
    )


def test_purl_upstream_carries_source_version_when_it_differs() -> None:
    p = pkg("libgcc-s1", version="14.2.0-19", source="gcc-14", source_version="14.2.0-19")
    assert deb_purl(p).endswith("&upstream=gcc-14")
    p = pkg("libgcc-s1", version="1:14.2.0-19", source="gcc-14", source_version="14.2.0-19")
    assert deb_purl(p).endswith("&upstream=gcc-14%4014.2.0-19")
    # A binNMU: same source name, different version.
    p = pkg("bash", version="5.2.37-2+b1", source="bash", source_version="5.2.37-2")
    assert deb_purl(p) == (
        "pkg:deb/debian/bash@5.2.37-2%2Bb1?arch=amd64&distro=debian-13&upstream=bash%405.2.37-2"
    )


def test_purl_without_upstream_when_source_is_the_package() -> None:
    assert "upstream" not in deb_purl(pkg("bash", version="5.2.37-2"))
    assert deb_purl(pkg("tzdata", arch="all")).startswith("pkg:deb/debian/tzdata@1.0-1?arch=all&")


def test_purl_parses_back_with_packageurl_python() -> None:
    packageurl = pytest.importorskip("packageurl")
    p = pkg("libstdc++6", version="1:2.3+dfsg-1~deb13u1", source="gcc-14", source_version="14.2")
    parsed = packageurl.PackageURL.from_string(deb_purl(p))
    assert (parsed.type, parsed.namespace, parsed.name) == ("deb", "debian", "libstdc++6")
    assert parsed.version == "1:2.3+dfsg-1~deb13u1"
    assert parsed.qualifiers == {
        "arch": "amd64",
        "distro": "debian-13",
        "upstream": "gcc-14@14.2",
    }


# --------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------

CREATED = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
SUBJECT = SbomSubject("python", "13.20261121", "amd64", CREATED, "sha256:" + "ab" * 32)


def packages() -> list[SbomPackage]:
    return [
        pkg(
            "libc6",
            version="2.41-12",
            source="glibc",
            maintainer="GNU Libc Maintainers <debian-glibc@lists.debian.org>",
            homepage="https://www.gnu.org/software/libc/libc.html",
            description="GNU C Library: Shared libraries",
            copyright=dep5("LGPL-2.1+", "GPL-2+ with GCC-runtime exception", "public-domain"),
        ),
        pkg(
            "perl-base",
            version="5.40.1-6",
            source="perl",
            maintainer="Niko Tyni <ntyni@debian.org>",
            copyright=dep5("GPL-1+ or Artistic"),
        ),
        pkg("libstdc++6", version="14.2.0-19", source="gcc-14", copyright=dep5("Expat")),
        pkg("libstdc--6", version="1.0", copyright=FREE_FORM_GPL),
        pkg(
            "base-files",
            version="13.8",
            maintainer="Santiago Vila <sanvila@debian.org>",
            copyright=COREUTILS_LIKE,
        ),
        pkg("tzdata", version="2025b-4", arch="all", description="time zone data"),
        pkg("zlib1g", version="1:1.3.dfsg+really1.3.1-1+b1", source="zlib",
            source_version="1:1.3.dfsg+really1.3.1-1", copyright=dep5("Zlib")),
        pkg(
            "libfoo1",
            version="0.1-1",
            # Non-ASCII must survive as UTF-8.
            maintainer="Jörg Müller (Debian) <jm@example.org>",
            copyright=dep5("Foo-Licence", extra="License: Foo-Licence\n Do what you like.\n"),
        ),
    ]


def spdx(subject: SbomSubject = SUBJECT, pkgs: list[SbomPackage] | None = None) -> Any:
    return json.loads(spdx_document(subject, packages() if pkgs is None else pkgs))


def cdx(subject: SbomSubject = SUBJECT, pkgs: list[SbomPackage] | None = None) -> Any:
    return json.loads(cyclonedx_document(subject, packages() if pkgs is None else pkgs))


@pytest.mark.parametrize("make", [spdx_document, cyclonedx_document])
def test_documents_are_deterministic(make: Any) -> None:
    first = make(SUBJECT, packages())
    assert first == make(SUBJECT, packages())
    assert first == make(SUBJECT, list(reversed(packages())))
    assert first.endswith(b"}\n")
    assert "Jörg Müller".encode() in first
    # Any change in the input changes the document, its id included.
    other = make(SUBJECT, [replace(packages()[0], sha256="0" * 64), *packages()[1:]])
    assert other != first


def test_spdx_namespace_and_cyclonedx_serial_follow_content() -> None:
    changed = [replace(packages()[0], sha256="0" * 64), *packages()[1:]]
    ns = spdx()["documentNamespace"]
    assert re.fullmatch(r"https://\S+/python-13\.20261121-amd64-[0-9a-f-]{36}", ns)
    assert spdx(pkgs=changed)["documentNamespace"] != ns
    assert spdx(replace(SUBJECT, arch="arm64"))["documentNamespace"] != ns
    serial = cdx()["serialNumber"]
    assert re.fullmatch(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-"
                        r"[0-9a-f]{12}", serial)
    assert cdx(pkgs=changed)["serialNumber"] != serial
    assert cdx(replace(SUBJECT, created=CREATED + timedelta(seconds=1)))["serialNumber"] != serial


def test_timestamps_are_utc_z() -> None:
    tokyo = CREATED.astimezone(timezone(timedelta(hours=9)))
    assert spdx(replace(SUBJECT, created=tokyo))["creationInfo"]["created"] == (
        "2026-11-21T12:00:00Z"
    )
    assert cdx(replace(SUBJECT, created=CREATED.replace(tzinfo=None)))["metadata"][
        "timestamp"
    ] == "2026-11-21T12:00:00Z"


def test_spdx_structure() -> None:
    doc = spdx()
    assert doc["spdxVersion"] == "SPDX-2.3"
    assert doc["dataLicense"] == "CC0-1.0"
    assert doc["SPDXID"] == "SPDXRef-DOCUMENT"
    assert doc["creationInfo"]["creators"] == [f"Tool: cerulean-{__version__}"]

    ids = [p["SPDXID"] for p in doc["packages"]]
    assert len(ids) == len(set(ids)) == len(packages()) + 1
    assert all(re.fullmatch(r"SPDXRef-[A-Za-z0-9.-]+", i) for i in ids)
    known = {*ids, "SPDXRef-DOCUMENT"}
    for rel in doc["relationships"]:
        assert rel["spdxElementId"] in known
        assert rel["relatedSpdxElement"] in known

    image = doc["packages"][0]
    assert image["primaryPackagePurpose"] == "CONTAINER"
    assert {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
            "relatedSpdxElement": image["SPDXID"]} in doc["relationships"]
    contained = {r["relatedSpdxElement"] for r in doc["relationships"]
                 if r["relationshipType"] == "CONTAINS" and r["spdxElementId"] == image["SPDXID"]}
    assert contained == set(ids[1:])

    # Sorted by (name, arch); libstdc++6 and libstdc--6 sanitise alike yet stay distinct.
    names = [p["name"] for p in doc["packages"][1:]]
    assert names == sorted(names)
    by_name = {p["name"]: p for p in doc["packages"][1:]}
    assert by_name["libstdc++6"]["SPDXID"] != by_name["libstdc--6"]["SPDXID"]

    libc = by_name["libc6"]
    assert libc["versionInfo"] == "2.41-12"
    assert libc["supplier"] == (
        "Organization: GNU Libc Maintainers (debian-glibc@lists.debian.org)"
    )
    assert libc["downloadLocation"] == "NOASSERTION"
    assert libc["filesAnalyzed"] is False
    assert libc["checksums"] == [{"algorithm": "SHA256", "checksumValue": packages()[0].sha256}]
    assert libc["licenseConcluded"] == "NOASSERTION"
    assert libc["licenseDeclared"] == (
        "GPL-2.0-or-later WITH GCC-exception-2.0 AND LGPL-2.1-or-later"
        " AND LicenseRef-public-domain"
    )
    assert libc["copyrightText"] == "NOASSERTION"
    assert libc["externalRefs"] == [{
        "referenceCategory": "PACKAGE-MANAGER",
        "referenceType": "purl",
        "referenceLocator": "pkg:deb/debian/libc6@2.41-12?arch=amd64&distro=debian-13"
                            "&upstream=glibc",
    }]
    assert libc["sourceInfo"] == "built package from: glibc 2.41-12"
    assert libc["summary"] == "GNU C Library: Shared libraries"
    assert by_name["tzdata"]["supplier"] == "NOASSERTION"
    assert by_name["tzdata"]["licenseDeclared"] == "NOASSERTION"
    assert by_name["libfoo1"]["supplier"] == "Organization: Jörg Müller Debian (jm@example.org)"


def test_spdx_every_licenseref_has_extracted_info() -> None:
    doc = spdx()
    used = set()
    for p in doc["packages"]:
        used |= set(re.findall(r"LicenseRef-[A-Za-z0-9.-]+", p["licenseDeclared"]))
    infos = {i["licenseId"]: i for i in doc["hasExtractedLicensingInfos"]}
    assert used == set(infos) == {"LicenseRef-public-domain", "LicenseRef-foo-licence"}
    for info in infos.values():
        assert info["extractedText"] and info["name"]
    # The text the copyright file gives is carried over...
    assert infos["LicenseRef-foo-licence"]["extractedText"] == "Do what you like."
    # ...and where packages give different texts (or none) the info says where to look.
    assert "base-files, libc6" in infos["LicenseRef-public-domain"]["extractedText"]


def test_spdx_without_licencerefs_has_no_extracted_infos() -> None:
    doc = spdx(pkgs=[pkg("zlib1g", copyright=dep5("Zlib"))])
    assert "hasExtractedLicensingInfos" not in doc


def test_spdx_image_without_digest() -> None:
    doc = spdx(replace(SUBJECT, digest=""))
    image = doc["packages"][0]
    assert "externalRefs" not in image and "checksums" not in image


def test_cyclonedx_structure() -> None:
    doc = cdx()
    assert (doc["bomFormat"], doc["specVersion"], doc["version"]) == ("CycloneDX", "1.6", 1)
    meta = doc["metadata"]
    assert meta["timestamp"] == "2026-11-21T12:00:00Z"
    assert meta["tools"]["components"] == [
        {"type": "application", "name": "cerulean", "version": __version__}
    ]
    image = meta["component"]
    assert image["type"] == "container"
    assert image["purl"] == f"pkg:oci/python@sha256:{'ab' * 32}?arch=amd64&tag=13.20261121"

    refs = [image["bom-ref"]] + [c["bom-ref"] for c in doc["components"]]
    assert len(refs) == len(set(refs))
    for dep in doc["dependencies"]:
        assert dep["ref"] in refs
        assert set(dep.get("dependsOn", [])) <= set(refs)
    assert doc["dependencies"] == [
        {"ref": image["bom-ref"], "dependsOn": [c["bom-ref"] for c in doc["components"]]}
    ]

    by_name = {c["name"]: c for c in doc["components"]}
    libc = by_name["libc6"]
    assert libc["type"] == "library"
    assert libc["bom-ref"] == libc["purl"] == deb_purl(packages()[0])
    assert libc["hashes"] == [{"alg": "SHA-256", "content": packages()[0].sha256}]
    assert libc["supplier"] == {
        "name": "GNU Libc Maintainers",
        "contact": [{"email": "debian-glibc@lists.debian.org"}],
    }
    props = {p["name"]: p["value"] for p in libc["properties"]}
    assert props == {
        "cerulean:deb:arch": "amd64",
        "cerulean:deb:source": "glibc",
        "cerulean:deb:source-version": "2.41-12",
    }
    # Licence choice: compound -> expression; SPDX id -> id; LicenseRef -> name.
    assert libc["licenses"] == [{
        "expression": "GPL-2.0-or-later WITH GCC-exception-2.0 AND LGPL-2.1-or-later"
                      " AND LicenseRef-public-domain",
        "acknowledgement": "declared",
    }]
    assert by_name["libstdc++6"]["licenses"] == [
        {"license": {"id": "MIT", "acknowledgement": "declared"}}
    ]
    assert by_name["libfoo1"]["licenses"] == [
        {"license": {"name": "Foo-Licence", "acknowledgement": "declared"}}
    ]
    assert "licenses" not in by_name["tzdata"]


def test_cyclonedx_image_without_digest_still_has_a_unique_ref() -> None:
    doc = cdx(replace(SUBJECT, digest=""))
    image = doc["metadata"]["component"]
    assert "purl" not in image
    assert doc["dependencies"][0]["ref"] == image["bom-ref"]
    assert image["bom-ref"] not in {c["bom-ref"] for c in doc["components"]}


@pytest.mark.parametrize("make", [spdx_document, cyclonedx_document])
def test_bad_input_is_refused(make: Any) -> None:
    with pytest.raises(ValueError, match="twice"):
        make(SUBJECT, [pkg("a"), pkg("a")])
    with pytest.raises(ValueError, match="sha256"):
        make(SUBJECT, [pkg("a", sha256="ABC")])
    with pytest.raises(ValueError, match="digest"):
        make(replace(SUBJECT, digest="md5:123"), [])
    # The same name on two architectures (multiarch) is fine.
    make(SUBJECT, [pkg("a"), pkg("a", arch="i386")])


def test_empty_image() -> None:
    assert spdx(pkgs=[])["relationships"][0]["relationshipType"] == "DESCRIBES"
    assert cdx(pkgs=[])["components"] == []


# --------------------------------------------------------------------------
# Third-party validators (skipped when not installed)
# --------------------------------------------------------------------------


def test_cyclonedx_validates_against_the_1_6_schema() -> None:
    pytest.importorskip("jsonschema")
    validation = pytest.importorskip("cyclonedx.validation.json")
    schema = pytest.importorskip("cyclonedx.schema")
    validator = validation.JsonStrictValidator(schema.SchemaVersion.V1_6)
    for subject in (SUBJECT, replace(SUBJECT, digest="")):
        error = validator.validate_str(cyclonedx_document(subject, packages()))
        assert error is None, str(error)


def test_spdx_validates_with_spdx_tools() -> None:
    parser = pytest.importorskip("spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser")
    validator = pytest.importorskip("spdx_tools.spdx.validation.document_validator")
    for subject in (SUBJECT, replace(SUBJECT, digest="")):
        document = parser.JsonLikeDictParser().parse(spdx(subject))
        messages = validator.validate_full_spdx_document(document)
        assert messages == [], [m.validation_message for m in messages]


def test_curated_spdx_ids_are_on_the_spdx_list() -> None:
    """Every id we may emit must be a real SPDX licence/exception id (per CycloneDX's copy)."""
    resources = pytest.importorskip("cyclonedx.schema._res")
    from importlib.resources import files

    spdx_schema = files(resources).joinpath("spdx.SNAPSHOT.schema.json")
    known = set(json.loads(spdx_schema.read_text())["enum"])
    assert sbom._SPDX_LICENSES - known == set()
    assert sbom._SPDX_EXCEPTIONS - known == set()
    mapped = set(sbom._DEBIAN_ALIASES.values())
    for value in sbom._DEBIAN_EXCEPTIONS.values():
        mapped |= set(value) if isinstance(value, tuple) else {value}
    assert mapped - known == set()
