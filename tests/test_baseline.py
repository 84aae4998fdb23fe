"""Baseline check of client beats, on windows of every MIT-BIH record before and after ingest."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import wfdb

from appliance.baseline import (
    OFFSET_LIMIT_MV,
    OFFSET_SHARE_LIMIT,
    UNIT_HIGH_MV,
    UNIT_LOW_MV,
    BaselineOffset,
    check_baseline,
    find_input_problem,
    measure_baseline_offset,
)
from appliance.config import DataConfig
from appliance.ecg import choose_leads, read_record

# Offset that, added to the processed windows, must make every record warn (see the module
# docstring of appliance.baseline).
CONSTANT_OFFSET_MV = 0.25


@dataclass
class RecordCheck:
    """Baseline checks of one record's windows."""

    processed: BaselineOffset
    raw: BaselineOffset
    raised: BaselineOffset
    lowered: BaselineOffset


def raw_windows(path: Path, record: str, r_samples: np.ndarray, config: DataConfig) -> np.ndarray:
    """Cut windows of the first configured lead from the signal without its high-pass.

    Returns:
        Shape (beats, 1, window_samples), in mV, at the record's rate, which for MIT-BIH is
        the model rate, so ``r_samples`` index the raw signal directly.
    """
    header = wfdb.rdheader(str(path))
    assert header.fs == config.fs_hz, f"record {record} is not at {config.fs_hz} Hz"
    channel = choose_leads(record, [str(n) for n in header.sig_name], config)[0]
    signal = wfdb.rdrecord(str(path), channels=[channel]).p_signal[:, 0]
    offsets = (r_samples - config.pre_r_samples)[:, None] + np.arange(config.window_samples)
    return signal[offsets][:, None, :].astype(np.float32)


@pytest.fixture(scope="module")
def record_checks(shared_data: Path) -> dict[str, RecordCheck]:
    """Checks of every MIT-BIH record: processed, raw, and processed plus or minus 0.25 mV."""
    mitdb = shared_data / "mitdb"
    config = DataConfig()
    names = [line.strip() for line in (mitdb / "RECORDS").read_text().splitlines()]
    checks = {}
    for name in filter(None, names):
        beats = read_record(mitdb / name, name, config)
        raw = raw_windows(mitdb / name, name, beats.r_samples, config)
        checks[name] = RecordCheck(
            processed=measure_baseline_offset(beats.windows),
            raw=measure_baseline_offset(raw),
            raised=measure_baseline_offset(beats.windows + CONSTANT_OFFSET_MV),
            lowered=measure_baseline_offset(beats.windows - CONSTANT_OFFSET_MV),
        )
    return checks


def test_every_record_is_checked(record_checks: dict[str, RecordCheck]) -> None:
    assert len(record_checks) == 48
    assert sum(check.processed.beats for check in record_checks.values()) > 100_000


def test_processed_records_do_not_warn(record_checks: dict[str, RecordCheck]) -> None:
    warned = [name for name, check in record_checks.items() if check.processed.suspect]
    assert warned == []
    offset = sum(check.processed.offset_beats for check in record_checks.values())
    total = sum(check.processed.beats for check in record_checks.values())
    assert offset / total < 0.005


def test_raw_records_warn(record_checks: dict[str, RecordCheck]) -> None:
    quiet = [name for name, check in record_checks.items() if not check.raw.suspect]
    assert quiet == []


@pytest.mark.parametrize("direction", ["raised", "lowered"])
def test_constant_offset_warns_on_every_record(
    record_checks: dict[str, RecordCheck], direction: str
) -> None:
    quiet = [
        name for name, check in record_checks.items() if not getattr(check, direction).suspect
    ]
    assert quiet == []


