"""OpenPGP test keys made with gpg in a temporary GNUPGHOME, to sign archive metadata.

:func:`make_keys` creates two ed25519 signing keys: a "trusted" one, exported
alone to a binary keyring (the kind gpgv reads and Cerulean is given), and an
"unknown" one that no keyring holds. :func:`stop_agent` ends the gpg-agent
that GNUPGHOME started. The unit tests' ``gpg_keys`` fixture and the security
archive of the integration tests are built on these.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

TRUSTED_UID = "Test Archive <test@example.invalid>"
UNKNOWN_UID = "Unknown Signer <unknown@example.invalid>"


@dataclass(frozen=True)
class GpgKeys:
    home: Path
    trusted: str  # fingerprint of the key Cerulean trusts
    unknown: str  # fingerprint of a key it does not know
    keyring: Path  # binary keyring holding the trusted key only

    def gpg(self, *args: str, data: bytes | None = None) -> bytes:
        proc = subprocess.run(
            ["gpg", "--batch", "--no-tty", "--quiet", *args],
            input=data,
            capture_output=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GNUPGHOME": str(self.home),
                 "LC_ALL": "C"},
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(f"gpg {' '.join(args)} failed: {proc.stderr.decode()}")
        return proc.stdout

    def clearsign(self, text: bytes, fingerprint: str) -> bytes:
        return self.gpg("--local-user", fingerprint, "--digest-algo", "SHA256", "--clearsign",
                        data=text)


def _fingerprint(keys: GpgKeys, uid: str) -> str:
    out = keys.gpg("--with-colons", "--list-keys", uid).decode()
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


def make_keys(home: Path) -> GpgKeys:
    """A trusted and an unknown signing key in the new GNUPGHOME *home*."""
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    keys = GpgKeys(home, "", "", home / "keyring.gpg")
    for uid in (TRUSTED_UID, UNKNOWN_UID):
        keys.gpg("--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
    keys = GpgKeys(
        home,
        _fingerprint(keys, "test@example.invalid"),
        _fingerprint(keys, "unknown@example.invalid"),
        home / "keyring.gpg",
    )
    keys.keyring.write_bytes(keys.gpg("--export", keys.trusted))
    assert keys.keyring.stat().st_size > 0
    return keys


def stop_agent(home: Path) -> None:
    """Stop the gpg-agent this GNUPGHOME started (and only that one)."""
    subprocess.run(["gpgconf", "--kill", "gpg-agent"],
                   env={**os.environ, "GNUPGHOME": str(home)}, capture_output=True, check=False)
