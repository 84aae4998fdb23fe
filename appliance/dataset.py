"""Ingest of a folder of WFDB records: record discovery, patient-wise splits, the ingest report."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from appliance.classes import AAMI_CLASSES
from appliance.config import DataConfig
from appliance.ecg import HIGHPASS_ORDER, RecordBeats, read_record
from appliance.errors import DataError, NoUsableDataError, RecordError
from appliance.ingest_cache import IngestCache, cache_key
from appliance.ingest_checks import is_synthetic_record

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLITS_FILE = "SPLITS"
# Records that fail to read and are logged one by one; the ingest summary lists every skip.
SKIP_LOG_LINES = 20
# Records named in a group of skipped records that share one reason.
SKIP_GROUP_NAMES = 3
# Skip reason of a record that the appliance wrote (generate --format wfdb, run).
SYNTHETIC_RECORD_REASON = (
    "synthetic record written by the ECG appliance, not a patient recording; move it out of "
    "the data folder, and write generated records to a folder outside it"
)
# Consequence of an empty split, named in the ingest warning.
EMPTY_SPLIT_EFFECT = {
    "validation": (
        "Training needs validation beats to select its checkpoint and stops without them; add "
        f"records, or name a validation record in a {SPLITS_FILE} file"
    ),
    "test": (
        "No beat of a patient outside training is scored; add records, or name a test record "
        f"in a {SPLITS_FILE} file"
    ),
}

# Inter-patient split of de Chazal, O'Dwyer and Reilly (IEEE TBME 51(7), 2004). Record 201 is
# moved from DS1 to DS2 because records 201 and 202 come from the same subject.
DE_CHAZAL_DS1 = (
    "101 106 108 109 112 114 115 116 118 119 122 124 203 205 207 208 209 215 220 223 230"
).split()
DE_CHAZAL_DS2 = (
    "100 103 105 111 113 117 121 123 200 201 202 210 212 213 214 219 221 222 228 231 232 233 234"
).split()
# Groups of record names from one subject; a split keeps each group on one side.
SAME_SUBJECT_GROUPS = (("201", "202"),)
# Paced records, which de Chazal et al. leave out of both sets.
DE_CHAZAL_EXCLUDED = ("102", "104", "107", "217")


@dataclass
class BeatSet:
    """Beats of one split.

    Attributes:
        windows: Beats, shape (beats, leads, window_samples), in mV.
        labels: AAMI class indices, shape (beats,).
        records: Record name of each beat, shape (beats,).
    """

    windows: np.ndarray
    labels: np.ndarray
    records: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self) -> dict[str, int]:
        """Return the number of beats of each AAMI class."""
        counts = np.bincount(self.labels, minlength=len(AAMI_CLASSES))
        return {name: int(counts[i]) for i, name in enumerate(AAMI_CLASSES)}

    def beats_per_record(self) -> dict[str, int]:
        """Return the number of beats of each record, by record name."""
        names, counts = np.unique(self.records.astype(str), return_counts=True)
        return {str(name): int(count) for name, count in zip(names, counts, strict=True)}


@dataclass
class IngestReport:
    """Summary of an ingest run: records read and skipped, beat sources and class counts.

    Attributes:
        records_read: Records that gave beats, in reading order.
        records_skipped: Reason of each record that gave no beats.
        beat_sources: Where each record's beat positions came from (``annotations:atr``,
            ``detector:xqrs``).
        beats_skipped: Beats left out over all records, by reason.
        split_of_record: Split of each record read.
        class_counts: Beats per AAMI class in each split.
        leads_of_record: Lead names used for each record read.
        warnings_of_record: Defects tolerated while reading each record.
        cache_hits: Records taken from the ingest cache.
    """

    records_read: list[str] = field(default_factory=list)
    records_skipped: dict[str, str] = field(default_factory=dict)
    beat_sources: dict[str, str] = field(default_factory=dict)
    beats_skipped: dict[str, int] = field(default_factory=dict)
    split_of_record: dict[str, str] = field(default_factory=dict)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    leads_of_record: dict[str, list[str]] = field(default_factory=dict)
    warnings_of_record: dict[str, list[str]] = field(default_factory=dict)
    cache_hits: int = 0

    def table(self) -> str:
        """Return the report as a plain-text table; skipped records are grouped by reason."""
        lines = [f"records read: {len(self.records_read)}  skipped: {len(self.records_skipped)}"]
        for group in skip_groups(self.records_skipped):
            lines.append(f"  skipped {group}")
        for record, warnings in sorted(self.warnings_of_record.items()):
            lines.append(f"  read with warnings {record}: {'; '.join(warnings)}")
        if self.beats_skipped:
            parts = ", ".join(f"{k}={v}" for k, v in sorted(self.beats_skipped.items()))
            lines.append(f"beats skipped: {parts}")
        lines.append("split       " + "".join(f"{name:>8}" for name in AAMI_CLASSES) + "   total")
        for split in SPLITS:
            counts = self.class_counts.get(split, {})
            total = sum(counts.values())
            row = "".join(f"{counts.get(name, 0):>8}" for name in AAMI_CLASSES)
            lines.append(f"{split:<12}{row}{total:>8}")
        return "\n".join(lines)

    def summary_line(self) -> str:
        """Return one line for the end of a run: records read and skipped, beats per split.

        The full table is logged once, when ingest ends; this line repeats only its totals.
        """
        beats = ", ".join(
            f"{split} {sum(self.class_counts.get(split, {}).values())}" for split in SPLITS
        )
        line = (
            f"records read: {len(self.records_read)}  skipped: {len(self.records_skipped)}  "
            f"beats: {beats}"
        )
        if self.records_skipped or self.warnings_of_record:
            line += "  (reasons and warnings in the logged ingest summary)"
        return line


def skip_groups(records_skipped: dict[str, str]) -> list[str]:
    """Return one line per distinct skip reason, naming its first records.

    A folder of thousands of empty headers then gives one line instead of thousands.

    Arguments:
        records_skipped: Record name to the reason it was skipped.

    Returns:
        Lines ``RECORD: REASON`` for a reason of one record, and ``N records (A, B, C and
        N - 3 more): REASON`` for a reason shared by several, in the order of the first record.
    """
    by_reason: dict[str, list[str]] = {}
    for record, reason in sorted(records_skipped.items()):
        by_reason.setdefault(reason, []).append(record)
    lines = []
    for reason, records in by_reason.items():
        if len(records) == 1:
            lines.append(f"{records[0]}: {reason}")
            continue
        named = ", ".join(records[:SKIP_GROUP_NAMES])
        more = len(records) - SKIP_GROUP_NAMES
        if more > 0:
            named += f" and {more} more"
        lines.append(f"{len(records)} records ({named}): {reason}")
    return lines


@dataclass
class Preprocessing:
    """Preprocessing facts of an ingest run, which the export step stores in the manifest.

    Generated beats are in the same units: mV after baseline removal, at ``fs_hz``. Resampling
    one with ``scipy.signal.resample_poly`` to a value of ``fs_hz_of_record`` returns it at that
    record's rate.

    Attributes:
        fs_hz: Sampling rate of every window.
        window_samples: Samples per window.
        pre_r_samples: Samples before the R peak in each window.
        leads: Configured leads in preference order.
        amplitude_unit: Unit of window values.
        baseline_filter: Filter that removed baseline wander.
        highpass_hz: Cut-off of that filter.
        highpass_order: Butterworth order of that filter (applied forward and backward).
        resampler: Method that brought each lead to ``fs_hz``.
        fs_hz_of_record: Rate of the first chosen lead of each record read.
        train_mean_mv: Mean of the training windows.
        train_std_mv: Standard deviation of the training windows.
    """

    fs_hz: float
    window_samples: int
    pre_r_samples: int
    leads: list[str]
    amplitude_unit: str = "mV"
    baseline_filter: str = "Butterworth high-pass, zero-phase (scipy.signal.sosfiltfilt)"
    highpass_hz: float = 0.0
    highpass_order: int = HIGHPASS_ORDER
    resampler: str = "scipy.signal.resample_poly, Kaiser-window anti-aliasing low-pass"
    fs_hz_of_record: dict[str, float] = field(default_factory=dict)
    train_mean_mv: float = 0.0
    train_std_mv: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the facts as plain JSON-ready values."""
        return asdict(self)


