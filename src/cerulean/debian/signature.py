"""OpenPGP verification of clearsigned archive metadata (InRelease).

Verification is delegated to ``gpgv`` with a keyring that ships inside
Cerulean, never the host's. Only the bytes gpgv itself reports as signed are
returned, so nothing outside the signed part of a file is ever parsed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cerulean.errors import VerificationError
from cerulean.run import require_tool, run


@dataclass(frozen=True)
class Verified:
    content: bytes
    fingerprints: tuple[str, ...]  # primary key fingerprints of the good signatures


def verify_clearsigned(data: bytes, keyring: Path, what: str) -> Verified:
    """Check the clearsigned *data* against *keyring*; *what* names it in errors."""
    if not data.lstrip().startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"):
        raise VerificationError(f"{what} is not signed: it has no OpenPGP signature.")
    if not keyring.is_file():
        raise VerificationError(f"The keyring {keyring} to verify {what} does not exist.")
    gpgv = require_tool("gpgv")
    with tempfile.TemporaryDirectory(prefix="cerulean-gpgv-") as tmp:
        src = Path(tmp) / "in"
        out = Path(tmp) / "out"
        src.write_bytes(data)
        proc = run(
            [gpgv, "--status-fd", "1", "--keyring", keyring, "--output", out, src],
            check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GNUPGHOME": tmp, "LC_ALL": "C"},
        )
        status = proc.stdout.decode(errors="replace").splitlines()
        good: list[str] = []
        unknown = bad = expired_key = False
        for line in status:
            words = line.split()
            if len(words) < 2 or words[0] != "[GNUPG:]":
                continue
            tag = words[1]
            if tag == "VALIDSIG" and len(words) >= 12:
                good.append(words[11])
            elif tag in ("NO_PUBKEY", "ERRSIG"):
                unknown = True
            elif tag == "BADSIG":
                bad = True
            elif tag in ("EXPKEYSIG", "REVKEYSIG"):
                expired_key = True
        if bad:
            raise VerificationError(f"{what} has a bad signature: its content was altered.")
        # Extra signatures by keys we do not know are harmless (apt accepts them
        # too) as long as one trusted key made a good signature.
        if not good or not out.exists():
            if expired_key:
                reason = "was made by an expired or revoked key"
            elif unknown:
                reason = "was made by a key that is not a trusted Debian archive key"
            else:
                reason = "could not be verified"
            raise VerificationError(f"The signature of {what} {reason}.")
        content = out.read_bytes()
    return Verified(content, tuple(sorted(set(good))))
