"""The conditional flow: float64 exactness, multi-lead shapes, stability after training."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from appliance.blocks import ActNorm
from appliance.config import ApplianceConfig, GateConfig, ModelConfig
from appliance.flow import ConditionalFlow
from appliance.train import one_hot

CLASSES = 5
SMALL = ModelConfig(
    n_levels=2, steps_per_level=2, hidden_channels=8, kernel_size=3, bottleneck_dims=4
)
TEMPERATURES = (0.5, 0.8, 1.0, 1.2)


def _small_flow(leads: int, window_samples: int, seed: int = 0) -> ConditionalFlow:
    """Build a float64 flow with every parameter moved away from its identity start."""
    torch.manual_seed(seed)
    flow = ConditionalFlow(SMALL, leads, window_samples, CLASSES).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator).double())
    for module in flow.modules():
        if isinstance(module, ActNorm):
            module.initialized.fill_(True)
    return flow.eval()


def _condition(batch: int) -> torch.Tensor:
    return one_hot(torch.arange(batch) % CLASSES).double()


@pytest.mark.parametrize(("leads", "window_samples"), [(1, 16), (2, 16), (12, 8)])
def test_flow_inverse_restores_input(leads: int, window_samples: int) -> None:
    flow = _small_flow(leads, window_samples)
    x = torch.randn(7, leads, window_samples, dtype=torch.float64)
    z, forward_log_det = flow(x, _condition(7))
    x_back, inverse_log_det = flow.inverse(z, _condition(7))
    assert z.shape == (7, leads * window_samples)
    assert flow.latent_dims == leads * window_samples
    assert x_back.shape == x.shape
    assert torch.max(torch.abs(x_back - x)).item() < 1e-10
    assert torch.max(torch.abs(forward_log_det + inverse_log_det)).item() < 1e-10


@pytest.mark.parametrize("leads", [1, 2])
def test_flow_log_det_matches_jacobian(leads: int) -> None:
    window_samples = 16
    flow = _small_flow(leads, window_samples, seed=leads)
    x = torch.randn(1, leads, window_samples, dtype=torch.float64)
    condition = _condition(1)

    def flat_forward(values: torch.Tensor) -> torch.Tensor:
        z, _ = flow(values.reshape(1, leads, window_samples), condition)
        return z.flatten()

    jacobian = torch.autograd.functional.jacobian(flat_forward, x.flatten())
    sign, expected = torch.linalg.slogdet(jacobian)
    _, log_det = flow(x, condition)
    assert sign.item() != 0
    assert log_det.item() == pytest.approx(expected.item(), abs=1e-8)


def test_flow_twelve_leads_default_architecture() -> None:
    flow = ConditionalFlow(ModelConfig(), 12, 256, CLASSES)
    x = torch.randn(3, 12, 256)
    flow.train()
    z, log_det = flow(x, one_hot(torch.tensor([0, 1, 2])))
    flow.eval()
    x_back, _ = flow.inverse(z, one_hot(torch.tensor([0, 1, 2])))
    assert z.shape == (3, 12 * 256)
    assert log_det.shape == (3,)
    relative = (x_back - x).norm() / x.norm()
    assert relative.item() < 1e-4


def test_flow_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ConditionalFlow(ModelConfig(n_levels=4), 1, 100, CLASSES)
    with pytest.raises(ValueError, match="bottleneck_dims"):
        ConditionalFlow(ModelConfig(bottleneck_dims=0), 1, 256, CLASSES)
    with pytest.raises(ValueError, match="bottleneck_dims"):
        ConditionalFlow(ModelConfig(bottleneck_dims=257), 1, 256, CLASSES)


def test_truncate_keeps_bottleneck_only() -> None:
    flow = _small_flow(1, 16)
    z = torch.randn(3, 16, dtype=torch.float64)
    truncated = flow.truncate(z)
    assert torch.equal(truncated[:, : flow.bottleneck_dims], z[:, : flow.bottleneck_dims])
    assert torch.count_nonzero(truncated[:, flow.bottleneck_dims :]).item() == 0


def test_sample_latent_respects_truncation() -> None:
    flow = _small_flow(1, 16)
    generator = torch.Generator().manual_seed(0)
    z = flow.sample_latent(2000, temperature=0.5, truncation=1.0, generator=generator)
    assert z.shape == (2000, 16)
    assert z.dtype == torch.float64
    assert torch.count_nonzero(z[:, flow.bottleneck_dims :]).item() == 0
    assert z.abs().max().item() <= 0.5
    assert z[:, : flow.bottleneck_dims].std().item() > 0.2
    with pytest.raises(ValueError, match="temperature"):
        flow.sample_latent(1, temperature=0.0, truncation=3.0)


def test_sample_latent_tail_scale() -> None:
    flow = _small_flow(1, 16)
    generator = torch.Generator().manual_seed(0)
    z = flow.sample_latent(4000, 0.5, 3.0, generator, tail_scale=0.4)
    tail = z[:, flow.bottleneck_dims :]
    # The tail is a normal truncated at 3, of standard deviation 0.5 * 0.4 = 0.2.
    assert tail.abs().max().item() <= 0.2 * 3.0
    assert abs(tail.std().item() - 0.2) < 0.01
    assert abs(z[:, : flow.bottleneck_dims].std().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="tail_scale"):
        flow.sample_latent(1, 1.0, 3.0, tail_scale=-0.1)


@pytest.fixture(scope="module")
def trained(trained_result):  # noqa: ANN001, ANN201
    return trained_result


@pytest.fixture(scope="module")
def real_beats(default_dataset, trained):  # noqa: ANN001, ANN201
    beats = default_dataset.splits["validation"]
    windows = torch.from_numpy(beats.windows[:512] / trained.scale_mv).float()
    condition = one_hot(torch.from_numpy(beats.labels[:512]))
    return windows, condition


def test_trained_round_trip_float32(trained, real_beats) -> None:
    model = trained.model.eval()
    x, condition = real_beats
    with torch.no_grad():
        z, forward_log_det = model(x, condition)
        x_back, inverse_log_det = model.inverse(z, condition)
    relative = (x_back - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert x.dtype == torch.float32
    assert relative.max().item() < 1e-4
    log_det_error = (forward_log_det + inverse_log_det).abs() / forward_log_det.abs().clamp_min(1)
    assert log_det_error.max().item() < 1e-4


def test_trained_round_trip_with_frozen_inverse(trained, real_beats) -> None:
    model = trained.model.eval()
    x, condition = real_beats
    with torch.no_grad():
        z, _ = model(x, condition)
        expected, _ = model.inverse(z, condition)
        model.freeze_inverse()
        frozen, _ = model.inverse(z, condition)
    relative = (frozen - expected).norm() / expected.norm()
    assert relative.item() < 1e-5


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_trained_samples_are_finite(trained, temperature: float) -> None:
    model = trained.model.eval()
    generator = torch.Generator().manual_seed(7)
    truncation = GateConfig().truncation
    z = model.sample_latent(200, temperature, truncation, generator)
    condition = one_hot(torch.arange(200) % CLASSES)
    with torch.no_grad():
        x, _ = model.inverse(z, condition)
        z_back, _ = model(x, condition)
    assert torch.all(torch.isfinite(x))
    # Draws inside the physiological amplitude range are the ones a gate can accept; for them
    # the forward pass must recover the latent values.
    max_abs = GateConfig().max_abs_mv / trained.scale_mv
    plausible = x.flatten(1).abs().max(dim=1).values <= max_abs
    assert plausible.sum().item() > 0
    error = (z_back - z)[plausible].norm(dim=1) / z[plausible].norm(dim=1)
    # The gate rejects and counts draws above 1e-4 (tested with the ONNX engine); in float32
    # nearly every draw stays below it, and none strays far.
    assert (error < 1e-4).float().mean().item() >= 0.95
    assert error.max().item() < 1e-3


@pytest.mark.parametrize("value", [6.0, -6.0])
def test_trained_extreme_latents_are_finite(trained, value: float) -> None:
    model = trained.model.eval()
    condition = one_hot(torch.arange(CLASSES))
    bottleneck = torch.zeros(CLASSES, model.latent_dims)
    bottleneck[:, : model.bottleneck_dims] = value
    alternating = bottleneck.clone()
    alternating[:, 1 : model.bottleneck_dims : 2] *= -1
    everywhere = torch.full((CLASSES, model.latent_dims), value)
    with torch.no_grad():
        for z in (bottleneck, alternating, everywhere):
            x, log_det = model.inverse(z, condition)
            assert torch.all(torch.isfinite(x))
            assert torch.all(torch.isfinite(log_det))


def test_trained_samples_repeat_with_seed(trained) -> None:
    model = trained.model.eval()
    condition = one_hot(torch.arange(10) % CLASSES)
    beats = []
    for _ in range(2):
        z = model.sample_latent(10, 1.0, 3.0, torch.Generator().manual_seed(3))
        with torch.no_grad():
            beats.append(model.inverse(z, condition)[0])
    assert torch.equal(beats[0], beats[1])


def test_trained_class_changes_beat(trained) -> None:
    model = trained.model.eval()
    z = model.sample_latent(1, 1.0, 3.0, torch.Generator().manual_seed(5)).expand(CLASSES, -1)
    with torch.no_grad():
        x, _ = model.inverse(z, one_hot(torch.arange(CLASSES)))
    assert not torch.allclose(x[0], x[2], atol=1e-3)


def test_activation_default_and_legacy() -> None:
    assert ModelConfig().activation == "relu"
    assert ApplianceConfig.from_dict(ApplianceConfig().to_dict()).model.activation == "relu"
    # Settings saved before the activation setting existed describe GELU models.
    legacy = ApplianceConfig().to_dict()
    del legacy["model"]["activation"]
    assert ApplianceConfig.from_dict(legacy).model.activation == "gelu"


def test_unknown_activation_is_rejected() -> None:
    with pytest.raises(ValueError, match="'tanh' is not supported; use one of relu, gelu"):
        ModelConfig(activation="tanh")


def test_activation_setting_changes_flow() -> None:
    torch.manual_seed(0)
    relu = ConditionalFlow(SMALL, 1, 16, CLASSES).double()
    gelu = ConditionalFlow(replace(SMALL, activation="gelu"), 1, 16, CLASSES).double()
    with torch.no_grad():
        for parameter in relu.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape).double())
    gelu.load_state_dict(relu.state_dict())
    for flow in (relu, gelu):
        for module in flow.modules():
            if isinstance(module, ActNorm):
                module.initialized.fill_(True)
        flow.eval()
    x = torch.randn(4, 1, 16, dtype=torch.float64)
    with torch.no_grad():
        z_relu, _ = relu(x, _condition(4))
        z_gelu, _ = gelu(x, _condition(4))
        x_back, _ = gelu.inverse(z_gelu, _condition(4))
    assert not torch.allclose(z_relu, z_gelu)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
