"""Baseline generators scored by the same code as the appliance, and the appliance's adapter.

- ``PcaGaussian``: per class, a Gaussian over the leading principal components of that class's
  z-normalised training beats.
- ``RealNvpBaseline``: one class-conditional RealNVP (``zuko.flows.RealNVP``) over the leading
  principal components of all training beats, whitened. A flow on the raw z-normalised beat
  would fit a near-singular distribution (each beat has mean 0 and variance 1 by construction),
  so the flow works in the principal subspace.
- ``ApplianceGenerator``: the served model through ``appliance.engine.Engine.generate``, gate
  and privacy guard included.

Every generator returns z-normalised beats.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from appliance.classes import AAMI_CLASSES
from appliance.engine import Engine
from appliance.quality.protocol import LabelledBeats, znormalise

logger = logging.getLogger(__name__)

PCA_DIMS = 32
# The RealNVP baseline measures its NLL on a fixed sample of its training beats this often and
# keeps the weights of the lowest, so that one late loss spike does not decide its figures.
REALNVP_MONITOR_EVERY_STEPS = 100
REALNVP_MONITOR_BEATS = 1024
# A last monitored NLL this many nats above the best is logged as a diverged training run.
REALNVP_DIVERGED_NATS = 1.0
_EIGEN_FLOOR = 1e-8


def _principal_axes(flat: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the mean (d,), the leading axes (k, d) and their variances (k,) of rows (n, d)."""
    mean = flat.mean(axis=0)
    _, singular, axes = np.linalg.svd(flat - mean, full_matrices=False)
    k = min(dims, axes.shape[0])
    variances = singular[:k] ** 2 / max(flat.shape[0] - 1, 1)
    return mean, axes[:k], variances


class PcaGaussian:
    """Per-class Gaussian in the space of the class's leading principal components.

    Arguments:
        train: Generator training beats, z-normalised.
        dims: Principal components kept per class.
    """

    name = "pca_gaussian"

    def __init__(self, train: LabelledBeats, dims: int = PCA_DIMS) -> None:
        self.shape = train.beats.shape[1:]
        self.models: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for class_index in np.unique(train.labels):
            flat = train.of_class(int(class_index)).reshape(-1, int(np.prod(self.shape)))
            if flat.shape[0] >= 2:
                self.models[int(class_index)] = _principal_axes(flat.astype(np.float64), dims)

    def sample(self, counts: dict[int, int], seed: int) -> LabelledBeats:
        """Draw ``counts[c]`` beats of each class seen in training; other classes give none."""
        rng = np.random.default_rng(seed)
        beats, labels = [], []
        for class_index, count in sorted(counts.items()):
            if class_index not in self.models or count <= 0:
                continue
            mean, axes, variances = self.models[class_index]
            coefficients = rng.standard_normal((count, variances.size)) * np.sqrt(variances)
            beats.append((mean + coefficients @ axes).reshape(count, *self.shape))
            labels.append(np.full(count, class_index, dtype=np.int64))
        return _labelled(beats, labels, self.shape)


@dataclass(frozen=True)
class RealNvpConfig:
    """Size and training budget of the RealNVP baseline.

    Attributes:
        dims: Principal components the flow models.
        transforms: Coupling transforms.
        hidden_features: Width of each coupling network's two hidden layers.
        steps: Optimiser steps.
        batch_size: Beats per step, drawn class-balanced.
        learning_rate: Adam learning rate.
    """

    dims: int = PCA_DIMS
    transforms: int = 6
    hidden_features: int = 128
    steps: int = 2000
    batch_size: int = 256
    learning_rate: float = 1e-3