@dataclass
class Dataset:
    """Ingested beats split by record, with the report of the run."""

    splits: dict[str, BeatSet]
    report: IngestReport
    fs_hz_of_record: dict[str, float]
    leads: list[str]
    preprocessing: Preprocessing | None = None


def _records_file_names(records_file: Path) -> list[str]:
    """Return the record names a RECORDS file lists, each once and inside its folder.

    A name that leaves the folder (absolute, or with a ``..`` part) could read another folder's
    records into a split, so it is skipped with a warning, as is a repeated name.
    """
    names: list[str] = []
    for line in records_file.read_text(errors="replace").splitlines():
        name = line.strip()
        if not name:
            continue
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts:
            logger.warning(
                "records_file=%s line=%r action=skip reason=outside_data_folder",
                records_file,
                name,
            )
        elif name in names:
            logger.warning(
                "records_file=%s line=%r action=skip reason=listed_twice", records_file, name
            )
        else:
            names.append(name)
    return names


def _header_names(data_dir: Path) -> list[str]:
    """Return the record names of every header under ``data_dir``, subfolders included.

    A subfolder this user may not list is logged with a warning, so that its records are not
    left out unnoticed.
    """

    def unreadable(exc: OSError) -> None:
        if exc.filename is not None and Path(exc.filename) == data_dir:
            raise exc
        logger.warning(
            "folder=%s action=skip reason=%s; its records are not read. Give user id %d read "
            "and search access to it",
            exc.filename,
            exc.strerror or exc,
            os.getuid(),
        )

    names = []
    for folder, folders, files in os.walk(data_dir, onerror=unreadable):
        # A folder named like a header is listed too, so that ingest reports it.
        for file in [*files, *folders]:
            if file.endswith(".hea"):
                names.append(str((Path(folder) / file).relative_to(data_dir).with_suffix("")))
    return names


