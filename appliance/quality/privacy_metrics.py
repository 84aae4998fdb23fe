"""Privacy figures: distance to the closest training beat (DCR) and membership inference.

Distances are those of the appliance's privacy guard (``appliance.privacy``): the RMS
difference of two per-beat z-normalised beats, computed exactly.

- DCR: each synthetic beat's distance to its closest generator training beat, against the same
  distance of hold-out beats (same patients, never trained on). A generator that copies its
  training beats puts synthetic beats below nearly every hold-out distance.
- Membership inference: an attacker who sees only synthetic beats guesses that a beat was a
  training beat when a synthetic beat lies close to it. The AUROC of that guess (members:
  training beats, non-members: hold-out beats, score: minus the distance to the closest
  synthetic beat) is 0.5 when the synthetic set reveals nothing about membership.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.stats

from appliance.privacy import NearestNeighbourIndex, privacy_space

# Quantile of the hold-out DCR below which a synthetic beat counts as too close.
DCR_QUANTILE = 0.05


def closest_distance(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Return each query beat's distance to its closest reference beat.

    Arguments:
        queries: Beats, shape (m, leads, samples).
        reference: Beats, shape (n, leads, samples), n >= 1.

    Returns:
        RMS differences of the z-normalised beats, shape (m,).
    """
    if queries.shape[0] == 0:
        return np.zeros(0)
    index = NearestNeighbourIndex(privacy_space(reference))
    return index.nearest_distance(privacy_space(queries))


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Return the area under the ROC curve of scores (higher means positive), ties counted half.

    Raises:
        ValueError: If either set is empty.
    """
    if positive.size == 0 or negative.size == 0:
        raise ValueError(
            f"AUROC needs both sets non-empty, got {positive.size} and {negative.size}"
        )
    ranks = scipy.stats.rankdata(np.concatenate([positive, negative]))
    rank_sum = ranks[: positive.size].sum()
    u = rank_sum - positive.size * (positive.size + 1) / 2.0
    return float(u / (positive.size * negative.size))


def privacy_report(
    synthetic: np.ndarray,
    members: np.ndarray,
    holdout: np.ndarray,
    seed: int,
    max_members: int = 5000,
    dcr_holdout: np.ndarray | None = None,
) -> dict[str, Any]:
    """Compute DCR figures and the membership-inference AUROC.

    Arguments:
        synthetic: Synthetic beats, shape (s, leads, samples).
        members: The generator's training beats, shape (m, leads, samples).
        holdout: Hold-out beats of the same patients, shape (h, leads, samples).
        seed: Seed of the member subsample that matches the hold-out size.
        max_members: Largest member and non-member sample of the membership-inference test.
        dcr_holdout: The hold-out's distances to ``members`` from an earlier call, if any.

    Returns:
        ``dcr_synthetic_median``, ``dcr_holdout_median``, ``holdout_dcr_p05`` (the hold-out's
        5th percentile), ``fraction_below_holdout_p05`` and ``mia_auroc``, and the distance
        arrays ``dcr_synthetic`` (s,) and ``dcr_holdout`` (h,).
    """
    dcr_synthetic = closest_distance(synthetic, members)
    if dcr_holdout is None:
        dcr_holdout = closest_distance(holdout, members)
    threshold = float(np.quantile(dcr_holdout, DCR_QUANTILE))
    rng = np.random.default_rng(seed)
    n = min(members.shape[0], holdout.shape[0], max_members)
    member_sample = members[rng.choice(members.shape[0], size=n, replace=False)]
    holdout_sample = holdout[rng.choice(holdout.shape[0], size=n, replace=False)]
    mia = None
    if synthetic.shape[0]:
        mia = auroc(
            -closest_distance(member_sample, synthetic),
            -closest_distance(holdout_sample, synthetic),
        )
    return {
        "dcr_synthetic_median": float(np.median(dcr_synthetic)) if dcr_synthetic.size else None,
        "dcr_holdout_median": float(np.median(dcr_holdout)),
        "holdout_dcr_p05": threshold,
        "fraction_below_holdout_p05": (
            float(np.mean(dcr_synthetic < threshold)) if dcr_synthetic.size else None
        ),
        "mia_auroc": mia,
        "dcr_synthetic": dcr_synthetic,
        "dcr_holdout": dcr_holdout,
    }
