"""Checks of TLS certificate and key files with Python's ``ssl`` module, for server and client.

gRPC's C core reports a bad TLS file only in its own log, as a failed bind on the server or a
failed handshake on the client, neither of which names the file. These checks load the files
first and name the file and the problem.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

# OpenSSL verification codes (X509_V_ERR_*) of a certificate outside its validity period.
_NOT_YET_VALID = 9
_EXPIRED = 10
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)
# Flights a TLS 1.2 or 1.3 handshake between two in-memory endpoints needs, with room to spare.
_HANDSHAKE_ROUNDS = 8


def no_key_password() -> bytes:
    """Return an empty password for an encrypted key, so that OpenSSL never prompts for one."""
    return b""


def ssl_reason(exc: ssl.SSLError) -> str:
    """Return OpenSSL's reason code as `` (REASON)``, or an empty string when it gave none."""
    return f" ({exc.reason})" if exc.reason else ""


def check_key_pair(
    certificate: Path, private_key: Path, certificate_flag: str, key_flag: str
) -> None:
    """Check that a certificate chain and a private key are PEM and belong together.

    Arguments:
        certificate: PEM certificate chain, first the certificate of ``private_key``.
        private_key: PEM private key, not encrypted.
        certificate_flag: Command-line option of ``certificate``, named in the error.
        key_flag: Command-line option of ``private_key``, named in the error.

    Raises:
        ValueError: Naming both files and what they must contain.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(certificate, private_key, password=no_key_password)
    except ssl.SSLError as exc:
        raise ValueError(
            f"TLS certificate {certificate} and key {private_key} are invalid or do not "
            f"match{ssl_reason(exc)}: {certificate_flag} must be a PEM certificate chain and "
            f"{key_flag} the PEM private key of its first certificate, not encrypted"
        ) from exc


def check_ca_file(path: Path, flag: str, role: str) -> None:
    """Check that a file contains at least one valid PEM certificate.

    Arguments:
        path: The CA file.
        flag: Its command-line option, named in the error.
        role: What the CAs sign, for the error, e.g. ``client certificates``.

    Raises:
        ValueError: Naming the file and what it must contain.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ValueError(
            f"CA file {path} contains no valid PEM certificate{ssl_reason(exc)}; {flag} must be "
            f"the PEM certificates of the CAs that sign {role}"
        ) from exc


def validity_problem(certificate: Path, private_key: Path) -> str | None:
    """Return why the first certificate of a chain is outside its validity period, else None.

    A TLS handshake between two in-memory endpoints, with the certificate itself as the only
    trust anchor, makes OpenSSL compare its validity dates with the clock. Other verification
    results (a missing key usage, a self-signed chain) are left to the real clients.

    Arguments:
        certificate: PEM certificate chain that ``check_key_pair`` accepted.
        private_key: Its PEM private key.

    Returns:
        OpenSSL's message, ``certificate has expired`` or ``certificate is not yet valid``, or
        None when the certificate is within its validity period or the check could not tell.
    """
    first = _PEM_CERTIFICATE.search(certificate.read_bytes())
    if first is None:
        return None
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certificate, private_key, password=no_key_password)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cadata=first.group(0).decode("ascii"))
    client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(to_client, to_server, server_side=False)
    from_client, from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_end = server.wrap_bio(from_client, from_server, server_side=True)
    for _ in range(_HANDSHAKE_ROUNDS):
        try:
            client_end.do_handshake()
            return None
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code in (_NOT_YET_VALID, _EXPIRED):
                return str(exc.verify_message)
            return None
        from_client.write(to_server.read())
        try:
            server_end.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            return None
        to_client.write(from_server.read())
    return None