def find_records(data_dir: Path) -> list[str]:
    """List record names in a folder, from its RECORDS file or its headers.

    Segment headers of multi-segment records are left out: the master header reads them.

    Raises:
        DataError: If the folder does not exist or contains no WFDB header.
    """
    if not data_dir.exists():
        raise DataError(f"data folder {data_dir} does not exist; pass --data with a WFDB folder")
    if not data_dir.is_dir():
        raise DataError(f"data path {data_dir} is not a folder; pass --data with a WFDB folder")
    records_file = data_dir / "RECORDS"
    try:
        # Listing first makes a folder this user may not read fail here, whatever its mode.
        top = os.listdir(data_dir)
        if "RECORDS" in top:
            names = _records_file_names(records_file)
        else:
            names = sorted(_header_names(data_dir))
    except PermissionError as exc:
        raise DataError(
            f"data folder {data_dir} cannot be listed: {exc.filename or data_dir} is not "
            f"readable by this process (user id {os.getuid()}); give that user read and search "
            "access to the folder and its files"
        ) from exc
    segments: set[str] = set()
    for name in names:
        header_path = data_dir / f"{name}.hea"
        try:
            text = header_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        first = next((line for line in text if line.strip() and not line.startswith("#")), "")
        if "/" in first.split(" ")[0]:  # "name/segments ..." marks a multi-segment master
            parent = str(Path(name).parent)
            for line in text[1:]:
                segment = line.split(" ")[0].strip()
                if segment and not segment.startswith("#") and segment != "~":
                    segments.add(segment if parent == "." else f"{parent}/{segment}")
    records = [name for name in names if name not in segments]
    if not records:
        raise DataError(
            f"no WFDB records (.hea files) found in {data_dir}; pass --data with a folder "
            "that contains WFDB headers"
        )
    return records


def _split_method(records: list[str], data_dir: Path, config: DataConfig) -> str:
    """Resolve ``auto`` to ``file`` (a SPLITS file), ``de-chazal`` (MIT-BIH) or ``random``."""
    if config.split != "auto":
        return config.split
    if (data_dir / SPLITS_FILE).exists():
        return "file"
    if set(DE_CHAZAL_DS1) <= set(records) and set(DE_CHAZAL_DS2) <= set(records):
        return "de-chazal"
    return "random"


def assign_splits(records: list[str], data_dir: Path, config: DataConfig) -> dict[str, str]:
    """Map each record to train, validation or test, keeping one subject on one side.

    Raises:
        DataError: If the split method is unknown or a split file is malformed.
    """
    method = _split_method(records, data_dir, config)
    if method == "file":
        mapping: dict[str, str] = {}
        for line in (data_dir / SPLITS_FILE).read_text().splitlines():
            line = line.split("#")[0].strip()
            if not line:
                continue
            name, _, split = line.partition(" ")
            if split.strip() not in SPLITS:
                raise DataError(
                    f"{data_dir / SPLITS_FILE}: split {split!r} of {name} is not "
                    f"one of {', '.join(SPLITS)}"
                )
            mapping[name] = split.strip()
        return {r: mapping[r] for r in records if r in mapping}
    if method == "de-chazal":
        rng = np.random.default_rng(config.split_seed)
        ds1 = [r for r in DE_CHAZAL_DS1 if r in records]
        n_validation = max(1, round(len(ds1) * config.validation_fraction))
        validation = set(rng.choice(ds1, size=n_validation, replace=False).tolist())
        mapping = {r: ("validation" if r in validation else "train") for r in ds1}
        mapping.update({r: "test" for r in DE_CHAZAL_DS2 if r in records})
        return mapping
    if method == "random":
        return _random_split(records, config)
    raise DataError(f"unknown split {method!r}; use auto, file, de-chazal or random")


