"""A Node.js client built from the .proto alone, against a real server over loopback.

clients/node/generate_validate.js loads proto/appliance/v1/appliance.proto with
@grpc/proto-loader. Its beats and scores must equal what the Python client gets for the same
request, so a second language can integrate from the contract file without generated code.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from appliance.client import ApplianceClient, Generated, Validated
from appliance.serve_config import ServeConfig, validate_message_fit
from appliance.server import create_server
from appliance.v1 import appliance_pb2 as pb

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NODE_CLIENT_DIR = ROOT / "clients" / "node"
NODE_SCRIPT = NODE_CLIENT_DIR / "generate_validate.js"
NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")
INSTALL_HINT = "run `make node-client` to install the Node.js client's packages"
CALL_TIMEOUT_S = 120.0
NODE_TIMEOUT_S = 300.0

# Margin 0 accepts any pertinence score, so that the beat count does not depend on how well the
# short fixture training went. The Node client must send it as an explicit 0 in the optional
# margin field, otherwise Validate reports the model's default_margin (0.05 unless configured).
COUNT = 24
SEED = 11
MARGIN = 0.0


def _node_executable() -> str:
    """Return the path of ``node``, failing the test with the install hint when it is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node not found on PATH; install Node.js 20 or later, then {INSTALL_HINT}")
    return node


def _check_packages_installed() -> None:
    """Fail the test unless the pinned versions of the Node.js packages are installed."""
    pinned = json.loads((NODE_CLIENT_DIR / "package.json").read_text())["dependencies"]
    for name in NODE_PACKAGES:
        manifest = NODE_CLIENT_DIR / "node_modules" / name / "package.json"
        if not manifest.exists():
            pytest.fail(f"Node.js package {name} not found in {manifest.parent}; {INSTALL_HINT}")
        installed = json.loads(manifest.read_text())["version"]
        if installed != pinned[name]:
            pytest.fail(
                f"Node.js package {name} is {installed}, but package.json pins {pinned[name]}; "
                f"{INSTALL_HINT}"
            )


