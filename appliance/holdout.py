"""Same-patient hold-out: the last beats of each training record, never trained on."""

from __future__ import annotations

import numpy as np

from appliance.dataset import BeatSet

# Fraction of each training record's beats, taken from its end, kept out of training.
HOLDOUT_FRACTION = 0.15


def split_holdout(beats: BeatSet, fraction: float = HOLDOUT_FRACTION) -> tuple[BeatSet, BeatSet]:
    """Split each record's beats in time into (fit, hold-out).

    The hold-out calibrates the pertinence score and the privacy threshold next to the
    validation records, so that both reflect the training patients as well as new ones; it is
    also the non-member set of the membership-inference check.

    Arguments:
        beats: Training beats in record order, then time order within a record.
        fraction: Share of each record's beats, from its end, put in the hold-out.
    """
    keep_fit = np.ones(len(beats), dtype=bool)
    for record in np.unique(beats.records):
        index = np.flatnonzero(beats.records == record)
        n_holdout = int(round(index.size * fraction))
        if n_holdout:
            keep_fit[index[-n_holdout:]] = False
    return _subset(beats, keep_fit), _subset(beats, ~keep_fit)


def _subset(beats: BeatSet, mask: np.ndarray) -> BeatSet:
    return BeatSet(
        windows=beats.windows[mask], labels=beats.labels[mask], records=beats.records[mask]
    )


def concatenate(first: BeatSet, second: BeatSet) -> BeatSet:
    """Return the beats of both sets, first then second."""
    return BeatSet(
        windows=np.concatenate([first.windows, second.windows]),
        labels=np.concatenate([first.labels, second.labels]),
        records=np.concatenate([first.records, second.records]),
    )