class RealNvpBaseline:
    """Class-conditional RealNVP from zuko in a whitened principal subspace.

    Arguments:
        train: Generator training beats, z-normalised.
        config: Size and training budget.
        seed: Seed of the weights and batch draws.
    """

    name = "realnvp"

    def __init__(
        self, train: LabelledBeats, config: RealNvpConfig | None = None, seed: int = 0
    ) -> None:
        import zuko  # imported here: only this baseline needs it

        settings = config or RealNvpConfig()
        self.shape = train.beats.shape[1:]
        flat = train.beats.reshape(len(train), -1).astype(np.float64)
        self.mean, self.axes, variances = _principal_axes(flat, settings.dims)
        self.std = np.sqrt(np.maximum(variances, _EIGEN_FLOOR))
        codes = ((flat - self.mean) @ self.axes.T) / self.std  # (n, dims), whitened
        self.classes_known = sorted(int(c) for c in np.unique(train.labels))
        torch.manual_seed(seed)
        self.flow = zuko.flows.RealNVP(
            features=codes.shape[1],
            context=len(AAMI_CLASSES),
            transforms=settings.transforms,
            hidden_features=(settings.hidden_features, settings.hidden_features),
        )
        x_all = torch.from_numpy(codes.astype(np.float32))
        context_all = torch.eye(len(AAMI_CLASSES))[torch.from_numpy(train.labels)]
        by_class = [np.flatnonzero(train.labels == c) for c in self.classes_known]
        rng = np.random.default_rng(seed)
        # A stream of its own, so the batch draws are those of a run without the monitor.
        monitor_rng = np.random.default_rng([seed, 1])
        monitor = torch.from_numpy(
            np.sort(
                monitor_rng.choice(
                    len(train), min(REALNVP_MONITOR_BEATS, len(train)), replace=False
                )
            )
        )
        optimiser = torch.optim.Adam(self.flow.parameters(), lr=settings.learning_rate)
        best_nll, best_step, final_nll = math.inf, 0, math.inf
        best_state = copy.deepcopy(self.flow.state_dict())
        skipped_steps = 0
        for step in range(settings.steps):
            chosen = rng.integers(0, len(by_class), size=settings.batch_size)
            index = torch.from_numpy(
                np.array([by_class[c][rng.integers(by_class[c].size)] for c in chosen])
            )
            loss = -self.flow(context_all[index]).log_prob(x_all[index]).mean()
            if torch.isfinite(loss):
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            else:
                skipped_steps += 1
            if step % 500 == 0:
                logger.info("realnvp step=%d nll_nats=%.3f", step, float(loss.detach()))
            # Monitored after skipped steps too, so final_nll is always that of the last weights.
            if (step + 1) % REALNVP_MONITOR_EVERY_STEPS == 0 or step + 1 == settings.steps:
                with torch.no_grad():
                    nll = -self.flow(context_all[monitor]).log_prob(x_all[monitor]).mean()
                final_nll = float(nll) if torch.isfinite(nll) else math.inf
                if final_nll < best_nll:
                    best_nll, best_step = final_nll, step + 1
                    best_state = copy.deepcopy(self.flow.state_dict())
        self.flow.load_state_dict(best_state)
        self.flow.eval()
        self.best_step = best_step
        self.monitor_nll_nats = best_nll
        diverged = not final_nll < best_nll + REALNVP_DIVERGED_NATS
        outcome = ""
        if best_step == 0:
            outcome = "; no monitored NLL was finite, so the untrained weights are kept"
        elif diverged:
            outcome = "; training diverged after the kept step"
        log = logger.warning if diverged or skipped_steps else logger.info
        log(
            "realnvp baseline keeps step=%d of steps=%d monitored_nll_nats=%.3f "
            "final_nll_nats=%.3f skipped_non_finite_steps=%d%s",
            best_step,
            settings.steps,
            best_nll,
            final_nll,
            skipped_steps,
            outcome,
        )

    @torch.no_grad()
    def sample(self, counts: dict[int, int], seed: int) -> LabelledBeats:
        """Draw ``counts[c]`` beats of each class seen in training; other classes give none."""
        torch.manual_seed(seed)
        beats, labels = [], []
        for class_index, count in sorted(counts.items()):
            if class_index not in self.classes_known or count <= 0:
                continue
            context = torch.eye(len(AAMI_CLASSES))[class_index]
            codes = self.flow(context).sample((count,)).numpy().astype(np.float64)
            flat = self.mean + (codes * self.std) @ self.axes
            beats.append(flat.reshape(count, *self.shape))
            labels.append(np.full(count, class_index, dtype=np.int64))
        return _labelled(beats, labels, self.shape)


