"""Engine: execution provider choice on a machine without CUDA, and latent draws."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from appliance import engine as engine_module
from appliance.engine import Engine, available_providers
from appliance.store import load_current

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@pytest.fixture
def cuda_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the engine ask for CUDA first, as it does where onnxruntime-gpu is installed."""
    monkeypatch.setattr(
        engine_module, "available_providers", lambda require_gpu=False: [CUDA, CPU]
    )


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="CUDA provider present")
def test_require_gpu_without_cuda_raises() -> None:
    assert available_providers() == [CPU]
    with pytest.raises(RuntimeError, match="--require-gpu"):
        available_providers(require_gpu=True)


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="CUDA provider present")
@pytest.mark.usefixtures("cuda_listed")
def test_cuda_fallback_rejected_when_required(model_store: Path) -> None:
    version = load_current(model_store)
    # ONNX Runtime warns that the requested provider is missing, then falls back to the CPU.
    with pytest.warns(UserWarning, match=CUDA), pytest.raises(RuntimeError, match="fell back"):
        Engine(version, require_gpu=True)


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="CUDA provider present")
@pytest.mark.usefixtures("cuda_listed")
def test_cuda_fallback_logged(model_store: Path, caplog: pytest.LogCaptureFixture) -> None:
    version = load_current(model_store)
    with caplog.at_level(logging.WARNING, logger="appliance.engine"):
        with pytest.warns(UserWarning, match=CUDA):
            loaded = Engine(version)
    assert loaded.execution_provider == CPU
    fallbacks = [r.getMessage() for r in caplog.records if "fallback" in r.getMessage()]
    assert fallbacks == [f"execution provider fallback requested={CUDA} used={CPU}"]


def test_draw_latent_uses_fitted_prior(model_store: Path) -> None:
    version = load_current(model_store)
    loaded = Engine(version, intra_op_threads=1)
    assert loaded.tail_scale == version.manifest["gate"]["tail_scale"]
    prior = loaded.latent_prior
    k = loaded.bottleneck_dims
    fitted = [c for c in loaded.classes_known if prior.beats[c] > 0]
    assert fitted, "the fixture model should have at least one class with a fitted prior"
    class_index = fitted[0]
    loaded.tail_scale = 0.0
    fixed = loaded.draw_latent(np.random.default_rng(0), 2000, 0.8, class_index)
    assert np.allclose(fixed[:, k:], prior.tail_mean[class_index], atol=1e-6)
    loaded.tail_scale = 1.0
    drawn = loaded.draw_latent(np.random.default_rng(0), 2000, 0.8, class_index)
    head_mean = drawn[:, :k].mean(axis=0)
    # The mean of 2000 draws lies within a few standard errors of the class mean.
    assert np.abs(head_mean - prior.mean[class_index]).max() < 0.15
    spread = drawn[:, k:].std(axis=0) / (0.8 * prior.tail_std[class_index])
    # A normal truncated at 3 standard deviations keeps 0.986 of the standard deviation.
    assert abs(float(np.median(spread)) - 0.986) < 0.05


def test_generate_with_tail_is_gated_and_seeded(model_store: Path) -> None:
    loaded = Engine(load_current(model_store), intra_op_threads=1)
    assert loaded.tail_scale == 1.0
    first = loaded.generate({0: 20}, 1.0, loaded.default_margin, 7, 20)
    second = loaded.generate({0: 20}, 1.0, loaded.default_margin, 7, 20)
    assert first.beats.shape[0] == 20
    assert np.array_equal(first.beats, second.beats)
    assert np.all(first.scores >= loaded.default_margin)
    assert np.count_nonzero(first.z[:, loaded.bottleneck_dims :]) > 0
