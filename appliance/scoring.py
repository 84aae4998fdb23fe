"""Pertinence score: evidence from the flow combined and calibrated on held-out real beats.

For a beat ``x`` scored under class ``c`` the flow gives latent values ``z = f(x | c)`` and
``log|det J|``. Four statistics are computed:

- ``nll_bpd``: negative log-likelihood in bits per dimension,
  ``(||z||^2 / 2 + D/2 log(2 pi) - log|det J|) / (D ln 2)``; large is atypical.
- ``bottleneck_norm``: ``||z[:k]||^2 / k`` over the ``k`` bottleneck dimensions; large is
  atypical.
- ``reconstruction``: ``log10(mean((x - f^-1(truncate(z) | c))^2))``, the error of the beat
  projected through the bottleneck; large is atypical (noise, mains, steps, other shapes).
- ``amplitude``: ``log`` of the peak-to-peak amplitude; too small or too large is atypical
  (flat lines, scaled beats), so both tails count.

Each statistic becomes a tail probability ``p_i`` against the same statistic of held-out real
validation beats (one-sided or two-sided as listed). The evidence ``e = min_i p_i`` is then
ranked against the evidence of those validation beats:

    score(x) = #{validation beats v : e(v) <= e(x)} / n

so the score is uniform on [0, 1] for real held-out beats, and a margin ``m`` rejects about a
fraction ``m`` of them whatever the model or dataset. Raw likelihood alone is not used because
flows give high density to simple inputs such as flat lines and scaled-down beats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES = ("nll_bpd", "bottleneck_norm", "reconstruction", "amplitude")
# Which tails of each statistic count as atypical: "upper" or "both".
FEATURE_TAILS = {"nll_bpd": "upper", "bottleneck_norm": "upper", "reconstruction": "upper",
                 "amplitude": "both"}
_LOG_FLOOR = 1e-12


def compute_features(
    x: np.ndarray, z: np.ndarray, log_det: np.ndarray, x_projected: np.ndarray,
    bottleneck_dims: int,
) -> np.ndarray:
    """Return the statistics of ``FEATURES`` for each beat, shape (beats, 4), float64.

    Arguments:
        x: Scaled beats, shape (beats, leads, window_samples).
        z: Latent values, shape (beats, latent_dims).
        log_det: ``log|det dz/dx|``, shape (beats,).
        x_projected: Beats mapped back from the truncated latent values, shape of ``x``.
        bottleneck_dims: Leading latent dimensions of the bottleneck.
    """
    z = z.astype(np.float64)
    dims = z.shape[1]
    log_prob = -0.5 * (z**2).sum(axis=1) - 0.5 * dims * np.log(2 * np.pi) + log_det
    nll_bpd = -log_prob / (dims * np.log(2.0))
    bottleneck_norm = (z[:, :bottleneck_dims] ** 2).sum(axis=1) / bottleneck_dims
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    error = ((flat - x_projected.reshape(x.shape[0], -1)) ** 2).mean(axis=1)
    reconstruction = np.log10(error + _LOG_FLOOR)
    amplitude = np.log(np.ptp(flat, axis=1) + _LOG_FLOOR)
    return np.stack([nll_bpd, bottleneck_norm, reconstruction, amplitude], axis=1)


@dataclass
class Calibration:
    """Sorted statistics and evidence of held-out real beats.

    Attributes:
        feature_values: Sorted statistics, shape (n, features); column i sorted on its own.
        evidence: Sorted evidence ``min_i p_i`` of the same beats, shape (n,).
    """

    feature_values: np.ndarray
    evidence: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> Calibration:
        """Calibrate on the statistics of held-out real beats, shape (n, features)."""
        finite = np.isfinite(features).all(axis=1)
        if finite.sum() < 10:
            raise ValueError(
                f"calibration needs at least 10 finite held-out beats, got {int(finite.sum())}"
            )
        sorted_values = np.sort(features[finite], axis=0)
        partial = cls(feature_values=sorted_values, evidence=np.zeros(0))
        evidence = np.sort(partial.evidence_of(features[finite]))
        return cls(feature_values=sorted_values, evidence=evidence)

    def evidence_of(self, features: np.ndarray) -> np.ndarray:
        """Return ``min_i p_i`` for each beat, shape (beats,); non-finite rows get 0."""
        n = self.feature_values.shape[0]
        p_values = np.empty_like(features)
        for i, name in enumerate(FEATURES):
            column = self.feature_values[:, i]
            values = features[:, i]
            upper = (n - np.searchsorted(column, values, side="left") + 1) / (n + 1)
            if FEATURE_TAILS[name] == "upper":
                p_values[:, i] = upper
            else:
                lower = (np.searchsorted(column, values, side="right") + 1) / (n + 1)
                p_values[:, i] = np.minimum(1.0, 2.0 * np.minimum(upper, lower))
        evidence = p_values.min(axis=1)
        evidence[~np.isfinite(features).all(axis=1)] = 0.0
        return evidence

    def score(self, features: np.ndarray) -> np.ndarray:
        """Return pertinence scores in [0, 1], shape (beats,); non-finite rows score 0."""
        evidence = self.evidence_of(features)
        scores = np.searchsorted(self.evidence, evidence, side="right") / self.evidence.size
        scores[evidence <= 0.0] = 0.0
        return scores

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return arrays for ``numpy.savez``."""
        return {"feature_values": self.feature_values, "evidence": self.evidence}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Calibration:
        """Rebuild from ``to_arrays`` output."""
        return cls(feature_values=arrays["feature_values"], evidence=arrays["evidence"])