def _random_split(records: list[str], config: DataConfig) -> dict[str, str]:
    groups: list[list[str]] = []
    grouped: set[str] = set()
    for group in SAME_SUBJECT_GROUPS:
        members = [r for r in records if Path(r).name in group]
        if members:
            groups.append(members)
            grouped.update(members)
    groups.extend([r] for r in records if r not in grouped)
    order = np.random.default_rng(config.split_seed).permutation(len(groups))
    n = len(groups)
    # With fewer than 3 subjects every record trains; otherwise each held-out side gets one.
    n_test, n_validation = 0, 0
    if n >= 3:
        n_test = max(1, round(n * config.test_fraction))
        n_validation = max(1, round(n * config.validation_fraction))
    mapping: dict[str, str] = {}
    for rank, g in enumerate(order):
        if rank < n_test:
            split = "test"
        elif rank < n_test + n_validation:
            split = "validation"
        else:
            split = "train"
        for record in groups[g]:
            mapping[record] = split
    return mapping


def ingest(data_dir: Path, config: DataConfig) -> Dataset:
    """Read every record of a folder, skip and report bad ones, and split beats by record.

    Each unusable record is skipped, and so is each record whose header contains
    ``appliance.outputs.SYNTHETIC_RECORD_COMMENT`` (the appliance's own output). The first
    ``SKIP_LOG_LINES`` records that fail to read or are synthetic get one warning line each,
    naming the record and the reason, and the ingest summary lists every skip. With
    ``config.cache_dir`` set, records whose files and settings are unchanged since an earlier
    run are taken from the cache.

    Raises:
        DataError: If the folder is missing or empty.
        NoUsableDataError: If no record gives beats, or the training split is empty.
    """
    data_dir = Path(data_dir)
    records = find_records(data_dir)
    split_of = assign_splits(records, data_dir, config)
    cache = IngestCache(Path(config.cache_dir), config) if config.cache_dir else None
    report = IngestReport()
    per_split: dict[str, list[RecordBeats]] = {split: [] for split in SPLITS}
    fs_of_record: dict[str, float] = {}
    leads: list[str] = []
    readable: dict[str, RecordBeats] = {}
    read_failures = 0
    for record in records:
        # Checked before the split, so that the reason names the appliance's output even when
        # a split file or the de Chazal sets leave the record out.
        if is_synthetic_record(data_dir / f"{record}.hea"):
            result: RecordBeats | RecordError = RecordError(record, SYNTHETIC_RECORD_REASON)
        elif record not in split_of:
            report.records_skipped[record] = _unsplit_reason(record, records, data_dir, config)
            continue
        else:
            result = _read_cached(data_dir, record, config, cache)
        if isinstance(result, RecordError):
            if read_failures < SKIP_LOG_LINES:
                logger.warning("record=%s action=skip reason=%s", record, result.reason)
            elif read_failures == SKIP_LOG_LINES:
                logger.warning(
                    "more than %d records failed to read; the rest are not logged one by one, "
                    "and the ingest summary groups every skip by reason",
                    SKIP_LOG_LINES,
                )
            read_failures += 1
            report.records_skipped[record] = result.reason
            continue
        readable[record] = result
    if len(readable) < len(split_of) and _split_method(records, data_dir, config) == "random":
        # A random split drawn over every record can leave validation or test with skipped
        # records only, so it is drawn again over the records that gave beats.
        split_of = assign_splits(list(readable), data_dir, config)
    for record, beats in readable.items():
        report.records_read.append(record)
        report.beat_sources[record] = beats.beat_source
        report.split_of_record[record] = split_of[record]
        report.leads_of_record[record] = beats.leads
        if beats.warnings:
            report.warnings_of_record[record] = beats.warnings
        for reason, count in beats.skipped.items():
            report.beats_skipped[reason] = report.beats_skipped.get(reason, 0) + count
        fs_of_record[record] = beats.fs_hz
        leads = leads or beats.leads
        per_split[split_of[record]].append(beats)
        logger.info(
            "record=%s split=%s beats=%d fs_hz=%g leads=%s source=%s",
            record,
            split_of[record],
            len(beats.labels),
            beats.fs_hz,
            ",".join(beats.leads),
            beats.beat_source,
        )
    report.cache_hits = cache.hits if cache else 0
    if not report.records_read:
        raise NoUsableDataError(
            f"no usable records in {data_dir} ({len(report.records_skipped)} skipped: "
            + "; ".join(skip_groups(report.records_skipped))
            + ")"
        )
    splits = {split: _concatenate(items, config) for split, items in per_split.items()}
    for split, beat_set in splits.items():
        report.class_counts[split] = beat_set.class_counts()
        if len(beat_set) == 0 and split != "train":
            logger.warning(
                "split=%s has no beats: no readable record is assigned to it. %s",
                split,
                EMPTY_SPLIT_EFFECT[split],
            )
    if len(splits["train"]) == 0:
        raise NoUsableDataError(f"no training beats in {data_dir}; check the split")
    logger.info("ingest summary\n%s", report.table())
    train_windows = splits["train"].windows
    preprocessing = Preprocessing(
        fs_hz=config.fs_hz,
        window_samples=config.window_samples,
        pre_r_samples=config.pre_r_samples,
        leads=list(config.leads),
        highpass_hz=config.highpass_hz,
        fs_hz_of_record=dict(fs_of_record),
        train_mean_mv=float(train_windows.mean(dtype=np.float64)),
        train_std_mv=float(train_windows.std(dtype=np.float64)),
    )
    return Dataset(
        splits=splits,
        report=report,
        fs_hz_of_record=fs_of_record,
        leads=leads,
        preprocessing=preprocessing,
    )


