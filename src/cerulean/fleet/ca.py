"""The fleet's own certificate authority: host certificates (mTLS) and the server's.

``fleet init`` makes an ECDSA P-256 CA that lives in the data directory
(``ca.key`` readable by the server's user only). It signs:

- a **host certificate** for each enrolled host, from the host's own signing
  request (the key never leaves the host): common name = host ID, client
  authentication only, valid for hours (``--cert-hours``), renewed by the agent
  at half its life;
- the **server certificate** for the names agents use to reach the server
  (``--name``), server authentication only.

The TLS handshake checks a host certificate's signature and dates; the server
checks its serial against the revoked ones on every call.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cerulean.errors import CeruleanError
from cerulean.protocol.fleet import ca_fingerprint

CA_DAYS = 3650
SERVER_DAYS = 397
CLOCK_SKEW = timedelta(minutes=5)


class CAError(CeruleanError):
    pass


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _check_public_key(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise CAError(f"The request's key is on curve {key.curve.name}; use P-256 or P-384.")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CAError(f"The request's RSA key has {key.key_size} bits; at least 2048 are "
                          "needed.")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CAError("The request's key is not ECDSA, RSA or Ed25519.")


@dataclass(frozen=True)
class Issued:
    pem: str
    serial: str  # hex
    not_before: datetime
    not_after: datetime


class FleetCA:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert, self.key = cert, key

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def fingerprint(self) -> str:
        return ca_fingerprint(self.cert.public_bytes(serialization.Encoding.DER))

    @classmethod
    def create(cls, directory: Path, name: str = "Cerulean fleet CA") -> FleetCA:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        subject = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {secrets.token_hex(4)}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(directory / "ca.key", _pem_key(key))
        _write_public(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key)

    @classmethod
    def load(cls, directory: Path) -> FleetCA:
        try:
            cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        except FileNotFoundError as e:
            raise CAError(f"{directory} has no fleet CA ({e.filename} is missing); run "
                          f"`cerulean fleet init --data {directory}` first.") from e
        except ValueError as e:
            raise CAError(f"The fleet CA in {directory} cannot be read: {e}.") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{directory / 'ca.key'} is not an ECDSA key.")
        return cls(cert, key)

    def _builder(self, subject: x509.Name, public_key: object, lifetime: timedelta,
                 now: datetime) -> tuple[x509.CertificateBuilder, int, datetime, datetime]:
        serial = x509.random_serial_number()
        nb, na = now - CLOCK_SKEW, min(now + lifetime, self.cert.not_valid_after_utc)
        b = (x509.CertificateBuilder()
             .subject_name(subject).issuer_name(self.cert.subject)
             .public_key(public_key)  # type: ignore[arg-type]
             .serial_number(serial).not_valid_before(nb).not_valid_after(na)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 self.key.public_key()), critical=False))
        return b, serial, nb, na

    def issue_host(self, csr_pem: str, host_id: str, lifetime: timedelta,
                   now: datetime | None = None) -> Issued:
        """A client certificate for *host_id* over the key in *csr_pem* (whose own
        subject is ignored: the server decides who the host is)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as e:
            raise CAError("The certificate signing request is not a PEM CSR.") from e
        try:
            ok = csr.is_signature_valid
        except InvalidSignature:
            ok = False
        if not ok:
            raise CAError("The certificate signing request's signature does not verify.")
        public_key = csr.public_key()
        _check_public_key(public_key)
        now = now or datetime.now(UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "host")])
        b, serial, nb, na = self._builder(subject, public_key, lifetime, now)
        cert = (b.add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return Issued(cert.public_bytes(serialization.Encoding.PEM).decode(), f"{serial:x}",
                      nb, na)

    def issue_server(self, directory: Path, names: list[str]) -> None:
        """``server.crt`` and ``server.key`` for *names* (DNS names or IP addresses)."""
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        b, _, _, _ = self._builder(subject, key.public_key(), timedelta(days=SERVER_DAYS),
                                   datetime.now(UTC))
        cert = (b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        _write_private(directory / "server.key", _pem_key(key))
        _write_public(directory / "server.crt", cert.public_bytes(serialization.Encoding.PEM)
                      + self.cert.public_bytes(serialization.Encoding.PEM))


def server_names(directory: Path) -> list[str]:
    """The names the server certificate in *directory* is valid for ([] if none)."""
    try:
        cert = x509.load_pem_x509_certificate((directory / "server.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (FileNotFoundError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(n.value) for n in san]


def serial_of(der: bytes) -> tuple[str, str]:
    """(serial as hex, common name) of a DER certificate."""
    cert = x509.load_der_x509_certificate(der)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"{cert.serial_number:x}", str(cn[0].value) if cn else ""
