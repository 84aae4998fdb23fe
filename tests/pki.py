"""Throwaway certificate authorities and certificates for the TLS tests.

Keys are ECDSA P-256 in unencrypted PKCS#8 PEM. Certificates are valid from five minutes ago for
one hour unless a test requests another period. Server certificates list ``localhost`` and
``127.0.0.1`` as subject alternative names.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Authority = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


@dataclass(frozen=True)
class Issued:
    """PEM files of one certificate and its private key."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """A CA with server and client certificates, and a second CA the server does not trust."""

    ca: Path
    server: Issued
    client: Issued
    rogue_ca: Path
    rogue_client: Issued


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Authority | None,
    server: bool = False,
    start_offset: datetime.timedelta = datetime.timedelta(minutes=-5),
    lifetime: datetime.timedelta = datetime.timedelta(minutes=65),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + start_offset)
        .not_valid_after(now + start_offset + lifetime)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        )
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        return builder.sign(key, hashes.SHA256())
    builder = builder.add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    )
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer[1], hashes.SHA256())


def create_authority(
    folder: Path, name: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    """Create a self-signed CA and write its certificate to ``folder/{name}-ca.pem``.

    Returns:
        The CA certificate, its private key (kept in memory only) and the certificate's path.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate(f"{name} test CA", key, None)
    path = folder / f"{name}-ca.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate, key, path


def issue_certificate(
    folder: Path,
    name: str,
    authority: Authority,
    server: bool = False,
    start_offset: datetime.timedelta = datetime.timedelta(minutes=-5),
) -> Issued:
    """Issue a client (or, with ``server``, a server) certificate signed by ``authority``.

    Writes ``folder/{name}.pem`` and its private key ``folder/{name}.key``. The certificate is
    valid for 65 minutes from now plus ``start_offset``, so an offset of -2 hours gives an
    expired one and +1 hour one that is not yet valid.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate(name, key, authority, server=server, start_offset=start_offset)
    path = folder / f"{name}.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Issued(path, _write_key(key, folder / f"{name}.key"))


def create_pki(folder: Path) -> Pki:
    """Create a CA with one server and one client certificate, and a rogue CA with one client."""
    ca_certificate, ca_key, ca_path = create_authority(folder, "hospital")
    rogue_certificate, rogue_key, rogue_path = create_authority(folder, "rogue")
    return Pki(
        ca=ca_path,
        server=issue_certificate(folder, "server", (ca_certificate, ca_key), server=True),
        client=issue_certificate(folder, "client", (ca_certificate, ca_key)),
        rogue_ca=rogue_path,
        rogue_client=issue_certificate(folder, "rogue-client", (rogue_certificate, rogue_key)),
    )
