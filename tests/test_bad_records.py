"""Damaged records built in a temporary folder: each is read with a warning or skipped once."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

from appliance.config import DataConfig
from appliance.dataset import SKIP_LOG_LINES, assign_splits, find_records, ingest
from appliance.ecg import FLAT_WINDOW_MV, read_record
from appliance.errors import RecordError

MITDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "mitdb"
SECONDS = 120
FS_HZ = 360
CONFIG = DataConfig(split="random", split_seed=0)


def write_record(folder: Path, name: str, source: str = "100", seconds: int = SECONDS) -> Path:
    """Write the first ``seconds`` of a MIT-BIH record and its beat annotations as format 16."""
    samples = seconds * FS_HZ
    record = wfdb.rdrecord(str(MITDB / source), sampto=samples, physical=False)
    wfdb.wrsamp(
        name,
        fs=FS_HZ,
        units=["mV", "mV"],
        sig_name=record.sig_name,
        d_signal=record.d_signal,
        fmt=["16", "16"],
        adc_gain=record.adc_gain,
        baseline=record.baseline,
        write_dir=str(folder),
    )
    annotation = wfdb.rdann(str(MITDB / source), "atr", sampto=samples - 1)
    wfdb.wrann(
        name, "atr", annotation.sample, symbol=annotation.symbol, fs=FS_HZ, write_dir=str(folder)
    )
    return folder / name


def edit_header(path: Path, old: str, new: str) -> None:
    header = path.with_name(f"{path.name}.hea")
    text = header.read_text()
    assert old in text, f"{old!r} not in {text!r}"
    header.write_text(text.replace(old, new, 1))


def write_gain_zero(folder: Path) -> Path:
    path = write_record(folder, "gain0")
    edit_header(path, "gain0.dat 16 200", "gain0.dat 16 0")
    return path


def write_bad_time(folder: Path) -> Path:
    path = write_record(folder, "badtime")
    edit_header(
        path,
        f"badtime 2 {FS_HZ} {SECONDS * FS_HZ}",
        f"badtime 2 {FS_HZ} {SECONDS * FS_HZ} 25:99:00 45/13/1999",
    )
    return path


def write_short_signal(folder: Path) -> Path:
    path = write_record(folder, "short")
    data = path.with_suffix(".dat")
    # Keep the first 60 s: 2 signals of 2 bytes per frame.
    data.write_bytes(data.read_bytes()[: 60 * FS_HZ * 4])
    return path


def write_tiny_signal(folder: Path) -> Path:
    path = write_record(folder, "tiny")
    data = path.with_suffix(".dat")
    # 8 frames of 2 signals of 2 bytes: too short for one beat window or the filter.
    data.write_bytes(data.read_bytes()[: 8 * 4])
    return path


def write_slow_rate(folder: Path) -> Path:
    path = write_record(folder, "slow")
    edit_header(path, f"slow 2 {FS_HZ} ", "slow 2 1 ")
    return path


def write_header_folder(folder: Path) -> Path:
    (folder / "dirhead.hea").mkdir()
    return folder / "dirhead"


def write_missing_segment(folder: Path) -> Path:
    write_record(folder, "seg_a")
    write_record(folder, "seg_b", source="101")
    samples = SECONDS * FS_HZ
    header = folder / "multi.hea"
    header.write_text(f"multi/3 2 {FS_HZ} {2 * samples}\nseg_a {samples}\nseg_b {samples}\n")
    return folder / "multi"


def write_signal_in_subfolder(folder: Path) -> Path:
    """Write a record whose header names its signal file as ``sig/subsig.dat``."""
    path = write_record(folder, "subsig")
    (folder / "sig").mkdir()
    (folder / "subsig.dat").rename(folder / "sig" / "subsig.dat")
    header = folder / "subsig.hea"
    header.write_text(header.read_text().replace("subsig.dat ", "sig/subsig.dat "))
    return path


def write_segment_in_subfolder(folder: Path) -> Path:
    """Write a multi-segment record whose first segment is named ``sig/seg_a``."""
    (folder / "sig").mkdir()
    write_record(folder / "sig", "seg_a")
    write_record(folder, "seg_b", source="101")
    samples = SECONDS * FS_HZ
    header = folder / "multi.hea"
    header.write_text(f"multi/2 2 {FS_HZ} {2 * samples}\nsig/seg_a {samples}\nseg_b {samples}\n")
    return folder / "multi"


def write_first_lead_run(
    folder: Path, name: str, start_s: int, stop_s: int, value: int | None
) -> Path:
    """Write a record whose first lead is set to ``value`` from ``start_s`` to ``stop_s``.

    ``value`` is a digital sample value; ``None`` stands for the baseline, a flat line at 0 mV.
    """
    path = write_record(folder, name)
    signal = wfdb.rdrecord(str(path), physical=False)
    digital = signal.d_signal.copy()
    digital[start_s * FS_HZ : stop_s * FS_HZ, 0] = signal.baseline[0] if value is None else value
    wfdb.wrsamp(
        name,
        fs=FS_HZ,
        units=["mV", "mV"],
        sig_name=signal.sig_name,
        d_signal=digital,
        fmt=["16", "16"],
        adc_gain=signal.adc_gain,
        baseline=signal.baseline,
        write_dir=str(folder),
    )
    return path


def write_nan_run(folder: Path) -> Path:
    # -32768 is the invalid-sample value of format 16, which wfdb reads as NaN.
    return write_first_lead_run(folder, "nanrun", 10, 20, -32768)


def write_flat_lead(folder: Path, name: str, start_s: int, stop_s: int) -> Path:
    """Write a record whose first lead stays at its baseline from ``start_s`` to ``stop_s``."""
    return write_first_lead_run(folder, name, start_s, stop_s, None)


def write_unknown_symbols(folder: Path) -> Path:
    path = write_record(folder, "oddsymbols")
    annotation = wfdb.rdann(str(path), "atr")
    symbols = list(annotation.symbol)
    for index in range(1, 21):
        symbols[index] = "Z"
    custom = pd.DataFrame({"label_store": [42], "symbol": ["Z"], "description": ["site code"]})
    wfdb.wrann(
        "oddsymbols",
        "atr",
        annotation.sample,
        symbol=symbols,
        fs=FS_HZ,
        custom_labels=custom,
        write_dir=str(folder),
    )
    return path


def test_gain_zero_is_skipped(tmp_path):
    path = write_gain_zero(tmp_path)
    with pytest.raises(RecordError, match="ADC gain 0") as caught:
        read_record(path, "gain0", CONFIG)
    assert "MLII" in caught.value.reason


def test_malformed_time_reads_with_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="appliance")
    good = read_record(write_record(tmp_path, "good"), "good", CONFIG)
    beats = read_record(write_bad_time(tmp_path), "badtime", CONFIG)
    assert any("25:99:00" in warning for warning in beats.warnings)
    np.testing.assert_array_equal(beats.windows, good.windows)
    lines = [r.getMessage() for r in caplog.records if "record=badtime" in r.getMessage()]
    assert len(lines) == 1


def test_short_signal_reads_frames_present(tmp_path):
    beats = read_record(write_short_signal(tmp_path), "short", CONFIG)
    assert any(f"{60 * FS_HZ} of the {SECONDS * FS_HZ} frames" in w for w in beats.warnings)
    assert beats.r_samples.max() < 60 * FS_HZ
    assert len(beats.labels) > 50


def test_signal_shorter_than_window_is_skipped(tmp_path):
    with pytest.raises(RecordError, match="lead MLII has 8 samples, fewer than one beat window"):
        read_record(write_tiny_signal(tmp_path), "tiny", CONFIG)


def test_slow_sampling_rate_is_skipped(tmp_path):
    with pytest.raises(RecordError, match="lead MLII is sampled at 1 Hz, below the 50 Hz"):
        read_record(write_slow_rate(tmp_path), "slow", CONFIG)


def test_header_folder_is_skipped(tmp_path):
    with pytest.raises(RecordError, match="is not a file"):
        read_record(write_header_folder(tmp_path), "dirhead", CONFIG)


@pytest.mark.parametrize("gain", ["nan", "inf", "abc"])
def test_non_numeric_gain_is_skipped(tmp_path, gain: str):
    path = write_record(tmp_path, "oddgain")
    edit_header(path, "200.0(1024)/mV", f"{gain}(1024)/mV")
    with pytest.raises(RecordError, match="lead MLII has an ADC gain .* not a finite number"):
        read_record(path, "oddgain", CONFIG)


def test_gain_zero_found_despite_spaced_name(tmp_path):
    path = write_record(tmp_path, "spaced")
    edit_header(path, "spaced.dat 16 200", "spaced.dat 16 0")
    edit_header(path, " MLII", "  MLII")
    with pytest.raises(RecordError, match="ADC gain 0"):
        read_record(path, "spaced", CONFIG)


def test_absurd_gain_amplitude_is_skipped(tmp_path):
    path = write_record(tmp_path, "tinygain")
    edit_header(path, "200.0(1024)/mV", "1e-30(1024)/mV")
    with pytest.raises(RecordError, match="lead MLII reaches .* mV .* check the header's ADC"):
        read_record(path, "tinygain", CONFIG)


@pytest.mark.parametrize("rate", ["-360", "1e6", "0"])
def test_unparsable_sampling_rate_is_skipped(tmp_path, rate: str):
    path = write_record(tmp_path, "oddrate")
    edit_header(path, f"oddrate 2 {FS_HZ} ", f"oddrate 2 {rate} ")
    with pytest.raises(RecordError, match=f"sampling rate '{rate}' on the header's record line"):
        read_record(path, "oddrate", CONFIG)


def test_header_folder_is_skipped_with_cache(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_record(data, "good")
    write_header_folder(data)
    cached = DataConfig(split="random", split_seed=0, cache_dir=str(tmp_path / "cache"))
    report = ingest(data, cached).report
    assert set(report.records_read) == {"good"}
    assert "is not a file" in report.records_skipped["dirhead"]


@pytest.mark.parametrize("cached", [False, True], ids=["without_cache", "with_cache"])
@pytest.mark.parametrize(
    ("write", "record", "named"),
    [
        (write_signal_in_subfolder, "subsig", "signal file 'sig/subsig.dat'"),
        (write_segment_in_subfolder, "multi", "segment 'sig/seg_a'"),
    ],
    ids=["signal_file", "segment"],
)
def test_file_in_subfolder_is_skipped(tmp_path, write, record, named, cached):
    data = tmp_path / "data"
    data.mkdir()
    write_record(data, "good")
    write(data)
    cache_dir = str(tmp_path / "cache") if cached else ""
    config = DataConfig(split="random", split_seed=0, cache_dir=cache_dir)
    report = ingest(data, config).report
    assert report.records_read == ["good"]
    assert set(report.records_skipped) == {record}
    assert named in report.records_skipped[record]
    assert "in a subfolder" in report.records_skipped[record]


def test_null_byte_file_name_is_skipped_with_cache(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_record(data, "good")
    write_record(data, "nul")
    header = data / "nul.hea"
    header.write_text(header.read_text().replace("nul.dat ", "n\x00ul.dat "))
    cached = DataConfig(split="random", split_seed=0, cache_dir=str(tmp_path / "cache"))
    report = ingest(data, cached).report
    assert report.records_read == ["good"]
    assert "HeaderSyntaxError" in report.records_skipped["nul"]


def test_missing_segment_is_skipped(tmp_path):
    path = write_missing_segment(tmp_path)
    with pytest.raises(RecordError, match="declares 3 segments but lists 2"):
        read_record(path, "multi", CONFIG)


def test_nan_run_skips_touching_beats(tmp_path):
    beats = read_record(write_nan_run(tmp_path), "nanrun", CONFIG)
    assert beats.invalid_samples == 10 * FS_HZ
    assert beats.skipped["invalid_samples"] >= 10
    assert np.isfinite(beats.windows).all()
    starts = beats.r_samples - CONFIG.pre_r_samples
    stops = starts + CONFIG.window_samples
    overlaps = (stops > 10 * FS_HZ) & (starts < 20 * FS_HZ)
    assert not overlaps.any()


def test_flat_record_is_skipped(tmp_path):
    # A lead that stays at its baseline, as with a disconnected electrode, yields no beat.
    path = write_flat_lead(tmp_path, "flat", 0, SECONDS)
    with pytest.raises(RecordError, match="every beat window is flat") as raised:
        read_record(path, "flat", CONFIG)
    assert f"span less than {FLAT_WINDOW_MV:g} mV" in str(raised.value)


def test_flat_stretch_skips_its_beats(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="appliance")
    beats = read_record(write_flat_lead(tmp_path, "flatrun", 10, 20), "flatrun", CONFIG)
    assert beats.skipped["flat"] >= 5
    spans = np.ptp(beats.windows, axis=2).min(axis=1)
    assert spans.min() >= FLAT_WINDOW_MV
    assert any("flat_windows=" in r.getMessage() for r in caplog.records)
    whole = read_record(write_record(tmp_path, "whole"), "whole", CONFIG)
    assert whole.skipped["flat"] == 0
    assert len(beats.labels) + beats.skipped["flat"] == len(whole.labels)


def test_unknown_symbols_are_counted(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="appliance")
    beats = read_record(write_unknown_symbols(tmp_path), "oddsymbols", CONFIG)
    assert beats.skipped["unknown_symbol"] == 20
    lines = [r.getMessage() for r in caplog.records if "unknown_symbols=Z" in r.getMessage()]
    assert len(lines) == 1
    assert "record=oddsymbols" in lines[0]


def test_mixed_folder_reads_good_records(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="appliance")
    for source in ("100", "101", "103", "105", "106"):
        write_record(tmp_path, f"good{source}", source=source)
    write_gain_zero(tmp_path)
    write_bad_time(tmp_path)
    write_short_signal(tmp_path)
    write_missing_segment(tmp_path)
    write_nan_run(tmp_path)
    write_unknown_symbols(tmp_path)
    write_tiny_signal(tmp_path)
    write_slow_rate(tmp_path)
    write_header_folder(tmp_path)
    dataset = ingest(tmp_path, CONFIG)
    report = dataset.report

    read = {
        "good100",
        "good101",
        "good103",
        "good105",
        "good106",
        "badtime",
        "short",
        "nanrun",
        "oddsymbols",
    }
    assert set(report.records_read) == read
    assert set(report.records_skipped) == {"gain0", "multi", "tiny", "slow", "dirhead"}
    assert "ADC gain 0" in report.records_skipped["gain0"]
    assert "declares 3 segments" in report.records_skipped["multi"]
    # The segments of "multi" are not records of their own.
    assert "seg_a" not in report.records_read
    assert report.beats_skipped["unknown_symbol"] == 20
    assert sum(len(dataset.splits[s]) for s in dataset.splits) > 1000

    for record in ("gain0", "multi", "tiny", "slow", "dirhead"):
        lines = [
            r.getMessage()
            for r in caplog.records
            if f"record={record} action=skip" in r.getMessage()
        ]
        assert len(lines) == 1, record
    table = report.table()
    assert "records read: 9  skipped: 5" in table
    assert "skipped gain0: lead MLII has ADC gain 0" in table
    assert "read with warnings short" in table
    assert table.splitlines()[-4].split() == ["split", "N", "S", "V", "F", "Q", "total"]


def test_records_file_stays_inside_folder(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="appliance")
    data = tmp_path / "data"
    data.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    write_record(data, "inside")
    write_record(outside, "stray", source="101")
    (data / "RECORDS").write_text(f"inside\n../outside/stray\n{outside / 'stray'}\ninside\n")
    assert find_records(data) == ["inside"]
    reasons = [r.getMessage() for r in caplog.records if "action=skip" in r.getMessage()]
    assert len(reasons) == 3
    assert sum("reason=outside_data_folder" in line for line in reasons) == 2
    assert sum("reason=listed_twice" in line for line in reasons) == 1


def test_truncated_signal_skip_names_truncation(tmp_path):
    path = write_record(tmp_path, "cut")
    data = path.with_suffix(".dat")
    # 300 frames of 2 signals of 2 bytes: longer than one window, but no beat fits whole.
    data.write_bytes(data.read_bytes()[: 300 * 4])
    with pytest.raises(RecordError) as raised:
        read_record(path, "cut", CONFIG)
    reason = raised.value.reason
    assert reason.startswith("no complete beat windows")
    assert f"signal file contains 300 of the {SECONDS * FS_HZ} frames" in reason


def test_truncated_annotations_warn(tmp_path):
    path = write_record(tmp_path, "fewnotes")
    annotation = wfdb.rdann(str(path), "atr")
    first_30_s = annotation.sample < 30 * FS_HZ
    wfdb.wrann(
        "fewnotes",
        "atr",
        annotation.sample[first_30_s],
        symbol=list(np.asarray(annotation.symbol)[first_30_s]),
        fs=FS_HZ,
        write_dir=str(tmp_path),
    )
    beats = read_record(path, "fewnotes", CONFIG)
    gaps = [w for w in beats.warnings if w.startswith("annotations (.atr) end at")]
    assert len(gaps) == 1, beats.warnings
    assert f"of the signal's {SECONDS} s" in gaps[0]
    whole = read_record(write_record(tmp_path, "allnotes"), "allnotes", CONFIG)
    assert not [w for w in whole.warnings if w.startswith("annotations")]


def test_header_with_too_few_samples_warns(tmp_path):
    path = write_record(tmp_path, "short")
    # The header states 30 s of the 120 s that the signal file contains.
    edit_header(path, f"{FS_HZ} {SECONDS * FS_HZ}", f"{FS_HZ} {30 * FS_HZ}")
    beats = read_record(path, "short", CONFIG)
    past_end = [w for w in beats.warnings if "lie after the end of the signal" in w]
    assert len(past_end) == 1, beats.warnings
    assert "at 30 s, so their beats are skipped" in past_end[0]
    assert "the header may state too few samples" in past_end[0]
    assert beats.skipped["edge"] > 100


def test_annotations_after_signal_name_cause(tmp_path):
    path = write_record(tmp_path, "late")
    # Every annotation moved past the last sample of the signal.
    annotation = wfdb.rdann(str(path), "atr")
    wfdb.wrann(
        "late",
        "atr",
        annotation.sample + SECONDS * FS_HZ,
        symbol=annotation.symbol,
        fs=FS_HZ,
        write_dir=str(tmp_path),
    )
    with pytest.raises(RecordError) as raised:
        read_record(path, "late", CONFIG)
    reason = raised.value.reason
    assert reason.startswith("no complete beat windows")
    assert f"{annotation.sample.size} of {annotation.sample.size} annotations (.atr) lie" in reason


def test_header_signal_count_mismatch_named(tmp_path):
    path = write_record(tmp_path, "nsig")
    # The record line declares 9 signals, but the header lists 2.
    edit_header(path, f"nsig 2 {FS_HZ}", f"nsig 9 {FS_HZ}")
    with pytest.raises(RecordError) as raised:
        read_record(path, "nsig", CONFIG)
    assert "header or signal cannot be read (" in raised.value.reason
    assert "matches its signal lines" in raised.value.reason


def test_truncated_annotation_file_named(tmp_path):
    path = write_record(tmp_path, "cutnotes")
    annotation_file = path.with_name("cutnotes.atr")
    content = annotation_file.read_bytes()
    # Annotations are 16-bit words, so an odd byte count cuts one in half.
    annotation_file.write_bytes(content[: len(content) // 2 + 1 - (len(content) // 2) % 2])
    with pytest.raises(RecordError) as raised:
        read_record(path, "cutnotes", CONFIG)
    assert raised.value.reason.startswith("annotation file .atr cannot be read (")
    assert "truncated, corrupt or not a WFDB annotation file" in raised.value.reason


def test_changed_signal_file_fails_checksum(tmp_path):
    whole = read_record(write_record(tmp_path, "kept"), "kept", CONFIG)
    assert not [w for w in whole.warnings if "checksum" in w]
    path = write_record(tmp_path, "changed")
    signal_file = path.with_suffix(".dat")
    content = bytearray(signal_file.read_bytes())
    # Format 16 stores little-endian 16-bit samples; the first sample of lead MLII gains 1.
    content[0] = (content[0] + 1) % 256
    signal_file.write_bytes(bytes(content))
    beats = read_record(path, "changed", CONFIG)
    mismatches = [w for w in beats.warnings if "checksum" in w]
    assert len(mismatches) == 1, beats.warnings
    assert mismatches[0].startswith("lead MLII: the signal file's checksum (")
    assert "so the signal file may be damaged" in mismatches[0]
    assert len(beats.labels) == len(whole.labels)


def test_random_split_drawn_over_readable_records(tmp_path):
    for source in ("100", "101", "103", "105"):
        write_record(tmp_path, f"good{source}", source=source)
    # Name the broken record so that a split over every record puts it in validation or test.
    # The split depends on the position of the name among the sorted names.
    for broken in ("a_bad", "good100_bad", "good101_bad", "good103_bad", "z_bad"):
        names = [*(f"good{s}" for s in ("100", "101", "103", "105")), broken]
        if assign_splits(sorted(names), tmp_path, CONFIG)[broken] != "train":
            break
    else:
        pytest.fail("no name puts the broken record outside train")
    path = write_record(tmp_path, broken)
    edit_header(path, f"{broken}.dat 16 200", f"{broken}.dat 16 0")
    dataset = ingest(tmp_path, CONFIG)
    assert broken in dataset.report.records_skipped
    assert broken not in dataset.report.split_of_record
    for split in ("train", "validation", "test"):
        assert len(dataset.splits[split]) > 0, split


def test_many_skips_grouped_by_reason(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="appliance.dataset")
    for source in ("100", "101", "103", "105"):
        write_record(tmp_path, f"good{source}", source=source)
    for index in range(SKIP_LOG_LINES + 30):
        (tmp_path / f"empty{index:03d}.hea").write_text("")
        (tmp_path / f"empty{index:03d}.dat").write_bytes(b"")
    dataset = ingest(tmp_path, CONFIG)
    assert len(dataset.report.records_skipped) == SKIP_LOG_LINES + 30
    skips = [r.getMessage() for r in caplog.records if "action=skip " in r.getMessage()]
    assert len(skips) == SKIP_LOG_LINES
    messages = [r.getMessage() for r in caplog.records]
    assert sum(f"more than {SKIP_LOG_LINES} records failed to read" in m for m in messages) == 1
    table = dataset.report.table()
    grouped = [line for line in table.splitlines() if line.startswith("  skipped ")]
    assert grouped == [
        f"  skipped {SKIP_LOG_LINES + 30} records (empty000, empty001, empty002 and "
        f"{SKIP_LOG_LINES + 27} more): header file is empty"
    ]
    assert len(dataset.report.records_read) == 4


def test_skip_log_counts_read_failures_only(tmp_path, caplog):
    # Records outside a SPLITS file are skipped without a log line, so they must not use up
    # the lines that read failures get.
    caplog.set_level(logging.WARNING, logger="appliance.dataset")
    for source in ("100", "101", "103"):
        write_record(tmp_path, f"good{source}", source=source)
    for index in range(SKIP_LOG_LINES + 5):
        write_record(tmp_path, f"extra{index:03d}", seconds=10)
    (tmp_path / "broken.hea").write_text("")
    (tmp_path / "SPLITS").write_text(
        "good100 train\ngood101 validation\ngood103 test\nbroken train\n"
    )
    dataset = ingest(tmp_path, DataConfig(split="file"))
    skips = [r.getMessage() for r in caplog.records if "action=skip " in r.getMessage()]
    assert skips == ["record=broken action=skip reason=header file is empty"]
    assert len(dataset.report.records_skipped) == SKIP_LOG_LINES + 6


def test_empty_split_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="appliance.dataset")
    for source in ("100", "101"):
        write_record(tmp_path, f"good{source}", source=source)
    dataset = ingest(tmp_path, CONFIG)
    assert len(dataset.splits["validation"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    for split in ("validation", "test"):
        lines = [m for m in messages if m.startswith(f"split={split} has no beats")]
        assert len(lines) == 1, messages
    assert not [m for m in messages if m.startswith("split=train")]
