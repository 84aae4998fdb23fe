"""Distribution distances: MMD² with a permutation test, and the Fréchet distance of embeddings.

MMD² is the unbiased estimate of Gretton et al. (JMLR 13, 2012) with a Gaussian kernel
``k(a, b) = exp(-||a - b||² / (2 σ²))``, where ``σ²`` is the median squared distance of the pooled
sample (the median heuristic). It can be slightly negative when the two distributions are equal.
The permutation p-value is ``(1 + #{permuted MMD² >= observed}) / (1 + permutations)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.signal

# Added to each covariance diagonal before the matrix square root of the Fréchet distance.
FRECHET_RIDGE = 1e-6


@dataclass(frozen=True)
class MmdResult:
    """MMD² of two samples and its permutation p-value.

    Attributes:
        mmd2: Unbiased MMD² estimate, unitless (kernel values are in [0, 1]).
        p_value: Share of label permutations whose MMD² reaches the observed one.
        bandwidth: Kernel ``σ`` from the median heuristic, in the units of the inputs.
    """

    mmd2: float
    p_value: float
    bandwidth: float


def _squared_distances(points: np.ndarray) -> np.ndarray:
    norms = (points**2).sum(axis=1)
    d2 = norms[:, None] + norms[None, :] - 2.0 * points @ points.T
    return np.maximum(d2, 0.0)


def _mmd2_from_kernel(kernel: np.ndarray, in_first: np.ndarray) -> float:
    """Unbiased MMD² of the pooled kernel matrix split by the boolean mask ``in_first``."""
    a, b = in_first, ~in_first
    m, n = int(a.sum()), int(b.sum())
    k_aa = kernel[np.ix_(a, a)]
    k_bb = kernel[np.ix_(b, b)]
    k_ab = kernel[np.ix_(a, b)]
    term_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    term_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(term_a + term_b - 2.0 * k_ab.mean())


def mmd2_test(
    first: np.ndarray, second: np.ndarray, permutations: int = 200, seed: int = 0
) -> MmdResult:
    """Compute the unbiased MMD² of two samples and a permutation p-value.

    Arguments:
        first: Sample, shape (m, ...), flattened per row; m >= 2.
        second: Sample, shape (n, ...), with the same row size; n >= 2.
        permutations: Random relabellings of the pooled sample.
        seed: Seed of the permutations.

    Raises:
        ValueError: If either sample has fewer than 2 rows or the row sizes differ.
    """
    x = first.reshape(first.shape[0], -1).astype(np.float64)
    y = second.reshape(second.shape[0], -1).astype(np.float64)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(
            f"MMD² needs at least 2 rows per sample, got {x.shape[0]} and {y.shape[0]}"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"MMD² samples differ in row size: {x.shape[1]} and {y.shape[1]}")
    pooled = np.concatenate([x, y])
    d2 = _squared_distances(pooled)
    off_diagonal = d2[~np.eye(d2.shape[0], dtype=bool)]
    sigma2 = float(np.median(off_diagonal))
    if sigma2 <= 0.0:
        sigma2 = float(off_diagonal.mean()) or 1.0
    kernel = np.exp(-d2 / (2.0 * sigma2))
    in_first = np.zeros(pooled.shape[0], dtype=bool)
    in_first[: x.shape[0]] = True
    observed = _mmd2_from_kernel(kernel, in_first)
    rng = np.random.default_rng(seed)
    reached = 0
    for _ in range(permutations):
        if _mmd2_from_kernel(kernel, rng.permutation(in_first)) >= observed:
            reached += 1
    return MmdResult(observed, (1 + reached) / (1 + permutations), float(np.sqrt(sigma2)))


def power_spectra(beats: np.ndarray, fs_hz: float) -> np.ndarray:
    """Return each beat's relative power spectrum (periodogram over the share of total power).

    Arguments:
        beats: Beats, shape (n, leads, samples).
        fs_hz: Sampling rate.

    Returns:
        Spectra, shape (n, leads * (samples // 2 + 1)); each lead's row sums to 1 (0 for a
        constant lead).
    """
    _, power = scipy.signal.periodogram(beats.astype(np.float64), fs=fs_hz, axis=-1)
    total = power.sum(axis=-1, keepdims=True)
    relative = np.divide(power, total, out=np.zeros_like(power), where=total > 0)
    return relative.reshape(beats.shape[0], -1)


def frechet_distance(first: np.ndarray, second: np.ndarray) -> float:
    """Return the Fréchet distance of Gaussians fitted to two sets of embeddings.

    ``d² = ||μ1 - μ2||² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½)``, as in the Fréchet Inception Distance.

    Arguments:
        first: Embeddings, shape (m, dims), m >= 2.
        second: Embeddings, shape (n, dims), n >= 2.
    """
    mu1, mu2 = first.mean(axis=0), second.mean(axis=0)
    sigma1 = np.atleast_2d(np.cov(first, rowvar=False))
    sigma2 = np.atleast_2d(np.cov(second, rowvar=False))
    # Embedding units that are zero for every beat make a covariance singular. A small ridge
    # keeps the matrix square root defined.
    ridge = FRECHET_RIDGE * np.eye(sigma1.shape[0])
    root = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    root = np.real(root)
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2.0 * root))
    return max(value, 0.0)
