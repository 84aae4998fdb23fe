"""The generation prior: a Gaussian per class fitted to the latent values of training beats.

The flow's base distribution is a standard normal, but a flow trained for minutes on a CPU maps
the training beats to latent values that are not standard normal: their bottleneck means are
offset and their dimensions correlated. Drawing the bottleneck from the standard normal then
yields beat shapes in the wrong proportions. The prior fitted at export corrects this:

- bottleneck (first ``k`` values): a full-covariance Gaussian per class,
  ``z[:k] = mean_c + temperature * chol_c @ e``;
- tail (the other values): an independent Gaussian per value and class,
  ``z[k:] = tail_mean_c + tail_scale * temperature * tail_std_c * e``;

with ``e`` standard normal truncated at ``truncation``. The moments are shrunk towards the
standard normal with ``SHRINKAGE_BEATS`` pseudo-beats, and a class with fewer than
``MIN_BEATS`` training beats keeps the standard normal, so that no statistic stands for a
handful of beats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Pseudo-beats of the standard normal added to each class's latent moments.
SHRINKAGE_BEATS = 32
# A class with fewer training beats keeps the standard normal prior.
MIN_BEATS = 100
# Training beats per class whose latent values the prior is fitted on, drawn at random.
MAX_FIT_BEATS_PER_CLASS = 5000


@dataclass(frozen=True)
class LatentPrior:
    """Per-class Gaussian prior of the latent values, for every AAMI class index.

    Attributes:
        mean: Bottleneck means, shape (classes, bottleneck_dims).
        chol: Lower Cholesky factors of the bottleneck covariances, shape
            (classes, bottleneck_dims, bottleneck_dims).
        tail_mean: Means of the other latent values, shape (classes, latent_dims -
            bottleneck_dims).
        tail_std: Standard deviations of the other latent values, same shape as ``tail_mean``.
        beats: Training beats each class was fitted on, shape (classes,); 0 where the class
            keeps the standard normal.
    """

    mean: np.ndarray
    chol: np.ndarray
    tail_mean: np.ndarray
    tail_std: np.ndarray
    beats: np.ndarray

    @property
    def bottleneck_dims(self) -> int:
        """Number of bottleneck values."""
        return int(self.mean.shape[1])

    @classmethod
    def standard(cls, classes: int, bottleneck_dims: int, latent_dims: int) -> LatentPrior:
        """Return the standard normal prior of every class."""
        tail = latent_dims - bottleneck_dims
        return cls(
            mean=np.zeros((classes, bottleneck_dims)),
            chol=np.tile(np.eye(bottleneck_dims), (classes, 1, 1)),
            tail_mean=np.zeros((classes, tail)),
            tail_std=np.ones((classes, tail)),
            beats=np.zeros(classes, dtype=np.int64),
        )

    @classmethod
    def fit(
        cls, z: np.ndarray, labels: np.ndarray, classes: int, bottleneck_dims: int
    ) -> LatentPrior:
        """Fit the prior to latent values of training beats.

        Arguments:
            z: Latent values, shape (beats, latent_dims); must be finite.
            labels: Class index of each beat, shape (beats,), in ``0..classes-1``.
            classes: Number of class indices.
            bottleneck_dims: Leading latent values that form the bottleneck.

        Returns:
            The fitted prior; classes with fewer than ``MIN_BEATS`` beats keep the standard
            normal.

        Raises:
            ValueError: If ``z`` contains a value that is not finite, or the latent values of a
                class are so large that its moments overflow or its covariance is not
                positive definite in floating point.
        """
        if not np.isfinite(z).all():
            raise ValueError(
                "latent values of the training beats are not all finite; the model is not "
                "fit to export, retrain it"
            )
        prior = cls.standard(classes, bottleneck_dims, z.shape[1])
        values = z.astype(np.float64)
        k = bottleneck_dims
        for class_index in range(classes):
            members = values[labels == class_index]
            n = members.shape[0]
            if n < MIN_BEATS:
                continue
            weight = n / (n + SHRINKAGE_BEATS)
            head, tail = members[:, :k], members[:, k:]
            # Finite latent values beyond about 1e154 overflow the second moments. The check
            # below turns that into an error instead of a prior that draws NaN.
            with np.errstate(over="ignore", invalid="ignore"):
                mean = head.mean(axis=0)
                second = (head.T @ head) / n
                # Shrink the mean and the second moment towards those of the standard normal
                # (0 and the identity), then centre; the result stays positive definite.
                mean_shrunk = weight * mean
                second_shrunk = weight * second + (1 - weight) * np.eye(k)
                covariance = second_shrunk - np.outer(mean_shrunk, mean_shrunk)
                tail_mean = weight * tail.mean(axis=0)
                tail_second = weight * (tail**2).mean(axis=0) + (1 - weight)
                tail_variance = tail_second - tail_mean**2
            magnitude = float(np.abs(members).max())
            if not (np.isfinite(covariance).all() and np.isfinite(tail_variance).all()):
                raise ValueError(
                    f"the latent moments of class {class_index} ({n} beats) overflow float64 "
                    f"because the largest latent magnitude is {magnitude:.3g}. The model is "
                    "not fit to export, so retrain it"
                )
            try:
                chol = np.linalg.cholesky(covariance)
            except np.linalg.LinAlgError as exc:
                # The shrinkage keeps every eigenvalue at or above 1 - weight. Rounding errors,
                # roughly 1e-16 times the squared latent magnitude, exceed that only for
                # latent values near 1e7 or beyond.
                raise ValueError(
                    f"the latent covariance of class {class_index} ({n} beats) is not positive "
                    "definite in floating point because the largest latent magnitude is "
                    f"{magnitude:.3g}. The model is not fit to export, so retrain it"
                ) from exc
            prior.mean[class_index] = mean_shrunk
            prior.chol[class_index] = chol
            prior.tail_mean[class_index] = tail_mean
            prior.tail_std[class_index] = np.sqrt(np.maximum(tail_variance, 0.0))
            prior.beats[class_index] = n
        return prior

    def sample(
        self,
        rng: np.random.Generator,
        count: int,
        class_index: int,
        temperature: float,
        truncation: float,
        tail_scale: float,
    ) -> np.ndarray:
        """Draw latent values of one class: truncated standard normal values mapped by ``draw``.

        With ``tail_scale`` 0 only the bottleneck's standard normal values are drawn. The
        generator is then consumed as it was before the fitted prior existed, so a model
        exported without a prior gives the same latent values for a seed as it did then.

        Arguments:
            rng: Random source; the same state gives the same values.
            count: Number of draws.
            class_index: Class of every draw.
            temperature: Multiplier of the spread around the class mean.
            truncation: Bound of each standard normal value's magnitude, > 0.
            tail_scale: Multiplier of the tail's spread; 0 puts the tail at its mean.

        Returns:
            Latent values, shape (count, latent_dims), float32.
        """
        latent_dims = self.bottleneck_dims + int(self.tail_mean.shape[1])
        drawn_dims = latent_dims if tail_scale != 0 else self.bottleneck_dims
        e = np.zeros((count, latent_dims))
        e[:, :drawn_dims] = truncated_standard_normal(rng, (count, drawn_dims), truncation)
        return self.draw(e, class_index, temperature, tail_scale)

    def draw(
        self,
        e: np.ndarray,
        class_index: int,
        temperature: float,
        tail_scale: float,
    ) -> np.ndarray:
        """Map standard normal values to latent values of one class.

        Arguments:
            e: Standard normal values (truncated by the caller), shape (count, latent_dims).
            class_index: Class of every draw.
            temperature: Multiplier of the spread around the class mean.
            tail_scale: Multiplier of the tail's spread; 0 puts the tail at its mean.

        Returns:
            Latent values, shape (count, latent_dims), float32.
        """
        k = self.bottleneck_dims
        head = self.mean[class_index] + temperature * e[:, :k] @ self.chol[class_index].T
        spread = tail_scale * temperature * self.tail_std[class_index]
        tail = self.tail_mean[class_index] + spread * e[:, k:]
        return np.concatenate([head, tail], axis=1).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the prior as named arrays for ``numpy.savez``."""
        return {
            "mean": self.mean,
            "chol": self.chol,
            "tail_mean": self.tail_mean,
            "tail_std": self.tail_std,
            "beats": self.beats,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LatentPrior:
        """Rebuild a prior from ``to_arrays`` output."""
        return cls(
            mean=arrays["mean"],
            chol=arrays["chol"],
            tail_mean=arrays["tail_mean"],
            tail_std=arrays["tail_std"],
            beats=arrays["beats"],
        )


def truncated_standard_normal(
    rng: np.random.Generator, shape: tuple[int, int], truncation: float
) -> np.ndarray:
    """Draw standard normal values, each redrawn until its magnitude is at most ``truncation``."""
    values = rng.standard_normal(shape)
    outside = np.abs(values) > truncation
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > truncation
    return values