def _read_cached(
    data_dir: Path, record: str, config: DataConfig, cache: IngestCache | None
) -> RecordBeats | RecordError:
    """Read one record, through the cache when there is one; failures are returned."""
    path = data_dir / record
    key = cache_key(path, config) if cache else ""
    if cache:
        cached = cache.load(record, path, key)
        if cached is not None:
            return cached
    try:
        result: RecordBeats | RecordError = read_record(path, record, config)
    except RecordError as exc:
        result = exc
    if cache and not (isinstance(result, RecordError) and _is_transient(result)):
        cache.store(record, path, key, result)
    return result


def _is_transient(error: RecordError) -> bool:
    """Return whether a record failed through an error that may pass on the next run.

    Such failures are not cached, because they can pass without any change to the files'
    sizes and times that the cache key covers. They are the file system's (``OSError``, as for
    a file this user may not read) and a lack of memory (``MemoryError``). The chain of causes
    is followed as a traceback shows it, so a ``MemoryError`` that a wrapper caught counts too.
    """
    seen: set[int] = set()
    cause = _cause_of(error)
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (OSError, MemoryError)):
            return True
        seen.add(id(cause))
        cause = _cause_of(cause)
    return False


def _cause_of(error: BaseException) -> BaseException | None:
    """Return the exception that a traceback shows before ``error``, or None."""
    if error.__cause__ is not None:
        return error.__cause__
    return None if error.__suppress_context__ else error.__context__


def _unsplit_reason(record: str, records: list[str], data_dir: Path, config: DataConfig) -> str:
    if _split_method(records, data_dir, config) == "de-chazal":
        if Path(record).name in DE_CHAZAL_EXCLUDED:
            return "paced record, left out of the de Chazal DS1 and DS2 sets"
        return "not in the de Chazal DS1 or DS2 sets"
    return f"not listed in the split file {data_dir / SPLITS_FILE}"


def _concatenate(items: list[RecordBeats], config: DataConfig) -> BeatSet:
    if not items:
        return BeatSet(
            windows=np.zeros((0, config.n_leads, config.window_samples), dtype=np.float32),
            labels=np.zeros(0, dtype=np.int64),
            records=np.zeros(0, dtype=str),
        )
    return BeatSet(
        windows=np.concatenate([b.windows for b in items]),
        labels=np.concatenate([b.labels for b in items]),
        records=np.concatenate([np.full(len(b.labels), b.record) for b in items]),
    )
