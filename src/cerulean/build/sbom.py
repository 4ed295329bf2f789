"""Software Bills of Materials for a composed image: SPDX 2.3 and CycloneDX 1.6 JSON.

This module owns three things:

* the package URL (purl) of a Debian binary package as Cerulean publishes it,
* licence detection from the ``/usr/share/doc/<package>/copyright`` files that
  packages ship (Debian's machine-readable "DEP-5" format, with a cautious
  keyword scan for free-form files), turned into SPDX licence expressions,
* the two SBOM documents themselves.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

from cerulean import __version__

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

NOASSERTION = "NOASSERTION"

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
# Licence expressions
# --------------------------------------------------------------------------

# SPDX licence identifiers we may emit, spelt as on the SPDX licence list. It
# is deliberately a curated subset (the licences that occur in Debian), not
# the whole list: an identifier outside it becomes a LicenseRef, which is
# always valid, whereas a misspelt "id" makes validators reject the document.
_SPDX_LICENSES = frozenset(
    {
        "0BSD", "AFL-2.1", "AFL-3.0", "AGPL-1.0-only", "AGPL-1.0-or-later",
        "AGPL-3.0-only", "AGPL-3.0-or-later", "Apache-1.0", "Apache-1.1", "Apache-2.0",
        "APSL-2.0", "Artistic-1.0", "Artistic-1.0-cl8", "Artistic-1.0-Perl", "Artistic-2.0",
        "Beerware", "blessing", "BSD-1-Clause", "BSD-2-Clause", "BSD-2-Clause-Patent",
        "BSD-3-Clause", "BSD-3-Clause-Clear", "BSD-4-Clause", "BSD-4-Clause-UC",
        "BSD-Source-Code", "BSL-1.0", "bzip2-1.0.6", "CC-BY-3.0", "CC-BY-4.0",
        "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC-PDDC", "CC0-1.0", "CDDL-1.0", "CDDL-1.1",
        "CECILL-2.0", "CECILL-2.1", "CECILL-B", "CECILL-C", "CPL-1.0", "curl", "ECL-2.0",
        "EPL-1.0", "EPL-2.0", "EUPL-1.1", "EUPL-1.2", "FSFAP", "FSFUL", "FSFULLR", "FTL",
        "GD", "GFDL-1.1-only", "GFDL-1.1-or-later", "GFDL-1.2-only", "GFDL-1.2-or-later",
        "GFDL-1.3-only", "GFDL-1.3-or-later", "GFDL-1.1-no-invariants-only",
        "GFDL-1.1-no-invariants-or-later", "GFDL-1.2-no-invariants-only",
        "GFDL-1.2-no-invariants-or-later", "GFDL-1.3-no-invariants-only",
        "GFDL-1.3-no-invariants-or-later", "GPL-1.0-only", "GPL-1.0-or-later",
        "GPL-2.0-only", "GPL-2.0-or-later", "GPL-3.0-only", "GPL-3.0-or-later", "HPND",
        "HPND-sell-variant", "ICU", "IJG", "ImageMagick", "Info-ZIP", "IPA", "ISC",
        "LGPL-2.0-only", "LGPL-2.0-or-later", "LGPL-2.1-only", "LGPL-2.1-or-later",
        "LGPL-3.0-only", "LGPL-3.0-or-later", "Libpng", "libpng-2.0", "libtiff",
        "LPPL-1.3c", "MirOS", "MIT", "MIT-0", "MIT-CMU", "MPL-1.0", "MPL-1.1", "MPL-2.0",
        "MPL-2.0-no-copyleft-exception", "MS-PL", "NCSA", "NTP", "OFL-1.0", "OFL-1.1",
        "OLDAP-2.8", "OpenSSL", "OSL-3.0", "PHP-3.01", "PostgreSQL", "PSF-2.0",
        "Python-2.0", "Qhull", "QPL-1.0", "Ruby", "Sendmail", "SGI-B-2.0", "Sleepycat",
        "SMLNJ", "Spencer-86", "Spencer-94", "Spencer-99", "SSH-OpenSSH", "TCL",
        "TCP-wrappers", "Unicode-3.0", "Unicode-DFS-2015", "Unicode-DFS-2016",
        "Unlicense", "UPL-1.0", "Vim", "W3C", "WTFPL", "X11", "Xnet", "Zlib",
        "zlib-acknowledgement", "ZPL-2.0", "ZPL-2.1",
    }
)  # fmt: skip
_SPDX_BY_LOWER = {i.lower(): i for i in _SPDX_LICENSES}

# SPDX licence exception identifiers we may put after WITH.
_SPDX_EXCEPTIONS = frozenset(
    {
        "389-exception", "Autoconf-exception-2.0", "Autoconf-exception-3.0",
        "Bison-exception-2.2", "Classpath-exception-2.0", "eCos-exception-2.0",
        "FLTK-exception", "Font-exception-2.0", "GCC-exception-2.0", "GCC-exception-3.1",
        "GPL-3.0-linking-exception", "LGPL-3.0-linking-exception", "Libtool-exception",
        "Linux-syscall-note", "LLVM-exception", "LZMA-exception",
        "OCaml-LGPL-linking-exception", "openvpn-openssl-exception",
        "Qt-GPL-exception-1.0", "Qt-LGPL-exception-1.1", "Universal-FOSS-exception-1.0",
        "WxWindows-exception-3.1",
    }
)  # fmt: skip
_EXCEPTIONS_BY_LOWER = {i.lower(): i for i in _SPDX_EXCEPTIONS}

# Debian short names (lowercased) that are not SPDX identifiers as written.
_DEBIAN_ALIASES = {
    "expat": "MIT",
    "artistic": "Artistic-1.0-Perl",  # Debian's "Artistic" is Perl's licence
    "artistic-1": "Artistic-1.0-Perl",
    "cc0": "CC0-1.0",
    "boost-1.0": "BSL-1.0",
    "zope-2.1": "ZPL-2.1",
    "psf": "PSF-2.0",
    "sil-ofl-1.1": "OFL-1.1",
    "ofl": "OFL-1.1",
    "bsd-2-clause-netbsd": "BSD-2-Clause",
    "mit/x11": "X11",
}

# Debian's "with <name> exception", keyed by the lowercased name with spaces
# turned into dashes. A value is an SPDX exception id, or a pair of ids for
# when the exception's version follows the GPL version it is attached to.
_DEBIAN_EXCEPTIONS: dict[str, str | tuple[str, str]] = {
    "gcc-runtime": ("GCC-exception-2.0", "GCC-exception-3.1"),
    "gcc-runtime-library": ("GCC-exception-2.0", "GCC-exception-3.1"),
    "gcc": ("GCC-exception-2.0", "GCC-exception-3.1"),
    "autoconf": ("Autoconf-exception-2.0", "Autoconf-exception-3.0"),
    "bison": "Bison-exception-2.2",
    "classpath": "Classpath-exception-2.0",
    "font": "Font-exception-2.0",
    "libtool": "Libtool-exception",
    "linux-syscall": "Linux-syscall-note",
    "linux-syscall-note": "Linux-syscall-note",
    "llvm": "LLVM-exception",
    "ocaml-lgpl-linking": "OCaml-LGPL-linking-exception",
    "ocaml-linking": "OCaml-LGPL-linking-exception",
    "ocaml": "OCaml-LGPL-linking-exception",
    "wxwindows": "WxWindows-exception-3.1",
}

# The GNU licences, whose SPDX ids spell "only"/"or later" out; the versions
# each family has.
_GNU_RE = re.compile(
    r"(?P<family>agpl|lgpl|gpl|gfdl-niv|gfdl)-?v?(?P<version>\d+(?:\.\d+)?)"
    r"(?P<later>\+|-or-later|-only)?",
    re.IGNORECASE,
)
_GNU_VERSIONS = {
    "gpl": {"1.0", "2.0", "3.0"},
    "lgpl": {"2.0", "2.1", "3.0"},
    "agpl": {"1.0", "3.0"},
    "gfdl": {"1.1", "1.2", "1.3"},
    "gfdl-niv": {"1.1", "1.2", "1.3"},
}


@dataclass(frozen=True)
class _Leaf:
    """One licence in an expression: an SPDX id (maybe WITH an exception) or a LicenseRef.

    ``name`` is the Debian short name the leaf came from when ``text`` is a
    LicenseRef, so the document can say what the reference stands for.
    """

    text: str
    name: str = ""

    @property
    def is_ref(self) -> bool:
        return self.text.startswith("LicenseRef-")


@dataclass(frozen=True)
class _Op:
    """Several expressions joined by one operator."""

    op: Literal["AND", "OR"]
    args: tuple[_Expr, ...]


_Expr = _Leaf | _Op


# Debian short names (lowercased) that stand for a whole expression.
_DEBIAN_COMPOUNDS: dict[str, _Expr] = {
    # Perl's own dual licence.
    "perl": _Op("OR", (_Leaf("Artistic-1.0-Perl"), _Leaf("GPL-1.0-or-later"))),
    # The name LLVM's Debian packaging uses.
    "apache-2-llvm-exceptions": _Leaf("Apache-2.0 WITH LLVM-exception"),
}


def _render(expr: _Expr, nested: bool = False) -> str:
    if isinstance(expr, _Leaf):
        return expr.text
    body = f" {expr.op} ".join(_render(a, nested=True) for a in expr.args)
    # SPDX would let AND inside OR go bare (AND binds tighter), but readers
    # should not have to know that.
    return f"({body})" if nested else body


def _combine(op: Literal["AND", "OR"], exprs: Iterable[_Expr]) -> _Expr | None:
    """Join *exprs* with *op*: flattened, deduplicated and sorted, so equal
    licensing always renders the same way whatever order the file used."""
    flat: dict[str, _Expr] = {}
    for expr in exprs:
        parts = expr.args if isinstance(expr, _Op) and expr.op == op else (expr,)
        for part in parts:
            flat.setdefault(_render(part), part)
    if not flat:
        return None
    if len(flat) == 1:
        return next(iter(flat.values()))
    return _Op(op, tuple(flat[k] for k in sorted(flat)))


def _leaves(expr: _Expr | None) -> Iterable[_Leaf]:
    if expr is None:
        return
    if isinstance(expr, _Leaf):
        yield expr
        return
    for arg in expr.args:
        yield from _leaves(arg)


def _license_ref(name: str) -> _Leaf:
    """A LicenseRef for a licence that is not on the SPDX list.

    SPDX only allows ``[A-Za-z0-9.-]`` after ``LicenseRef-``. Debian short
    names are case-insensitive, so the reference is lowercased too: the same
    licence spelt "Public-Domain" in one package and "public-domain" in
    another is one reference.
    """
    idstring = name.lower().replace("+", "-plus")
    idstring = re.sub(r"[^a-z0-9.]+", "-", idstring).strip("-") or "unknown"
    return _Leaf(f"LicenseRef-{idstring}", name)


def _gnu_version(version: str) -> str:
    """GNU licences are versioned "2.0", "2.1", "3.0"; Debian writes "2", "2.1", "3"."""
    return version if "." in version else f"{version}.0"


def _spdx_id(name: str) -> str | None:
    """The SPDX licence id for one Debian short name (no exception), if there is one."""
    lower = name.lower()
    if lower in _SPDX_BY_LOWER:
        return _SPDX_BY_LOWER[lower]
    if lower in _DEBIAN_ALIASES:
        return _DEBIAN_ALIASES[lower]
    gnu = _GNU_RE.fullmatch(name)
    if gnu:
        family = gnu["family"].lower()
        version = _gnu_version(gnu["version"])
        if version not in _GNU_VERSIONS[family]:
            return None
        suffix = "-or-later" if gnu["later"] in ("+", "-or-later") else "-only"
        if family == "gfdl-niv":
            return f"GFDL-{version}-no-invariants{suffix}"
        return f"{family.upper()}-{version}{suffix}"
    # "Apache-2" for "Apache-2.0", "PSF-2" for "PSF-2.0".
    if re.search(r"-\d+$", lower) and f"{lower}.0" in _SPDX_BY_LOWER:
        return _SPDX_BY_LOWER[f"{lower}.0"]
    # Any other "+" means "this version or later", which SPDX writes as a
    # trailing "+" on the id.
    if lower.endswith("+"):
        base = _spdx_id(name[:-1])
        if base is not None and " " not in base:
            return f"{base}+"
    return None


def _map_term(term: str) -> _Expr:
    """Map one Debian licence term, e.g. ``GPL-3+ with GCC-runtime exception``.

    The exception may also be glued on with dashes, as some files write it
    (``GPL-3+-WITH-BISON-EXCEPTION``).
    """
    base, *rest = re.split(r"\s+with\s+|(?<=[\w+])-with-(?=\w)", term, maxsplit=1, flags=re.I)
    if not rest:
        compound = _DEBIAN_COMPOUNDS.get(term.lower())
        if compound is not None:
            return compound
        spdx = _spdx_id(term)
        return _Leaf(spdx) if spdx else _license_ref(term)
    spdx = _spdx_id(base.strip())
    key = re.sub(r"[\s-]+", "-", rest[0].strip()).lower()
    key = re.sub(r"-exceptions?$", "", key)
    known = _EXCEPTIONS_BY_LOWER.get(key) or _EXCEPTIONS_BY_LOWER.get(f"{key}-exception")
    mapped = known or _DEBIAN_EXCEPTIONS.get(key)
    if isinstance(mapped, tuple):
        mapped = mapped[1] if spdx and "-3.0-" in f"{spdx}-" else mapped[0]
    if spdx is None or mapped is None:
        # SPDX 2.3 has no way to name an exception that is not on its list,
        # so the licence-with-exception as a whole becomes one reference.
        return _license_ref(" ".join(term.split()))
    return _Leaf(f"{spdx} WITH {mapped}")


def _split_words(words: list[str], operator: str) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for word in words:
        if word.lower() == operator:
            parts.append([])
        else:
            parts[-1].append(word)
    return [p for p in parts if p]


def _parse_group(words: list[str]) -> _Expr | None:
    """Parse ``A or B and C``: "and" binds tighter than "or" (DEP-5, like SPDX)."""
    alternatives = []
    for alternative in _split_words(words, "or"):
        terms = [_map_term(" ".join(t)) for t in _split_words(alternative, "and")]
        combined = _combine("AND", terms)
        if combined is not None:
            alternatives.append(combined)
    return _combine("OR", alternatives)


def _parse_dep5_license(line: str) -> _Expr | None:
    """Parse the first line of a DEP-5 License field into an expression.

    DEP-5 has no parentheses; a comma lowers the precedence of the operator
    after it, so ``A or B, and C`` is ``(A or B) and C``. A comma with no
    operator after it (seen in hand-written files) is read as "and", and so is
    "and/or": claiming both licences apply is the safe over-statement.
    """
    tokens = re.findall(r",|[^\s,]+", line.replace("and/or", "and"))
    groups: list[list[str]] = [[]]
    for token in tokens:
        if token == ",":
            groups.append([])
        else:
            groups[-1].append(token)
    result: _Expr | None = None
    for index, group in enumerate(groups):
        op: Literal["AND", "OR"] = "AND"
        if index and group and group[0].lower() in ("and", "or"):
            op = "OR" if group[0].lower() == "or" else "AND"
            group = group[1:]
        expr = _parse_group(group)
        if expr is None:
            continue
        result = expr if result is None else _combine(op, (result, expr))
    return result


def _paragraphs(text: str) -> list[dict[str, str]]:
    """Split deb822 text into paragraphs of lowercased field name -> value.

    Tolerant on purpose: copyright files are hand-written, and a malformed
    one must cost us a licence, never the build. A value keeps its
    continuation lines, with the one leading space removed and " ." turned
    back into an empty line.
    """
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line.strip():
            if current:
                paragraphs.append(current)
            current, last = {}, None
        elif line.startswith("#"):
            continue
        elif line[0] in " \t":
            if last is not None:
                content = line[1:]
                current[last] += "\n" + ("" if content.strip() == "." else content)
        else:
            name, sep, value = line.partition(":")
            if sep and name.strip():
                last = name.strip().lower()
                current[last] = value.strip()
            else:
                last = None
    if current:
        paragraphs.append(current)
    return paragraphs


def _is_dep5_header(paragraph: dict[str, str]) -> bool:
    fmt = paragraph.get("format") or paragraph.get("format-specification") or ""
    fmt = fmt.lower()
    return "copyright-format" in fmt or "dep5" in fmt or "dep-5" in fmt


@dataclass
class _Detection:
    """What a copyright file says: the expression, and the texts of its licences.

    ``texts`` maps a lowercased Debian licence name to the full text the file
    gives for it, so LicenseRefs can carry their real text.
    """

    expression: _Expr | None = None
    texts: dict[str, str] = field(default_factory=dict)


def _detect_dep5(paragraphs: list[dict[str, str]]) -> _Detection:
    detection = _Detection()
    header, body = paragraphs[0], paragraphs[1:]
    uses: list[_Expr] = []
    for paragraph in body:
        value = paragraph.get("license")
        if value is None:
            continue
        first, _, text = value.partition("\n")
        if text.strip():
            detection.texts.setdefault(" ".join(first.split()).lower(), text.strip("\n"))
        # Stand-alone License paragraphs only give texts; the licences in use
        # are those of the Files paragraphs.
        if "files" in paragraph:
            expr = _parse_dep5_license(first)
            if expr is not None:
                uses.append(expr)
    if not uses and header.get("license"):
        # A file with no usable Files paragraph: the header's summary licence
        # is the best statement there is.
        expr = _parse_dep5_license(header["license"].partition("\n")[0])
        if expr is not None:
            uses.append(expr)
    detection.expression = _combine("AND", uses)
    return detection


# Free-form files: grants of the GNU licences with their version, and whether
# "or (at your option) any later version" follows.
_FREEFORM_GNU_RE = re.compile(
    r"GNU (?P<kind>Lesser General|Library General|Affero General|General|Free Documentation)"
    r" (?:Public )?License",
    re.IGNORECASE,
)
# Matched right after the licence's name (so no "^": match(pos) ignores it).
_FREEFORM_VERSION_RE = re.compile(
    r"[,;]?(?: \(?(?:the )?\"?[AL]?GPL\"?\)?)?,?"
    r"(?: as published by the Free Software Foundation[;,]?)?"
    r"(?: either)?,? (?:version|v\.?) ?(?P<version>\d(?:\.\d)?)(?P<rest>.{0,80})",
    re.IGNORECASE,
)
_LATER_RE = re.compile(r"or \(?at your option\)? any later|or any later version|or later", re.I)
_COMMON_LICENSES_RE = re.compile(r"/usr/share/common-licenses/([A-Za-z0-9.+-]+)")
# Phrases that identify one licence on their own.
_FREEFORM_PHRASES = (
    ("Permission is hereby granted, free of charge, to any person obtaining a copy", "MIT"),
    ("Licensed under the Apache License, Version 2.0", "Apache-2.0"),
    ("Mozilla Public License, v. 2.0", "MPL-2.0"),
)


def _detect_free_form(text: str) -> _Detection:
    """A conservative scan of a copyright file that is not machine-readable.

    Only licences named unambiguously count, and only SPDX-list ones: a
    versioned GNU licence grant, a reference to a versioned file in
    ``/usr/share/common-licenses`` (read like the DEP-5 short name of the same
    spelling, so ``GPL-2`` alone means "only"), and a few verbatim licence
    phrases. Everything found is joined with AND, which over-states rather
    than under-states the obligations. Nothing found is NOASSERTION.
    """
    flat = " ".join(text.split())
    found: list[_Expr] = []
    gnu_seen: set[tuple[str, str]] = set()
    for match in _FREEFORM_GNU_RE.finditer(flat):
        kind = match["kind"].split()[0].lower()
        family = {"lesser": "lgpl", "library": "lgpl", "affero": "agpl", "free": "gfdl"}.get(
            kind, "gpl"
        )
        grant = _FREEFORM_VERSION_RE.match(flat, match.end())
        if grant is None:
            continue  # an unversioned mention says too little
        later = "+" if _LATER_RE.search(grant["rest"]) else ""
        spdx = _spdx_id(f"{family}-{grant['version']}{later}")
        if spdx:
            gnu_seen.add((family, _gnu_version(grant["version"])))
            found.append(_Leaf(spdx))
    for match in _COMMON_LICENSES_RE.finditer(flat):
        name = match.group(1).rstrip(".")
        gnu = _GNU_RE.fullmatch(name)
        if gnu and (gnu["family"].lower(), _gnu_version(gnu["version"])) in gnu_seen:
            continue  # the grant itself already said only/or-later
        spdx = _spdx_id(name)
        if spdx:
            found.append(_Leaf(spdx))
    lowered = flat.lower()
    for phrase, spdx in _FREEFORM_PHRASES:
        if phrase.lower() in lowered:
            found.append(_Leaf(spdx))
    return _Detection(_combine("AND", found))


def _detect(copyright_file: bytes | None) -> _Detection:
    if not copyright_file:
        return _Detection()
    text = copyright_file.decode("utf-8", errors="replace").lstrip("\ufeff")
    paragraphs = _paragraphs(text)
    if paragraphs and _is_dep5_header(paragraphs[0]):
        detection = _detect_dep5(paragraphs)
        if detection.expression is not None:
            return detection
    return _detect_free_form(text)


def licenses_from_copyright(text: bytes | None) -> str:
    """The SPDX licence expression a Debian copyright file declares, or NOASSERTION.

    Machine-readable (DEP-5) files give the licences of all their Files
    paragraphs, each mapped to SPDX (``GPL-2+`` is ``GPL-2.0-or-later``,
    ``Expat`` is ``MIT``, unknown names become ``LicenseRef-<name>``),
    deduplicated and joined with AND in sorted order. Free-form files get a
    conservative keyword scan.
    """
    expression = _detect(text).expression
    return _render(expression) if expression is not None else NOASSERTION


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

        detection = _detect(package.copyright)
        declared = _render(detection.expression) if detection.expression else NOASSERTION
        for leaf in _leaves(detection.expression):
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


def _cyclonedx_licenses(expression: _Expr | None) -> list[dict[str, Any]]:
    """CycloneDX's licence choice: one ``license`` object, or one ``expression``."""
    if expression is None:
        return []
    if isinstance(expression, _Leaf) and " WITH " not in expression.text:
        if expression.is_ref:
            license_: dict[str, str] = {"name": expression.name}
        else:
            license_ = {"id": expression.text}
        license_["acknowledgement"] = "declared"
        return [{"license": license_}]
    return [{"expression": _render(expression), "acknowledgement": "declared"}]


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
        licenses = _cyclonedx_licenses(_detect(package.copyright).expression)
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
