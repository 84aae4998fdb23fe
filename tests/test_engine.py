"""Execution provider choice of the engine on a machine whose ONNX Runtime has no CUDA."""

from __future__ import annotations

import logging
from pathlib import Path

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
