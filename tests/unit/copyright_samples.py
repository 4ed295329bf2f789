"""Debian copyright files for the licence and SBOM tests, written out in full.

* ``dep5(...)``: a machine-readable file with one Files paragraph per licence,
* ``COREUTILS_LIKE``: a DEP-5 file with stand-alone License paragraphs, texts
  and a comment line,
* ``FREE_FORM_GPL``: an old free-form file granting GPL-2 or later.

Use them from a test module with ``from copyright_samples import ...`` (this
directory is on sys.path in pytest's default "prepend" import mode).
"""

from __future__ import annotations

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
