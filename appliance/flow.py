"""The class-conditional multi-scale flow and its latent bottleneck."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from appliance.blocks import FlowStep, Squeeze
from appliance.config import ModelConfig


class ConditionalFlow(nn.Module):
    """Multi-scale conditional normalizing flow over beat windows (Dinh et al., RealNVP, 2017).

    Each level squeezes time by 2, applies ``steps_per_level`` flow steps and, except at the
    last level, factors out half of its channels as latent values. The latent vector is ordered
    coarsest level first, so its leading ``bottleneck_dims`` values carry the slow, large-scale
    shape of a beat; generation samples only those and sets the rest to zero.

    Arguments:
        config: Architecture settings.
        leads: Leads per window.
        window_samples: Samples per window; divisible by ``2 ** n_levels``.
        classes: Number of beat classes of the one-hot condition.
    """

    def __init__(self, config: ModelConfig, leads: int, window_samples: int, classes: int) -> None:
        super().__init__()
        if window_samples % (2**config.n_levels):
            raise ValueError(
                f"window_samples={window_samples} must be divisible by 2**n_levels="
                f"{2**config.n_levels}; change --window-samples or --levels"
            )
        self.leads = leads
        self.window_samples = window_samples
        self.classes = classes
        self.latent_dims = leads * window_samples
        if not 0 < config.bottleneck_dims <= self.latent_dims:
            raise ValueError(
                f"bottleneck_dims={config.bottleneck_dims} must be in 1..{self.latent_dims}"
            )
        self.bottleneck_dims = config.bottleneck_dims
        self.squeeze = Squeeze()
        self.levels = nn.ModuleList()
        # Shapes (channels, samples) of each factored-out part, finest first, then the last level.
        self.latent_shapes: list[tuple[int, int]] = []
        channels, samples = leads, window_samples
        for level in range(config.n_levels):
            channels, samples = channels * 2, samples // 2
            steps = nn.ModuleList(
                FlowStep(
                    channels,
                    classes,
                    config.hidden_channels,
                    config.kernel_size,
                    i % 2 == 1,
                    config.activation,
                )
                for i in range(config.steps_per_level)
            )
            self.levels.append(steps)
            if level < config.n_levels - 1:
                self.latent_shapes.append((channels // 2, samples))
                channels = channels - channels // 2
        self.latent_shapes.append((channels, samples))

    def _steps(self, level: int) -> list[FlowStep]:
        """Return the flow steps of one level, in forward order."""
        return [cast(FlowStep, step) for step in cast(nn.ModuleList, self.levels[level])]

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map beats to latent values.

        Arguments:
            x: Scaled beats, shape (batch, leads, window_samples).
            condition: One-hot classes, shape (batch, classes).

        Returns:
            ``z`` of shape (batch, latent_dims), coarsest level first, and ``log|det dz/dx|``
            of shape (batch,).
        """
        log_det = x.new_zeros(x.shape[0])
        factored: list[torch.Tensor] = []
        h = x
        for index in range(len(self.levels)):
            h, _ = self.squeeze(h)
            for step in self._steps(index):
                h, step_log_det = step(h, condition)
                log_det = log_det + step_log_det
            if index < len(self.levels) - 1:
                split = h.shape[1] // 2
                factored.append(h[:, :split])
                h = h[:, split:]
        parts = [h.flatten(1)] + [part.flatten(1) for part in reversed(factored)]
        return torch.cat(parts, dim=1), log_det

    def inverse(
        self, z: torch.Tensor, condition: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map latent values to beats.

        Arguments:
            z: Latent values, shape (batch, latent_dims), coarsest level first.
            condition: One-hot classes, shape (batch, classes).

        Returns:
            Scaled beats of shape (batch, leads, window_samples) and ``log|det dx/dz|`` of
            shape (batch,).
        """
        batch = z.shape[0]
        sizes = [c * s for c, s in reversed(self.latent_shapes)]
        chunks = list(torch.split(z, sizes, dim=1))
        final_channels, final_samples = self.latent_shapes[-1]
        h = chunks[0].reshape(batch, final_channels, final_samples)
        factored = chunks[1:][::-1]  # finest first, as in forward
        log_det = z.new_zeros(batch)
        for index in reversed(range(len(self.levels))):
            if index < len(self.levels) - 1:
                channels, samples = self.latent_shapes[index]
                h = torch.cat([factored[index].reshape(batch, channels, samples), h], dim=1)
            for step in reversed(self._steps(index)):
                h, step_log_det = step.inverse(h, condition)
                log_det = log_det + step_log_det
            h, _ = self.squeeze.inverse(h)
        return h, log_det

    def log_prob(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Return ``log p(x | class)`` in nats under a standard normal base, shape (batch,)."""
        z, log_det = self(x, condition)
        return standard_normal_log_prob(z) + log_det

    def truncate(self, z: torch.Tensor) -> torch.Tensor:
        """Zero every latent value after the bottleneck, shape kept."""
        mask = torch.zeros_like(z)
        mask[:, : self.bottleneck_dims] = 1.0
        return z * mask

    def sample_latent(
        self,
        batch: int,
        temperature: float,
        truncation: float,
        generator: torch.Generator | None = None,
        tail_scale: float = 0.0,
    ) -> torch.Tensor:
        """Draw latent values for generation under the standard normal prior.

        The served engine draws from the prior fitted at export instead (``Engine.draw_latent``).

        Each bottleneck value is ``temperature * e`` and each later value
        ``tail_scale * temperature * e``, with ``e`` standard normal redrawn until
        ``|e| <= truncation``. With ``tail_scale`` 0 only the bottleneck is random.

        Arguments:
            batch: Number of draws.
            temperature: Standard deviation multiplier, > 0.
            truncation: Bound of ``|e|`` in standard deviations, > 0.
            generator: Random source; the same seed gives the same draws.
            tail_scale: Standard deviation of the values after the bottleneck relative to
                ``temperature``, >= 0.

        Returns:
            Latent values, shape (batch, latent_dims).
        """
        if temperature <= 0 or truncation <= 0 or tail_scale < 0:
            raise ValueError(
                f"temperature={temperature} and truncation={truncation} must both be > 0 and "
                f"tail_scale={tail_scale} must be >= 0"
            )
        dtype = next(self.parameters()).dtype
        drawn_dims = self.latent_dims if tail_scale > 0 else self.bottleneck_dims
        e = torch.randn(batch, drawn_dims, generator=generator, dtype=dtype)
        outside = e.abs() > truncation
        while bool(outside.any()):
            e[outside] = torch.randn(int(outside.sum()), generator=generator, dtype=dtype)
            outside = e.abs() > truncation
        z = torch.zeros(batch, self.latent_dims, dtype=dtype)
        z[:, : self.bottleneck_dims] = temperature * e[:, : self.bottleneck_dims]
        if drawn_dims > self.bottleneck_dims:
            z[:, self.bottleneck_dims :] = tail_scale * temperature * e[:, self.bottleneck_dims :]
        return z

    def freeze_inverse(self) -> None:
        """Precompute the inverse channel-mixing matrices, for export."""
        for module in self.modules():
            freeze = getattr(module, "freeze_inverse", None)
            if freeze is not None and module is not self:
                freeze()


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Return the log-density of a standard normal summed over dimensions, shape (batch,)."""
    return -0.5 * (z**2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def bits_per_dim(log_prob: torch.Tensor, dims: int) -> torch.Tensor:
    """Convert a log-likelihood in nats to a negative log-likelihood in bits per dimension."""
    return -log_prob / (dims * math.log(2.0))
