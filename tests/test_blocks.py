"""Exactness of every invertible block in float64: round trip, log-det sign, log-det value."""

from __future__ import annotations

import pytest
import torch

from appliance.blocks import (
    POSITION_CHANNELS,
    SCALE_CLAMP,
    ActNorm,
    AffineCoupling,
    FlowStep,
    InvertibleBlock,
    InvertibleConv1x1,
    Squeeze,
    run_subnetwork,
)

CLASSES = 5
CHANNELS = 4
SAMPLES = 8


def _perturb(block: torch.nn.Module, seed: int) -> None:
    """Move every parameter away from the identity start, so the checks see a general block."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator).double())
    for module in block.modules():
        if isinstance(module, ActNorm):
            module.initialized.fill_(True)


def _condition(batch: int, seed: int) -> torch.Tensor:
    labels = torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(labels, CLASSES).double()


def _blocks() -> dict[str, tuple[InvertibleBlock, bool]]:
    """Return each block type with whether it takes the class condition."""
    return {
        "actnorm": (ActNorm(CHANNELS), False),
        "conv1x1": (InvertibleConv1x1(CHANNELS), False),
        "coupling": (AffineCoupling(CHANNELS, CLASSES, 8, 3, swap=False), True),
        "coupling_swap": (AffineCoupling(CHANNELS, CLASSES, 8, 3, swap=True), True),
        "coupling_no_condition": (AffineCoupling(CHANNELS, 0, 8, 3, swap=False), False),
        "coupling_odd_channels_swap": (AffineCoupling(3, CLASSES, 8, 3, swap=True), True),
        "coupling_gelu": (AffineCoupling(CHANNELS, CLASSES, 8, 3, False, "gelu"), True),
        "squeeze": (Squeeze(), False),
        "flow_step": (FlowStep(CHANNELS, CLASSES, 8, 3, swap=False), True),
        "flow_step_swap": (FlowStep(CHANNELS, CLASSES, 8, 3, swap=True), True),
    }


BLOCK_NAMES = list(_blocks())


def _prepared(name: str) -> tuple[InvertibleBlock, int, bool]:
    block, conditioned = _blocks()[name]
    block = block.double()
    _perturb(block, seed=BLOCK_NAMES.index(name))
    block.eval()
    channels = 3 if "odd" in name else CHANNELS
    return block, channels, conditioned


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_block_inverse_restores_input(name: str) -> None:
    block, channels, conditioned = _prepared(name)
    x = torch.randn(6, channels, SAMPLES, dtype=torch.float64)
    condition = _condition(6, 1) if conditioned else None
    y, _ = block(x, condition)
    x_back, _ = block.inverse(y, condition)
    assert y.shape[0] == x.shape[0]
    if y.shape == x.shape:
        assert not torch.allclose(y, x), "the perturbed block should not be the identity"
    assert torch.max(torch.abs(x_back - x)).item() < 1e-10


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_block_log_dets_cancel(name: str) -> None:
    block, channels, conditioned = _prepared(name)
    x = torch.randn(6, channels, SAMPLES, dtype=torch.float64)
    condition = _condition(6, 2) if conditioned else None
    y, forward_log_det = block(x, condition)
    _, inverse_log_det = block.inverse(y, condition)
    assert forward_log_det.shape == (6,)
    assert inverse_log_det.shape == (6,)
    assert torch.max(torch.abs(forward_log_det + inverse_log_det)).item() < 1e-10


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_block_log_det_matches_jacobian(name: str) -> None:
    block, channels, conditioned = _prepared(name)
    x = torch.randn(1, channels, SAMPLES, dtype=torch.float64)
    condition = _condition(1, 3) if conditioned else None

    def flat_forward(values: torch.Tensor) -> torch.Tensor:
        y, _ = block(values.reshape(1, channels, SAMPLES), condition)
        return y.flatten()

    jacobian = torch.autograd.functional.jacobian(flat_forward, x.flatten())
    sign, expected = torch.linalg.slogdet(jacobian)
    _, log_det = block(x, condition)
    assert sign.item() != 0
    assert log_det.item() == pytest.approx(expected.item(), abs=1e-8)

    y, _ = block(x, condition)

    def flat_inverse(values: torch.Tensor) -> torch.Tensor:
        x_back, _ = block.inverse(values.reshape(y.shape), condition)
        return x_back.flatten()

    inverse_jacobian = torch.autograd.functional.jacobian(flat_inverse, y.flatten())
    _, expected_inverse = torch.linalg.slogdet(inverse_jacobian)
    _, inverse_log_det = block.inverse(y, condition)
    assert inverse_log_det.item() == pytest.approx(expected_inverse.item(), abs=1e-8)


@pytest.mark.parametrize("name", ["coupling", "flow_step"])
def test_fresh_block_is_identity(name: str) -> None:
    block, conditioned = _blocks()[name]
    block = block.double().eval()
    for module in block.modules():
        if isinstance(module, ActNorm):
            module.initialized.fill_(True)
    x = torch.randn(3, CHANNELS, SAMPLES, dtype=torch.float64)
    y, log_det = block(x, _condition(3, 4) if conditioned else None)
    assert torch.equal(y, x)
    assert torch.equal(log_det, torch.zeros(3, dtype=torch.float64))


def test_coupling_uses_condition() -> None:
    block, _, _ = _prepared("coupling")
    x = torch.randn(1, CHANNELS, SAMPLES, dtype=torch.float64).expand(CLASSES, -1, -1)
    condition = torch.eye(CLASSES, dtype=torch.float64)
    y, _ = block(x, condition)
    assert not torch.allclose(y[0], y[1])


def test_coupling_scale_is_bounded() -> None:
    block, _, _ = _prepared("coupling")
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.mul_(1e3)
    x = 100 * torch.randn(4, CHANNELS, SAMPLES, dtype=torch.float64)
    y, log_det = block(x, _condition(4, 5))
    x_back, _ = block.inverse(y, _condition(4, 5))
    assert torch.all(torch.isfinite(y))
    assert torch.all(log_det.abs() <= SCALE_CLAMP * (CHANNELS // 2) * SAMPLES)
    assert torch.all(torch.isfinite(x_back))


def test_actnorm_init_with_one_beat() -> None:
    block = ActNorm(CHANNELS)
    x = torch.randn(1, CHANNELS, SAMPLES)
    y, log_det = block(x)
    assert bool(block.initialized)
    for parameter in block.parameters():
        assert torch.all(torch.isfinite(parameter))
    assert torch.all(torch.isfinite(y))
    assert torch.all(torch.isfinite(log_det))
    assert torch.allclose(y.mean(dim=(0, 2)), torch.zeros(CHANNELS), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2), correction=0), torch.ones(CHANNELS), atol=1e-3)


def test_actnorm_init_with_one_sample() -> None:
    block = ActNorm(CHANNELS)
    y, _ = block(torch.randn(1, CHANNELS, 1))
    for parameter in block.parameters():
        assert torch.all(torch.isfinite(parameter))
    assert torch.all(torch.isfinite(y))


def test_actnorm_init_with_constant_positions() -> None:
    x = torch.randn(16, CHANNELS, SAMPLES)
    x[:, :, -3:] = 0.0  # zero-padded tail, the same in every beat
    x[:, 1, :] = 0.25  # one channel constant everywhere
    block = ActNorm(CHANNELS)
    y, log_det = block(x)
    for parameter in block.parameters():
        assert torch.all(torch.isfinite(parameter))
    assert torch.all(torch.isfinite(y))
    assert torch.all(torch.isfinite(log_det))
    x_back, _ = block.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-5)


def test_actnorm_eval_does_not_initialise() -> None:
    block = ActNorm(CHANNELS).eval()
    x = torch.randn(2, CHANNELS, SAMPLES)
    y, _ = block(x)
    assert not bool(block.initialized)
    assert torch.equal(y, x)


def test_frozen_inverse_matches_and_converts() -> None:
    block, _, _ = _prepared("conv1x1")
    y = torch.randn(3, CHANNELS, SAMPLES, dtype=torch.float64)
    expected, _ = block.inverse(y)
    block.freeze_inverse()
    frozen, _ = block.inverse(y)
    assert torch.allclose(frozen, expected, atol=1e-12)
    block.float()
    assert block.frozen_inverse is not None
    assert block.frozen_inverse.dtype == torch.float32
    assert "frozen_inverse" not in block.state_dict()


def test_squeeze_rejects_odd_samples() -> None:
    with pytest.raises(ValueError, match="even number of samples"):
        Squeeze()(torch.zeros(1, 1, 7))


def test_subnetwork_layout_keeps_function_and_gradients() -> None:
    coupling = AffineCoupling(CHANNELS, CLASSES, 16, 5, swap=False).double()
    _perturb(coupling, seed=11)
    net = coupling.net
    assert isinstance(net, torch.nn.Sequential)
    generator = torch.Generator().manual_seed(12)
    in_channels = CHANNELS // 2 + CLASSES + POSITION_CHANNELS
    inputs = torch.randn(3, in_channels, SAMPLES, generator=generator).double()
    expected = net(inputs)
    expected.square().sum().backward()
    expected_grads = [torch.clone(parameter.grad) for parameter in net.parameters()]
    net.zero_grad()
    actual = run_subnetwork(net, inputs)
    actual.square().sum().backward()
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    for parameter, expected_grad in zip(net.parameters(), expected_grads, strict=True):
        torch.testing.assert_close(parameter.grad, expected_grad, rtol=0, atol=1e-10)


def test_subnetwork_layout_calls_other_modules() -> None:
    planar = torch.nn.Identity()
    inputs = torch.randn(2, 3, SAMPLES)
    assert run_subnetwork(planar, inputs) is inputs
