"""The generation prior fitted to training latents: moments, shrinkage, fallback, draws."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.vq import kmeans2

from appliance.latent_prior import (
    BEATS_PER_COMPONENT,
    COMPONENT_SHRINKAGE_BEATS,
    MIN_BEATS,
    MIXTURE_STARTS,
    SHRINKAGE_BEATS,
    LatentPrior,
    _expectation_maximisation,
)

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
    # Identical latent values leave k-means a single distinct point, so one component.
    assert prior.components(0) == 1


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


def _redrawn_normal(rng: np.random.Generator, shape: tuple[int, int], bound: float) -> np.ndarray:
    """Draw standard normal values, redrawing each one beyond ``bound``, in the prior's order.

    It is written out here, apart from ``truncated_standard_normal``, so that the tests pin the
    order in which the generator is consumed.
    """
    values = rng.standard_normal(shape)
    outside = np.abs(values) > bound
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > bound
    return values


def _bottleneck_only_draws(seed: int, count: int, temperature: float) -> np.ndarray:
    """Return the latent values that generation drew before the fitted prior existed."""
    rng = np.random.default_rng(seed)
    lead = _redrawn_normal(rng, (count, BOTTLENECK), 3.0)
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
    prior = LatentPrior.fit(z, np.zeros(2000, dtype=np.int64), CLASSES, BOTTLENECK, 1)
    drawn = prior.sample(np.random.default_rng(8), 3000, 0, 0.7, 2.0, 1.5)
    e = _redrawn_normal(np.random.default_rng(8), (3000, LATENT), 2.0)
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


def _two_clusters(n: int, seed: int) -> np.ndarray:
    """Return latents whose bottleneck has two tight clusters at +-3 on its first value."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((2, BOTTLENECK))
    centres[:, 0] = [3.0, -3.0]
    head = centres[np.arange(n) % 2] + 0.3 * rng.standard_normal((n, BOTTLENECK))
    tail = rng.standard_normal((n, LATENT - BOTTLENECK))
    return np.concatenate([head, tail], axis=1)


def test_mixture_finds_separated_clusters() -> None:
    n = 2000
    z = _two_clusters(n, 13)
    prior = LatentPrior.fit(z, np.zeros(n, dtype=np.int64), CLASSES, BOTTLENECK, 2, seed=0)
    assert prior.components(0) == 2
    assert np.allclose(np.sort(prior.component_mean[0, :, 0]), [-3.0, 3.0], atol=0.05)
    assert np.allclose(prior.component_weights[0], 0.5, atol=0.01)
    drawn = prior.sample(np.random.default_rng(14), 4000, 0, 1.0, 3.0, 1.0)
    head = drawn[:, 0]
    # One Gaussian would put a third of its draws between the clusters. The mixture puts
    # almost none there, and each cluster keeps its own spread, widened by the shrinkage.
    assert np.mean(np.abs(head) < 1.5) < 0.01
    assert abs(float(np.mean(head > 0)) - 0.5) < 0.03
    assert 0.3 <= float(head[head > 0].std()) < 0.5
    single = LatentPrior.fit(z, np.zeros(n, dtype=np.int64), CLASSES, BOTTLENECK, 1)
    single_draws = single.sample(np.random.default_rng(14), 4000, 0, 1.0, 3.0, 1.0)
    assert np.mean(np.abs(single_draws[:, 0]) < 1.5) > 0.2


def test_components_follow_class_size() -> None:
    # One component per BEATS_PER_COMPONENT beats, at most max_components; a class under
    # MIN_BEATS keeps the standard normal with one component.
    sizes = {
        0: 9 * BEATS_PER_COMPONENT,
        1: 3 * BEATS_PER_COMPONENT,
        3: 2 * BEATS_PER_COMPONENT - 1,
        4: MIN_BEATS - 1,
    }
    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in sizes.items()])
    z = _two_clusters(labels.size, 15)
    prior = LatentPrior.fit(z, labels, CLASSES, BOTTLENECK, 4, seed=0)
    assert [prior.components(c) for c in range(CLASSES)] == [4, 3, 1, 1, 1]
    assert prior.beats[2] == 0
    assert prior.beats[4] == 0
    assert np.allclose(prior.component_weights.sum(axis=1), 1.0)


