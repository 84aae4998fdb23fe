"""Lead check: fitted on other leads of the bundled records, scored on an unseen record."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from appliance.config import DEFAULT_DATA_DIR, ApplianceConfig
from appliance.corrupt import read_other_lead
from appliance.dataset import BeatSet, Dataset
from appliance.ecg import record_lead_names
from appliance.engine import Engine
from appliance.errors import RecordError
from appliance.export import export_model
from appliance.holdout import concatenate
from appliance.jobs import read_other_lead_beats, train_records
from appliance.lead_check import HIDDEN_UNITS, MIN_OTHER_LEAD_BEATS, LeadCheck
from appliance.scoring import FEATURES, auroc
from appliance.store import load_current
from appliance.train import TrainResult

TEST_RECORD = "213"
MULTI_SEGMENT_RECORD = Path("wfdb-formats") / "multi-segment" / "041s" / "041s"
# Lead check alone, MLII against V1 beats of the test record. The benchmark on the full DS1
# records reports the whole score against lead V1 of 19 unseen patients in docs/benchmarks.md.
MIN_TEST_RECORD_AUROC = 0.95


@pytest.fixture(scope="module")
def engine(model_store: Path) -> Engine:
    return Engine(load_current(model_store))


@pytest.fixture(scope="module")
def test_record_leads(
    default_dataset: Dataset, fixture_config: ApplianceConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Beats of the test record on the model's lead (MLII) and on V1, in mV."""
    test = default_dataset.splits["test"]
    assert set(test.records.tolist()) == {TEST_RECORD}
    other = read_other_lead(DEFAULT_DATA_DIR / TEST_RECORD, TEST_RECORD, fixture_config.data)
    return test.windows, other


def _small_sides(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, 64)
    peak = np.exp(-(((t - 0.35) / 0.03) ** 2))
    model_lead = peak + 0.1 * rng.standard_normal((300, 1, 64))
    other_leads = -peak + 0.1 * rng.standard_normal((300, 1, 64))
    return model_lead, other_leads


def test_fit_is_seeded_and_round_trips() -> None:
    model_lead, other_leads = _small_sides(0)
    first = LeadCheck.fit(model_lead, other_leads, seed=3)
    second = LeadCheck.fit(model_lead, other_leads, seed=3)
    other_seed = LeadCheck.fit(model_lead, other_leads, seed=4)
    for name, values in first.to_arrays().items():
        np.testing.assert_array_equal(values, second.to_arrays()[name], err_msg=name)
    assert not np.array_equal(first.hidden_weight, other_seed.hidden_weight)
    assert first.hidden_weight.shape == (HIDDEN_UNITS, 64)
    rebuilt = LeadCheck.from_arrays(first.to_arrays())
    np.testing.assert_array_equal(rebuilt.logit(model_lead), first.logit(model_lead))


def test_logit_ignores_scale_and_offset() -> None:
    model_lead, other_leads = _small_sides(1)
    check = LeadCheck.fit(model_lead, other_leads, seed=0)
    np.testing.assert_allclose(check.logit(3 * model_lead + 1), check.logit(model_lead), atol=1e-9)
    assert auroc(check.logit(model_lead), check.logit(other_leads)) > 0.99


def test_logit_rejects_other_window() -> None:
    check = LeadCheck.fit(*_small_sides(2), seed=0)
    with pytest.raises(ValueError, match="expects beats of 64 values, got 128"):
        check.logit(np.zeros((2, 1, 128)))


def test_other_leads_of_bundled_records(
    default_dataset: Dataset, fixture_config: ApplianceConfig
) -> None:
    records = train_records(default_dataset)
    beats = read_other_lead_beats(DEFAULT_DATA_DIR, records, fixture_config.data)
    assert beats is not None
    assert beats.shape[1:] == (1, fixture_config.data.window_samples)
    assert np.isfinite(beats).all()
    # Every bundled record pairs MLII with V1 at the annotated beats of its first lead.
    model_lead_beats = default_dataset.splits["train"].windows.shape[0]
    assert abs(beats.shape[0] - model_lead_beats) <= 0.01 * model_lead_beats


