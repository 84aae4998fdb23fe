"""Invertible blocks of the flow.

Contract of every block, for inputs of shape (batch, channels, samples):

- ``forward(x, condition)`` returns ``(y, log_det)`` with ``log_det = log|det dy/dx|`` per beat,
  shape (batch,).
- ``inverse(y, condition)`` returns ``(x, log_det)`` with ``log_det = log|det dx/dy|``, which is
  minus the forward value at the same point.
- ``condition`` is a one-hot class tensor of shape (batch, classes); blocks that do not use it
  ignore it.
- A freshly built block computes the identity (ActNorm after its data-dependent
  initialisation makes the first batch zero-mean and unit-variance instead).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Bound of the coupling log-scale: s = SCALE_CLAMP * tanh(s_raw / SCALE_CLAMP), so each affine
# coupling scales a value by at most exp(2) in either direction.
SCALE_CLAMP = 2.0
# Channels of the fixed position encoding fed to every coupling subnetwork. Convolutions are
# translation-equivariant, so without it the flow could not tell a beat from a shifted or
# time-reversed one; beats are aligned on the R peak, so position carries information.
POSITION_CHANNELS = 3
# ActNorm's initial scale is 1 / max(std, ACTNORM_MIN_STD), so constant channels stay finite.
ACTNORM_MIN_STD = 1e-3


class InvertibleBlock(nn.Module):
    """Base class of the blocks; see the module docstring for the contract."""

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(
        self, y: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class ActNorm(InvertibleBlock):
    """Per-channel affine normalisation, ``y = (x + b) * exp(s)``, log-det ``samples * sum(s)``.

    The first forward call in training mode sets ``b`` and ``s`` so that the batch has zero mean
    and unit variance per channel (Kingma and Dhariwal, Glow, 2018).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1))
        self.initialized: torch.Tensor
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2), keepdim=True)
        std = x.std(dim=(0, 2), keepdim=True, unbiased=False)
        std = torch.nan_to_num(std, nan=1.0).clamp_min(ACTNORM_MIN_STD)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std))
        self.initialized.fill_(True)

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        log_det = self.log_scale.sum() * x.shape[2]
        return y, log_det.expand(x.shape[0])

    def inverse(
        self, y: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = y * torch.exp(-self.log_scale) - self.bias
        log_det = -self.log_scale.sum() * y.shape[2]
        return x, log_det.expand(y.shape[0])


class InvertibleConv1x1(InvertibleBlock):
    """Learned channel mixing ``y[:, :, t] = W x[:, :, t]`` with ``W = L (U + diag(sign e^s))``.

    The LU parameterisation makes ``log|det W| = sum(s)``; the log-det of the block is
    ``samples * sum(s)``. ``W`` starts at the identity. ``freeze_inverse`` stores ``W^-1`` as a
    constant so that the exported inverse graph needs no matrix inversion operator.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.lower = nn.Parameter(torch.zeros(channels, channels))
        self.upper = nn.Parameter(torch.zeros(channels, channels))
        self.log_diagonal = nn.Parameter(torch.zeros(channels))
        self.sign: torch.Tensor
        self.lower_mask: torch.Tensor
        self.eye: torch.Tensor
        self.register_buffer("sign", torch.ones(channels))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        # Non-persistent buffer, so that ``.to()`` and ``.double()`` convert it with the weights
        # but checkpoints do not store it.
        self.frozen_inverse: torch.Tensor | None
        self.register_buffer("frozen_inverse", None, persistent=False)

    def weight(self) -> torch.Tensor:
        """Return ``W``, shape (channels, channels)."""
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(
            self.sign * torch.exp(self.log_diagonal)
        )
        return lower @ upper

    def freeze_inverse(self) -> None:
        """Store ``W^-1`` computed in float64, for export.

        The stored matrix goes stale if the weights change afterwards; call this again then.
        """
        with torch.no_grad():
            self.frozen_inverse = torch.linalg.inv(self.weight().double()).to(self.lower.dtype)

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.einsum("ij,bjt->bit", self.weight(), x)
        log_det = self.log_diagonal.sum() * x.shape[2]
        return y, log_det.expand(x.shape[0])

    def inverse(
        self, y: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen_inverse is not None:
            weight_inverse = self.frozen_inverse
        else:
            weight_inverse = torch.linalg.inv(self.weight().double()).to(y.dtype)
        x = torch.einsum("ij,bjt->bit", weight_inverse, y)
        log_det = -self.log_diagonal.sum() * y.shape[2]
        return x, log_det.expand(y.shape[0])


class AffineCoupling(InvertibleBlock):
    """Class-conditional affine coupling (Dinh et al., RealNVP, 2017).

    With ``x = (x_a, x_b)`` split along channels (swapped when ``swap`` is set), ``c`` the
    one-hot class and ``p`` the fixed position encoding::

        s, t = net([x_a, p, c])            s soft-clamped to (-SCALE_CLAMP, SCALE_CLAMP)
        y_a = x_a
        y_b = x_b * exp(s) + t          log-det = sum(s)

    The inverse is closed form: ``x_b = (y_b - t) * exp(-s)``. The last convolution of ``net``
    starts at zero, so the block starts at the identity.
    """

    def __init__(
        self,
        channels: int,
        classes: int,
        hidden_channels: int,
        kernel_size: int,
        swap: bool,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"affine coupling needs at least 2 channels, got {channels}")
        self.swap = swap
        self.channels_a = channels // 2 if not swap else channels - channels // 2
        self.channels_b = channels - self.channels_a
        padding = kernel_size // 2
        net = nn.Sequential(
            nn.Conv1d(
                self.channels_a + classes + POSITION_CHANNELS,
                hidden_channels,
                kernel_size,
                padding=padding,
            ),
            activation_layer(activation),
            nn.Conv1d(hidden_channels, hidden_channels, 1),
            activation_layer(activation),
            nn.Conv1d(hidden_channels, 2 * self.channels_b, kernel_size, padding=padding),
        )
        last = net[-1]
        assert isinstance(last, nn.Conv1d)
        nn.init.zeros_(last.weight)
        assert last.bias is not None
        nn.init.zeros_(last.bias)
        # Typed as any module: the export's graph form puts an equal planar network here.
        self.net: nn.Module = net

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.swap:
            x_b, x_a = x[:, : self.channels_b], x[:, self.channels_b :]
        else:
            x_a, x_b = x[:, : self.channels_a], x[:, self.channels_a :]
        return x_a, x_b

    def _join(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        return torch.cat([x_b, x_a] if self.swap else [x_a, x_b], dim=1)

    def _scale_shift(
        self, x_a: torch.Tensor, condition: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [x_a, position_encoding(x_a)]
        if condition is not None:
            parts.append(condition[:, :, None].expand(-1, -1, x_a.shape[2]).to(x_a.dtype))
        inputs = torch.cat(parts, dim=1)
        s_raw, t = run_subnetwork(self.net, inputs).chunk(2, dim=1)
        s = SCALE_CLAMP * torch.tanh(s_raw / SCALE_CLAMP)
        return s, t

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = self._split(x)
        s, t = self._scale_shift(x_a, condition)
        y_b = x_b * torch.exp(s) + t
        return self._join(x_a, y_b), s.sum(dim=(1, 2))

    def inverse(
        self, y: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y_a, y_b = self._split(y)
        s, t = self._scale_shift(y_a, condition)
        x_b = (y_b - t) * torch.exp(-s)
        return self._join(y_a, x_b), -s.sum(dim=(1, 2))


def run_subnetwork(net: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Apply a coupling subnetwork to ``inputs`` of shape (batch, channels, samples).

    A subnetwork as built, an ``nn.Sequential`` of stride-1 ``nn.Conv1d`` layers and
    nonlinearities, runs as 2-D convolutions of kernel height 1 on tensors of shape (batch,
    channels, 1, samples) in the channels-last memory layout. The function and the parameters
    are those of the 1-D layers. With PyTorch 2.13 on an x86 CPU with AVX-512, a training step
    ran about 1.3 times faster this way (docs/model.md, section Training). Any other module,
    such as the planar form that export substitutes, is called as it is.

    Returns:
        The subnetwork's output, shape (batch, out_channels, samples).
    """
    if not isinstance(net, nn.Sequential):
        output: torch.Tensor = net(inputs)
        return output
    hidden = inputs[:, :, None, :].contiguous(memory_format=torch.channels_last)
    for layer in net:
        if isinstance(layer, nn.Conv1d):
            padding = layer.padding
            assert isinstance(padding, tuple) and layer.stride == (1,)
            hidden = nn.functional.conv2d(
                hidden, layer.weight[:, :, None, :], layer.bias, padding=(0, padding[0])
            )
        else:
            hidden = layer(hidden)
    return hidden[:, :, 0, :]


def activation_layer(name: str) -> nn.Module:
    """Return the nonlinearity named ``name``: ``"relu"`` or ``"gelu"`` (exact, erf-based)."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation {name!r} is not supported; use relu or gelu")


def position_encoding(x: torch.Tensor) -> torch.Tensor:
    """Return a ramp and one sine-cosine period over the window, shape (batch, 3, samples)."""
    samples = x.shape[2]
    t = torch.arange(samples, dtype=x.dtype, device=x.device) / samples
    channels = torch.stack([2.0 * t - 1.0, torch.sin(2 * math.pi * t), torch.cos(2 * math.pi * t)])
    return channels[None].expand(x.shape[0], -1, -1)


class Squeeze(InvertibleBlock):
    """Fold pairs of neighbouring samples into channels: (B, C, L) -> (B, 2C, L/2), log-det 0."""

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels, samples = x.shape
        if samples % 2:
            raise ValueError(f"squeeze needs an even number of samples, got {samples}")
        y = x.reshape(batch, channels, samples // 2, 2).permute(0, 1, 3, 2)
        y = y.reshape(batch, channels * 2, samples // 2)
        return y, x.new_zeros(batch)

    def inverse(
        self, y: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels, samples = y.shape
        x = y.reshape(batch, channels // 2, 2, samples).permute(0, 1, 3, 2)
        x = x.reshape(batch, channels // 2, samples * 2)
        return x, y.new_zeros(batch)


class FlowStep(InvertibleBlock):
    """One step of the flow: ActNorm, then the 1x1 convolution, then an affine coupling."""

    def __init__(
        self,
        channels: int,
        classes: int,
        hidden_channels: int,
        kernel_size: int,
        swap: bool,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                ActNorm(channels),
                InvertibleConv1x1(channels),
                AffineCoupling(channels, classes, hidden_channels, kernel_size, swap, activation),
            ]
        )

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, block_log_det = block(x, condition)
            log_det = log_det + block_log_det
        return x, log_det

    def inverse(
        self, y: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = y.new_zeros(y.shape[0])
        for block in reversed(self.blocks):
            assert isinstance(block, InvertibleBlock)
            y, block_log_det = block.inverse(y, condition)
            log_det = log_det + block_log_det
        return y, log_det
