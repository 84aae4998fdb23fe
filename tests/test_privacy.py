"""Privacy guard: exact nearest neighbours, the threshold, near-copies and membership."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.engine import Engine, GenerateResult
from appliance.privacy import NearestNeighbourIndex, privacy_space
from appliance.scoring import auroc
from appliance.store import load_current

# Members and non-members per membership-inference attack.
ATTACK_BEATS = 600
# Largest AUROC an attack may reach, in whichever direction suits the attacker.
MAX_ATTACK_AUROC = 0.6


@pytest.fixture(scope="module")
def engine(model_store: Path) -> Engine:
    return Engine(load_current(model_store))


@pytest.fixture(scope="module")
def synthetic(engine: Engine) -> GenerateResult:
    """Beats accepted by the gate, 150 of each known class."""
    counts = dict.fromkeys(engine.classes_known, 150)
    return engine.generate(counts, 1.0, engine.default_margin, seed=3, max_draws_per_beat=20)


def _known(beats, engine: Engine) -> np.ndarray:
    return np.isin(beats.labels, engine.classes_known)


def _brute_force_distance(queries: np.ndarray, beats: np.ndarray) -> np.ndarray:
    """Nearest distance in the privacy space by float64 differences, chunked over queries."""
    train = privacy_space(beats).astype(np.float64)
    vectors = privacy_space(queries).astype(np.float64)
    out = np.empty(vectors.shape[0])
    for start in range(0, vectors.shape[0], 64):
        block = vectors[start : start + 64]
        squared = ((block[:, None, :] - train[None, :, :]) ** 2).sum(axis=2)
        out[start : start + 64] = np.sqrt(squared.min(axis=1))
    return out


def test_privacy_space_ignores_scale_and_offset() -> None:
    beats = np.random.default_rng(0).normal(size=(3, 1, 256))
    moved = beats * 4.0 + 2.5
    np.testing.assert_allclose(privacy_space(moved), privacy_space(beats), atol=1e-6)
    norms = np.linalg.norm(privacy_space(beats), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_index_matches_brute_force(split_train) -> None:
    fit, holdout = split_train
    train = fit.windows[:3000]
    queries = holdout.windows[:200]
    index = NearestNeighbourIndex(privacy_space(train))
    np.testing.assert_allclose(
        index.nearest_distance(privacy_space(queries)),
        _brute_force_distance(queries, train),
        atol=1e-6,
    )


def test_index_finds_exact_copy_across_chunks(split_train) -> None:
    fit, _ = split_train
    vectors = privacy_space(fit.windows[:1000])
    index = NearestNeighbourIndex(vectors)
    index_chunked = NearestNeighbourIndex(vectors)
    index_chunked.chunk_rows = 97  # the copy's neighbour falls in a later chunk
    queries = vectors[[5, 500, 999]]
    assert index.nearest_distance(queries).max() < 1e-6
    assert index_chunked.nearest_distance(queries).max() < 1e-6


def test_index_rejects_empty() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        NearestNeighbourIndex(np.zeros((0, 256), dtype=np.float32))


def test_threshold_is_heldout_quantile(engine: Engine, default_dataset, split_train) -> None:
    fit, holdout = split_train
    privacy = engine.manifest["privacy"]
    assert engine.privacy_threshold == privacy["threshold"]
    assert engine.privacy_threshold > 0.0
    assert privacy["train_beats"] == int(_known(fit, engine).sum())
    beats = np.concatenate([default_dataset.splits["validation"].windows, holdout.windows])
    labels = np.concatenate([default_dataset.splits["validation"].labels, holdout.labels])
    distances = engine.privacy_distance(beats[np.isin(labels, engine.classes_known)])
    expected = float(np.quantile(distances, privacy["quantile"]))
    assert engine.privacy_threshold == pytest.approx(expected, rel=1e-6)


def test_planted_training_copy_is_rejected(
    engine: Engine, split_train, synthetic: GenerateResult
) -> None:
    fit, _ = split_train
    known = np.flatnonzero(_known(fit, engine))
    planted = known[[10, len(known) // 2]]
    copies = (fit.windows[planted] / engine.scale_mv).astype(np.float32)
    candidates = np.concatenate([synthetic.beats[:20], copies])
    labels = np.concatenate([synthetic.classes[:20], fit.labels[planted]])
    z, _ = engine.forward(candidates, labels)
    result = GenerateResult(beats=np.zeros(0), classes=np.zeros(0), scores=np.zeros(0))
    accepted, _ = engine.gate(candidates, z, labels, 0.0, result)
    assert not accepted[-2:].any()
    assert result.privacy_rejections >= 2
    assert engine.privacy_distance(copies).max() < 1e-5


def test_accepted_beats_none_closer_than_threshold(
    engine: Engine, split_train, synthetic: GenerateResult
) -> None:
    fit, _ = split_train
    assert synthetic.beats.shape[0] > 0
    assert synthetic.privacy_threshold == engine.privacy_threshold
    # Independent of the index: brute force over every training beat of known classes.
    distances = _brute_force_distance(synthetic.beats, fit.windows[_known(fit, engine)])
    closer = int((distances < engine.privacy_threshold).sum())
    assert closer == 0, f"{closer} accepted beats within {engine.privacy_threshold:.4f}"


def _attack_sets(split_train, engine: Engine) -> tuple[np.ndarray, ...]:
    fit, holdout = split_train
    rng = np.random.default_rng(5)
    members = rng.choice(np.flatnonzero(_known(fit, engine)), ATTACK_BEATS, replace=False)
    outsiders = np.flatnonzero(_known(holdout, engine))
    outsiders = rng.choice(outsiders, min(ATTACK_BEATS, outsiders.size), replace=False)
    return (
        fit.windows[members],
        fit.labels[members],
        holdout.windows[outsiders],
        holdout.labels[outsiders],
    )


def _attack_auroc(member_values: np.ndarray, outsider_values: np.ndarray) -> float:
    value = auroc(member_values, outsider_values)
    return max(value, 1.0 - value)


def test_membership_by_score_near_chance(engine: Engine, split_train) -> None:
    members, member_labels, outsiders, outsider_labels = _attack_sets(split_train, engine)
    member_scores = engine.score((members / engine.scale_mv).astype(np.float32), member_labels)
    outsider_scores = engine.score(
        (outsiders / engine.scale_mv).astype(np.float32), outsider_labels
    )
    value = _attack_auroc(member_scores.scores, outsider_scores.scores)
    assert value <= MAX_ATTACK_AUROC, f"score attack AUROC {value:.3f}"


def test_membership_by_synthetic_distance_near_chance(
    engine: Engine, split_train, synthetic: GenerateResult
) -> None:
    members, _, outsiders, _ = _attack_sets(split_train, engine)
    # The attacker holds only released beats: distance to the nearest one of them.
    released = NearestNeighbourIndex(privacy_space(synthetic.beats))
    member_distance = released.nearest_distance(privacy_space(members))
    outsider_distance = released.nearest_distance(privacy_space(outsiders))
    value = _attack_auroc(-member_distance, -outsider_distance)
    assert value <= MAX_ATTACK_AUROC, f"distance attack AUROC {value:.3f}"
