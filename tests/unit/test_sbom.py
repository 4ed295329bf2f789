"""Tests for cerulean.build.sbom: purls, SPDX 2.3 and CycloneDX 1.6.

Everything is hermetic: the copyright files come from copyright_samples. The
schema and validator checks run only when cyclonedx-python-lib / spdx-tools /
packageurl-python are installed, and skip otherwise.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from copyright_samples import COREUTILS_LIKE, FREE_FORM_GPL, dep5

from cerulean import __version__
from cerulean.build.sbom import (
    SbomPackage,
    SbomSubject,
    cyclonedx_document,
    deb_purl,
    spdx_document,
)

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
