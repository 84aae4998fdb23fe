"""Privacy figures: distance to the closest training beat (DCR) and membership inference.

Distances are those of the appliance's privacy guard (``appliance.privacy``): the RMS
difference of two per-beat z-normalised beats, computed exactly.

- DCR: each synthetic beat's distance to its closest generator training beat, against the same
  distance of hold-out beats (same patients, never trained on). A generator that copies its
  training beats puts synthetic beats below nearly every hold-out distance.
- Membership inference: an attacker who sees only synthetic beats guesses that a beat was a
  training beat when a synthetic beat lies close to it. The AUROC of that guess (members:
  beats the generator learnt from, non-members: hold-out beats, score: minus the distance to
  the closest synthetic beat) is 0.5 when the synthetic set reveals nothing about membership.
  The members are drawn with the class counts of the non-member sample, so that a class mix
  that differs between the two sets does not move the AUROC.
- The same attack against unseen beats: members against beats of the same records and period
  that training left out (the per-class cap leaves most normal beats out). The hold-out is the
  end of each record, and beats change over a record, so part of the AUROC against the
  hold-out comes from that change and not from membership. Against unseen beats of the same
  period that part is absent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.stats

from appliance.privacy import NearestNeighbourIndex, privacy_space
from appliance.quality.protocol import LabelledBeats

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


def matched_samples(
    first_labels: np.ndarray,
    second_labels: np.ndarray,
    max_second: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw two samples with equal class counts, one from each labelled set.

    The second sample is drawn first: up to ``max_second`` beats of the classes that both sets
    contain. Then each class keeps the same number of beats on both sides, the smaller count.

    Arguments:
        first_labels: Class index of each beat of the first set, shape (n,).
        second_labels: Class index of each beat of the second set, shape (m,).
        max_second: Largest size of the second sample before the classes are matched.
        rng: Source of the draws without replacement.

    Returns:
        Sorted indices into the first set and into the second set, with equal class counts.
    """
    usable = np.flatnonzero(np.isin(second_labels, first_labels))
    drawn = rng.choice(usable, size=min(usable.size, max_second), replace=False)
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    for class_index in np.unique(second_labels[drawn]):
        of_class = drawn[second_labels[drawn] == class_index]
        pool = np.flatnonzero(first_labels == class_index)
        count = min(of_class.size, pool.size)
        first.append(rng.choice(pool, size=count, replace=False))
        second.append(of_class[:count])
    if not first:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def membership_auroc(
    synthetic: np.ndarray,
    members: LabelledBeats,
    others: LabelledBeats,
    rng: np.random.Generator,
    max_beats: int,
) -> float | None:
    """AUROC of the closest-synthetic-beat attack, members against others of the same classes.

    Arguments:
        synthetic: Synthetic beats, shape (s, leads, samples).
        members: Beats the generator learnt from.
        others: Beats it never saw.
        rng: Source of both samples.
        max_beats: Largest sample of ``others``; both samples have the same class counts
            (``matched_samples``).

    Returns:
        The AUROC, or None when the synthetic set or a matched sample is empty.
    """
    member_index, other_index = matched_samples(members.labels, others.labels, max_beats, rng)
    if synthetic.shape[0] == 0 or member_index.size == 0:
        return None
    return auroc(
        -closest_distance(members.beats[member_index], synthetic),
        -closest_distance(others.beats[other_index], synthetic),
    )


def privacy_report(
    synthetic: np.ndarray,
    members: LabelledBeats,
    holdout: LabelledBeats,
    seed: int,
    max_members: int = 5000,
    dcr_holdout: np.ndarray | None = None,
    unseen: LabelledBeats | None = None,
) -> dict[str, Any]:
    """Compute DCR figures and the membership-inference AUROC.

    Arguments:
        synthetic: Synthetic beats, shape (s, leads, samples).
        members: The beats the generator learnt from.
        holdout: Hold-out beats of the same patients.
        seed: Seed of the samples of the membership-inference tests.
        max_members: Largest non-member sample of each membership-inference test.
        dcr_holdout: The hold-out's distances to ``members`` from an earlier call, if any.
        unseen: Beats of the same records and period that the generator never saw, if any.

    Returns:
        ``dcr_synthetic_median``, ``dcr_holdout_median``, ``holdout_dcr_p05`` (the hold-out's
        5th percentile), ``fraction_below_holdout_p05``, ``mia_auroc`` (against the hold-out)
        and ``mia_auroc_unseen`` (against ``unseen``; None without unseen beats), and the
        distance arrays ``dcr_synthetic`` (s,) and ``dcr_holdout`` (h,).
    """
    dcr_synthetic = closest_distance(synthetic, members.beats)
    if dcr_holdout is None:
        dcr_holdout = closest_distance(holdout.beats, members.beats)
    threshold = float(np.quantile(dcr_holdout, DCR_QUANTILE))
    rng = np.random.default_rng(seed)
    mia = membership_auroc(synthetic, members, holdout, rng, max_members)
    mia_unseen = None
    if unseen is not None and len(unseen):
        mia_unseen = membership_auroc(synthetic, members, unseen, rng, max_members)
    return {
        "dcr_synthetic_median": float(np.median(dcr_synthetic)) if dcr_synthetic.size else None,
        "dcr_holdout_median": float(np.median(dcr_holdout)),
        "holdout_dcr_p05": threshold,
        "fraction_below_holdout_p05": (
            float(np.mean(dcr_synthetic < threshold)) if dcr_synthetic.size else None
        ),
        "mia_auroc": mia,
        "mia_auroc_unseen": mia_unseen,
        "dcr_synthetic": dcr_synthetic,
        "dcr_holdout": dcr_holdout,
    }