def run_node(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the Node.js client with ``args`` and return the finished process."""
    node = _node_executable()
    _check_packages_installed()
    return subprocess.run(
        [node, str(NODE_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
        cwd=ROOT,
    )


def _parse_stdout(process: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert process.returncode == 0, f"node client failed: {process.stderr}"
    output: dict[str, Any] = json.loads(process.stdout)
    return output


def _class_names(enum_names: list[str]) -> list[str]:
    """Map BeatClass enum names (``BEAT_CLASS_N``) to the Python client's class names (``N``)."""
    return [name.removeprefix("BEAT_CLASS_") for name in enum_names]


@pytest.fixture(scope="module")
def client(server_address: str) -> Iterator[ApplianceClient]:
    with ApplianceClient(server_address, timeout_s=CALL_TIMEOUT_S) as connected:
        yield connected


@pytest.fixture(scope="module")
def info(client: ApplianceClient) -> pb.GetModelInfoResponse:
    return client.model_info()


@pytest.fixture(scope="module")
def node_output(server_address: str) -> dict[str, Any]:
    """Output of one Node.js GetModelInfo, Generate and Validate run."""
    process = run_node(
        "--address",
        server_address,
        "--count",
        str(COUNT),
        "--seed",
        str(SEED),
        "--margin",
        str(MARGIN),
        "--timeout-s",
        str(CALL_TIMEOUT_S),
    )
    return _parse_stdout(process)


@pytest.fixture(scope="module")
def python_generated(client: ApplianceClient) -> Generated:
    return client.generate(count=COUNT, seed=SEED, margin=MARGIN)


@pytest.fixture(scope="module")
def python_validated(client: ApplianceClient, python_generated: Generated) -> Validated:
    return client.validate(python_generated.beats, classes=python_generated.classes, margin=MARGIN)


def test_node_model_info_matches(
    node_output: dict[str, Any], info: pb.GetModelInfoResponse
) -> None:
    node_info = node_output["model_info"]
    assert node_info["model_id"] == info.model_id
    assert node_info["leads"] == list(info.leads)
    assert node_info["window_samples"] == info.window_samples
    assert np.float32(node_info["fs_hz"]) == np.float32(info.fs_hz)
    assert _class_names(node_info["classes_known"]) == _class_names(
        [pb.BeatClass.Name(value) for value in info.classes_known]
    )


def test_node_beat_shape_matches_model(
    node_output: dict[str, Any], info: pb.GetModelInfoResponse
) -> None:
    generated = node_output["generate"]
    beats = np.asarray(generated["beats"], dtype=np.float64)
    assert beats.ndim == 3
    assert beats.shape[0] > 0
    assert beats.shape[1] == len(info.leads)
    assert beats.shape[2] == info.window_samples
    assert generated["shape"] == list(beats.shape)
    assert generated["unit"] == "SAMPLE_UNIT_MILLIVOLT"
    assert len(generated["classes"]) == beats.shape[0]
    assert len(generated["scores"]) == beats.shape[0]
    assert generated["stats"]["accepted"] == beats.shape[0]
    stats = generated["stats"]
    rejected = sum(
        stats[name]
        for name in (
            "pertinence_rejections",
            "privacy_rejections",
            "invalid_rejections",
            "surplus_dropped",
        )
    )
    assert stats["accepted"] + rejected == stats["draws"]


def test_node_beats_equal_python_bits(
    node_output: dict[str, Any], python_generated: Generated
) -> None:
    generated = node_output["generate"]
    node_beats = np.asarray(generated["beats"], dtype=np.float64)
    # Every value the Node client printed must be a float32 value exactly, so that converting
    # it to float32 loses nothing and the bit comparison below compares what Node decoded.
    assert np.array_equal(node_beats.astype(np.float32).astype(np.float64), node_beats)
    node_bits = node_beats.astype(np.float32).view(np.uint32)
    python_bits = np.ascontiguousarray(python_generated.beats, dtype="<f4").view(np.uint32)
    assert node_bits.shape == python_bits.shape
    assert np.array_equal(node_bits, python_bits)
    assert _class_names(generated["classes"]) == python_generated.classes
    node_scores = np.asarray(generated["scores"], dtype=np.float32)
    assert np.array_equal(node_scores, python_generated.scores.astype(np.float32))


def test_node_validate_scores_equal_python(
    node_output: dict[str, Any], python_validated: Validated
) -> None:
    validated = node_output["validate"]
    node_scores = np.asarray(validated["scores"], dtype=np.float64)
    assert node_scores.shape == python_validated.scores.shape
    np.testing.assert_allclose(node_scores, python_validated.scores, rtol=0.0, atol=1e-6)
    assert validated["accepted"] == python_validated.accepted.tolist()
    assert _class_names(validated["classes"]) == python_validated.classes
    assert validated["margin"] == MARGIN
    assert python_validated.margin == MARGIN


def test_node_validate_uses_given_classes(node_output: dict[str, Any]) -> None:
    # Validate scores each beat under the class sent with it; Generate's class was sent.
    assert node_output["validate"]["classes"] == node_output["generate"]["classes"]


def test_node_bad_count_invalid_argument(server_address: str) -> None:
    process = run_node("--address", server_address, "--bad-count")
    status = _parse_stdout(process)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status["code_name"] == "INVALID_ARGUMENT"
    assert "count=0" in status["details"]


def test_node_invalid_option_exits_2() -> None:
    process = run_node("--count=-3")
    assert process.returncode == 2
    assert process.stdout == ""
    assert "--count=-3 is invalid" in process.stderr


def test_node_count_over_validate_limit(
    server_address: str, info: pb.GetModelInfoResponse
) -> None:
    # The client sends all beats in one Validate message, so it rejects a count whose samples
    # would not fit in the server's default 4 MiB message, before it calls Generate.
    count = 4 * 1024 * 1024 // (len(info.leads) * info.window_samples * 4) + 1
    process = run_node("--address", server_address, "--count", str(count))
    assert process.returncode == 2
    assert process.stdout == ""
    assert f"--count={count} is too large" in process.stderr


def test_node_count_held_to_server_limits(model_store: Path) -> None:
    settings = ServeConfig(
        port=0,
        workers=2,
        intra_op_threads=1,
        max_beats_per_request=700,
        max_message_bytes=64 * 1024,
        grace_s=1.0,
        drain_s=0.0,
    )
    running = create_server(model_store, settings)
    try:
        address = f"127.0.0.1:{running.port}"
        with ApplianceClient(address, timeout_s=CALL_TIMEOUT_S) as client:
            info = client.model_info()
        fit = validate_message_fit(64 * 1024, len(info.leads) * info.window_samples)
        assert fit < 700
        too_many = run_node("--address", address, "--count", str(fit + 1))
        assert too_many.returncode == 2
        assert too_many.stdout == ""
        assert f"--count={fit + 1} is too large for this server" in too_many.stderr
        assert f"use --count {fit} or less" in too_many.stderr
        # The largest count it names goes through Generate and Validate.
        largest = run_node("--address", address, "--count", str(fit), "--margin", "0")
        output = _parse_stdout(largest)
        assert len(output["validate"]["scores"]) == len(output["generate"]["classes"])
    finally:
        running.stop()


def test_node_unreachable_server_fails() -> None:
    # A port that was just bound and closed on loopback refuses the connection.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = run_node("--address", f"127.0.0.1:{port}", "--count", "3", "--timeout-s", "10")
    assert process.returncode == 1
    assert process.stdout == ""
    assert "UNAVAILABLE" in process.stderr