class ApplianceGenerator:
    """The served model's ``Generate`` path: latent draws, pertinence gate and privacy guard.

    Arguments:
        engine: Engine on a published model version.
        temperature: Multiplier of the latent standard deviation.
        margin: Lowest accepted pertinence score; ``None`` uses the model's default.
        max_draws_per_beat: Draw budget per requested beat.
    """

    name = "appliance"

    def __init__(
        self,
        engine: Engine,
        temperature: float = 1.0,
        margin: float | None = None,
        max_draws_per_beat: int = 20,
    ) -> None:
        self.engine = engine
        self.temperature = temperature
        self.margin = engine.default_margin if margin is None else margin
        self.max_draws_per_beat = max_draws_per_beat
        # Pertinence scores of every beat returned so far, for the report's histograms.
        self.scores: list[np.ndarray] = []

    def sample(self, counts: dict[int, int], seed: int) -> LabelledBeats:
        """Generate beats of the classes the model knows; a short class is logged, not padded."""
        known = {c: n for c, n in counts.items() if c in self.engine.classes_known and n > 0}
        result = self.engine.generate(
            known, self.temperature, self.margin, seed, self.max_draws_per_beat
        )
        if result.budget_exhausted:
            logger.warning(
                "appliance generation budget exhausted requested=%s got=%s draws=%s",
                known,
                np.bincount(result.classes, minlength=len(AAMI_CLASSES)),
                result.per_class_draws,
            )
        self.scores.append(result.scores)
        beats_mv = result.beats * self.engine.scale_mv
        return LabelledBeats(znormalise(beats_mv), result.classes.astype(np.int64))


class CopyGenerator:
    """Returns training beats themselves, drawn with replacement: the worst case for privacy.

    Arguments:
        train: Beats to copy, z-normalised.
    """

    name = "copies"

    def __init__(self, train: LabelledBeats) -> None:
        self.train = train

    def sample(self, counts: dict[int, int], seed: int) -> LabelledBeats:
        """Return ``counts[c]`` copies of random training beats of class ``c``."""
        rng = np.random.default_rng(seed)
        beats, labels = [], []
        for class_index, count in sorted(counts.items()):
            index = np.flatnonzero(self.train.labels == class_index)
            if index.size == 0 or count <= 0:
                continue
            beats.append(self.train.beats[rng.choice(index, size=count)])
            labels.append(np.full(count, class_index, dtype=np.int64))
        return _labelled(beats, labels, self.train.beats.shape[1:])


class NoiseGenerator:
    """Returns white Gaussian noise labelled with the requested classes: the worst fidelity.

    Arguments:
        shape: Shape of one beat, (leads, samples).
    """

    name = "noise"

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def sample(self, counts: dict[int, int], seed: int) -> LabelledBeats:
        """Return ``counts[c]`` noise beats for each class ``c``."""
        rng = np.random.default_rng(seed)
        beats = [rng.standard_normal((n, *self.shape)) for _, n in sorted(counts.items())]
        labels = [np.full(n, c, dtype=np.int64) for c, n in sorted(counts.items())]
        return _labelled(beats, labels, self.shape)


def _labelled(
    beats: list[np.ndarray], labels: list[np.ndarray], shape: tuple[int, ...]
) -> LabelledBeats:
    if not beats:
        return LabelledBeats(np.zeros((0, *shape), dtype=np.float32), np.zeros(0, dtype=np.int64))
    return LabelledBeats(znormalise(np.concatenate(beats)), np.concatenate(labels))
