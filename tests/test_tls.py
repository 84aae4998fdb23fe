"""TLS and mutual TLS from certificate files, with a throwaway CA made in the test."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.client import ApplianceClient
from appliance.server import ApplianceServer, ServeConfig, TlsFiles, create_server

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Issued:
    """PEM files of one certificate and its private key."""

    certificate: Path
    key: Path


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
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
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


def _authority(
    folder: Path, name: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate(f"{name} test CA", key, None)
    path = folder / f"{name}-ca.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate, key, path


def _issue(
    folder: Path,
    name: str,
    authority: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    server: bool = False,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate(name, key, authority, server=server)
    path = folder / f"{name}.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Issued(path, _write_key(key, folder / f"{name}.key"))


@dataclass(frozen=True)
class Pki:
    """A CA with server and client certificates, and a second CA the server does not trust."""

    ca: Path
    server: Issued
    client: Issued
    rogue_ca: Path
    rogue_client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_certificate, ca_key, ca_path = _authority(folder, "hospital")
    rogue_certificate, rogue_key, rogue_path = _authority(folder, "rogue")
    return Pki(
        ca=ca_path,
        server=_issue(folder, "server", (ca_certificate, ca_key), server=True),
        client=_issue(folder, "client", (ca_certificate, ca_key)),
        rogue_ca=rogue_path,
        rogue_client=_issue(folder, "rogue-client", (rogue_certificate, rogue_key)),
    )


@pytest.fixture(scope="module")
def tls_server(model_store: Path, pki: Pki) -> Iterator[ApplianceServer]:
    running = create_server(
        model_store,
        ServeConfig(
            port=0, tls=TlsFiles(pki.server.certificate, pki.server.key), grace_s=1.0, drain_s=0.0
        ),
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mtls_server(model_store: Path, pki: Pki) -> Iterator[ApplianceServer]:
    tls = TlsFiles(pki.server.certificate, pki.server.key, client_ca=pki.ca)
    running = create_server(model_store, ServeConfig(port=0, tls=tls, grace_s=1.0, drain_s=0.0))
    yield running
    running.stop()


def _model_id(address: str, **tls: Path) -> str:
    with ApplianceClient(address, timeout_s=CALL_TIMEOUT_S, **tls) as client:
        return client.model_info().model_id


def _rejection(address: str, **tls: Path) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        _model_id(address, **tls)
    return raised.value


def test_tls_server_accepts_trusting_client(tls_server: ApplianceServer, pki: Pki):
    address = f"localhost:{tls_server.port}"
    assert len(_model_id(address, root_certificate=pki.ca)) == 16
    plaintext = _rejection(address)
    assert plaintext.code() == grpc.StatusCode.UNAVAILABLE
    untrusting = _rejection(address, root_certificate=pki.rogue_ca)
    assert untrusting.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_client_certificate(mtls_server: ApplianceServer, pki: Pki):
    address = f"localhost:{mtls_server.port}"
    model_id = _model_id(
        address,
        root_certificate=pki.ca,
        client_certificate=pki.client.certificate,
        client_key=pki.client.key,
    )
    assert len(model_id) == 16
    without = _rejection(address, root_certificate=pki.ca)
    assert without.code() == grpc.StatusCode.UNAVAILABLE
    rogue = _rejection(
        address,
        root_certificate=pki.ca,
        client_certificate=pki.rogue_client.certificate,
        client_key=pki.rogue_client.key,
    )
    assert rogue.code() == grpc.StatusCode.UNAVAILABLE
    # The server is still serving trusted clients after rejecting the others.
    assert (
        _model_id(
            address,
            root_certificate=pki.ca,
            client_certificate=pki.client.certificate,
            client_key=pki.client.key,
        )
        == model_id
    )


def test_cli_without_client_certificate_hints(
    mtls_server: ApplianceServer, pki: Pki, tmp_path: Path
):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "quality-report",
            "--address",
            f"localhost:{mtls_server.port}",
            "--tls-ca",
            str(pki.ca),
            "--out",
            str(tmp_path / "report"),
            "--timeout-s",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert "pass --tls-cert and --tls-key" in result.stderr
    assert not (tmp_path / "report").exists()


def test_missing_certificate_file_named(model_store: Path, pki: Pki, tmp_path: Path):
    missing = tmp_path / "absent.pem"
    with pytest.raises(ValueError, match="absent.pem"):
        create_server(model_store, ServeConfig(port=0, tls=TlsFiles(missing, pki.server.key)))
