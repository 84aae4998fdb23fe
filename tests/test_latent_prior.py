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


def _bottleneck_only_draws(seed: int, count: int, temperature: float) -> np.ndarray:
    """Return the latent values that generation drew before the fitted prior existed."""
    rng = np.random.default_rng(seed)
    lead = rng.standard_normal((count, BOTTLENECK))
    outside = np.abs(lead) > 3.0
    while outside.any():
        lead[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(lead) > 3.0
    z = np.zeros((count, LATENT), dtype=np.float32)
    z[:, :BOTTLENECK] = temperature * lead
    return z


def test_sample_without_tail_keeps_old_draws() -> None:
    # A model exported before the fitted prior has the standard prior and tail_scale 0. The
    # same seed must give the latent values that generation drew then.
    prior = LatentPrior.standard(CLASSES, BOTTLENECK, LATENT)
    drawn = prior.sample(np.random.default_rng(7), 500, 1, 0.8, 3.0, 0.0)
    expected = _bottleneck_only_draws(7, 500, 0.8)
    assert drawn.dtype == np.float32
    assert np.array_equal(drawn, expected)


def test_sample_with_tail_draws_every_value() -> None:
    z, _, _ = _latents(2000, 6)
    prior = LatentPrior.fit(z, np.zeros(2000, dtype=np.int64), CLASSES, BOTTLENECK)
    drawn = prior.sample(np.random.default_rng(8), 3000, 0, 0.7, 2.0, 1.5)
    rng = np.random.default_rng(8)
    e = rng.standard_normal((3000, LATENT))
    outside = np.abs(e) > 2.0
    while outside.any():
        e[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(e) > 2.0
    assert np.array_equal(drawn, prior.draw(e, 0, 0.7, 1.5))
    # Each tail value is its mean plus 1.5 * 0.7 * tail_std times a value within +-2.
    bound = 1.5 * 0.7 * 2.0 * prior.tail_std[0] + 1e-5
    assert np.all(np.abs(drawn[:, BOTTLENECK:] - prior.tail_mean[0]) <= bound)
    fixed = prior.sample(np.random.default_rng(8), 10, 0, 0.7, 2.0, 0.0)
    assert np.allclose(fixed[:, BOTTLENECK:], prior.tail_mean[0], atol=1e-6)


def test_fit_with_fewer_beats_than_dimensions() -> None:
    # 100 beats in a 150-dimensional bottleneck make the sample covariance singular, but the
    # shrinkage keeps every eigenvalue at or above 1 - weight.
    n, bottleneck, latent = MIN_BEATS, 150, 160
    z = np.random.default_rng(9).standard_normal((n, latent))
    prior = LatentPrior.fit(z, np.zeros(n, dtype=np.int64), CLASSES, bottleneck)
    weight = n / (n + SHRINKAGE_BEATS)
    assert prior.beats[0] == n
    assert np.all(np.isfinite(prior.chol[0]))
    eigenvalues = np.linalg.eigvalsh(prior.chol[0] @ prior.chol[0].T)
    assert eigenvalues.min() >= (1 - weight) * (1 - 1e-9)


def test_fit_rejects_covariance_lost_to_rounding() -> None:
    # Two identical bottleneck values of +-2**27 with mean 0 make every sum exact. The
    # shrinkage's 1 - weight (0.0064) is lost against w * 2**54, so the covariance is singular
    # and its computed Cholesky pivot is negative.
    n = 5000
    z = np.random.default_rng(10).standard_normal((n, LATENT))
    z[:, 0] = 2.0**27
    z[::2, 0] = -(2.0**27)
    z[:, 1] = z[:, 0]
    labels = np.full(n, 3, dtype=np.int64)
    with pytest.raises(ValueError, match="covariance of class 3 .5000 beats.") as caught:
        LatentPrior.fit(z, labels, CLASSES, 2)
    assert "not positive definite" in str(caught.value)
    assert "retrain" in str(caught.value)


def test_fit_rejects_overflowing_moments() -> None:
    # Finite latent values of 1e200 square to infinity, and the prior must not contain NaN.
    z, _, _ = _latents(MIN_BEATS, 11)
    z[:, -1] *= 1e200
    labels = np.full(MIN_BEATS, 4, dtype=np.int64)
    with pytest.raises(ValueError, match="moments of class 4 .100 beats. overflow"):
        LatentPrior.fit(z, labels, CLASSES, BOTTLENECK)
    z, _, _ = _latents(MIN_BEATS, 12)
    z[:, 0] *= 1e200
    with pytest.raises(ValueError, match="moments of class 4 .100 beats. overflow"):
        LatentPrior.fit(z, labels, CLASSES, BOTTLENECK)
