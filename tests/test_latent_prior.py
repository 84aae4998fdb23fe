"""The generation prior fitted to training latents: moments, shrinkage, fallback, draws."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.latent_prior import MIN_BEATS, SHRINKAGE_BEATS, LatentPrior

CLASSES = 5
BOTTLENECK = 4
LATENT = 10


def _latents(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return latents of a known Gaussian: (z, bottleneck mean, bottleneck covariance)."""
    rng = np.random.default_rng(seed)
    mean = np.array([1.0, -0.5, 0.0, 2.0])
    mixing = np.array(
        [[1.0, 0.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0], [0.0, 0.3, 0.5, 0.0], [0.2, 0.0, 0.1, 1.5]]
    )
    covariance = mixing @ mixing.T
    head = mean + rng.standard_normal((n, BOTTLENECK)) @ mixing.T
    tail = 0.3 + 0.5 * rng.standard_normal((n, LATENT - BOTTLENECK))
    return np.concatenate([head, tail], axis=1), mean, covariance


def test_fit_recovers_shrunk_moments() -> None:
    n = 20000
    z, mean, covariance = _latents(n, 0)
    prior = LatentPrior.fit(z, np.zeros(n, dtype=np.int64), CLASSES, BOTTLENECK)
    weight = n / (n + SHRINKAGE_BEATS)
    assert prior.beats[0] == n
    assert np.allclose(prior.mean[0], weight * mean, atol=0.03)
    fitted_covariance = prior.chol[0] @ prior.chol[0].T
    assert np.allclose(fitted_covariance, covariance, atol=0.06)
    assert np.allclose(prior.tail_mean[0], 0.3, atol=0.02)
    assert np.allclose(prior.tail_std[0], 0.5, atol=0.02)


def test_small_class_keeps_standard_normal() -> None:
    z, _, _ = _latents(MIN_BEATS - 1, 1)
    prior = LatentPrior.fit(z, np.full(MIN_BEATS - 1, 2), CLASSES, BOTTLENECK)
    assert prior.beats[2] == 0
    assert np.array_equal(prior.mean[2], np.zeros(BOTTLENECK))
    assert np.array_equal(prior.chol[2], np.eye(BOTTLENECK))
    assert np.array_equal(prior.tail_std[2], np.ones(LATENT - BOTTLENECK))


def test_shrinkage_pulls_towards_standard_normal() -> None:
    # With four times as many beats as pseudo-beats, the moments lie 0.8 of the way to the data's.
    n = SHRINKAGE_BEATS * 4
    z = np.full((n, LATENT), 2.0)
    prior = LatentPrior.fit(z, np.zeros(n, dtype=np.int64), CLASSES, BOTTLENECK)
    weight = n / (n + SHRINKAGE_BEATS)
    assert np.allclose(prior.mean[0], 2.0 * weight)
    # Second moment weight * 4 + (1 - weight) * 1, minus the squared shrunk mean.
    expected_variance = weight * 4.0 + (1 - weight) - (2.0 * weight) ** 2
    assert np.allclose(np.diag(prior.chol[0] @ prior.chol[0].T), expected_variance)
    assert np.all(np.isfinite(prior.chol[0]))


def test_non_finite_latents_raise() -> None:
    z, _, _ = _latents(MIN_BEATS, 2)
    z[3, 1] = np.nan
    with pytest.raises(ValueError, match="not all finite"):
        LatentPrior.fit(z, np.zeros(MIN_BEATS, dtype=np.int64), CLASSES, BOTTLENECK)


def test_draw_follows_prior_and_scales() -> None:
    n = 20000
    z, mean, covariance = _latents(n, 3)
    prior = LatentPrior.fit(z, np.zeros(n, dtype=np.int64), CLASSES, BOTTLENECK)
    e = np.random.default_rng(4).standard_normal((n, LATENT))
    drawn = prior.draw(e, 0, temperature=0.5, tail_scale=2.0)
    assert drawn.dtype == np.float32
    assert drawn.shape == (n, LATENT)
    assert np.allclose(drawn[:, :BOTTLENECK].mean(axis=0), prior.mean[0], atol=0.03)
    assert np.allclose(np.cov(drawn[:, :BOTTLENECK], rowvar=False), 0.25 * covariance, atol=0.03)
    # Tail spread: tail_scale * temperature * tail_std = 2 * 0.5 * 0.5.
    assert np.allclose(drawn[:, BOTTLENECK:].std(axis=0), 0.5, atol=0.02)
    at_mean = prior.draw(e[:5], 0, temperature=1.0, tail_scale=0.0)
    assert np.allclose(at_mean[:, BOTTLENECK:], prior.tail_mean[0], atol=1e-6)


def test_arrays_round_trip() -> None:
    z, _, _ = _latents(500, 5)
    labels = np.zeros(500, dtype=np.int64)
    labels[250:] = 2
    prior = LatentPrior.fit(z, labels, CLASSES, BOTTLENECK)
    rebuilt = LatentPrior.from_arrays(prior.to_arrays())
    for name, array in prior.to_arrays().items():
        assert np.array_equal(getattr(rebuilt, name), array), name
    assert rebuilt.bottleneck_dims == BOTTLENECK
