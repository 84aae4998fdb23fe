"""A 1-D CNN beat classifier and the utility metrics built on it: TSTR, TRTR, rebalancing gain.

TSTR trains on synthetic beats and tests on real DS2 beats; TRTR trains on real DS1 beats of the
same class composition and tests on the same DS2 beats. The rebalancing gain compares real
training beats alone with real beats topped up by synthetic beats of the rarer classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from appliance.classes import AAMI_CLASSES
from appliance.quality.protocol import SCORED_CLASSES, LabelledBeats, concatenate

logger = logging.getLogger(__name__)

EMBEDDING_DIMS = 64
PREDICT_BATCH = 1024


@dataclass(frozen=True)
class ClassifierConfig:
    """Training budget of the beat classifier.

    Attributes:
        steps: Optimiser steps; a fixed count keeps the cost independent of the set size.
        batch_size: Beats per step, drawn uniformly from the training set (its class balance is
            kept, so that rebalancing has an effect to measure).
        learning_rate: Adam learning rate.
        threads: Torch intra-op threads while training (0 keeps torch's default); one thread
            suits this small network and leaves the other cores to other work.
    """

    steps: int = 400
    batch_size: int = 128
    learning_rate: float = 2e-3
    threads: int = 1


class BeatClassifier(nn.Module):
    """Three convolution blocks, global average pooling and a linear head.

    Arguments:
        leads: Input channels.
        n_outputs: Number of classes.
    """

    def __init__(self, leads: int, n_outputs: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(leads, 16, 7, padding=3),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 7, padding=3),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(32, EMBEDDING_DIMS, 5, padding=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(EMBEDDING_DIMS, n_outputs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Map beats (batch, leads, samples) to embeddings (batch, EMBEDDING_DIMS)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map beats (batch, leads, samples) to class logits (batch, n_outputs)."""
        return self.head(self.features(x))


def train_classifier(
    beats: np.ndarray, labels: np.ndarray, n_outputs: int, config: ClassifierConfig, seed: int
) -> BeatClassifier:
    """Train a classifier by cross-entropy.

    Arguments:
        beats: Training beats, shape (n, leads, samples), z-normalised.
        labels: Target indices in [0, n_outputs), shape (n,).
        n_outputs: Number of classes.
        config: Training budget.
        seed: Seed of the weights and the batch draws.

    Raises:
        ValueError: If there is no training beat.
    """
    if beats.shape[0] == 0:
        raise ValueError("classifier needs at least one training beat, got 0")
    threads_before = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = BeatClassifier(beats.shape[1], n_outputs)
        optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        x_all = torch.from_numpy(np.ascontiguousarray(beats, dtype=np.float32))
        y_all = torch.from_numpy(labels.astype(np.int64))
        model.train()
        for _ in range(config.steps):
            index = torch.from_numpy(rng.integers(0, beats.shape[0], size=config.batch_size))
            loss = nn.functional.cross_entropy(model(x_all[index]), y_all[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
        return model
    finally:
        torch.set_num_threads(threads_before)


@torch.no_grad()
def predict_logits(model: BeatClassifier, beats: np.ndarray) -> np.ndarray:
    """Return class logits, shape (n, n_outputs), of beats (n, leads, samples)."""
    outputs = [
        model(torch.from_numpy(np.ascontiguousarray(beats[i : i + PREDICT_BATCH]))).numpy()
        for i in range(0, beats.shape[0], PREDICT_BATCH)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, model.head.out_features))


@torch.no_grad()
def embed(model: BeatClassifier, beats: np.ndarray) -> np.ndarray:
    """Return embeddings, shape (n, EMBEDDING_DIMS), of beats (n, leads, samples)."""
    outputs = [
        model.embed(torch.from_numpy(np.ascontiguousarray(beats[i : i + PREDICT_BATCH]))).numpy()
        for i in range(0, beats.shape[0], PREDICT_BATCH)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, EMBEDDING_DIMS))


def f1_per_class(true: np.ndarray, predicted: np.ndarray) -> dict[str, float | None]:
    """Return the F1 score of each AAMI class and ``macro`` over the scored classes N, S, V, F.

    A class with no true and no predicted beat gets ``None`` and is left out of the macro mean.
    """
    result: dict[str, float | None] = {}
    for class_index, name in enumerate(AAMI_CLASSES):
        true_positive = int(np.sum((true == class_index) & (predicted == class_index)))
        denominator = int(np.sum(true == class_index) + np.sum(predicted == class_index))
        result[name] = 2.0 * true_positive / denominator if denominator else None
    scored = [result[AAMI_CLASSES[c]] for c in SCORED_CLASSES]
    values = [v for v in scored if v is not None]
    result["macro"] = float(np.mean(values)) if values else None
    return result


def evaluate_f1(
    train: LabelledBeats, test: LabelledBeats, config: ClassifierConfig, seed: int
) -> tuple[dict[str, float | None], BeatClassifier]:
    """Train on one set and return the per-class F1 on another, with the trained model."""
    model = train_classifier(train.beats, train.labels, len(AAMI_CLASSES), config, seed)
    predicted = predict_logits(model, test.beats).argmax(axis=1)
    return f1_per_class(test.labels, predicted), model


def utility(
    synthetic: LabelledBeats,
    top_up: LabelledBeats,
    real_train: LabelledBeats,
    test: LabelledBeats,
    trtr_f1: dict[str, float | None],
    config: ClassifierConfig,
    seed: int,
) -> dict[str, Any]:
    """Compute TSTR, the TSTR/TRTR ratio and the rebalancing gain of one generator.

    Arguments:
        synthetic: Synthetic training set, drawn with the class counts of ``real_train``.
        top_up: Synthetic beats of the rarer classes added to ``real_train`` for rebalancing.
        real_train: Real training beats (the TRTR training set).
        test: Real DS2 beats.
        trtr_f1: Per-class F1 of the classifier trained on ``real_train``.
        config: Classifier training budget.
        seed: Seed of the classifiers.

    Returns:
        ``tstr_f1``, ``tstr_trtr`` (ratio of macro-F1), ``rebalanced_f1`` and
        ``rebalancing_gain`` (rebalanced minus real-only F1 per class).
    """
    tstr_f1: dict[str, float | None] = {name: None for name in (*AAMI_CLASSES, "macro")}
    if len(synthetic):
        tstr_f1, _ = evaluate_f1(synthetic, test, config, seed)
    rebalanced_f1, _ = evaluate_f1(concatenate(real_train, top_up), test, config, seed)
    gain: dict[str, float | None] = {}
    for name in (*AAMI_CLASSES, "macro"):
        after, before = rebalanced_f1[name], trtr_f1[name]
        gain[name] = after - before if after is not None and before is not None else None
    trtr_macro, tstr_macro = trtr_f1["macro"], tstr_f1["macro"]
    ratio = tstr_macro / trtr_macro if tstr_macro is not None and trtr_macro else None
    logger.info("utility tstr_macro_f1=%s trtr_macro_f1=%s", tstr_macro, trtr_macro)
    return {
        "tstr_f1": tstr_f1,
        "tstr_trtr": ratio,
        "rebalanced_f1": rebalanced_f1,
        "rebalancing_gain": gain,
    }