@pytest.fixture(scope="module")
def record_100(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Processed windows of MIT-BIH record 100 and their R-peak samples at 360 Hz."""
    beats = read_record(shared_data / "mitdb" / "100", "100", DataConfig())
    return beats.windows, beats.r_samples


def _baseline_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "appliance.baseline"]


def test_processed_beats_log_nothing(
    record_100: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    windows, _ = record_100
    with caplog.at_level(logging.WARNING, logger="appliance.baseline"):
        result = check_baseline(windows)
    assert not result.suspect
    assert _baseline_warnings(caplog) == []


def test_dc_offset_logs_warning(
    record_100: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    windows, _ = record_100
    # -0.34 mV is the median level of record 100's raw MLII windows.
    with caplog.at_level(logging.WARNING, logger="appliance.baseline"):
        result = check_baseline(windows - 0.34)
    assert result.suspect
    assert result.median_offset_mv == pytest.approx(-0.34, abs=0.05)
    messages = _baseline_warnings(caplog)
    assert len(messages) == 1
    assert f"offset_beats={result.offset_beats} beats={len(windows)}" in messages[0]
    assert f"median_offset_mv={result.median_offset_mv:.3f}" in messages[0]
    assert "Remove the baseline first" in messages[0]
    assert "docs/api.md" in messages[0]


def test_wander_logs_warning(
    record_100: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    windows, r_samples = record_100
    config = DataConfig()
    # Respiratory wander: 0.3 mV at 0.25 Hz, evaluated at every sample of every window.
    seconds = (r_samples[:, None] - config.pre_r_samples + np.arange(256)) / config.fs_hz
    wander = 0.3 * np.sin(2 * np.pi * 0.25 * seconds)
    wandering = windows + wander[:, None, :].astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="appliance.baseline"):
        result = check_baseline(wandering)
    assert result.suspect
    assert result.offset_beats > 0.3 * len(windows)
    assert len(_baseline_warnings(caplog)) == 1


def test_processed_records_have_mv_amplitudes(record_checks: dict[str, RecordCheck]) -> None:
    medians = {
        name: check.processed.median_peak_to_peak_mv for name, check in record_checks.items()
    }
    suspects = [name for name, check in record_checks.items() if check.processed.unit_suspect]
    assert suspects == []
    assert min(medians.values()) > 4 * UNIT_LOW_MV
    assert max(medians.values()) < UNIT_HIGH_MV / 4


@pytest.mark.parametrize(
    ("factor", "advice"),
    [
        (1000.0, "probably in uV or in raw ADC units and must be converted to mV"),
        (1000.0, "For uV, divide them by 1000"),
        (0.001, "probably in V: multiply them by 1000"),
    ],
)
def test_wrong_unit_logs_unit_warning(
    record_100: tuple[np.ndarray, np.ndarray],
    caplog: pytest.LogCaptureFixture,
    factor: float,
    advice: str,
) -> None:
    windows, _ = record_100
    with caplog.at_level(logging.WARNING, logger="appliance.baseline"):
        result = check_baseline(windows * factor)
    assert result.unit_suspect
    messages = _baseline_warnings(caplog)
    # Only the unit is reported, because an offset in uV means nothing about the baseline.
    assert len(messages) == 1
    assert "probably not in mV" in messages[0]
    assert (
        f"amplitude is {result.median_peak_to_peak_mv:.4g} in the unit they came in"
        in (messages[0])
    )
    assert advice in messages[0]
    assert "carry baseline wander" not in messages[0]


def test_non_finite_beats_log_no_unit_warning(caplog: pytest.LogCaptureFixture) -> None:
    beats = np.zeros((4, 1, 256))
    beats[:, 0, 17] = np.nan
    with caplog.at_level(logging.WARNING, logger="appliance.baseline"):
        result = check_baseline(beats)
    # The server rejects these beats, so a unit warning would only send the user the wrong way.
    assert math.isnan(result.median_peak_to_peak_mv)
    assert not result.unit_suspect
    assert _baseline_warnings(caplog) == []


def test_opposite_infinities_raise_no_numpy_warning() -> None:
    beats = np.zeros((2, 1, 256), dtype=np.float32)
    beats[0, 0, 3] = np.inf
    beats[0, 0, 9] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = measure_baseline_offset(beats)
    assert result.beats == 2


def test_flat_beats_get_flat_warning(caplog: pytest.LogCaptureFixture) -> None:
    for level in (0.0, 1e30):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="appliance.baseline"):
            result = check_baseline(np.full((5, 1, 256), level))
        assert result.flat_beats == 5
        problem = find_input_problem(result)
        assert problem is not None
        assert problem.kind == "flat"
        messages = _baseline_warnings(caplog)
        assert len(messages) == 1
        assert "flat_beats=5 beats=5" in messages[0]
        assert "multiply them by 1000" not in messages[0]


def test_unit_warning_counts_beats_in_other_unit(
    record_100: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    windows, _ = record_100
    # A quarter of the beats in uV leaves the median in the mV range.
    mixed = windows[:400].copy()
    mixed[:100] *= 1000
    with caplog.at_level(logging.WARNING, logger="appliance.baseline"):
        result = check_baseline(mixed)
    assert UNIT_LOW_MV <= result.median_peak_to_peak_mv <= UNIT_HIGH_MV
    assert result.high_amplitude_beats == 100
    assert result.unit_suspect
    messages = _baseline_warnings(caplog)
    assert len(messages) == 1
    assert "100 of 400 beats lie outside 0.05 to 50" in messages[0]
    assert "For uV, divide them by 1000" in messages[0]


def test_adc_counts_log_conversion_advice(
    shared_data: Path,
    record_100: tuple[np.ndarray, np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Raw int16 samples of record 100 (gain 200 per mV, baseline 1024) get ADC advice."""
    config = DataConfig()
    _, r_samples = record_100
    record = wfdb.rdrecord(str(shared_data / "mitdb" / "100"), channels=[0], physical=False)
    counts = record.d_signal[:, 0]
    offsets = (r_samples - config.pre_r_samples)[:, None] + np.arange(config.window_samples)
    windows = counts[offsets][:, None, :].astype(np.int16)
    with caplog.at_level(logging.WARNING, logger="appliance.baseline"):
        result = check_baseline(windows)
    assert result.unit_suspect
    assert UNIT_HIGH_MV < result.median_peak_to_peak_mv < 1000.0
    messages = _baseline_warnings(caplog)
    assert len(messages) == 1
    assert "probably in uV or in raw ADC units" in messages[0]
    assert "subtract the baseline and divide by the gain" in messages[0]
    assert "multiply them by 1000" not in messages[0]


def test_measure_uses_furthest_lead_and_skips_nan() -> None:
    beats = np.zeros((4, 2, 8), dtype=np.float32)
    beats[0, 1] = -0.5  # second lead offset
    beats[1, 0] = 0.3
    beats[2, 0, 3] = np.nan  # not counted, whatever its other samples
    beats[2, 1] = 5.0
    result = measure_baseline_offset(beats)
    assert result.beats == 4
    assert result.offset_beats == 2
    assert result.median_offset_mv == pytest.approx(-0.1)
    assert result.largest_offset_mv == pytest.approx(-0.5)
    assert result.suspect


def test_measure_limits_are_exclusive() -> None:
    beats = np.full((10, 1, 4), OFFSET_LIMIT_MV, dtype=np.float64)
    assert measure_baseline_offset(beats).offset_beats == 0
    beats[0] += 0.01
    result = measure_baseline_offset(beats)
    assert result.offset_beats == 1
    # One beat of 10 is exactly the share limit, which does not warn.
    assert result.offset_beats == OFFSET_SHARE_LIMIT * result.beats
    assert not result.suspect


def test_measure_rejects_two_dimensions() -> None:
    with pytest.raises(ValueError, match=r"shape \(beats, leads, window_samples\)"):
        measure_baseline_offset(np.zeros((3, 256)))
