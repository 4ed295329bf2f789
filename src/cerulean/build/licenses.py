"""Licence detection from the copyright files of Debian packages, as SPDX expressions.

This module owns reading ``/usr/share/doc/<package>/copyright``:

* Debian's machine-readable "DEP-5" format (deb822 paragraphs, the License
  fields of the Files paragraphs with their "and"/"or"/comma grammar, and the
  licence texts the file carries),
* a cautious keyword scan for free-form files,
* the mapping of Debian short names (``GPL-2+``, ``Expat``, ``GPL-3+ with
  GCC-runtime exception``) onto the curated SPDX licence and exception ids we
  may emit, with ``LicenseRef-`` references for everything else,
* the small expression model (:class:`Leaf`, :class:`Op`) and its rendering,
  which :mod:`cerulean.build.sbom` puts into its documents.

:func:`licenses_from_copyright` gives the expression as text;
:func:`detect_licenses` gives the expression and the licence texts, for
callers that need the references' texts too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

# What SPDX (and CycloneDX, by omission) says when nothing reliable is known.
NOASSERTION = "NOASSERTION"


# --------------------------------------------------------------------------
# SPDX ids and Debian short names
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


# --------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
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
class Op:
    """Several expressions joined by one operator."""

    op: Literal["AND", "OR"]
    args: tuple[Expression, ...]


Expression = Leaf | Op


# Debian short names (lowercased) that stand for a whole expression.
_DEBIAN_COMPOUNDS: dict[str, Expression] = {
    # Perl's own dual licence.
    "perl": Op("OR", (Leaf("Artistic-1.0-Perl"), Leaf("GPL-1.0-or-later"))),
    # The name LLVM's Debian packaging uses.
    "apache-2-llvm-exceptions": Leaf("Apache-2.0 WITH LLVM-exception"),
}


def render_expression(expr: Expression, nested: bool = False) -> str:
    """The SPDX text of *expr*; a compound inside another is parenthesised."""
    if isinstance(expr, Leaf):
        return expr.text
    body = f" {expr.op} ".join(render_expression(a, nested=True) for a in expr.args)
    # SPDX would let AND inside OR go bare (AND binds tighter), but readers
    # should not have to know that.
    return f"({body})" if nested else body


def _combine(op: Literal["AND", "OR"], exprs: Iterable[Expression]) -> Expression | None:
    """Join *exprs* with *op*: flattened, deduplicated and sorted, so equal
    licensing always renders the same way whatever order the file used."""
    flat: dict[str, Expression] = {}
    for expr in exprs:
        parts = expr.args if isinstance(expr, Op) and expr.op == op else (expr,)
        for part in parts:
            flat.setdefault(render_expression(part), part)
    if not flat:
        return None
    if len(flat) == 1:
        return next(iter(flat.values()))
    return Op(op, tuple(flat[k] for k in sorted(flat)))


def expression_leaves(expr: Expression | None) -> Iterable[Leaf]:
    """Every licence in *expr*, left to right (none for None)."""
    if expr is None:
        return
    if isinstance(expr, Leaf):
        yield expr
        return
    for arg in expr.args:
        yield from expression_leaves(arg)


# --------------------------------------------------------------------------
# Mapping Debian licence names
# --------------------------------------------------------------------------


def _license_ref(name: str) -> Leaf:
    """A LicenseRef for a licence that is not on the SPDX list.

    SPDX only allows ``[A-Za-z0-9.-]`` after ``LicenseRef-``. Debian short
    names are case-insensitive, so the reference is lowercased too: the same
    licence spelt "Public-Domain" in one package and "public-domain" in
    another is one reference.
    """
    idstring = name.lower().replace("+", "-plus")
    idstring = re.sub(r"[^a-z0-9.]+", "-", idstring).strip("-") or "unknown"
    return Leaf(f"LicenseRef-{idstring}", name)


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


def _map_term(term: str) -> Expression:
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
        return Leaf(spdx) if spdx else _license_ref(term)
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
    return Leaf(f"{spdx} WITH {mapped}")


# --------------------------------------------------------------------------
# DEP-5 (machine-readable) files
# --------------------------------------------------------------------------


def _split_words(words: list[str], operator: str) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for word in words:
        if word.lower() == operator:
            parts.append([])
        else:
            parts[-1].append(word)
    return [p for p in parts if p]


def _parse_group(words: list[str]) -> Expression | None:
    """Parse ``A or B and C``: "and" binds tighter than "or" (DEP-5, like SPDX)."""
    alternatives = []
    for alternative in _split_words(words, "or"):
        terms = [_map_term(" ".join(t)) for t in _split_words(alternative, "and")]
        combined = _combine("AND", terms)
        if combined is not None:
            alternatives.append(combined)
    return _combine("OR", alternatives)


def _parse_dep5_license(line: str) -> Expression | None:
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
    result: Expression | None = None
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
class Detection:
    """What a copyright file says: the expression, and the texts of its licences.

    ``texts`` maps a lowercased Debian licence name to the full text the file
    gives for it, so LicenseRefs can carry their real text.
    """

    expression: Expression | None = None
    texts: dict[str, str] = field(default_factory=dict)


def _detect_dep5(paragraphs: list[dict[str, str]]) -> Detection:
    detection = Detection()
    header, body = paragraphs[0], paragraphs[1:]
    uses: list[Expression] = []
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


# --------------------------------------------------------------------------
# Free-form files
# --------------------------------------------------------------------------

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


def _detect_free_form(text: str) -> Detection:
    """A conservative scan of a copyright file that is not machine-readable.

    Only licences named unambiguously count, and only SPDX-list ones: a
    versioned GNU licence grant, a reference to a versioned file in
    ``/usr/share/common-licenses`` (read like the DEP-5 short name of the same
    spelling, so ``GPL-2`` alone means "only"), and a few verbatim licence
    phrases. Everything found is joined with AND, which over-states rather
    than under-states the obligations. Nothing found is NOASSERTION.
    """
    flat = " ".join(text.split())
    found: list[Expression] = []
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
            found.append(Leaf(spdx))
    for match in _COMMON_LICENSES_RE.finditer(flat):
        name = match.group(1).rstrip(".")
        gnu = _GNU_RE.fullmatch(name)
        if gnu and (gnu["family"].lower(), _gnu_version(gnu["version"])) in gnu_seen:
            continue  # the grant itself already said only/or-later
        spdx = _spdx_id(name)
        if spdx:
            found.append(Leaf(spdx))
    lowered = flat.lower()
    for phrase, spdx in _FREEFORM_PHRASES:
        if phrase.lower() in lowered:
            found.append(Leaf(spdx))
    return Detection(_combine("AND", found))


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def detect_licenses(copyright_file: bytes | None) -> Detection:
    """The licences a Debian copyright file declares, with the texts it gives for them.

    A DEP-5 file is read as such when that yields any licence; otherwise, and
    for free-form files, the keyword scan decides. A missing or empty file
    gives an empty detection.
    """
    if not copyright_file:
        return Detection()
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
    expression = detect_licenses(text).expression
    return render_expression(expression) if expression is not None else NOASSERTION
