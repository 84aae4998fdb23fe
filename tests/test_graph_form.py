"""The export's graph form: the same function as the trained flow, with other operators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from appliance.config import ModelConfig
from appliance.export import export_graphs
from appliance.flow import ConditionalFlow
from appliance.graph_form import (
    MAX_TAP_SUM_OUT_CHANNELS,
    PlanarNet,
    TapSumConv,
    graph_form,
    planar_conv,
)


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "kernel_size", "samples"),
    [(64, 2, 5, 128), (64, 8, 5, 16), (7, 3, 3, 9), (5, 2, 7, 4), (4, 1, 1, 6)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_tap_sum_equals_convolution(
    in_channels: int, out_channels: int, kernel_size: int, samples: int, bias: bool
) -> None:
    generator = torch.Generator().manual_seed(in_channels * 100 + samples)
    conv = nn.Conv1d(
        in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias
    ).double()
    with torch.no_grad():
        for parameter in conv.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(3, in_channels, samples, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x)
        tap_sum = TapSumConv(conv)(x[:, :, None, :])
        planar = planar_conv(conv)(x[:, :, None, :])
    assert tap_sum.shape == planar.shape == (*expected.shape[:2], 1, expected.shape[2])
    torch.testing.assert_close(tap_sum[:, :, 0], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(planar[:, :, 0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(4, 2, 3, padding=1, stride=2),
        nn.Conv1d(4, 2, 3, padding=2, dilation=2),
        nn.Conv1d(4, 2, 3, padding=1, groups=2),
        nn.Conv1d(4, 2, 3, padding=1, padding_mode="circular"),
        nn.Conv1d(4, 2, 3, padding="same"),
    ],
    ids=["stride", "dilation", "groups", "circular", "same"],
)
def test_graph_form_rejects_other_convolutions(conv: nn.Conv1d) -> None:
    with pytest.raises(ValueError, match="supports only stride-1"):
        TapSumConv(conv)
    with pytest.raises(ValueError, match="supports only stride-1"):
        planar_conv(conv)


def _trained_like_flow(activation: str = "relu") -> ConditionalFlow:
    """A small flow with every weight away from its identity start, in float64."""
    config = ModelConfig(
        n_levels=2, steps_per_level=2, hidden_channels=16, bottleneck_dims=8, activation=activation
    )
    model = ConditionalFlow(
        config,
        leads=2,
        window_samples=32,
        classes=5,
    ).double()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator).double())
    return model.eval()


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_graph_form_keeps_flow_function(activation: str) -> None:
    model = _trained_like_flow(activation)
    model.freeze_inverse()
    rewritten = graph_form(model)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, 32, generator=generator, dtype=torch.float64)
    condition = nn.functional.one_hot(torch.arange(6) % 5, 5).double()
    with torch.no_grad():
        z, log_det = model(x, condition)
        z_rewritten, log_det_rewritten = rewritten(x, condition)
        x_back, _ = model.inverse(z, condition)
        x_back_rewritten, _ = rewritten.inverse(z, condition)
    torch.testing.assert_close(z_rewritten, z, rtol=0, atol=1e-10)
    torch.testing.assert_close(log_det_rewritten, log_det, rtol=0, atol=1e-10)
    torch.testing.assert_close(x_back_rewritten, x_back, rtol=0, atol=1e-10)
    # One subnetwork per coupling, each ending in a tap sum to 2 * channels_b <= 8 channels,
    # with no 1-D convolution left.
    planar_nets = [m for m in rewritten.modules() if isinstance(m, PlanarNet)]
    assert len(planar_nets) == 4
    tap_sums = [m for m in rewritten.modules() if isinstance(m, TapSumConv)]
    assert len(tap_sums) == 4
    assert all(m.out_channels <= MAX_TAP_SUM_OUT_CHANNELS for m in tap_sums)
    assert not any(isinstance(m, nn.Conv1d) for m in rewritten.modules())
    # The trained model keeps its own layers.
    assert not any(isinstance(m, (PlanarNet, TapSumConv)) for m in model.modules())


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_exported_graph_has_only_planar_wide_convolutions(tmp_path: Path, activation: str) -> None:
    model = _trained_like_flow(activation).float()
    forward_path, _ = export_graphs(model, tmp_path)
    graph = onnx.load(str(forward_path)).graph
    weights = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    conv_weights = [weights[node.input[1]] for node in graph.node if node.op_type == "Conv"]
    assert conv_weights
    # Every convolution is 2-D with kernel height 1, and none with a kernel wider than 1 is
    # narrow.
    assert all(len(s) == 4 and s[2] == 1 for s in conv_weights)
    narrow = [s for s in conv_weights if s[3] > 1 and s[0] <= MAX_TAP_SUM_OUT_CHANNELS]
    assert not narrow

    x = torch.randn(5, 2, 32, generator=torch.Generator().manual_seed(5))
    condition = nn.functional.one_hot(torch.arange(5) % 5, 5).float()
    session = ort.InferenceSession(str(forward_path), providers=["CPUExecutionProvider"])
    z_onnx, log_det_onnx = session.run(None, {"x": x.numpy(), "condition": condition.numpy()})
    with torch.no_grad():
        z, log_det = model(x, condition)
    np.testing.assert_allclose(z_onnx, z.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(log_det_onnx, log_det.numpy(), rtol=0, atol=1e-3)
