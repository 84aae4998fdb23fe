"""Discriminative score: how well a classifier tells real beats from synthetic ones.

Real and synthetic beats are paired per class (equal counts), split in half by pair, a beat
classifier with two outputs is trained on one half and tested on the other. The score is
``|accuracy - 0.5|`` on the held-out half: 0 when the two are indistinguishable, 0.5 when they
are fully separable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from appliance.classes import AAMI_CLASSES
from appliance.quality.classifier import ClassifierConfig, predict_logits, train_classifier
from appliance.quality.protocol import LabelledBeats


def discriminative_score(
    real: LabelledBeats, synthetic: LabelledBeats, config: ClassifierConfig, seed: int
) -> dict[str, Any]:
    """Return the discriminative score overall and per class.

    Arguments:
        real: Real beats, z-normalised.
        synthetic: Synthetic beats, z-normalised.
        config: Training budget of the real-against-synthetic classifier.
        seed: Seed of the pairing, the split and the classifier.

    Returns:
        ``overall`` and ``per_class`` (class name to score, ``None`` without pairs), and
        ``pairs`` per class.

    Raises:
        ValueError: If no class has both real and synthetic beats.
    """
    rng = np.random.default_rng(seed)
    train_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    test_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    pairs: dict[str, int] = {}
    for class_index, name in enumerate(AAMI_CLASSES):
        real_index = np.flatnonzero(real.labels == class_index)
        fake_index = np.flatnonzero(synthetic.labels == class_index)
        n = min(real_index.size, fake_index.size)
        pairs[name] = int(n)
        if n < 2:
            continue
        real_pick = rng.choice(real_index, size=n, replace=False)
        fake_pick = rng.choice(fake_index, size=n, replace=False)
        half = n // 2
        for part, chosen in ((train_parts, slice(0, half)), (test_parts, slice(half, n))):
            x = np.concatenate([real.beats[real_pick[chosen]], synthetic.beats[fake_pick[chosen]]])
            y = np.concatenate([np.zeros(len(real_pick[chosen])), np.ones(len(fake_pick[chosen]))])
            part.append((x, y.astype(np.int64), np.full(y.shape[0], class_index)))
    if not train_parts:
        raise ValueError(
            "discriminative score needs at least 2 real and 2 synthetic beats of one class; "
            f"pairs per class: {pairs}"
        )
    x_train = np.concatenate([p[0] for p in train_parts])
    y_train = np.concatenate([p[1] for p in train_parts])
    x_test = np.concatenate([p[0] for p in test_parts])
    y_test = np.concatenate([p[1] for p in test_parts])
    class_test = np.concatenate([p[2] for p in test_parts])
    model = train_classifier(x_train, y_train, 2, config, seed)
    correct = predict_logits(model, x_test).argmax(axis=1) == y_test
    per_class: dict[str, float | None] = {}
    for class_index, name in enumerate(AAMI_CLASSES):
        mask = class_test == class_index
        per_class[name] = float(abs(correct[mask].mean() - 0.5)) if mask.any() else None
    return {
        "overall": float(abs(correct.mean() - 0.5)),
        "per_class": per_class,
        "pairs": pairs,
    }
