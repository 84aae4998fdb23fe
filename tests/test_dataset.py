"""Folder ingest: record discovery, patient-wise splits, preprocessing facts and the cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import wfdb

from appliance import ecg
from appliance.classes import AAMI_CLASSES
from appliance.config import DataConfig
from appliance.dataset import (
    DE_CHAZAL_DS1,
    DE_CHAZAL_DS2,
    DE_CHAZAL_EXCLUDED,
    SYNTHETIC_RECORD_REASON,
    Dataset,
    assign_splits,
    find_records,
    ingest,
)
from appliance.outputs import SYNTHETIC_RECORD_COMMENT, write_beats

MITDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "mitdb"
WFDB_FORMATS = MITDB.parent / "wfdb-formats"


@pytest.fixture(scope="session")
def mitdb_dataset(shared_data) -> Dataset:
    """All of MIT-BIH ingested with the default settings (de Chazal split)."""
    return ingest(MITDB, DataConfig())


def test_de_chazal_sets_cover_database():
    records = set((MITDB / "RECORDS").read_text().split())
    sets = set(DE_CHAZAL_DS1) | set(DE_CHAZAL_DS2) | set(DE_CHAZAL_EXCLUDED)
    assert sets == records
    assert not set(DE_CHAZAL_DS1) & set(DE_CHAZAL_DS2)


def test_de_chazal_keeps_one_subject_together(mitdb_dataset):
    split_of = mitdb_dataset.report.split_of_record
    assert split_of["201"] == split_of["202"] == "test"
    assert {split_of[r] for r in DE_CHAZAL_DS1} == {"train", "validation"}
    assert {split_of[r] for r in DE_CHAZAL_DS2} == {"test"}


def test_de_chazal_skips_paced_records(mitdb_dataset):
    skipped = mitdb_dataset.report.records_skipped
    assert set(skipped) == set(DE_CHAZAL_EXCLUDED)
    assert all("paced" in reason for reason in skipped.values())


def test_mitdb_beats_per_split(mitdb_dataset):
    splits = mitdb_dataset.splits
    for name, beat_set in splits.items():
        records = set(beat_set.records.tolist())
        expected = {r for r, s in mitdb_dataset.report.split_of_record.items() if s == name}
        assert records == expected, name
        assert beat_set.windows.shape == (len(beat_set), 1, 256)
        assert beat_set.windows.dtype == np.float32
        assert beat_set.labels.dtype == np.int64
    # DS2 holds 1836 S and 3220 V beats in the published counts; edge beats may drop a few.
    test_counts = splits["test"].class_counts()
    assert test_counts["V"] == pytest.approx(3220 + 198, abs=5)  # DS2 V plus 201's 198
    total = sum(len(s) for s in splits.values())
    assert total == sum(c for s in mitdb_dataset.report.class_counts.values() for c in s.values())


def test_preprocessing_facts(mitdb_dataset):
    facts = mitdb_dataset.preprocessing
    assert facts is not None
    values = facts.to_dict()
    assert values["fs_hz"] == 360.0
    assert values["highpass_hz"] == 0.5
    assert values["amplitude_unit"] == "mV"
    assert values["fs_hz_of_record"]["100"] == 360.0
    train = mitdb_dataset.splits["train"].windows
    assert values["train_std_mv"] == pytest.approx(float(train.std()), rel=1e-4)
    assert 0.05 < values["train_std_mv"] < 2.0


def test_random_split_is_seeded_and_grouped():
    records = [str(n) for n in range(100, 130)] + ["201", "202"]
    config = DataConfig(split="random", split_seed=3)
    first = assign_splits(records, Path("."), config)
    assert first == assign_splits(records, Path("."), config)
    assert first != assign_splits(records, Path("."), dataclasses.replace(config, split_seed=4))
    assert first["201"] == first["202"]
    assert set(first.values()) == {"train", "validation", "test"}
    assert set(first) == set(records)


def test_split_file_is_followed(tmp_path):
    (tmp_path / "SPLITS").write_text("a train\nb test  # held out\n")
    mapping = assign_splits(["a", "b", "c"], tmp_path, DataConfig())
    assert mapping == {"a": "train", "b": "test"}


def test_find_records_skips_segments():
    records = find_records(WFDB_FORMATS)
    assert "multi-segment/041s/041s" in records
    assert "multi-segment/041s/041s01" not in records
    assert "multi-segment/s25047/3234460_layout" not in records
    assert len(records) == 14


@pytest.fixture()
def small_folder(tmp_path) -> Path:
    folder = tmp_path / "records"
    folder.mkdir()
    for record in ("100", "101", "103"):
        for suffix in (".hea", ".dat", ".atr"):
            shutil.copy(MITDB / f"{record}{suffix}", folder / f"{record}{suffix}")
    return folder


def test_cache_returns_same_windows(small_folder, tmp_path):
    config = DataConfig(split="random", cache_dir=str(tmp_path / "cache"))
    cold = ingest(small_folder, config)
    assert cold.report.cache_hits == 0
    warm = ingest(small_folder, config)
    assert warm.report.cache_hits == 3
    for name in cold.splits:
        np.testing.assert_array_equal(cold.splits[name].windows, warm.splits[name].windows)
        np.testing.assert_array_equal(cold.splits[name].labels, warm.splits[name].labels)
    assert warm.fs_hz_of_record == cold.fs_hz_of_record


def test_cache_invalidated_by_file_change(small_folder, tmp_path):
    config = DataConfig(split="random", cache_dir=str(tmp_path / "cache"))
    ingest(small_folder, config)
    annotation = small_folder / "101.atr"
    stat = annotation.stat()
    os.utime(annotation, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = ingest(small_folder, config)
    assert again.report.cache_hits == 2
    assert len(list((tmp_path / "cache").glob("101-*.npz"))) == 1


def test_cache_invalidated_by_settings(small_folder, tmp_path):
    config = DataConfig(split="random", cache_dir=str(tmp_path / "cache"))
    ingest(small_folder, config)
    changed_config = dataclasses.replace(config, highpass_hz=1.0)
    changed = ingest(small_folder, changed_config)
    assert changed.report.cache_hits == 0
    # The split does not change a record's windows, so it stays out of the key.
    resplit = ingest(small_folder, dataclasses.replace(changed_config, split_seed=7))
    assert resplit.report.cache_hits == 3


def test_cache_keeps_same_named_records_apart(tmp_path):
    # Two copies of record 100 with equal file names, sizes and times, as cp -p leaves them,
    # but with the N beats of the second copy relabelled V.
    first, second = tmp_path / "first", tmp_path / "second"
    annotation = wfdb.rdann(str(MITDB / "100"), "atr")
    relabelled = ["V" if symbol == "N" else symbol for symbol in annotation.symbol]
    mtime_ns = (MITDB / "100.atr").stat().st_mtime_ns
    for folder, symbols in ((first, annotation.symbol), (second, relabelled)):
        folder.mkdir()
        for suffix in (".hea", ".dat"):
            shutil.copy2(MITDB / f"100{suffix}", folder / f"100{suffix}")
        wfdb.wrann(
            "100",
            "atr",
            annotation.sample,
            symbol=symbols,
            aux_note=annotation.aux_note,
            fs=annotation.fs,
            write_dir=str(folder),
        )
        os.utime(folder / "100.atr", ns=(mtime_ns, mtime_ns))
    for suffix in (".hea", ".dat", ".atr"):
        first_stat, second_stat = (first / f"100{suffix}").stat(), (second / f"100{suffix}").stat()
        assert first_stat.st_size == second_stat.st_size, suffix
        assert first_stat.st_mtime_ns == second_stat.st_mtime_ns, suffix

    cache = tmp_path / "cache"
    config = DataConfig(split="random", cache_dir=str(cache))
    first_cold = ingest(first, config).splits["train"].labels
    second_cold = ingest(second, config).splits["train"].labels
    assert not np.array_equal(first_cold, second_cold)
    v_class = AAMI_CLASSES.index("V")
    assert np.count_nonzero(second_cold == v_class) > np.count_nonzero(first_cold == v_class)

    # Ingesting the folders in turn keeps both entries, so each run is a cache hit.
    assert len(list(cache.glob("100-*.npz"))) == 2
    for folder, labels in ((first, first_cold), (second, second_cold), (first, first_cold)):
        warm = ingest(folder, config)
        assert warm.report.cache_hits == 1, folder
        np.testing.assert_array_equal(warm.splits["train"].labels, labels)


def test_cache_deletes_only_own_entries(small_folder, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    old_format = cache / f"101-{'0' * 32}.npz"
    other_folder = cache / f"101-{'0' * 16}-{'0' * 32}.npz"
    for entry in (old_format, other_folder):
        entry.write_bytes(b"")
    ingest(small_folder, DataConfig(split="random", cache_dir=str(cache)))
    assert not old_format.exists()
    assert other_folder.exists()
    assert len(list(cache.glob("101-*.npz"))) == 2


@pytest.mark.parametrize("target", ["_read_record", "wfdb.rdrecord"])
def test_cache_skips_memory_error(small_folder, tmp_path, monkeypatch, target):
    cache = tmp_path / "cache"
    config = DataConfig(split="random", cache_dir=str(cache))
    owner = ecg.wfdb if target == "wfdb.rdrecord" else ecg
    name = target.rpartition(".")[2]
    original = getattr(owner, name)

    def fail_on_101(path: str | Path, *args: object, **kwargs: object) -> object:
        if Path(path).name == "101":
            raise MemoryError("out of memory")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(owner, name, fail_on_101)
    failed = ingest(small_folder, config)
    assert "MemoryError" in failed.report.records_skipped["101"]
    assert list(cache.glob("101-*.npz")) == []

    # Once memory is available the record is read again, not taken as a cached failure.
    monkeypatch.undo()
    again = ingest(small_folder, config)
    assert "101" in again.report.records_read
    assert again.report.cache_hits == 2


def _rewrite_entry(entry: Path, change: str) -> None:
    """Damage a cache entry in place the way ``change`` names."""
    if change == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
        return
    if change == "empty":
        entry.write_bytes(b"")
        return
    with np.load(entry, allow_pickle=False) as stored:
        meta = json.loads(str(stored["meta"]))
        arrays = {name: stored[name] for name in stored.files if name != "meta"}
    if change == "extra_key":
        meta["future_field"] = 1
    elif change == "missing_key":
        del meta["beat_source"]
    elif change in ("nan_window", "inf_window"):
        arrays["windows"] = arrays["windows"].copy()
        arrays["windows"][3, 0, 10] = np.nan if change == "nan_window" else np.inf
    elif change == "short_windows":
        arrays["windows"] = arrays["windows"][:, :, :128]
    elif change == "two_leads":
        arrays["windows"] = np.concatenate([arrays["windows"], arrays["windows"]], axis=1)
        meta["leads"] = meta["leads"] * 2
    elif change == "two_lead_names":
        meta["leads"] = meta["leads"] * 2
    elif change in ("label_too_large", "label_negative"):
        arrays["labels"] = arrays["labels"].copy()
        arrays["labels"][5] = len(AAMI_CLASSES) if change == "label_too_large" else -1
    elif change == "float_labels":
        arrays["labels"] = arrays["labels"].astype(np.float64)
    with entry.open("wb") as file:
        np.savez(file, meta=np.array(json.dumps(meta)), **arrays)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("truncated", ""),
        ("empty", ""),
        ("extra_key", "unknown=['future_field']"),
        ("missing_key", "missing=['beat_source']"),
        ("nan_window", "1 of"),
        ("inf_window", "NaN or infinity"),
        ("short_windows", "(beats, 1, 256)"),
        ("two_leads", "windows have shape"),
        ("two_lead_names", "names 2 leads, not 1"),
        ("label_too_large", "1 labels lie outside the AAMI class indices 0 to 4, such as 5"),
        ("label_negative", "such as -1"),
        ("float_labels", "labels have dtype float64"),
    ],
)
def test_cache_damaged_entry_reread(
    small_folder: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: str,
    reason: str,
) -> None:
    cache = tmp_path / "cache"
    config = DataConfig(split="random", cache_dir=str(cache))
    cold = ingest(small_folder, config)
    (entry,) = cache.glob("101-*.npz")
    _rewrite_entry(entry, change)

    with caplog.at_level(logging.WARNING, logger="appliance.ingest_cache"):
        again = ingest(small_folder, config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    damaged = [message for message in warnings if "damaged ingest cache entry" in message]
    assert len(damaged) == 1, warnings
    assert f"cache_entry={entry}" in damaged[0]
    assert "record=101" in damaged[0]
    assert reason in damaged[0]
    assert again.report.cache_hits == 2
    for name in cold.splits:
        np.testing.assert_array_equal(cold.splits[name].windows, again.splits[name].windows)
        np.testing.assert_array_equal(cold.splits[name].labels, again.splits[name].labels)

    # The re-read record replaced the damaged entry.
    assert [path.name for path in cache.glob("101-*.npz")] == [entry.name]
    assert ingest(small_folder, config).report.cache_hits == 3


def _write_generated_record(folder: Path, config: DataConfig) -> Path:
    """Write a record as ``generate --format wfdb`` does, from 40 beats of MIT-BIH 100."""
    record = wfdb.rdrecord(str(MITDB / "100"), channel_names=["MLII"], sampto=60 * 360)
    annotation = wfdb.rdann(str(MITDB / "100"), "atr", sampto=60 * 360)
    starts = [s - config.pre_r_samples for s in annotation.sample if s > config.pre_r_samples]
    starts = starts[:40]
    lead = record.p_signal[:, 0]
    beats = np.stack([lead[start : start + config.window_samples] for start in starts])[:, None]
    paths = write_beats(
        folder,
        beats,
        ["N"] * len(beats),
        np.zeros(len(beats)),
        config.fs_hz,
        config.pre_r_samples,
        ["MLII"],
        "wfdb",
    )
    return paths[0]


def test_synthetic_record_is_skipped(small_folder, tmp_path, caplog):
    config = DataConfig(split="random", cache_dir=str(tmp_path / "cache"))
    header = _write_generated_record(small_folder / "runs" / "latest", config)
    record = "runs/latest/synthetic"
    assert record in find_records(small_folder)

    with caplog.at_level(logging.WARNING, logger="appliance.dataset"):
        dataset = ingest(small_folder, config)
    assert dataset.report.records_skipped == {record: SYNTHETIC_RECORD_REASON}
    assert sorted(dataset.report.records_read) == ["100", "101", "103"]
    assert record not in dataset.report.split_of_record
    assert f"record={record} action=skip" in caplog.text
    assert "move it out of the data folder" in dataset.report.table()

    # Without the appliance's comment the same files are read as a patient's record.
    lines = header.read_text().splitlines()
    assert f"# {SYNTHETIC_RECORD_COMMENT}" in lines
    lines.remove(f"# {SYNTHETIC_RECORD_COMMENT}")
    header.write_text("\n".join(lines) + "\n")
    unmarked = ingest(small_folder, config)
    assert record in unmarked.report.records_read