def test_other_leads_skip_multi_lead_models(
    default_dataset: Dataset, fixture_config: ApplianceConfig, caplog: pytest.LogCaptureFixture
) -> None:
    config = replace(fixture_config.data, leads=("MLII", "V1"), n_leads=2)
    with caplog.at_level(logging.INFO, logger="appliance.jobs"):
        beats = read_other_lead_beats(DEFAULT_DATA_DIR, train_records(default_dataset), config)
    assert beats is None
    assert "lead check skipped reason=model_has_2_leads" in caplog.text


def test_other_leads_skip_unannotated_and_bad_records(
    tmp_path: Path, fixture_config: ApplianceConfig, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("106.hea", "106.dat", "208.hea", "208.dat", "208.atr"):
        shutil.copy(DEFAULT_DATA_DIR / name, tmp_path / name)
    (tmp_path / "209.hea").write_text("not a header\n")
    (tmp_path / "209.atr").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="appliance.jobs"):
        beats = read_other_lead_beats(tmp_path, ["106", "208", "209"], fixture_config.data)
    assert beats is not None
    assert beats.shape[0] >= MIN_OTHER_LEAD_BEATS
    assert "record=106 other leads skipped reason=no_annotation_file" in caplog.text
    bad = [r for r in caplog.records if r.getMessage().startswith("record=209 other leads")]
    assert len(bad) == 1
    assert bad[0].levelno == logging.WARNING
    assert "action=skip reason=record 209: header cannot be read" in bad[0].getMessage()
    # Record 208 alone gives its V1 beats.
    only_208 = read_other_lead_beats(tmp_path, ["208"], fixture_config.data)
    assert only_208 is not None
    assert only_208.shape == beats.shape


