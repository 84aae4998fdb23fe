"""Every quality and privacy figure of a set of generators, on one protocol, by the same code.

Fidelity figures (discriminative score, MMD², Fréchet distance, morphology) compare synthetic
beats with the generator's own training beats (the fit set), the distribution it was asked to
learn. Copying those beats would look perfect there, which is why the privacy figures compare
against the hold-out of the same patients.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.classes import AAMI_CLASSES
from appliance.quality.classifier import (
    BeatClassifier,
    ClassifierConfig,
    embed,
    evaluate_f1,
    utility,
)
from appliance.quality.discriminative import discriminative_score
from appliance.quality.mmd import frechet_distance, mmd2_test, power_spectra
from appliance.quality.morphology import morphology_report
from appliance.quality.privacy_metrics import closest_distance, privacy_report
from appliance.quality.protocol import (
    SCORED_CLASSES,
    BeatGenerator,
    LabelledBeats,
    ProtocolData,
    subsample,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityConfig:
    """Sample sizes and budgets of the evaluation.

    Attributes:
        train_per_class: Cap on real training beats per class for TRTR; TSTR asks each
            generator for the same counts.
        rebalance_target: Scored classes with fewer real training beats are topped up with
            synthetic beats to this count.
        eval_per_class: Beats per class and set for the discriminative score and privacy.
        mmd_per_class: Beats per class and set for MMD² and the Fréchet distance.
        permutations: Permutations of each MMD² test.
        morphology_per_class: Beats per class and set that are delineated.
        classifier: Training budget of every beat classifier.
        seed: Seed of every draw.
    """

    train_per_class: int = 2000
    rebalance_target: int = 2000
    eval_per_class: int = 500
    mmd_per_class: int = 300
    permutations: int = 200
    morphology_per_class: int = 100
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    seed: int = 0


@dataclass
class GeneratorFigures:
    """Figures of one generator and the synthetic beats behind them.

    Attributes:
        metrics: JSON-ready figures.
        synthetic: The synthetic training set drawn for TSTR, z-normalised.
        dcr_synthetic: Distances of synthetic beats to their closest training beat, (s,).
    """

    metrics: dict[str, Any]
    synthetic: LabelledBeats
    dcr_synthetic: np.ndarray


@dataclass
class Evaluation:
    """Figures of every generator with the shared real-data figures.

    Attributes:
        trtr_f1: Per-class F1 on DS2 of the classifier trained on real beats.
        real_train: The real training set of TRTR, z-normalised.
        generators: Generator name to its figures.
        dcr_holdout: Distances of hold-out beats to their closest training beat, (h,).
    """

    trtr_f1: dict[str, float | None]
    real_train: LabelledBeats
    generators: dict[str, GeneratorFigures]
    dcr_holdout: np.ndarray

    def summary(self) -> dict[str, Any]:
        """Return JSON-ready figures: TRTR and the metrics of each generator."""
        return {
            "trtr_f1": self.trtr_f1,
            "real_train_counts": self.real_train.counts(),
            "generators": {name: g.metrics for name, g in self.generators.items()},
        }


def evaluate_generators(
    data: ProtocolData, generators: list[BeatGenerator], config: QualityConfig
) -> Evaluation:
    """Score each generator on the protocol with the same classifiers, samples and seeds.

    Arguments:
        data: The protocol's fit, hold-out and test sets.
        generators: Generators trained on ``data.members``.
        config: Sample sizes and budgets.
    """
    real_train = subsample(data.fit, config.train_per_class, config.seed)
    trtr_f1, real_model = evaluate_f1(real_train, data.test, config.classifier, config.seed)
    logger.info("trtr macro_f1=%s", trtr_f1["macro"])
    dcr_holdout = closest_distance(data.holdout.beats, data.members.beats)
    evaluation = Evaluation(trtr_f1, real_train, {}, dcr_holdout)
    for generator in generators:
        evaluation.generators[generator.name] = _evaluate_one(
            data, generator, real_train, trtr_f1, real_model, dcr_holdout, config
        )
    return evaluation


def _evaluate_one(
    data: ProtocolData,
    generator: BeatGenerator,
    real_train: LabelledBeats,
    trtr_f1: dict[str, float | None],
    real_model: BeatClassifier,
    dcr_holdout: np.ndarray,
    config: QualityConfig,
) -> GeneratorFigures:
    seed = config.seed
    logger.info("generator=%s evaluation started", generator.name)
    started = time.monotonic()

    def stage_done(stage: str) -> None:
        # A report runs for minutes, so each finished stage is logged as progress.
        logger.info(
            "generator=%s stage=%s done elapsed_s=%.0f",
            generator.name,
            stage,
            time.monotonic() - started,
        )

    counts = {c: int(n) for c, n in enumerate(np.bincount(real_train.labels)) if n > 0}
    synthetic = generator.sample(counts, seed)
    top_up_counts = {
        c: config.rebalance_target - counts.get(c, 0)
        for c in SCORED_CLASSES
        if counts.get(c, 0) < config.rebalance_target
    }
    top_up = generator.sample(top_up_counts, seed + 1)
    stage_done("sampling")
    metrics: dict[str, Any] = {
        "requested_counts": _named_counts(counts),
        "synthetic_counts": synthetic.counts(),
        "requested_top_up_counts": _named_counts(top_up_counts),
        "top_up_counts": top_up.counts(),
    }
    metrics.update(
        utility(synthetic, top_up, real_train, data.test, trtr_f1, config.classifier, seed)
    )
    # A class that got none of its requested top-up beats was not rebalanced. Its "gain" would
    # be the difference of two classifiers trained on the same real beats.
    for name, requested in metrics["requested_top_up_counts"].items():
        if requested > 0 and metrics["top_up_counts"][name] == 0:
            metrics["rebalancing_gain"][name] = None
    stage_done("tstr_and_rebalancing")
    real_eval = subsample(data.fit, config.eval_per_class, seed)
    synthetic_eval = subsample(synthetic, config.eval_per_class, seed)
    metrics["discriminative"] = discriminative_score(
        real_eval, synthetic_eval, config.classifier, seed
    )
    stage_done("discriminative")
    metrics.update(_distances(data, synthetic, real_model, config))
    stage_done("mmd_and_frechet")
    metrics["morphology"] = morphology_report(
        data.fit, synthetic, data.fs_hz, data.pre_r_samples, config.morphology_per_class, seed
    )
    stage_done("morphology")
    privacy = privacy_report(
        synthetic_eval.beats,
        data.members,
        data.holdout,
        seed,
        max_members=config.eval_per_class * len(AAMI_CLASSES),
        dcr_holdout=dcr_holdout,
        unseen=data.unseen,
    )
    dcr_synthetic = privacy.pop("dcr_synthetic")
    privacy.pop("dcr_holdout")
    metrics["privacy"] = privacy
    logger.info("generator=%s evaluation done", generator.name)
    return GeneratorFigures(metrics, synthetic, dcr_synthetic)


def _named_counts(counts: dict[int, int]) -> dict[str, int]:
    """Return per-class counts keyed by AAMI class name, every class present."""
    return {name: int(counts.get(index, 0)) for index, name in enumerate(AAMI_CLASSES)}


def _distances(
    data: ProtocolData,
    synthetic: LabelledBeats,
    real_model: BeatClassifier,
    config: QualityConfig,
) -> dict[str, Any]:
    """Per-class MMD² on waveforms and power spectra, and Fréchet distances of embeddings."""
    real = subsample(data.fit, config.mmd_per_class, config.seed + 2)
    fake = subsample(synthetic, config.mmd_per_class, config.seed + 2)
    per_class: dict[str, Any] = {}
    for class_index, name in enumerate(AAMI_CLASSES):
        a, b = real.of_class(class_index), fake.of_class(class_index)
        if min(len(a), len(b)) < 2:
            continue
        waveform = mmd2_test(a, b, config.permutations, config.seed)
        spectrum = mmd2_test(
            power_spectra(a, data.fs_hz),
            power_spectra(b, data.fs_hz),
            config.permutations,
            config.seed,
        )
        per_class[name] = {
            "mmd2_waveform": waveform.mmd2,
            "p_value_waveform": waveform.p_value,
            "mmd2_spectrum": spectrum.mmd2,
            "p_value_spectrum": spectrum.p_value,
            "frechet": frechet_distance(embed(real_model, a), embed(real_model, b)),
            "beats": [len(a), len(b)],
        }
    scored = [per_class[AAMI_CLASSES[c]] for c in SCORED_CLASSES if AAMI_CLASSES[c] in per_class]

    def mean_of(key: str) -> float | None:
        return float(np.mean([entry[key] for entry in scored])) if scored else None

    overall_frechet = None
    if len(real) >= 2 and len(fake) >= 2:
        overall_frechet = frechet_distance(
            embed(real_model, real.beats), embed(real_model, fake.beats)
        )
    return {
        "mmd": per_class,
        "mean_mmd2_waveform": mean_of("mmd2_waveform"),
        "mean_mmd2_spectrum": mean_of("mmd2_spectrum"),
        "frechet": overall_frechet,
    }
