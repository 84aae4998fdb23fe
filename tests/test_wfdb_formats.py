"""Every record of the WFDB format collection: beats found, sampling rate and lead chosen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import wfdb

from appliance.config import DataConfig
from appliance.dataset import Dataset, find_records, ingest
from appliance.ecg import DETECTOR, RecordBeats, read_record
from appliance.errors import RecordError
from appliance.ingest_cache import IngestCache, cache_key

WFDB_FORMATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wfdb-formats"

# Lead preference that covers the ECG lead names of the collection, most standard first.
FORMAT_LEADS = ("MLII", "II", "MCL1", "I", "col 0", "FECG", "ECG 1")
FORMATS_CONFIG = DataConfig(leads=FORMAT_LEADS, split="random")
# XQRS counts may move by a beat or two with scipy's filters; annotation counts may not.
DETECTOR_TOLERANCE = 0.02

# record: (lead chosen, sampling rate of that lead in Hz, beats found, windows kept)
EXPECTED = {
    "03700181": ("MCL1", 500.0, 1226, 1224),  # 125 Hz frames, 4 samples per frame
    "3000003_0003": ("II", 125.0, 11, 9),  # format 80
    "310derive": ("col 0", 250.0, 10, 9),  # format 310
    "311derive": ("col 0", 250.0, 6, 5),  # format 311
    "E07500": ("II", 500.0, 9, 9),  # 12 leads in a .mat file
    "a103l": ("II", 250.0, 692, 690),  # format 16 in a .mat file
    "mixedsignals": ("II", 62.4725 * 4, 391, 390),  # FLAC, signals at 1, 2 and 4 per frame
    "multi-segment/041s/041s": ("I", 500.0, 33, 30),  # fixed layout, 4 samples per frame
    "multi-segment/s25047/s25047-2704-05-04-10-44": ("II", 125.0, 6493, 5677),  # variable
    "p10143": ("FECG", 500.0, 1, 1),  # format 61; the FECG lead is flat for most of it
    "s0010_re": ("ii", 1000.0, 52, 51),  # 15 leads in two signal files
    "test01_00s": ("ECG 1", 500.0, 12, 11),  # signal names with spaces
    "v102s": ("II", 250.0, 493, 490),  # ADC resolution 0, NaN samples
}


@pytest.fixture(scope="session")
def cached_formats(shared_data, tmp_path_factory) -> tuple[Dataset, DataConfig]:
    """The collection ingested once through an ingest cache, and the settings used."""
    config = dataclasses.replace(
        FORMATS_CONFIG, cache_dir=str(tmp_path_factory.mktemp("format-cache"))
    )
    return ingest(WFDB_FORMATS, config), config


@pytest.fixture(scope="session")
def format_results(cached_formats) -> dict[str, RecordBeats | RecordError]:
    """Each record's beats, or the error that rejected it, as the ingest run cached them."""
    _, config = cached_formats
    cache = IngestCache(Path(config.cache_dir), config)
    results: dict[str, RecordBeats | RecordError] = {}
    for record in find_records(WFDB_FORMATS):
        path = WFDB_FORMATS / record
        cached = cache.load(record, path, cache_key(path, config))
        assert cached is not None, f"record {record} missing from the ingest cache"
        results[record] = cached
    return results


def test_collection_lists_every_record(format_results):
    numerics = "multi-segment/s25047/s25047-2704-05-04-10-44n"
    assert set(format_results) == set(EXPECTED) | {numerics}


@pytest.mark.parametrize("record", sorted(EXPECTED))
def test_record_beats_rate_and_lead(format_results, record):
    lead, fs_hz, found, kept = EXPECTED[record]
    beats = format_results[record]
    assert isinstance(beats, RecordBeats), beats
    assert beats.leads == [lead]
    assert beats.fs_hz == pytest.approx(fs_hz, rel=1e-9)
    assert beats.beat_source == DETECTOR
    assert beats.beats_found == pytest.approx(found, rel=DETECTOR_TOLERANCE, abs=1)
    assert len(beats.labels) == pytest.approx(kept, rel=DETECTOR_TOLERANCE, abs=1)
    assert beats.windows.shape == (len(beats.labels), 1, FORMATS_CONFIG.window_samples)
    assert beats.windows.dtype == np.float32
    assert np.isfinite(beats.windows).all()


def test_numerics_record_has_no_ecg_lead(format_results):
    error = format_results["multi-segment/s25047/s25047-2704-05-04-10-44n"]
    assert isinstance(error, RecordError)
    assert "HR" in error.reason
    assert "--leads" in error.reason