def test_mixture_keeps_the_best_start() -> None:
    # Three clusters of unequal size and spread, fitted with three components: the starts
    # end at different fits, and the prior is the one of highest mean log-likelihood.
    rng = np.random.default_rng(21)
    centres = np.zeros((3, BOTTLENECK))
    centres[:, 0] = [-4.0, 0.0, 1.5]
    centres[:, 1] = [0.0, 3.0, -1.0]
    members = rng.choice(3, size=900, p=[0.6, 0.3, 0.1])
    spreads = np.array([1.2, 0.4, 0.8])[members, None]
    head = centres[members] + spreads * rng.standard_normal((900, BOTTLENECK))
    z = np.concatenate([head, rng.standard_normal((900, LATENT - BOTTLENECK))], axis=1)
    labels = np.full(900, 2, dtype=np.int64)
    prior = LatentPrior.fit(z, labels, CLASSES, BOTTLENECK, 3, seed=5)
    # Replay the starts in the order the fit draws them.
    class_prior = LatentPrior.fit(z, labels, CLASSES, BOTTLENECK, 1, seed=5)
    mean, covariance = class_prior.mean[2], class_prior.chol[2] @ class_prior.chol[2].T
    start_rng = np.random.default_rng([5, 2])
    fits = []
    for _ in range(MIXTURE_STARTS):
        _, assignment = kmeans2(head, 3, iter=20, minit="++", seed=start_rng)
        fits.append(_expectation_maximisation(head, assignment, mean, covariance, 3, 2))
    likelihoods = [fit[0] for fit in fits]
    assert max(likelihoods) - min(likelihoods) > 1e-3, "the starts should differ"
    best = fits[int(np.argmax(likelihoods))]
    np.testing.assert_allclose(prior.component_weights[2], best[1])
    np.testing.assert_allclose(prior.component_mean[2], best[2])


def test_class_prior_ignores_other_classes() -> None:
    # Each class draws its k-means starts from its own stream, so adding a class with
    # several components before it leaves its prior unchanged.
    z = _two_clusters(1200, 22)
    labels = np.full(1200, 3, dtype=np.int64)
    alone = LatentPrior.fit(z, labels, CLASSES, BOTTLENECK, 3, seed=1)
    extra = _two_clusters(600, 23)
    with_other = LatentPrior.fit(
        np.concatenate([extra, z]),
        np.concatenate([np.zeros(600, dtype=np.int64), labels]),
        CLASSES,
        BOTTLENECK,
        3,
        seed=1,
    )
    assert with_other.components(0) == 3
    np.testing.assert_array_equal(with_other.component_weights[3], alone.component_weights[3])
    np.testing.assert_array_equal(with_other.component_mean[3], alone.component_mean[3])


def test_mixture_fit_and_sample_are_seeded() -> None:
    z = _two_clusters(1200, 16)
    labels = np.zeros(1200, dtype=np.int64)
    first = LatentPrior.fit(z, labels, CLASSES, BOTTLENECK, 4, seed=3)
    second = LatentPrior.fit(z, labels, CLASSES, BOTTLENECK, 4, seed=3)
    for name, array in first.to_arrays().items():
        assert np.array_equal(getattr(second, name), array), name
    draws = first.sample(np.random.default_rng(5), 300, 0, 0.9, 3.0, 1.0)
    again = second.sample(np.random.default_rng(5), 300, 0, 0.9, 3.0, 1.0)
    assert np.array_equal(draws, again)
    rebuilt = LatentPrior.from_arrays(first.to_arrays())
    assert np.array_equal(rebuilt.sample(np.random.default_rng(5), 300, 0, 0.9, 3.0, 1.0), draws)


def test_mixture_components_shrink_towards_class() -> None:
    # Each component's covariance mixes in the class covariance with
    # COMPONENT_SHRINKAGE_BEATS pseudo-beats.
    z = _two_clusters(2000, 17)
    prior = LatentPrior.fit(z, np.zeros(2000, dtype=np.int64), CLASSES, BOTTLENECK, 2, seed=0)
    class_variance = (prior.chol[0] @ prior.chol[0].T)[0, 0]
    for j in range(2):
        covariance = prior.component_chol[0, j] @ prior.component_chol[0, j].T
        beats = prior.component_weights[0, j] * 2000
        share = COMPONENT_SHRINKAGE_BEATS / (beats + COMPONENT_SHRINKAGE_BEATS)
        expected = (1 - share) * 0.09 + share * class_variance
        assert covariance[0, 0] == pytest.approx(expected, rel=0.1)
        assert np.linalg.eigvalsh(covariance).min() > 0


def test_arrays_without_components_draw_as_before() -> None:
    # Arrays written before mixtures existed lack the component arrays; the rebuilt prior
    # draws exactly as the single Gaussian did, seed for seed.
    z, _, _ = _latents(800, 18)
    prior = LatentPrior.fit(z, np.zeros(800, dtype=np.int64), CLASSES, BOTTLENECK, 1)
    old = {
        name: prior.to_arrays()[name]
        for name in ("mean", "chol", "tail_mean", "tail_std", "beats")
    }
    rebuilt = LatentPrior.from_arrays(old)
    assert rebuilt.components(0) == 1
    e = _redrawn_normal(np.random.default_rng(19), (400, LATENT), 3.0)
    expected = (prior.mean[0] + 0.8 * e[:, :BOTTLENECK] @ prior.chol[0].T).astype(np.float32)
    drawn = rebuilt.sample(np.random.default_rng(19), 400, 0, 0.8, 3.0, 1.0)
    assert np.array_equal(drawn[:, :BOTTLENECK], expected)


def test_max_components_below_one_raises() -> None:
    z, _, _ = _latents(MIN_BEATS, 20)
    with pytest.raises(ValueError, match="max_components=0"):
        LatentPrior.fit(z, np.zeros(MIN_BEATS, dtype=np.int64), CLASSES, BOTTLENECK, 0)
