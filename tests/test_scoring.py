"""Pertinence score: statistics, calibration, labels and parity between PyTorch and ONNX."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from appliance.engine import Engine
from appliance.errors import ModelStoreError
from appliance.scoring import (
    FEATURE_TAILS,
    FEATURES,
    HIGH_FREQUENCY_HZ,
    Calibration,
    auroc,
    compute_features,
    high_frequency_share,
)
from appliance.store import MANIFEST_FILE, load_current, model_id_of, sha256_of
from appliance.train import one_hot

FS_HZ = 360.0
# Beats of the test record used per test; the engine scores about 1000 beats/s per class.
TEST_BEATS = 400


@pytest.fixture(scope="module")
def engine(model_store: Path) -> Engine:
    return Engine(load_current(model_store))


@pytest.fixture(scope="module")
def record_beats(default_dataset, engine: Engine) -> tuple[np.ndarray, np.ndarray]:
    """Scaled beats of the test record of known classes and their labels."""
    test = default_dataset.splits["test"]
    known = np.flatnonzero(np.isin(test.labels, engine.classes_known))
    index = np.random.default_rng(1).choice(known, TEST_BEATS, replace=False)
    index.sort()
    return (test.windows[index] / engine.scale_mv).astype(np.float32), test.labels[index]


def test_calibration_uniform_on_its_own_beats() -> None:
    features = np.random.default_rng(0).normal(size=(2000, len(FEATURES)))
    scores = Calibration.fit(features).score(features)
    assert scores.min() >= 0.0
    assert scores.max() == 1.0
    assert abs(float((scores < 0.05).mean()) - 0.05) < 0.01
    assert abs(float((scores < 0.5).mean()) - 0.5) < 0.02


def test_calibration_drops_non_finite_rows() -> None:
    features = np.random.default_rng(0).normal(size=(500, len(FEATURES)))
    damaged = features.copy()
    damaged[[3, 70, 400], [0, 2, 5]] = [np.nan, np.inf, -np.inf]
    finite_rows = np.delete(features, [3, 70, 400], axis=0)
    fitted = Calibration.fit(damaged)
    expected = Calibration.fit(finite_rows)
    assert np.array_equal(fitted.feature_values, expected.feature_values)
    assert np.array_equal(fitted.evidence, expected.evidence)
    nine_finite = np.full((20, len(FEATURES)), np.nan)
    nine_finite[:9] = features[:9]
    with pytest.raises(ValueError, match="at least 10 finite held-out beats, got 9"):
        Calibration.fit(nine_finite)


def test_calibration_ranks_far_values_lower() -> None:
    features = np.random.default_rng(0).normal(size=(1000, len(FEATURES)))
    calibration = Calibration.fit(features)
    beyond = np.zeros((3, len(FEATURES)))
    beyond[:, 0] = [5.0, 10.0, 50.0]  # nll_bpd, upper tail only
    evidence = calibration.evidence_of(beyond)
    assert evidence[0] > evidence[1] > evidence[2]
    assert np.isfinite(evidence).all()


def test_calibration_two_sided_tail_counts_low() -> None:
    features = np.random.default_rng(0).normal(size=(1000, len(FEATURES)))
    calibration = Calibration.fit(features)
    amplitude = FEATURES.index("amplitude")
    nll = FEATURES.index("nll_bpd")
    low = np.zeros((2, len(FEATURES)))
    low[0, amplitude] = -8.0
    low[1, nll] = -8.0  # very likely beats are not atypical
    scores = calibration.score(low)
    assert scores[0] < 1.0 / calibration.evidence.size  # less typical than every held-out beat
    assert scores[1] > 0.2


def test_calibration_keeps_order_below_range() -> None:
    features = np.random.default_rng(0).normal(size=(1000, len(FEATURES)))
    calibration = Calibration.fit(features)
    far = np.zeros((2, len(FEATURES)))
    far[:, FEATURES.index("morphology")] = [6.0, 9.0]
    scores = calibration.score(far)
    assert scores[0] > scores[1] > 0.0
    assert scores[0] < 1.0 / calibration.evidence.size


def test_calibration_non_finite_scores_zero() -> None:
    features = np.random.default_rng(0).normal(size=(100, len(FEATURES)))
    calibration = Calibration.fit(features)
    bad = np.zeros((2, len(FEATURES)))
    bad[0, 2] = np.nan
    bad[1, 3] = np.inf
    assert calibration.score(bad).tolist() == [0.0, 0.0]


def test_calibration_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="shape"):
        Calibration.fit(np.zeros((100, 4)))


def test_high_frequency_share_of_mains_and_beat() -> None:
    t_s = np.arange(256) / FS_HZ
    mains = np.sin(2 * np.pi * 50.0 * t_s)[None, None, :]
    slow = np.sin(2 * np.pi * 5.0 * t_s)[None, None, :]
    shares = high_frequency_share(np.concatenate([mains, slow]), FS_HZ)
    assert HIGH_FREQUENCY_HZ < 50.0
    assert shares[0] > 0.9
    assert shares[1] < 0.05


@pytest.mark.parametrize(
    ("name", "atypical", "typical"),
    [("max_slope", -8.0, 8.0), ("step_sharpness", 8.0, -8.0), ("lead_match", -8.0, 8.0)],
)
def test_calibration_one_sided_tails(name: str, atypical: float, typical: float) -> None:
    features = np.random.default_rng(0).normal(size=(1000, len(FEATURES)))
    calibration = Calibration.fit(features)
    probe = np.zeros((2, len(FEATURES)))
    probe[0, FEATURES.index(name)] = atypical
    probe[1, FEATURES.index(name)] = typical
    scores = calibration.score(probe)
    assert scores[0] < 1.0 / calibration.evidence.size
    assert scores[1] > 0.2


def test_calibration_lower_tail_ignores_high() -> None:
    features = np.random.default_rng(0).normal(size=(1000, len(FEATURES)))
    calibration = Calibration.fit(features)
    r_peak = FEATURES.index("r_peak")
    assert FEATURE_TAILS["r_peak"] == "lower"
    probe = np.zeros((2, len(FEATURES)))
    probe[0, r_peak] = -8.0
    probe[1, r_peak] = 8.0  # a taller peak than any held-out beat is not atypical
    scores = calibration.score(probe)
    assert scores[0] < 1.0 / calibration.evidence.size
    assert scores[1] > 0.2


def test_slope_and_peak_statistics_on_real_beats(
    engine: Engine, record_beats: tuple[np.ndarray, np.ndarray]
) -> None:
    x, labels = record_beats[0][:200], record_beats[1][:200]
    beats = x.astype(np.float64)
    step = beats.copy()
    step[:, :, 150:] += 1.0 / engine.scale_mv  # 1 mV baseline step after the R peak
    inverted = -beats
    t_s = np.arange(beats.shape[2]) / engine.fs_hz
    sinusoid = np.ptp(beats, axis=2, keepdims=True) / 2 * np.sin(2 * np.pi * 1.2 * t_s)
    slope = FEATURES.index("max_slope")
    sharpness = FEATURES.index("step_sharpness")
    peak = FEATURES.index("r_peak")
    real = engine.score(x, labels).features
    stepped = engine.score(step.astype(np.float32), labels).features
    flipped = engine.score(inverted.astype(np.float32), labels).features
    smooth = engine.score(sinusoid.astype(np.float32), labels).features
    assert auroc(real[:, slope], smooth[:, slope]) > 0.95
    assert auroc(stepped[:, sharpness], real[:, sharpness]) > 0.95
    # A QRS upstroke changes over the span more than twice as much as in one sample.
    assert np.median(real[:, sharpness]) < np.log(0.5)
    assert auroc(real[:, peak], flipped[:, peak]) > 0.95
    # The statistics do not depend on the beat's scale.
    doubled = engine.score((2 * x).astype(np.float32), labels).features
    np.testing.assert_allclose(doubled[:, slope], real[:, slope], atol=1e-5)
    np.testing.assert_allclose(doubled[:, sharpness], real[:, sharpness], atol=1e-5)
    np.testing.assert_allclose(doubled[:, peak], real[:, peak], atol=1e-4)


def test_likelihood_and_reconstruction_statistics_on_real_beats(
    engine: Engine, record_beats: tuple[np.ndarray, np.ndarray]
) -> None:
    x, labels = record_beats[0][:200], record_beats[1][:200]
    # White noise of 0.2 mV: detail the bottleneck cannot carry and the flow finds unlikely.
    noise = np.random.default_rng(3).normal(0.0, 0.2 / engine.scale_mv, size=x.shape)
    noisy = (x + noise).astype(np.float32)
    nll = FEATURES.index("nll_bpd")
    reconstruction = FEATURES.index("reconstruction")
    real = engine.score(x, labels).features
    corrupted = engine.score(noisy, labels).features
    # A statistic set to a constant would give 0.5.
    assert auroc(corrupted[:, nll], real[:, nll]) > 0.9
    assert auroc(corrupted[:, reconstruction], real[:, reconstruction]) > 0.9
    assert np.isfinite(real[:, nll]).all()
    assert np.isfinite(real[:, reconstruction]).all()


def test_engine_rejects_older_calibration(model_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    version = load_current(store)
    with np.load(version.file("calibration")) as arrays:
        narrow = {name: arrays[name] for name in arrays.files}
    narrow["feature_values"] = narrow["feature_values"][:, :6]
    with version.file("calibration").open("wb") as handle:
        np.savez(handle, **narrow)
    manifest = dict(version.manifest)
    manifest["files"]["calibration"]["sha256"] = sha256_of(version.file("calibration"))
    # An export by an older appliance: its model id matches its own files.
    manifest["model_id"] = model_id_of(manifest)
    (version.path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelStoreError, match="calibrated on 6 statistics"):
        Engine(load_current(store))


def test_auroc_orders_and_ties() -> None:
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5


def test_engine_scores_heldout_beats_uniformly(engine: Engine, default_dataset) -> None:
    validation = default_dataset.splits["validation"]
    known = np.flatnonzero(np.isin(validation.labels, engine.classes_known))
    # A random sample over the whole record, not its first minutes.
    pick = np.sort(np.random.default_rng(11).choice(known, TEST_BEATS, replace=False))
    x = (validation.windows[pick] / engine.scale_mv).astype(np.float32)
    scored = engine.score(x, validation.labels[pick])
    assert scored.features.shape == (x.shape[0], len(FEATURES))
    assert np.isfinite(scored.features).all()
    # Calibrated on the validation record and the training records' hold-out, so roughly
    # uniform on the validation record alone.
    assert 0.25 < float(np.median(scored.scores)) < 0.75


def test_score_without_label_returns_best_class(
    engine: Engine, record_beats: tuple[np.ndarray, np.ndarray]
) -> None:
    x = record_beats[0][:100]
    unlabelled = engine.score(x)
    best = engine.best_classes(x)
    np.testing.assert_array_equal(unlabelled.classes, best)
    assert set(unlabelled.classes.tolist()) <= set(engine.classes_known)
    relabelled = engine.score(x, best)
    np.testing.assert_allclose(relabelled.scores, unlabelled.scores)
    mixed = np.where(np.arange(100) % 2 == 0, -1, best)
    np.testing.assert_allclose(engine.score(x, mixed).scores, unlabelled.scores)


def test_best_class_fits_better_than_given(
    engine: Engine, record_beats: tuple[np.ndarray, np.ndarray]
) -> None:
    x, labels = record_beats[0][:100], record_beats[1][:100]
    best = engine.score(x)
    given = engine.score(x, labels)
    nll = FEATURES.index("nll_bpd")
    assert (best.features[:, nll] <= given.features[:, nll] + 1e-6).all()


def _torch_features(
    model: torch.nn.Module, engine: Engine, x: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Compute the scoring statistics with the PyTorch model instead of the ONNX graphs."""
    model.eval()
    with torch.no_grad():
        condition = one_hot(torch.from_numpy(labels))
        z, log_det = model(torch.from_numpy(x), condition)
        x_projected, _ = model.inverse(model.truncate(z), condition)
    return compute_features(
        x,
        z.numpy(),
        log_det.numpy(),
        x_projected.numpy(),
        engine.centroids,
        model.bottleneck_dims,
        engine.fs_hz,
        engine.pre_r_samples,
        engine.lead_match(x),
    )


def test_scores_rank_same_in_torch_and_onnx(
    engine: Engine, trained_result, record_beats: tuple[np.ndarray, np.ndarray]
) -> None:
    x, labels = record_beats
    onnx_scores = engine.score(x, labels).scores
    assert engine.calibration is not None
    torch_scores = engine.calibration.score(
        _torch_features(trained_result.model, engine, x, labels)
    )
    rho = spearmanr(torch_scores, onnx_scores).statistic
    assert rho >= 0.999, f"Spearman {rho:.5f} between PyTorch and ONNX scores"
