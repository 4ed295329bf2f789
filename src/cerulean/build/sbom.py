"""Software Bills of Materials for a composed image: SPDX 2.3 and CycloneDX 1.6 JSON.

This module owns two things:

* the package URL (purl) of a Debian binary package, and of the image, as
  Cerulean publishes them,
* the two SBOM documents themselves.

The licences it declares come from :mod:`cerulean.build.licenses`, which reads
the ``/usr/share/doc/<package>/copyright`` files that packages ship.

Both documents are byte-for-byte deterministic: packages are sorted, JSON keys
are sorted, the timestamp is the lock's ``SOURCE_DATE_EPOCH`` handed in by the
caller, and the identifiers that are normally random (the SPDX
``documentNamespace`` and the CycloneDX ``serialNumber``) are UUIDs derived
from a hash of the document's own content. Rebuilding an image from the same
lock therefore reproduces its SBOMs exactly, and any change in what went into
the image changes them.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from cerulean import __version__
from cerulean.build.licenses import (
    NOASSERTION,
    Expression,
    Leaf,
    detect_licenses,
    expression_leaves,
    render_expression,
)

# The distro qualifier of every purl. Cerulean is composed from Debian 13
# (trixie) only; scanners such as grype key their vulnerability data on it.
PURL_DISTRO = "debian-13"

# SPDX asks for a unique URI per document; it need not resolve. The project
# has no domain of its own, so we use the reserved ``.invalid`` TLD, which can
# never collide with anyone else's namespace.
SPDX_NAMESPACE_BASE = "https://cerulean-linux.invalid/spdx"

# Who makes the image itself (the Debian packages are supplied by their
# maintainers).
IMAGE_SUPPLIER = "Cerulean Linux"

# Fixed namespace for the content-derived UUIDs, so the same content gives the
# same UUID in every Cerulean release.
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://cerulean-linux.invalid/sbom")

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class SbomPackage:
    """One Debian binary package installed in the image."""

    name: str
    version: str
    arch: str  # "amd64", "arm64" or "all"
    source: str  # source package name
    source_version: str
    sha256: str  # of the .deb file
    maintainer: str = ""
    homepage: str = ""
    description: str = ""  # first line of the Description field
    copyright: bytes | None = None  # /usr/share/doc/<name>/copyright, if shipped
    purl: str = ""  # set for packages not from Debian (Cerulean's own, a repacked wheel)


@dataclass(frozen=True)
class SbomSubject:
    """The image the SBOM describes."""

    image: str  # e.g. "python"
    version: str  # image version, e.g. "13.20261121"
    arch: str  # "amd64" / "arm64"
    created: datetime  # the lock's SOURCE_DATE_EPOCH; naive values are taken as UTC
    digest: str = ""  # image manifest digest "sha256:..." if known


# --------------------------------------------------------------------------
# Package URLs
# --------------------------------------------------------------------------


def _purl_encode(value: str) -> str:
    """Percent-encode one purl component.

    The purl spec leaves only ``A-Za-z0-9.-_~`` unencoded, plus ``:``, which it
    says must never be encoded (so a Debian epoch reads ``1:2.3``). Python's
    ``quote`` keeps exactly ``A-Za-z0-9_.-~``; adding ``:`` as safe (and
    dropping its default ``/``) gives the spec's set: ``+`` becomes ``%2B``,
    ``@`` ``%40``, ``/`` ``%2F``.
    """
    return quote(value, safe=":")


def deb_purl(package: SbomPackage) -> str:
    """Return the purl of a Debian binary package, e.g.
    ``pkg:deb/debian/libc6@2.41-12?arch=amd64&distro=debian-13&upstream=glibc``.

    ``arch`` and ``distro`` are the deb type's qualifiers. ``upstream`` is not
    in the purl spec; it is the qualifier syft introduced (grype reads it, and
    Snyk emits it too) to carry the source package, which is what Debian's
    security tracker is keyed on. Like syft, it is only present when the
    source differs from the binary package: its value is the source name,
    followed by ``@<source version>`` when the versions differ too (binNMUs,
    or binaries versioned apart from their source).
    """
    if package.purl:
        return package.purl
    qualifiers = {"arch": package.arch, "distro": PURL_DISTRO}
    source = package.source or package.name
    source_version = package.source_version or package.version
    if source != package.name or source_version != package.version:
        if source_version == package.version:
            qualifiers["upstream"] = source
        else:
            qualifiers["upstream"] = f"{source}@{source_version}"
    # The spec's canonical form sorts qualifiers by key.
    query = "&".join(f"{k}={_purl_encode(v)}" for k, v in sorted(qualifiers.items()) if v)
    name = _purl_encode(package.name.lower())
    return f"pkg:deb/debian/{name}@{_purl_encode(package.version)}?{query}"


def image_purl(subject: SbomSubject) -> str:
    """Return the ``pkg:oci`` purl of the image, or "" when its digest is unknown.

    The oci type requires the digest as the version, so without one there is
    no purl to give.
    """
    if not subject.digest:
        return ""
    qualifiers = {"arch": subject.arch, "tag": subject.version}
    query = "&".join(f"{k}={_purl_encode(v)}" for k, v in sorted(qualifiers.items()) if v)
    name = _purl_encode(subject.image.rsplit("/", 1)[-1].lower())
    return f"pkg:oci/{name}@{_purl_encode(subject.digest)}?{query}"


# --------------------------------------------------------------------------
# Shared document plumbing
# --------------------------------------------------------------------------


def _timestamp(moment: datetime) -> str:
    """ISO-8601 in UTC with a Z and whole seconds, the form SPDX requires."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sorted_packages(packages: Sequence[SbomPackage]) -> list[SbomPackage]:
    """Packages in document order, after checking they make sense."""
    seen: set[tuple[str, str]] = set()
    for package in packages:
        key = (package.name, package.arch)
        if key in seen:
            raise ValueError(f"package {package.name}:{package.arch} is listed twice")
        seen.add(key)
        if not _SHA256_RE.fullmatch(package.sha256):
            raise ValueError(f"package {package.name}: sha256 is not 64 lowercase hex digits")
    return sorted(packages, key=lambda p: (p.name, p.arch))


