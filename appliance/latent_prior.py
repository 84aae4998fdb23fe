"""The generation prior: a Gaussian mixture per class fitted to latent values of training beats.

The flow's base distribution is a standard normal, but a flow trained for minutes on a CPU maps
the training beats to latent values that are not standard normal: their bottleneck means are
offset, their dimensions correlated, and their distribution heavier-tailed than a Gaussian.
Drawing the bottleneck from the standard normal then yields beat shapes in the wrong
proportions. The prior fitted at export corrects this:

- bottleneck (first ``k`` values): a mixture of full-covariance Gaussians per class; a draw
  picks component ``j`` with its weight, then ``z[:k] = mean_cj + temperature * chol_cj @ e``;
- tail (the other values): an independent Gaussian per value and class,
  ``z[k:] = tail_mean_c + tail_scale * temperature * tail_std_c * e``;

with ``e`` standard normal truncated at ``truncation``. The class moments are shrunk towards
the standard normal with ``SHRINKAGE_BEATS`` pseudo-beats, and a class with fewer than
``MIN_BEATS`` training beats keeps the standard normal, so that no statistic stands for a
handful of beats. A class has one component per ``BEATS_PER_COMPONENT`` beats, at most
``MAX_COMPONENTS``. Expectation-maximisation fits them, and each component's mean and
covariance are shrunk towards the class's with ``COMPONENT_SHRINKAGE_BEATS`` pseudo-beats, so
a component that contains few beats draws like the class as a whole, never like those beats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.vq import kmeans2
from scipy.linalg import solve_triangular
from scipy.special import logsumexp

# Pseudo-beats of the standard normal added to each class's latent moments.
SHRINKAGE_BEATS = 32
# A class with fewer training beats keeps the standard normal prior.
MIN_BEATS = 100
# Training beats per class whose latent values the prior is fitted on, drawn at random.
MAX_FIT_BEATS_PER_CLASS = 5000
# Mixture components of a class's bottleneck: one per this many beats, at most MAX_COMPONENTS.
BEATS_PER_COMPONENT = 60
MAX_COMPONENTS = 3
# Pseudo-beats of the class's moments added to each component's.
COMPONENT_SHRINKAGE_BEATS = 8
# Expectation-maximisation stops after this many iterations, or earlier when the mean
# log-likelihood per beat gains less than MIXTURE_TOLERANCE.
MIXTURE_ITERATIONS = 100
MIXTURE_TOLERANCE = 1e-4
# Expectation-maximisation runs from this many k-means starts, and the fit of highest mean
# log-likelihood is kept, so that one unlucky start does not decide a class's prior.
MIXTURE_STARTS = 4


@dataclass(frozen=True)
class LatentPrior:
    """Per-class prior of the latent values, for every AAMI class index.

    Attributes:
        mean: Bottleneck means of each class as a whole, shape (classes, bottleneck_dims).
        chol: Lower Cholesky factors of each class's bottleneck covariance, shape
            (classes, bottleneck_dims, bottleneck_dims).
        tail_mean: Means of the other latent values, shape (classes, latent_dims -
            bottleneck_dims).
        tail_std: Standard deviations of the other latent values, same shape as ``tail_mean``.
        beats: Training beats each class was fitted on, shape (classes,); 0 where the class
            keeps the standard normal.
        component_weights: Mixture weights, shape (classes, components); each row sums to 1.
            A class whose only positive weight is its first draws from ``mean`` and ``chol``.
        component_mean: Bottleneck means of the components, shape
            (classes, components, bottleneck_dims).
        component_chol: Lower Cholesky factors of the components' covariances, shape
            (classes, components, bottleneck_dims, bottleneck_dims).
    """

    mean: np.ndarray
    chol: np.ndarray
    tail_mean: np.ndarray
    tail_std: np.ndarray
    beats: np.ndarray
    component_weights: np.ndarray
    component_mean: np.ndarray
    component_chol: np.ndarray

    @property
    def bottleneck_dims(self) -> int:
        """Number of bottleneck values."""
        return int(self.mean.shape[1])

    def components(self, class_index: int) -> int:
        """Return the number of mixture components of one class with a positive weight."""
        return int(np.count_nonzero(self.component_weights[class_index] > 0))

    @classmethod
    def standard(
        cls, classes: int, bottleneck_dims: int, latent_dims: int, components: int = 1
    ) -> LatentPrior:
        """Return the standard normal prior of every class, with room for ``components``."""
        tail = latent_dims - bottleneck_dims
        weights = np.zeros((classes, components))
        weights[:, 0] = 1.0
        return cls(
            mean=np.zeros((classes, bottleneck_dims)),
            chol=np.tile(np.eye(bottleneck_dims), (classes, 1, 1)),
            tail_mean=np.zeros((classes, tail)),
            tail_std=np.ones((classes, tail)),
            beats=np.zeros(classes, dtype=np.int64),
            component_weights=weights,
            component_mean=np.zeros((classes, components, bottleneck_dims)),
            component_chol=np.tile(np.eye(bottleneck_dims), (classes, components, 1, 1)),
        )

    @classmethod
    def fit(
        cls,
        z: np.ndarray,
        labels: np.ndarray,
        classes: int,
        bottleneck_dims: int,
        max_components: int = MAX_COMPONENTS,
        seed: int = 0,
    ) -> LatentPrior:
        """Fit the prior to latent values of training beats.

        Arguments:
            z: Latent values, shape (beats, latent_dims); must be finite.
            labels: Class index of each beat, shape (beats,), in ``0..classes-1``.
            classes: Number of class indices.
            bottleneck_dims: Leading latent values that form the bottleneck.
            max_components: Maximum number of mixture components of a class; 1 fits one Gaussian.
            seed: Seed of the mixtures' k-means initialisation; the same latent values and
                seed give the same prior.

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
        if max_components < 1:
            raise ValueError(f"max_components={max_components} is out of range; use 1 or more")
        prior = cls.standard(classes, bottleneck_dims, z.shape[1], max_components)
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
            prior.component_mean[class_index, 0] = mean_shrunk
            prior.component_chol[class_index, 0] = chol
            count = min(max_components, n // BEATS_PER_COMPONENT)
            if count > 1:
                # k-means cannot place more centres than there are distinct points.
                count = min(count, np.unique(head, axis=0).shape[0])
            if count > 1:
                # Each class draws its starts from its own stream, so a class's prior does not
                # depend on how many components the classes before it have.
                rng = np.random.default_rng([seed, class_index])
                weights, means, chols = _fit_mixture(
                    head, mean_shrunk, covariance, count, rng, class_index
                )
                prior.component_weights[class_index] = 0.0
                prior.component_weights[class_index, :count] = weights
                prior.component_mean[class_index, :count] = means
                prior.component_chol[class_index, :count] = chols
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
        exported without a prior gives the same latent values for a seed as it did then. For
        a class with several components, the component of each draw is drawn after ``e``.

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
        components = None
        if self.components(class_index) > 1:
            # Drawn after e, so that a class with one component consumes the generator as it
            # did before mixtures existed.
            weights = self.component_weights[class_index]
            components = rng.choice(weights.size, size=count, p=weights / weights.sum())
        return self.draw(e, class_index, temperature, tail_scale, components)

    def draw(
        self,
        e: np.ndarray,
        class_index: int,
        temperature: float,
        tail_scale: float,
        components: np.ndarray | None = None,
    ) -> np.ndarray:
        """Map standard normal values to latent values of one class.

        Arguments:
            e: Standard normal values (truncated by the caller), shape (count, latent_dims).
            class_index: Class of every draw.
            temperature: Multiplier of the spread around the class or component mean.
            tail_scale: Multiplier of the tail's spread; 0 puts the tail at its mean.
            components: Mixture component of each draw, shape (count,); ``None`` maps every
                draw with the class's own mean and covariance.

        Returns:
            Latent values, shape (count, latent_dims), float32.
        """
        k = self.bottleneck_dims
        if components is None:
            head = self.mean[class_index] + temperature * e[:, :k] @ self.chol[class_index].T
        else:
            means = self.component_mean[class_index, components]  # (count, k)
            chols = self.component_chol[class_index, components]  # (count, k, k)
            head = means + temperature * np.einsum("nij,nj->ni", chols, e[:, :k])
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
            "component_weights": self.component_weights,
            "component_mean": self.component_mean,
            "component_chol": self.component_chol,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LatentPrior:
        """Rebuild a prior from ``to_arrays`` output.

        Arrays written before mixtures existed contain no components; each class then gets one
        component, its own Gaussian, and draws as it did then.
        """
        mean, chol = arrays["mean"], arrays["chol"]
        if "component_weights" in arrays:
            weights = arrays["component_weights"]
            component_mean = arrays["component_mean"]
            component_chol = arrays["component_chol"]
        else:
            weights = np.ones((mean.shape[0], 1))
            component_mean = mean[:, None, :]
            component_chol = chol[:, None, :, :]
        return cls(
            mean=mean,
            chol=chol,
            tail_mean=arrays["tail_mean"],
            tail_std=arrays["tail_std"],
            beats=arrays["beats"],
            component_weights=weights,
            component_mean=component_mean,
            component_chol=component_chol,
        )


def _fit_mixture(
    head: np.ndarray,
    class_mean: np.ndarray,
    class_covariance: np.ndarray,
    count: int,
    rng: np.random.Generator,
    class_index: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit a Gaussian mixture to one class's bottleneck values by expectation-maximisation.

    k-means (SciPy ``kmeans2``) gives the first assignment of each of ``MIXTURE_STARTS`` starts,
    and the start whose fit has the highest mean log-likelihood wins. Each M-step shrinks a
    component's mean and covariance towards the class's with ``COMPONENT_SHRINKAGE_BEATS``
    pseudo-beats. The class's covariance is positive definite, so every component's is too.

    Arguments:
        head: Bottleneck values of the class's beats, shape (n, k), float64.
        class_mean: Shrunk class mean, shape (k,).
        class_covariance: Shrunk class covariance, shape (k, k), positive definite.
        count: Number of components, at least 2.
        rng: Seeds the k-means initialisation.
        class_index: Class named in errors.

    Returns:
        Weights, shape (count,), summing to 1; means, shape (count, k); lower Cholesky
        factors, shape (count, k, k).

    Raises:
        ValueError: If a component's covariance is not positive definite in floating point.
    """
    fits = []
    for _ in range(MIXTURE_STARTS):
        _, assignment = kmeans2(head, count, iter=20, minit="++", seed=rng)
        fits.append(
            _expectation_maximisation(
                head, assignment, class_mean, class_covariance, count, class_index
            )
        )
    # max keeps the earliest start among equal likelihoods.
    _, weights, means, chols = max(fits, key=lambda fit: fit[0])
    return weights, means, chols


def _expectation_maximisation(
    head: np.ndarray,
    assignment: np.ndarray,
    class_mean: np.ndarray,
    class_covariance: np.ndarray,
    count: int,
    class_index: int,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Run EM from a hard assignment; return the mean log-likelihood, weights, means, factors."""
    n, k = head.shape
    responsibility = np.zeros((n, count))
    responsibility[np.arange(n), assignment] = 1.0
    previous = -np.inf
    for _ in range(MIXTURE_ITERATIONS):
        totals = responsibility.sum(axis=0)  # (count,)
        weights = totals / n
        sums = responsibility.T @ head  # (count, k)
        means = (sums + COMPONENT_SHRINKAGE_BEATS * class_mean) / (
            totals + COMPONENT_SHRINKAGE_BEATS
        )[:, None]
        chols = np.empty((count, k, k))
        log_density = np.empty((n, count))
        for j in range(count):
            centred = head - means[j]
            scatter = (responsibility[:, j, None] * centred).T @ centred
            covariance = (scatter + COMPONENT_SHRINKAGE_BEATS * class_covariance) / (
                totals[j] + COMPONENT_SHRINKAGE_BEATS
            )
            try:
                chols[j] = np.linalg.cholesky(covariance)
            except np.linalg.LinAlgError as exc:
                raise ValueError(
                    f"the covariance of component {j} of class {class_index} ({n} beats) is "
                    "not positive definite in floating point. The model is not fit to "
                    "export, so retrain it"
                ) from exc
            whitened = solve_triangular(chols[j], centred.T, lower=True)  # (k, n)
            log_det = np.log(np.diag(chols[j])).sum()
            log_density[:, j] = (
                -0.5 * (whitened**2).sum(axis=0) - log_det - 0.5 * k * np.log(2 * np.pi)
            )
        with np.errstate(divide="ignore"):
            joint = log_density + np.log(weights)
        per_beat = logsumexp(joint, axis=1)
        responsibility = np.exp(joint - per_beat[:, None])
        mean_log_likelihood = float(per_beat.mean())
        if mean_log_likelihood - previous < MIXTURE_TOLERANCE:
            break
        previous = mean_log_likelihood
    return mean_log_likelihood, weights, means, chols


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
