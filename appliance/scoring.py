"""Pertinence score: evidence from the flow combined and calibrated on held-out real beats.

For a beat ``x`` (scaled, shape (leads, samples), ``D = leads * samples`` values) scored under
class ``c`` the flow gives latent values ``z = f(x | c)`` and ``log|det J|``. Ten statistics
are computed:

- ``nll_bpd``: negative log-likelihood in bits per dimension,
  ``(||z||^2 / 2 + D/2 log(2 pi) - log|det J|) / (D ln 2)``; large is atypical.
- ``bottleneck_norm``: ``||z[:k]||^2 / k`` over the ``k`` bottleneck dimensions, a test on the
  latent norm; too large is atypical. Too small is not, so that draws at temperatures below 1
  are not rejected for being close to the mode.
- ``reconstruction``: ``log10(mean((x - f^-1(truncate(z) | c))^2) / var(x))``, the error of
  the beat projected through the bottleneck relative to the beat's variance, so that it does
  not grow with a patient's amplitude; large is atypical (noise, mains, steps, other shapes).
- ``amplitude``: ``log`` of the peak-to-peak amplitude; too small or too large is atypical
  (flat lines, scaled beats).
- ``high_frequency``: ``log10`` of the share of the beat's spectral energy above
  ``HIGH_FREQUENCY_HZ``; too large is atypical (noise, mains) and so is too small (smooth
  sinusoids, flat lines).
- ``morphology``: RMS difference between the z-normalised beat and the nearest of
  ``MORPHOLOGY_CENTROIDS`` k-means centroids of the z-normalised training beats; large is
  atypical (time-reversed beats, other leads, steps, sinusoids). z-normalising makes it blind
  to amplitude, which ``amplitude`` covers.
- ``max_slope``: ``log`` of the largest change between neighbouring samples divided by the
  peak-to-peak amplitude; too small is atypical (a smooth sinusoid has no steep part).
- ``step_sharpness``: ``log`` of the largest change between neighbouring samples divided by
  the largest change over ``STEP_SPAN_S`` (3 samples at 360 Hz); too large is atypical. The
  fastest slope of a real beat, the QRS upstroke, goes on for several samples, so the change
  over the span is larger than one sample's. A baseline step, a spike or an electrode pop
  moves the level within one sample, and the ratio nears 1.
- ``r_peak``: the z-normalised value at the R-peak position of the window (``pre_r_samples``),
  averaged over leads; too small is atypical. Windows are cut around a detected R peak, so a
  beat from another lead, an inverted or time-reversed beat, or a beat shifted in time has no
  peak there.
- ``lead_match``: the logit of the lead check (``appliance.lead_check``), a network fitted at
  export to tell the model's lead from the other leads of the training records; too small is
  atypical (a beat from another lead). It is 0 for every beat when the model has no lead check.

Each statistic becomes a tail probability ``p_i`` against the same statistic of held-out real
beats (one-sided or two-sided as listed), with the empirical distribution inside the held-out
range and an exponential tail beyond it, so that a beat far outside the range gets a smaller
p-value than one just outside. The evidence is
``e = min_i log p_i``, and the score ranks it against the evidence of those held-out beats:

    score(x) = #{held-out beats v : e(v) <= e(x)} / n

and, below the lowest held-out evidence ``e_min``, ``exp(e(x) - e_min) / n``, so that beats
beyond every held-out beat still rank among themselves. The score is uniform on [0, 1] for
real held-out beats, and a margin ``m`` rejects about a fraction ``m`` of them whatever the
model or dataset. Raw likelihood alone is not used because
flows give high density to simple inputs such as flat lines and scaled-down beats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.vq import kmeans2

FEATURES = (
    "nll_bpd",
    "bottleneck_norm",
    "reconstruction",
    "amplitude",
    "high_frequency",
    "morphology",
    "max_slope",
    "step_sharpness",
    "r_peak",
    "lead_match",
)
# Tails of each statistic that count as atypical: "upper", "lower" or "both".
FEATURE_TAILS = {
    "nll_bpd": "upper",
    "bottleneck_norm": "upper",
    "reconstruction": "upper",
    "amplitude": "both",
    "high_frequency": "both",
    "morphology": "upper",
    "max_slope": "lower",
    "step_sharpness": "upper",
    "r_peak": "lower",
    "lead_match": "lower",
}
# Lower edge of the band whose energy share ``high_frequency`` measures. QRS energy lies mostly
# below 40 Hz, while mains (50 or 60 Hz) and broadband noise put energy above it.
HIGH_FREQUENCY_HZ = 40.0
# Centroids of the training beats that ``morphology`` compares with, and the training beats
# (at most) that k-means runs on.
MORPHOLOGY_CENTROIDS = 32
MORPHOLOGY_SAMPLE = 5000
# Span of ``step_sharpness``: 3 samples at 360 Hz, shorter than a QRS upstroke.
STEP_SPAN_S = 3 / 360
_LOG_FLOOR = 1e-12
_MIN_STD = 1e-8
# Distance from median to edge below which a held-out statistic counts as constant.
_MIN_SPREAD = 1e-9


def z_normalise(beats: np.ndarray) -> np.ndarray:
    """Centre each beat and divide it by its standard deviation over all its values.

    Arguments:
        beats: Beats, shape (beats, leads, window_samples), any unit.

    Returns:
        Flattened z-normalised beats, shape (beats, leads * window_samples), float64; a
        constant beat maps to zeros.
    """
    flat = beats.reshape(beats.shape[0], -1).astype(np.float64)
    centred = flat - flat.mean(axis=1, keepdims=True)
    std = centred.std(axis=1, keepdims=True)
    return centred / np.maximum(std, _MIN_STD)


def high_frequency_share(beats: np.ndarray, fs_hz: float) -> np.ndarray:
    """Return each beat's share of spectral energy above ``HIGH_FREQUENCY_HZ``, shape (beats,).

    Arguments:
        beats: Beats, shape (beats, leads, window_samples), any unit.
        fs_hz: Sampling rate of the beats.
    """
    centred = beats.astype(np.float64) - beats.mean(axis=2, keepdims=True)
    power = np.abs(np.fft.rfft(centred, axis=2)) ** 2  # (beats, leads, bins)
    frequencies_hz = np.fft.rfftfreq(beats.shape[2], d=1.0 / fs_hz)
    high = power[:, :, frequencies_hz >= HIGH_FREQUENCY_HZ].sum(axis=(1, 2))
    total = power.sum(axis=(1, 2))
    return high / np.maximum(total, _LOG_FLOOR)


def morphology_centroids(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """Cluster z-normalised training beats into ``MORPHOLOGY_CENTROIDS`` centroids.

    Arguments:
        vectors: Training beats mapped by ``appliance.privacy.privacy_space``, shape (n, dims),
            unit norm.
        seed: Seed of the subsample and of the k-means initialisation; the same vectors and
            seed give the same centroids.

    Returns:
        Unit-norm centroids, shape (min(MORPHOLOGY_CENTROIDS, n), dims), float64.
    """
    rng = np.random.default_rng(seed)
    sample = vectors
    if vectors.shape[0] > MORPHOLOGY_SAMPLE:
        sample = vectors[np.sort(rng.choice(vectors.shape[0], MORPHOLOGY_SAMPLE, replace=False))]
    sample = sample.astype(np.float64)
    count = min(MORPHOLOGY_CENTROIDS, sample.shape[0])
    centroids, _ = kmeans2(sample, count, iter=20, minit="++", seed=rng)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return np.asarray(centroids / np.maximum(norms, _MIN_STD))


def compute_features(
    x: np.ndarray,
    z: np.ndarray,
    log_det: np.ndarray,
    x_projected: np.ndarray,
    centroids: np.ndarray,
    bottleneck_dims: int,
    fs_hz: float,
    r_index: int,
    lead_match: np.ndarray,
) -> np.ndarray:
    """Compute the statistics of ``FEATURES`` for each beat.

    Arguments:
        x: Scaled beats, shape (beats, leads, window_samples).
        z: Latent values, shape (beats, latent_dims).
        log_det: ``log|det dz/dx|``, shape (beats,).
        x_projected: Beats mapped back from the truncated latent values, shape of ``x``.
        centroids: Unit-norm centroids from ``morphology_centroids``, shape
            (centroids, leads * window_samples).
        bottleneck_dims: Leading latent dimensions of the bottleneck.
        fs_hz: Sampling rate of the beats.
        r_index: Sample of the window where the R peak lies (``pre_r_samples``).
        lead_match: Logit of the lead check per beat, shape (beats,); zeros without one.

    Returns:
        Statistics, shape (beats, len(FEATURES)), float64, columns in ``FEATURES`` order.
    """
    z = z.astype(np.float64)
    dims = z.shape[1]
    log_prob = -0.5 * (z**2).sum(axis=1) - 0.5 * dims * np.log(2 * np.pi) + log_det
    nll_bpd = -log_prob / (dims * np.log(2.0))
    bottleneck_norm = (z[:, :bottleneck_dims] ** 2).sum(axis=1) / bottleneck_dims
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    error = ((flat - x_projected.reshape(x.shape[0], -1)) ** 2).mean(axis=1)
    reconstruction = np.log10((error + _LOG_FLOOR) / (flat.var(axis=1) + _LOG_FLOOR))
    amplitude = np.log(np.ptp(flat, axis=1) + _LOG_FLOOR)
    high_frequency = np.log10(high_frequency_share(x, fs_hz) + _LOG_FLOOR)
    vectors = z_normalise(x) / np.sqrt(flat.shape[1])  # unit norm unless constant
    similarity = (vectors @ centroids.T).max(axis=1)
    squared_norms = (vectors**2).sum(axis=1)
    morphology = np.sqrt(np.maximum(squared_norms + 1.0 - 2.0 * similarity, 0.0))
    per_lead = x.astype(np.float64)
    largest_step = np.abs(np.diff(per_lead, axis=2)).max(axis=(1, 2))
    max_slope = np.log((largest_step + _LOG_FLOOR) / (np.ptp(flat, axis=1) + _LOG_FLOOR))
    span = min(max(2, round(STEP_SPAN_S * fs_hz)), x.shape[2] - 1)
    largest_span_change = np.abs(per_lead[:, :, span:] - per_lead[:, :, :-span]).max(axis=(1, 2))
    step_sharpness = np.log((largest_step + _LOG_FLOOR) / (largest_span_change + _LOG_FLOOR))
    lead_std = np.maximum(per_lead.std(axis=2), _MIN_STD)  # (beats, leads)
    r_peak = ((per_lead[:, :, r_index] - per_lead.mean(axis=2)) / lead_std).mean(axis=1)
    return np.stack(
        [
            nll_bpd,
            bottleneck_norm,
            reconstruction,
            amplitude,
            high_frequency,
            morphology,
            max_slope,
            step_sharpness,
            r_peak,
            lead_match.astype(np.float64),
        ],
        axis=1,
    )


@dataclass
class Calibration:
    """Sorted statistics and evidence of held-out real beats.

    Attributes:
        feature_values: Sorted statistics, shape (n, features); column i sorted on its own.
        evidence: Sorted log evidence ``log min_i p_i`` of the same beats, shape (n,).
    """

    feature_values: np.ndarray
    evidence: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> Calibration:
        """Calibrate on the statistics of held-out real beats, shape (n, features).

        Raises:
            ValueError: If fewer than 10 beats have finite statistics, or the number of
                statistics differs from ``len(FEATURES)``.
        """
        if features.ndim != 2 or features.shape[1] != len(FEATURES):
            raise ValueError(
                f"calibration needs statistics of shape (n, {len(FEATURES)}), got "
                f"{features.shape}; compute them with compute_features"
            )
        finite = np.isfinite(features).all(axis=1)
        if finite.sum() < 10:
            raise ValueError(
                f"calibration needs at least 10 finite held-out beats, got {int(finite.sum())}"
            )
        sorted_values = np.sort(features[finite], axis=0)
        partial = cls(feature_values=sorted_values, evidence=np.zeros(0))
        evidence = np.sort(partial.evidence_of(features[finite]))
        return cls(feature_values=sorted_values, evidence=evidence)

    def _log_tail(self, column: np.ndarray, values: np.ndarray, upper: bool) -> np.ndarray:
        """Return the log tail probability of ``values`` against one sorted held-out column.

        Inside the held-out range it is the empirical ``log((count beyond + 1) / (n + 1))``.
        Beyond the range it continues from the floor ``log(1 / (n + 1))`` along an exponential
        tail, ``-(distance beyond the range) / scale``, whose scale makes the tail fall from
        1/2 at the median to ``1 / (n + 1)`` at the range's edge.
        """
        n = column.size
        median = float(column[n // 2])
        if upper:
            count = n - np.searchsorted(column, values, side="left")
            edge = float(column[-1])
            beyond = values - edge
        else:
            count = np.searchsorted(column, values, side="right")
            edge = float(column[0])
            beyond = edge - values
        scale = max(abs(edge - median), _MIN_SPREAD) / np.log((n + 1) / 2.0)
        log_p = np.log((count + 1) / (n + 1))
        return np.where(beyond > 0, log_p - np.maximum(beyond, 0.0) / scale, log_p)

    def evidence_of(self, features: np.ndarray) -> np.ndarray:
        """Return ``log min_i p_i`` for each beat, shape (beats,); non-finite rows get -inf."""
        log_p = np.empty_like(features, dtype=np.float64)
        for i, name in enumerate(FEATURES):
            column = self.feature_values[:, i]
            # Non-finite rows get -inf below; zeros keep the arithmetic finite meanwhile.
            values = np.nan_to_num(features[:, i].astype(np.float64), posinf=0.0, neginf=0.0)
            tail = FEATURE_TAILS[name]
            if tail == "upper":
                log_p[:, i] = self._log_tail(column, values, upper=True)
            elif tail == "lower":
                log_p[:, i] = self._log_tail(column, values, upper=False)
            else:
                upper = self._log_tail(column, values, upper=True)
                lower = self._log_tail(column, values, upper=False)
                log_p[:, i] = np.minimum(0.0, np.log(2.0) + np.minimum(upper, lower))
        evidence = log_p.min(axis=1)
        evidence[~np.isfinite(features).all(axis=1)] = -np.inf
        return evidence

    def score(self, features: np.ndarray) -> np.ndarray:
        """Return pertinence scores in [0, 1], shape (beats,); non-finite rows score 0.

        Scores below ``1 / n`` (``n`` held-out beats) mark beats less typical than every
        held-out beat; they decrease with the evidence and stay above 0.
        """
        evidence = self.evidence_of(features)
        n = self.evidence.size
        scores = np.searchsorted(self.evidence, evidence, side="right") / n
        # Below every held-out beat the rank is 0; keep ordering beats there, inside [0, 1/n).
        below = evidence < self.evidence[0]
        scores[below] = np.exp(evidence[below] - self.evidence[0]) / n
        scores[~np.isfinite(evidence)] = 0.0
        return scores

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return arrays for ``numpy.savez``."""
        return {"feature_values": self.feature_values, "evidence": self.evidence}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Calibration:
        """Rebuild from ``to_arrays`` output."""
        return cls(feature_values=arrays["feature_values"], evidence=arrays["evidence"])


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Return the probability that a positive value exceeds a negative one, ties counted half.

    Arguments:
        positive: Values of the positive set, shape (n,); for the gate, scores of real beats.
        negative: Values of the negative set, shape (m,).
    """
    positive = np.asarray(positive, dtype=np.float64)
    negative = np.sort(np.asarray(negative, dtype=np.float64))
    below = np.searchsorted(negative, positive, side="left")
    at_or_below = np.searchsorted(negative, positive, side="right")
    return float((below + at_or_below).sum() / (2.0 * positive.size * negative.size))