def _check_subject(subject: SbomSubject) -> None:
    if subject.digest and not (
        subject.digest.startswith("sha256:") and _SHA256_RE.fullmatch(subject.digest[7:])
    ):
        raise ValueError(f"image digest {subject.digest!r} is not sha256:<64 hex digits>")


def _dump(document: dict[str, Any]) -> bytes:
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False)
    return (text + "\n").encode("utf-8")


def _content_uuid(document: dict[str, Any]) -> uuid.UUID:
    """A UUID that stands for the document's content (with its id left blank)."""
    digest = hashlib.sha256(_dump(document)).hexdigest()
    return uuid.uuid5(_UUID_NAMESPACE, digest)


def _split_maintainer(maintainer: str) -> tuple[str, str]:
    """Split ``Name <email>`` into its parts."""
    match = re.fullmatch(r"\s*(.*?)\s*<([^<>]*)>\s*", maintainer)
    if match:
        return match.group(1), match.group(2).strip()
    return maintainer.strip(), ""


def _is_url(value: str) -> bool:
    return re.fullmatch(r"https?://[^\s]+", value) is not None


# --------------------------------------------------------------------------
# SPDX 2.3
# --------------------------------------------------------------------------


def _spdx_id_part(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", value)


def _spdx_supplier(maintainer: str) -> str:
    name, email = _split_maintainer(maintainer)
    # SPDX writes "Organization: name (email)"; parentheses in the name would
    # be read as the email, so they go.
    name = name.replace("(", "").replace(")", "").strip()
    if not name:
        return NOASSERTION
    return f"Organization: {name} ({email})" if email else f"Organization: {name}"


@dataclass
class _RefUse:
    """Everything the document knows about one LicenseRef."""

    names: set[str] = field(default_factory=set)
    texts: set[str] = field(default_factory=set)
    packages: set[str] = field(default_factory=set)
    untexted: bool = False  # some package names it without giving its text


def _extracted_info(ref: str, use: _RefUse) -> dict[str, Any]:
    names = sorted(use.names)
    packages = ", ".join(sorted(use.packages))
    if len(use.texts) == 1 and not use.untexted:
        text = next(iter(use.texts))
    else:
        # Packages disagree on the text, or some give none (a different
        # "public-domain" note per package is typical): rather than lend one
        # package's text to the others, point at where each one's is.
        text = (
            f"The licence named \"{' / '.join(names)}\" in the Debian copyright files of "
            f"these packages: {packages}. Each package's terms are in its "
            "/usr/share/doc/<package>/copyright file."
        )
    return {
        "licenseId": ref,
        "name": " / ".join(names),
        "extractedText": text,
        "comment": f"Declared by the Debian copyright files of: {packages}",
    }


def spdx_document(subject: SbomSubject, packages: Sequence[SbomPackage]) -> bytes:
    """An SPDX 2.3 JSON document for the image and its Debian packages."""
    _check_subject(subject)
    ordered = _sorted_packages(packages)
    created = _timestamp(subject.created)

    image_id = f"SPDXRef-Image-{_spdx_id_part(subject.image)}"
    image: dict[str, Any] = {
        "SPDXID": image_id,
        "name": subject.image,
        "versionInfo": subject.version,
        "primaryPackagePurpose": "CONTAINER",
        "supplier": f"Organization: {IMAGE_SUPPLIER}",
        "downloadLocation": NOASSERTION,
        "filesAnalyzed": False,
        "builtDate": created,
        "licenseConcluded": NOASSERTION,
        "licenseDeclared": NOASSERTION,
        "copyrightText": NOASSERTION,
        "comment": f"Cerulean Linux image for {subject.arch}",
    }
    if subject.digest:
        image["checksums"] = [{"algorithm": "SHA256", "checksumValue": subject.digest[7:]}]
        image["externalRefs"] = [
            {
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": image_purl(subject),
            }
        ]

    spdx_packages: list[dict[str, Any]] = [image]
    relationships: list[dict[str, str]] = [
        {
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": image_id,
        }
    ]
    used_ids = {image_id}
    refs: dict[str, _RefUse] = {}
    for package in ordered:
        spdx_id = f"SPDXRef-Package-deb-{_spdx_id_part(package.name)}-{_spdx_id_part(package.arch)}"
        if spdx_id in used_ids:
            # Sanitising can map two names onto one id ("a+b" and "a-b");
            # the order is sorted, so this suffix is stable.
            tag = hashlib.sha256(f"{package.name}/{package.arch}".encode()).hexdigest()[:8]
            spdx_id = f"{spdx_id}-{tag}"
        used_ids.add(spdx_id)

        detection = detect_licenses(package.copyright)
        declared = render_expression(detection.expression) if detection.expression else NOASSERTION
        for leaf in expression_leaves(detection.expression):
            if leaf.is_ref:
                use = refs.setdefault(leaf.text, _RefUse())
                use.names.add(leaf.name)
                use.packages.add(package.name)
                text = detection.texts.get(" ".join(leaf.name.split()).lower())
                if text:
                    use.texts.add(text)
                else:
                    use.untexted = True

        entry: dict[str, Any] = {
            "SPDXID": spdx_id,
            "name": package.name,
            "versionInfo": package.version,
            "supplier": _spdx_supplier(package.maintainer),
            "downloadLocation": NOASSERTION,
            "filesAnalyzed": False,
            "checksums": [{"algorithm": "SHA256", "checksumValue": package.sha256}],
            "licenseConcluded": NOASSERTION,
            "licenseDeclared": declared,
            "copyrightText": NOASSERTION,
            "externalRefs": [
                {
                    "referenceCategory": "PACKAGE-MANAGER",
                    "referenceType": "purl",
                    "referenceLocator": deb_purl(package),
                }
            ],
            "sourceInfo": (
                f"built package from: {package.source or package.name} "
                f"{package.source_version or package.version}"
            ),
        }
        if package.description:
            entry["summary"] = package.description
        if _is_url(package.homepage):
            entry["homepage"] = package.homepage
        spdx_packages.append(entry)
        relationships.append(
            {
                "spdxElementId": image_id,
                "relationshipType": "CONTAINS",
                "relatedSpdxElement": spdx_id,
            }
        )

    name = f"{subject.image}-{subject.version}-{subject.arch}"
    document: dict[str, Any] = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "documentNamespace": "",
        "creationInfo": {"created": created, "creators": [f"Tool: cerulean-{__version__}"]},
        "packages": spdx_packages,
        "relationships": relationships,
    }
    if refs:
        document["hasExtractedLicensingInfos"] = [
            _extracted_info(ref, refs[ref]) for ref in sorted(refs)
        ]
    document["documentNamespace"] = (
        f"{SPDX_NAMESPACE_BASE}/{_spdx_id_part(name)}-{_content_uuid(document)}"
    )
    return _dump(document)


