"""MIT-BIH reading: annotation counts under NumPy 2, AAMI classes, lead choice, filters."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np
import pytest
import wfdb

from appliance.classes import AAMI_CLASSES, BEAT_SYMBOL_TO_AAMI, NON_BEAT_SYMBOLS
from appliance.config import DataConfig
from appliance.ecg import choose_leads, preprocess, read_record, remove_baseline, resample
from appliance.errors import RecordError

MITDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "mitdb"
MITDB_SAMPLES = 650_000

# Annotation totals of the 48 records, as PhysioNet's database description lists them.
MITDB_SYMBOL_TOTALS = {
    "N": 75_052,
    "L": 8_075,
    "R": 7_259,
    "V": 7_130,
    "/": 7_028,
    "A": 2_546,
    "f": 982,
    "F": 803,
}
MITDB_ANNOTATIONS = 112_647
# AAMI class totals of the 48 records, as published for the EC57 grouping (N: N L R e j,
# S: A a J S, V: V E, F: F, Q: / f Q).
MITDB_AAMI_TOTALS = {"N": 90_631, "S": 2_781, "V": 7_236, "F": 803, "Q": 8_043}
# Published beat counts of single records, by AAMI class.
RECORD_AAMI_COUNTS = {
    "100": {"N": 2239, "S": 33, "V": 1, "F": 0, "Q": 0},
    "101": {"N": 1860, "S": 3, "V": 0, "F": 0, "Q": 2},
    "208": {"N": 1586, "S": 2, "V": 992, "F": 373, "Q": 2},
    "232": {"N": 398, "S": 1382, "V": 0, "F": 0, "Q": 0},
}


@pytest.fixture(scope="session")
def mitdb_annotations(shared_data) -> dict[str, wfdb.Annotation]:
    """The reference annotations of all 48 records (no signals read)."""
    names = (MITDB / "RECORDS").read_text().split()
    return {name: wfdb.rdann(str(MITDB / name), "atr") for name in names}


def test_pinned_reader_versions():
    """The annotation counts below were checked with these versions."""
    assert wfdb.__version__ == "4.3.1"
    assert int(np.__version__.split(".")[0]) == 2


def test_record_100_annotation_count(mitdb_annotations):
    annotation = mitdb_annotations["100"]
    assert len(annotation.sample) == 2274
    assert annotation.symbol[:3] == ["+", "N", "N"]
    assert annotation.sample[:3].tolist() == [18, 77, 370]
    assert annotation.fs == 360


def test_annotation_samples_in_range(mitdb_annotations):
    """An overflowing sample counter would give negative or decreasing positions."""
    for name, annotation in mitdb_annotations.items():
        samples = annotation.sample
        assert samples.dtype.kind == "i", name
        assert (np.diff(samples) >= 0).all(), name
        assert samples[0] >= 0, name
        assert samples[-1] < MITDB_SAMPLES, name


def test_database_symbol_totals(mitdb_annotations):
    counts = collections.Counter(s for a in mitdb_annotations.values() for s in a.symbol)
    assert sum(counts.values()) == MITDB_ANNOTATIONS
    for symbol, total in MITDB_SYMBOL_TOTALS.items():
        assert counts[symbol] == total, symbol


def test_database_aami_totals(mitdb_annotations):
    counts = collections.Counter(
        BEAT_SYMBOL_TO_AAMI[s]
        for a in mitdb_annotations.values()
        for s in a.symbol
        if s in BEAT_SYMBOL_TO_AAMI
    )
    assert dict(counts) == MITDB_AAMI_TOTALS


@pytest.mark.parametrize("record", sorted(RECORD_AAMI_COUNTS))
def test_record_aami_counts(mitdb_annotations, record):
    counts = collections.Counter(
        BEAT_SYMBOL_TO_AAMI[s]
        for s in mitdb_annotations[record].symbol
        if s in BEAT_SYMBOL_TO_AAMI
    )
    assert {name: counts[name] for name in AAMI_CLASSES} == RECORD_AAMI_COUNTS[record]


def test_every_symbol_is_classified(mitdb_annotations):
    """Each MIT-BIH symbol is a beat of the AAMI map or a known non-beat annotation."""
    symbols = {s for a in mitdb_annotations.values() for s in a.symbol}
    assert symbols <= set(BEAT_SYMBOL_TO_AAMI) | NON_BEAT_SYMBOLS


def test_record_beats_match_annotations():
    beats = read_record(MITDB / "100", "100", DataConfig())
    assert beats.beat_source == "annotations:atr"
    assert beats.beats_found == 2273
    assert len(beats.labels) + beats.skipped["edge"] == 2273
    counts = np.bincount(beats.labels, minlength=len(AAMI_CLASSES))
    assert counts[AAMI_CLASSES.index("S")] == 33
    assert counts[AAMI_CLASSES.index("V")] == 1
    assert beats.fs_hz == 360.0
    assert beats.leads == ["MLII"]


def test_reversed_lead_order_gives_mlii():
    """Record 114 stores V5 first and MLII second."""
    header = wfdb.rdheader(str(MITDB / "114"))
    assert header.sig_name == ["V5", "MLII"]
    assert choose_leads("114", header.sig_name, DataConfig()) == [1]
    beats = read_record(MITDB / "114", "114", DataConfig())
    assert beats.leads == ["MLII"]
    raw = wfdb.rdrecord(str(MITDB / "114"), channels=[1])
    expected = preprocess(raw.p_signal, 360.0, DataConfig())[:, 0]
    start = int(beats.r_samples[0]) - DataConfig().pre_r_samples
    np.testing.assert_allclose(
        beats.windows[0, 0], expected[start : start + DataConfig().window_samples], atol=1e-5
    )


@pytest.mark.parametrize("record", ["102", "104"])
def test_record_without_mlii_uses_next_lead(record, caplog):
    caplog.set_level(logging.INFO, logger="appliance")
    header = wfdb.rdheader(str(MITDB / record))
    assert "MLII" not in header.sig_name
    assert choose_leads(record, header.sig_name, DataConfig()) == [header.sig_name.index("V5")]
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"record={record} leads=V5 preferred=MLII" in m for m in messages)


def test_record_without_configured_lead_raises():
    header = wfdb.rdheader(str(MITDB / "102"))
    with pytest.raises(RecordError, match="configured leads") as caught:
        choose_leads("102", header.sig_name, DataConfig(leads=("MLII", "II")))
    assert "V5" in caught.value.reason


def test_lead_names_match_without_case():
    assert choose_leads("r", ["i", "ii", "iii"], DataConfig(leads=("II",))) == [1]
    assert choose_leads("r", ["ECG 1", "ECG 2"], DataConfig(leads=("ecg  2",))) == [1]


def test_all_headers_rate_length_and_lead():
    """All 48 headers: 360 Hz, 650,000 samples, MLII chosen except where it is absent."""
    for record in (MITDB / "RECORDS").read_text().split():
        header = wfdb.rdheader(str(MITDB / record))
        assert header.fs == 360, record
        assert header.sig_len == MITDB_SAMPLES, record
        chosen = header.sig_name[choose_leads(record, header.sig_name, DataConfig())[0]]
        assert chosen == ("V5" if record in ("102", "104") else "MLII"), record


def test_resample_rejects_aliases():
    """A 250 Hz tone is above the 180 Hz Nyquist rate of 360 Hz and must not fold back."""
    fs_hz = 1000.0
    t = np.arange(int(10 * fs_hz)) / fs_hz
    high = np.sin(2 * np.pi * 250 * t)
    low = np.sin(2 * np.pi * 10 * t)
    high_out = resample(high, fs_hz, 360.0)
    low_out = resample(low, fs_hz, 360.0)
    assert high_out.size == 3600
    middle = slice(360, -360)
    assert np.sqrt(np.mean(high_out[middle] ** 2)) < 0.01
    assert np.sqrt(np.mean(low_out[middle] ** 2)) == pytest.approx(np.sqrt(0.5), rel=0.01)


def test_resample_same_rate_is_identity():
    values = np.arange(10.0)
    assert resample(values, 360.0, 360.0) is values


def test_baseline_removal_keeps_qrs_band():
    fs_hz = 360.0
    t = np.arange(int(60 * fs_hz)) / fs_hz
    wander = 1.5 + 0.8 * np.sin(2 * np.pi * 0.05 * t)
    qrs_band = 0.5 * np.sin(2 * np.pi * 10 * t)
    filtered = remove_baseline(wander + qrs_band, fs_hz, DataConfig())
    middle = slice(int(5 * fs_hz), -int(5 * fs_hz))
    assert np.abs(filtered[middle] - qrs_band[middle]).max() < 0.05
