"""TLS and mutual TLS from certificate files, with a throwaway CA made in the test."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pki import Pki, create_authority, create_pki, issue_certificate

from appliance.client import ApplianceClient
from appliance.server import ApplianceServer, ServeConfig, TlsFiles, create_server

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return create_pki(tmp_path_factory.mktemp("pki"))


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


def test_invalid_certificate_file_named(model_store: Path, pki: Pki, tmp_path: Path):
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="garbled.pem.*PEM certificate chain"):
        create_server(model_store, ServeConfig(port=0, tls=TlsFiles(garbled, pki.server.key)))


def test_key_of_other_certificate_rejected(model_store: Path, pki: Pki):
    # The client's key does not belong to the server certificate.
    tls = TlsFiles(pki.server.certificate, pki.client.key)
    with pytest.raises(ValueError, match="invalid or do not match"):
        create_server(model_store, ServeConfig(port=0, tls=tls))


def test_invalid_client_ca_file_named(model_store: Path, pki: Pki, tmp_path: Path):
    garbled = tmp_path / "garbled-ca.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    tls = TlsFiles(pki.server.certificate, pki.server.key, client_ca=garbled)
    with pytest.raises(ValueError, match="garbled-ca.pem contains no valid PEM certificate"):
        create_server(model_store, ServeConfig(port=0, tls=tls))


def _run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m appliance`` with ``arguments`` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=_env_without_grpc_verbosity(),
    )


def _env_without_grpc_verbosity() -> dict[str, str]:
    """Return this process's environment without ``GRPC_VERBOSITY``, the CLI's default case."""
    return {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}


def test_cli_without_tls_hints_tls_ca(tls_server: ApplianceServer):
    result = _run_cli("health", "--address", f"localhost:{tls_server.port}", "--timeout-s", "20")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert "pass --tls-ca if that server uses TLS" in result.stderr


@pytest.mark.parametrize("with_client_certificate", [False, True])
def test_cli_tls_refused_port_names_address(pki: Pki, with_client_certificate: bool):
    # Port 1 on loopback has no listener, so the connection is refused before any handshake.
    certificate = (
        ["--tls-cert", str(pki.client.certificate), "--tls-key", str(pki.client.key)]
        if with_client_certificate
        else []
    )
    result = _run_cli(
        "health", "--address", "127.0.0.1:1", "--tls-ca", str(pki.ca), *certificate,
        "--timeout-s", "10",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach 127.0.0.1:1: UNAVAILABLE: ")
    assert result.stderr.rstrip().endswith(
        "; check --address and that `python -m appliance serve` is running there"
    )
    assert "mutual TLS" not in result.stderr
    assert "signed by the CA" not in result.stderr


def test_cli_with_rogue_certificate_hints_ca(mtls_server: ApplianceServer, pki: Pki):
    result = _run_cli(
        "health",
        "--address",
        f"localhost:{mtls_server.port}",
        "--tls-ca",
        str(pki.ca),
        "--tls-cert",
        str(pki.rogue_client.certificate),
        "--tls-key",
        str(pki.rogue_client.key),
        "--timeout-s",
        "20",
    )
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert "--tls-cert is signed by the CA the server trusts" in result.stderr


@pytest.mark.parametrize(
    ("start_offset", "problem"),
    [
        (datetime.timedelta(hours=-2), "certificate has expired"),
        (datetime.timedelta(hours=1), "certificate is not yet valid"),
    ],
)
def test_server_rejects_certificate_out_of_period(
    model_store: Path, tmp_path: Path, start_offset: datetime.timedelta, problem: str
):
    # A served certificate outside its period would fail every client's handshake.
    authority_certificate, authority_key, _ = create_authority(tmp_path, "clock")
    issued = issue_certificate(
        tmp_path, "server", (authority_certificate, authority_key), True, start_offset
    )
    tls = TlsFiles(issued.certificate, issued.key)
    with pytest.raises(ValueError, match=f"server.pem is rejected: {problem}"):
        create_server(model_store, ServeConfig(port=0, tls=tls))


def test_client_rejects_key_of_other_certificate(pki: Pki):
    with pytest.raises(ValueError, match="invalid or do not match") as raised:
        ApplianceClient(
            "127.0.0.1:1",
            root_certificate=pki.ca,
            client_certificate=pki.client.certificate,
            client_key=pki.server.key,
        )
    assert str(pki.client.certificate) in str(raised.value)
    assert "--tls-key (client_key)" in str(raised.value)


def test_client_rejects_invalid_ca_file(tmp_path: Path):
    garbled = tmp_path / "garbled-ca.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="garbled-ca.pem contains no valid PEM certificate"):
        ApplianceClient("127.0.0.1:1", root_certificate=garbled)


def test_cli_with_other_ca_hints_tls_ca(tls_server: ApplianceServer, pki: Pki):
    # The rogue CA did not sign the server's certificate, so the client rejects the server.
    result = _run_cli(
        "health",
        "--address",
        f"localhost:{tls_server.port}",
        "--tls-ca",
        str(pki.rogue_ca),
        "--timeout-s",
        "20",
    )
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert "--tls-ca does not contain the CA that signed the server's certificate" in result.stderr
    assert "pass --tls-cert and --tls-key" not in result.stderr


def test_cli_tls_to_plain_server_hints(model_store: Path, pki: Pki):
    running = create_server(model_store, ServeConfig(port=0, grace_s=1.0, drain_s=0.0))
    try:
        result = _run_cli(
            "health",
            "--address",
            f"127.0.0.1:{running.port}",
            "--tls-ca",
            str(pki.ca),
            "--timeout-s",
            "20",
        )
        debug = _run_cli(
            "--log-level",
            "DEBUG",
            "health",
            "--address",
            f"127.0.0.1:{running.port}",
            "--tls-ca",
            str(pki.ca),
            "--timeout-s",
            "20",
        )
    finally:
        running.stop()
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert "does not use TLS, so leave out --tls-ca" in result.stderr
    # gRPC's C core logs the failed handshake only when asked to, with --log-level DEBUG.
    assert "Handshake failed" not in result.stderr
    assert "Handshake failed" in debug.stderr
    assert "does not use TLS, so leave out --tls-ca" in debug.stderr


def test_serve_keeps_failed_handshakes_out_of_its_log(model_store: Path, pki: Pki, tmp_path: Path):
    # A plain-text client at a TLS port fails the handshake before any call exists.
    port_file = tmp_path / "server.port"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            "serve",
            "--store",
            str(model_store),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--tls-cert",
            str(pki.server.certificate),
            "--tls-key",
            str(pki.server.key),
            "--grace-s",
            "1",
            "--drain-s",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=_env_without_grpc_verbosity(),
    )
    try:
        deadline = time.monotonic() + 120.0
        while not port_file.exists():
            assert server.poll() is None, server.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "serve wrote no port file in 120 s"
            time.sleep(0.2)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        for _ in range(3):
            assert _rejection(address).code() == grpc.StatusCode.UNAVAILABLE
        with ApplianceClient(
            f"localhost:{port_file.read_text().strip()}", timeout_s=5.0, root_certificate=pki.ca
        ) as client:
            while client.health() != "SERVING":
                assert time.monotonic() < deadline, "serve did not report SERVING in 120 s"
                time.sleep(0.2)
            assert len(client.model_info().model_id) == 16
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    assert "Handshake failed" not in stderr
    assert "rpc=GetModelInfo" in stderr