# --------------------------------------------------------------------------
# CycloneDX 1.6
# --------------------------------------------------------------------------


def _cyclonedx_licenses(expression: Expression | None) -> list[dict[str, Any]]:
    """CycloneDX's licence choice: one ``license`` object, or one ``expression``."""
    if expression is None:
        return []
    if isinstance(expression, Leaf) and " WITH " not in expression.text:
        if expression.is_ref:
            license_: dict[str, str] = {"name": expression.name}
        else:
            license_ = {"id": expression.text}
        license_["acknowledgement"] = "declared"
        return [{"license": license_}]
    return [{"expression": render_expression(expression), "acknowledgement": "declared"}]


def _cyclonedx_supplier(maintainer: str) -> dict[str, Any] | None:
    name, email = _split_maintainer(maintainer)
    if not name and not email:
        return None
    supplier: dict[str, Any] = {"name": name or email}
    if email:
        supplier["contact"] = [{"email": email}]
    return supplier


def cyclonedx_document(subject: SbomSubject, packages: Sequence[SbomPackage]) -> bytes:
    """A CycloneDX 1.6 JSON BOM for the image and its Debian packages."""
    _check_subject(subject)
    ordered = _sorted_packages(packages)

    purl = image_purl(subject)
    image_ref = purl or f"cerulean-image:{subject.image}@{subject.version}?arch={subject.arch}"
    image: dict[str, Any] = {
        "type": "container",
        "bom-ref": image_ref,
        "name": subject.image,
        "version": subject.version,
        "supplier": {"name": IMAGE_SUPPLIER},
        "properties": [{"name": "cerulean:image:arch", "value": subject.arch}],
    }
    if purl:
        image["purl"] = purl
        image["hashes"] = [{"alg": "SHA-256", "content": subject.digest[7:]}]

    components: list[dict[str, Any]] = []
    for package in ordered:
        package_purl = deb_purl(package)
        component: dict[str, Any] = {
            "type": "library",
            "bom-ref": package_purl,
            "name": package.name,
            "version": package.version,
            "purl": package_purl,
            "hashes": [{"alg": "SHA-256", "content": package.sha256}],
            "properties": [
                {"name": "cerulean:deb:arch", "value": package.arch},
                {"name": "cerulean:deb:source", "value": package.source or package.name},
                {
                    "name": "cerulean:deb:source-version",
                    "value": package.source_version or package.version,
                },
            ],
        }
        licenses = _cyclonedx_licenses(detect_licenses(package.copyright).expression)
        if licenses:
            component["licenses"] = licenses
        supplier = _cyclonedx_supplier(package.maintainer)
        if supplier:
            component["supplier"] = supplier
        if package.description:
            component["description"] = package.description
        if _is_url(package.homepage):
            component["externalReferences"] = [{"type": "website", "url": package.homepage}]
        components.append(component)

    document: dict[str, Any] = {
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": "",
        "version": 1,
        "metadata": {
            "timestamp": _timestamp(subject.created),
            "lifecycles": [{"phase": "build"}],
            "tools": {
                "components": [
                    {"type": "application", "name": "cerulean", "version": __version__}
                ]
            },
            "component": image,
        },
        "components": components,
        "dependencies": [
            {"ref": image_ref, "dependsOn": [c["bom-ref"] for c in components]},
        ],
    }
    document["serialNumber"] = f"urn:uuid:{_content_uuid(document)}"
    return _dump(document)