def test_too_few_other_lead_beats_leave_check_out(
    tmp_path: Path, fixture_config: ApplianceConfig, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("208.hea", "208.dat", "208.atr"):
        shutil.copy(DEFAULT_DATA_DIR / name, tmp_path / name)
    lines = (tmp_path / "208.hea").read_text().splitlines()
    # Keep the MLII channel only: the record then has no other lead.
    (tmp_path / "208.hea").write_text("\n".join([lines[0].replace(" 2 ", " 1 ", 1), lines[1]]))
    with caplog.at_level(logging.INFO, logger="appliance.jobs"):
        beats = read_other_lead_beats(tmp_path, ["208"], fixture_config.data)
    assert beats is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"too_few_other_lead_beats beats=0 min={MIN_OTHER_LEAD_BEATS}" in (
        warnings[0].getMessage()
    )


def test_repeated_lead_name_read_once(
    fixture_config: ApplianceConfig,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    once = read_other_lead_beats(DEFAULT_DATA_DIR, ["208"], fixture_config.data)
    # The header lists V1 twice, once in lower case.
    monkeypatch.setattr(
        "appliance.jobs.record_lead_names", lambda path, record: ["MLII", "V1", "v1"]
    )
    with caplog.at_level(logging.INFO, logger="appliance.jobs"):
        beats = read_other_lead_beats(DEFAULT_DATA_DIR, ["208"], fixture_config.data)
    assert once is not None
    assert beats is not None
    np.testing.assert_array_equal(beats, once)
    assert "record=208 lead=v1 repeated; the first channel is read" in caplog.text


@pytest.mark.parametrize("renamed", ["mlii", "V5"])
def test_configured_lead_names_are_no_negatives(
    tmp_path: Path, fixture_config: ApplianceConfig, renamed: str
) -> None:
    # A case variant of the model's lead, or a fallback lead of the configuration, in the
    # place of V1: neither may become an other-lead beat.
    for name in ("208.hea", "208.dat", "208.atr"):
        shutil.copy(DEFAULT_DATA_DIR / name, tmp_path / name)
    header = tmp_path / "208.hea"
    lines = header.read_text().splitlines()
    assert lines[2].endswith(" V1")
    lines[2] = lines[2][: -len("V1")] + renamed
    header.write_text("\n".join(lines) + "\n")
    assert read_other_lead_beats(tmp_path, ["208"], fixture_config.data) is None


def test_other_leads_are_sampled_with_seed(
    default_dataset: Dataset, fixture_config: ApplianceConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("appliance.jobs.MAX_BEATS_PER_SIDE", 1000)
    records = train_records(default_dataset)
    first = read_other_lead_beats(DEFAULT_DATA_DIR, records, fixture_config.data, seed=1)
    again = read_other_lead_beats(DEFAULT_DATA_DIR, records, fixture_config.data, seed=1)
    other = read_other_lead_beats(DEFAULT_DATA_DIR, records, fixture_config.data, seed=2)
    assert first is not None
    assert again is not None
    assert other is not None
    assert first.shape == (1000, 1, fixture_config.data.window_samples)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_record_lead_names_of_unusual_headers(tmp_path: Path, shared_data: Path) -> None:
    segmented = shared_data / MULTI_SEGMENT_RECORD
    names = record_lead_names(segmented, segmented.name)
    assert "I" in names
    lines = (DEFAULT_DATA_DIR / "208.hea").read_text().splitlines()
    shutil.copy(DEFAULT_DATA_DIR / "208.dat", tmp_path / "208.dat")
    (tmp_path / "late.hea").write_text(
        "\n".join([lines[0].replace("208", "late") + " 25:99:00 45/13/1999", *lines[1:3]]) + "\n"
    )
    assert record_lead_names(tmp_path / "late", "late") == ["MLII", "V1"]
    (tmp_path / "empty.hea").write_text("")
    with pytest.raises(RecordError, match="header file is empty"):
        record_lead_names(tmp_path / "empty", "empty")
    (tmp_path / "comment.hea").write_text("# only a comment\n")
    with pytest.raises(RecordError, match="header"):
        record_lead_names(tmp_path / "comment", "comment")


def test_check_separates_unseen_record_leads(
    engine: Engine, test_record_leads: tuple[np.ndarray, np.ndarray]
) -> None:
    assert engine.lead_check is not None
    assert engine.manifest["lead_check"]["other_lead_beats"] > MIN_OTHER_LEAD_BEATS
    model_lead, v1 = test_record_leads
    value = auroc(engine.lead_match(model_lead), engine.lead_match(v1))
    assert value >= MIN_TEST_RECORD_AUROC, f"lead check AUROC MLII vs V1: {value:.3f}"
    # The score's lead_match column is this logit, computed on the scaled beats.
    x = (model_lead[:50] / engine.scale_mv).astype(np.float32)
    features = engine.score(x).features
    np.testing.assert_allclose(
        features[:, FEATURES.index("lead_match")], engine.lead_match(model_lead[:50]), atol=1e-6
    )


def test_export_without_other_leads_has_no_check(
    fixture_config: ApplianceConfig,
    trained_result: TrainResult,
    split_train: tuple[BeatSet, BeatSet],
    default_dataset: Dataset,
    tmp_path: Path,
) -> None:
    calibration_beats = concatenate(default_dataset.splits["validation"], split_train[1])
    version = export_model(
        fixture_config, trained_result, split_train[0], calibration_beats, tmp_path / "store"
    )
    assert "lead_check" not in version.manifest["files"]
    assert "lead_check" not in version.manifest
    assert not (version.path / "lead_check.npz").exists()
    engine = Engine(load_current(tmp_path / "store"))
    assert engine.lead_check is None
    assert engine.calibration is not None
    column = FEATURES.index("lead_match")
    np.testing.assert_array_equal(engine.calibration.feature_values[:, column], 0.0)
    # With a constant column the statistic is neutral: held-out beats still score uniformly.
    known = np.isin(calibration_beats.labels, engine.classes_known)
    x = (calibration_beats.windows[known] / engine.scale_mv).astype(np.float32)
    scored = engine.score(x, calibration_beats.labels[known])
    np.testing.assert_array_equal(scored.features[:, column], 0.0)
    assert abs(float(np.median(scored.scores)) - 0.5) < 0.05