def test_nan_samples_skip_touching_beats(format_results):
    gaps = format_results["multi-segment/s25047/s25047-2704-05-04-10-44"]
    assert isinstance(gaps, RecordBeats)
    assert gaps.invalid_samples == 26462
    assert gaps.skipped["invalid_samples"] > 0
    assert any("NaN" in warning for warning in gaps.warnings)
    mixed = format_results["mixedsignals"]
    assert isinstance(mixed, RecordBeats)
    assert mixed.invalid_samples > 0


@pytest.mark.parametrize(
    ("extension", "annotation_fs_hz", "annotations"),
    [("gqrsh", 500, 1150), ("gqrsl", 125, 1117), ("sqrs", 250, 1195)],
)
def test_detector_annotations_at_own_rate(extension, annotation_fs_hz, annotations):
    annotation = wfdb.rdann(str(WFDB_FORMATS / "03700181"), extension)
    assert annotation.fs == annotation_fs_hz
    config = DataConfig(leads=("MCL1",), annotation_extension=extension)
    beats = read_record(WFDB_FORMATS / "03700181", "03700181", config)
    assert beats.beat_source == f"annotations:{extension}"
    assert beats.beats_found == annotations
    # The last annotation lies near the end of the 600 s record whatever the annotation rate.
    assert beats.r_samples[-1] / config.fs_hz == pytest.approx(600, abs=2)


def test_annotation_rates_agree_on_positions():
    """Beats annotated at 500 Hz and at 125 Hz land on the same model-rate samples."""
    high = read_record(
        WFDB_FORMATS / "03700181", "h", DataConfig(leads=("MCL1",), annotation_extension="gqrsh")
    )
    low = read_record(
        WFDB_FORMATS / "03700181", "l", DataConfig(leads=("MCL1",), annotation_extension="gqrsl")
    )
    nearest = np.abs(high.r_samples[:, None] - low.r_samples[None, :]).min(axis=1)
    # Within 10 samples (28 ms at 360 Hz) for nearly every beat; a rate mix-up shifts by 4x.
    assert np.mean(nearest <= 10) > 0.9


def test_twelve_lead_record_reads_all_leads():
    leads = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    config = DataConfig(leads=leads, n_leads=12)
    beats = read_record(WFDB_FORMATS / "E07500", "E07500", config)
    assert beats.leads == list(leads)
    assert beats.windows.shape[1:] == (12, config.window_samples)
    assert beats.lead_fs_hz == [500.0] * 12


def test_two_signal_files_give_both_leads():
    """Lead ii is stored in s0010_re.dat and lead vz in s0010_re.xyz."""
    config = DataConfig(leads=("II", "VZ"), n_leads=2)
    beats = read_record(WFDB_FORMATS / "s0010_re", "s0010_re", config)
    assert beats.leads == ["ii", "vz"]
    assert beats.lead_fs_hz == [1000.0, 1000.0]
    raw = wfdb.rdrecord(str(WFDB_FORMATS / "s0010_re"), channel_names=["vz"])
    assert np.ptp(beats.windows[:, 1]) < 2 * np.ptp(raw.p_signal)
    assert np.ptp(beats.windows[:, 1]) > 0


def test_leads_at_different_rates_align():
    """MCL1 is stored at 500 Hz and ABP at 125 Hz; both come out at the model rate."""
    config = DataConfig(leads=("MCL1", "ABP"), n_leads=2)
    beats = read_record(WFDB_FORMATS / "03700181", "03700181", config)
    assert beats.lead_fs_hz == [500.0, 125.0]
    assert beats.windows.shape[1:] == (2, config.window_samples)


def test_packed_formats_match_source_record():
    """The 310 and 311 records re-encode the first 1026 samples of 3000003_0003."""
    source = wfdb.rdrecord(str(WFDB_FORMATS / "3000003_0003"), physical=False, sampto=1026)
    both = wfdb.rdrecord(str(WFDB_FORMATS / "310derive"), physical=False)
    single = wfdb.rdrecord(str(WFDB_FORMATS / "311derive"), physical=False)
    np.testing.assert_array_equal(both.d_signal, source.d_signal)
    np.testing.assert_array_equal(single.d_signal[:, 0], source.d_signal[:, 1])


def test_folder_ingest_records_beat_source(cached_formats):
    dataset, _ = cached_formats
    report = dataset.report
    assert len(report.records_read) == len(EXPECTED)
    assert set(report.beat_sources.values()) == {DETECTOR}
    assert list(report.records_skipped) == ["multi-segment/s25047/s25047-2704-05-04-10-44n"]
    assert report.leads_of_record["s0010_re"] == ["ii"]
    assert dataset.fs_hz_of_record["mixedsignals"] == pytest.approx(249.89)
    assert "mixedsignals" in report.warnings_of_record


def test_read_record_missing_header(tmp_path: Path):
    with pytest.raises(RecordError, match="not found"):
        read_record(tmp_path / "absent", "absent", FORMATS_CONFIG)
