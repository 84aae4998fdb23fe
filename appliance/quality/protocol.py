"""The evaluation protocol: MIT-BIH de Chazal inter-patient split and per-beat z-normalisation.

- DS1 records are the training side. Of each DS1 training record, the earlier beats train the
  generator (members) and the last beats (``appliance.holdout.split_holdout``) form the privacy
  hold-out: same patients, never seen by the generator (non-members).
- DS2 records are the test set of every classifier.
- Every comparison sees beats z-normalised on their own (mean 0, standard deviation 1 over all
  values of the beat), so that amplitude scaling alone neither helps nor hurts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from appliance.classes import AAMI_CLASSES
from appliance.config import DataConfig, TrainConfig
from appliance.dataset import DE_CHAZAL_DS1, DE_CHAZAL_DS2, BeatSet, ingest
from appliance.holdout import split_holdout
from appliance.train import select_training_beats

logger = logging.getLogger(__name__)

# Classes that TSTR, F1 and the goals score on; Q is too rare in MIT-BIH and is only reported.
SCORED_CLASSES: tuple[int, ...] = (0, 1, 2, 3)
_MIN_STD = 1e-8


def znormalise(beats: np.ndarray) -> np.ndarray:
    """Z-normalise each beat over all its values.

    Arguments:
        beats: Beats, shape (beats, leads, samples), any unit.

    Returns:
        Beats of the same shape, float32, each with mean 0 and standard deviation 1; a constant
        beat becomes all zeros.
    """
    x = beats.astype(np.float64)
    centred = x - x.mean(axis=(1, 2), keepdims=True)
    std = centred.std(axis=(1, 2), keepdims=True)
    return (centred / np.maximum(std, _MIN_STD)).astype(np.float32)


@dataclass
class LabelledBeats:
    """Z-normalised beats with their AAMI class indices.

    Attributes:
        beats: Beats, shape (beats, leads, samples), z-normalised per beat.
        labels: AAMI class indices, shape (beats,).
    """

    beats: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def of_class(self, class_index: int) -> np.ndarray:
        """Return the beats of one class, shape (n, leads, samples)."""
        return self.beats[self.labels == class_index]

    def counts(self) -> dict[str, int]:
        """Return the number of beats per AAMI class name."""
        counts = np.bincount(self.labels, minlength=len(AAMI_CLASSES))
        return {name: int(counts[i]) for i, name in enumerate(AAMI_CLASSES)}

    @classmethod
    def from_beat_set(cls, beats: BeatSet) -> LabelledBeats:
        """Z-normalise the windows of an ingested split."""
        return cls(znormalise(beats.windows), beats.labels.astype(np.int64))


@dataclass
class ProtocolData:
    """The three sets of the protocol, z-normalised.

    Attributes:
        fit: DS1 beats before each record's hold-out, the generator's training set.
        members: The beats of ``fit`` that the generator learnt from: training keeps the known
            classes and caps each one (``appliance.train.select_training_beats``), so a beat of
            ``fit`` left out by the cap was never seen. The membership-inference members, the
            reference set of DCR, and the baselines' training set.
        unseen: The beats of ``fit`` of the known classes that the cap left out: same records
            and period as the members, never seen.
        holdout: Later DS1 beats of the same records, never trained on (non-members).
        test: DS2 beats, the classifiers' test set.
        fs_hz: Sampling rate of every beat.
        pre_r_samples: Samples before the R peak in each window.
        holdout_mv: The hold-out beats before z-normalisation, shape (beats, leads, samples),
            in mV; the pertinence score and the corruptions need real amplitudes.
        missing_records: De Chazal records that the data folder lacks; with any, the figures
            are not comparable with a report on the full MIT-BIH database.
    """

    fit: LabelledBeats
    members: LabelledBeats
    unseen: LabelledBeats
    holdout: LabelledBeats
    test: LabelledBeats
    fs_hz: float
    pre_r_samples: int
    holdout_mv: np.ndarray
    missing_records: tuple[str, ...] = ()


class BeatGenerator(Protocol):
    """A class-conditional beat generator under evaluation."""

    name: str

    def sample(self, counts: dict[int, int], seed: int) -> LabelledBeats:
        """Return up to ``counts[c]`` beats of each class index ``c``, z-normalised."""
        ...


def recorded_training(manifest: dict[str, Any]) -> TrainConfig | None:
    """Return the cap and seed that chose a model's training beats, from its manifest.

    Returns:
        A ``TrainConfig`` with the recorded ``max_beats_per_class`` and ``seed``, or None with a
        warning when the manifest does not record them.
    """
    recorded = manifest.get("training", {}).get("config", {})
    if "max_beats_per_class" not in recorded or "seed" not in recorded:
        logger.warning(
            "manifest records no max_beats_per_class and seed of training; the members of the "
            "privacy figures assume the defaults, which may differ from the model's own"
        )
        return None
    return TrainConfig(
        max_beats_per_class=int(recorded["max_beats_per_class"]), seed=int(recorded["seed"])
    )


def load_protocol(
    data_dir: Path,
    config: DataConfig | None = None,
    training: TrainConfig | None = None,
) -> ProtocolData:
    """Ingest MIT-BIH with the de Chazal split and build the fit, hold-out and test sets.

    The fit and hold-out sets are the ones ``appliance.jobs.train_and_export`` uses for the same
    folder and settings. Of the fit beats, a model trained by it has learnt from the members:
    those ``appliance.train.select_training_beats`` keeps under ``training``'s cap and seed.

    Arguments:
        data_dir: Folder of the MIT-BIH records (all DS1 and DS2 records).
        config: Ingest settings; the split is forced to ``de-chazal``.
        training: Training settings of the model under evaluation; the defaults when None.
    """
    base = config or DataConfig()
    settings = DataConfig(**{**base.__dict__, "split": "de-chazal"})
    dataset = ingest(Path(data_dir), settings)
    missing = [
        record
        for record in (*DE_CHAZAL_DS1, *DE_CHAZAL_DS2)
        if record not in dataset.report.split_of_record
    ]
    if missing:
        logger.warning(
            "protocol data=%s lacks %d of the %d de Chazal records (%s), so the figures are not "
            "comparable with a report on the full MIT-BIH database; pass a folder with all 48 "
            "MIT-BIH records",
            data_dir,
            len(missing),
            len(DE_CHAZAL_DS1) + len(DE_CHAZAL_DS2),
            ",".join(missing),
        )
    fit, holdout = split_holdout(dataset.splits["train"])
    train_settings = training or TrainConfig()
    classes_known, trained = select_training_beats(
        fit.labels, train_settings.max_beats_per_class, train_settings.seed
    )
    left_out = np.isin(fit.labels, [AAMI_CLASSES.index(name) for name in classes_known])
    left_out[trained] = False
    fit_beats = LabelledBeats.from_beat_set(fit)
    data = ProtocolData(
        fit=fit_beats,
        members=LabelledBeats(fit_beats.beats[trained], fit_beats.labels[trained]),
        unseen=LabelledBeats(fit_beats.beats[left_out], fit_beats.labels[left_out]),
        holdout=LabelledBeats.from_beat_set(holdout),
        test=LabelledBeats.from_beat_set(dataset.splits["test"]),
        fs_hz=settings.fs_hz,
        pre_r_samples=settings.pre_r_samples,
        holdout_mv=holdout.windows,
        missing_records=tuple(missing),
    )
    logger.info(
        "protocol fit=%d members=%d unseen=%d holdout=%d test=%d",
        len(data.fit),
        len(data.members),
        len(data.unseen),
        len(data.holdout),
        len(data.test),
    )
    return data


def subsample(data: LabelledBeats, per_class: int, seed: int) -> LabelledBeats:
    """Keep at most ``per_class`` beats of each class, drawn without replacement."""
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for class_index in np.unique(data.labels):
        index = np.flatnonzero(data.labels == class_index)
        if index.size > per_class:
            index = np.sort(rng.choice(index, size=per_class, replace=False))
        keep.append(index)
    chosen = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    return LabelledBeats(data.beats[chosen], data.labels[chosen])


def concatenate(first: LabelledBeats, second: LabelledBeats) -> LabelledBeats:
    """Return the beats of both sets, first then second."""
    return LabelledBeats(
        np.concatenate([first.beats, second.beats]),
        np.concatenate([first.labels, second.labels]),
    )
