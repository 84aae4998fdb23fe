"""Export checks: ONNX Runtime against PyTorch on real beats, scaled to the outputs' size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.classes import AAMI_CLASSES
from appliance.dataset import BeatSet
from appliance.engine import Engine
from appliance.export import (
    PARITY_TOLERANCE,
    ROUNDTRIP_MAX_REL_ERROR,
    ExportError,
    check_parity,
    parity_figures,
    scaled_difference,
)
from appliance.store import load_current
from appliance.train import TrainResult


def _outputs(
    rng: np.random.Generator, z_scale: float
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    x = rng.standard_normal((8, 1, 64)).astype(np.float32)
    z = (z_scale * rng.standard_normal((8, 64))).astype(np.float32)
    log_det = rng.standard_normal(8).astype(np.float32)
    return x, (z, log_det, x.copy())


def test_scaled_difference_divides_by_magnitude() -> None:
    expected = np.array([[50.0, -10.0], [0.1, 0.2]])
    actual = np.array([[50.5, -10.0], [0.1, 0.25]])
    # Beat 1 gives 0.5 / 50 = 0.01 and beat 2 gives 0.05 / max(1, 0.2) = 0.05.
    assert scaled_difference(actual, expected) == pytest.approx(0.05)
    assert np.isnan(scaled_difference(np.array([[np.nan, 0.0]]), np.array([[1.0, 0.0]])))


def test_parity_passes_large_latent_values() -> None:
    rng = np.random.default_rng(0)
    x, torch_outputs = _outputs(rng, z_scale=40.0)
    z, log_det, x_inverse = torch_outputs
    # A relative error of 5e-5 (an estimate of float32 rounding through the network) exceeds an
    # absolute 1e-3 at these magnitudes.
    z_onnx = z * (1 + 5e-5)
    assert np.abs(z_onnx - z).max() > 1e-3
    figures = parity_figures(x, torch_outputs, (z_onnx, log_det, x_inverse))
    assert figures["parity_z_max_scaled_diff"] < PARITY_TOLERANCE
    assert figures["roundtrip_max_rel_error"] == 0.0


@pytest.mark.parametrize(
    ("output", "check"),
    [
        (0, "parity_z_max_scaled_diff"),
        (1, "parity_log_det_max_scaled_diff"),
        (2, "parity_x_max_scaled_diff"),
    ],
)
def test_parity_failure_names_the_check(output: int, check: str) -> None:
    rng = np.random.default_rng(1)
    x, torch_outputs = _outputs(rng, z_scale=40.0)
    onnx_outputs = list(torch_outputs)
    onnx_outputs[output] = onnx_outputs[output] * (1 + 1e-2) + 2e-2
    with pytest.raises(ExportError, match=f"{check} check: .* > 0.001; nothing was published"):
        parity_figures(x, torch_outputs, (onnx_outputs[0], onnx_outputs[1], onnx_outputs[2]))


def test_parity_rejects_nan_and_drift() -> None:
    rng = np.random.default_rng(2)
    x, torch_outputs = _outputs(rng, z_scale=1.0)
    z, log_det, x_inverse = torch_outputs
    with pytest.raises(ExportError, match="parity_z_max_scaled_diff check: nan"):
        parity_figures(x, torch_outputs, (np.full_like(z, np.nan), log_det, x_inverse))
    # Both runtimes agree on an inverse that misses x by 1e-3 relative.
    drifted = x_inverse * (1 + 1e-3)
    with pytest.raises(ExportError, match="roundtrip_max_rel_error check"):
        parity_figures(x, (z, log_det, drifted), (z, log_det, drifted))


def test_fixture_model_passes_parity(
    trained_result: TrainResult, model_store: Path, split_train: tuple[BeatSet, BeatSet]
) -> None:
    engine = Engine(load_current(model_store))
    known = np.isin(
        split_train[1].labels,
        [AAMI_CLASSES.index(name) for name in trained_result.classes_known],
    )
    x = (split_train[1].windows[known][:64] / trained_result.scale_mv).astype(np.float32)
    labels = split_train[1].labels[known][:64]
    figures = check_parity(trained_result.model.eval(), engine, x, labels)
    assert 0 < figures["parity_z_max_scaled_diff"] <= PARITY_TOLERANCE
    assert figures["roundtrip_max_rel_error"] <= ROUNDTRIP_MAX_REL_ERROR
