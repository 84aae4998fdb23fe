"""Cache of preprocessed beat windows, one file per record.

A cache entry is keyed by a SHA-256 hash of the record's files (resolved absolute path, size and
modification time in nanoseconds of the header, signal, segment and annotation files), of the
settings that change the windows, and of ``CACHE_FORMAT``. Editing, replacing or touching any of
those files, or changing a setting, gives a new key, so the stale entry is never read. It is
deleted when the new entry is written. Records that failed are cached too, with their reason.

An entry's file name is ``<record>-<location>-<key>.npz``, where the location is a hash of the
record's resolved path. Records of the same name in two data folders therefore have entries of
their own, and ingesting one folder does not delete the other folder's entries.

An entry that cannot be read or decoded (a truncated or empty file, metadata with missing or
unknown fields, arrays of inconsistent shapes, or non-finite windows) is logged at WARNING and
treated as a miss, so the record is read from its WFDB files again and the entry is rewritten.
So is an entry that does not fit the settings: windows of another length than
``window_samples`` or with another number of leads than ``n_leads``, or labels that are not
AAMI class indices.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from appliance.classes import AAMI_CLASSES
from appliance.config import DataConfig
from appliance.ecg import RecordBeats
from appliance.errors import RecordError
from appliance.ingest_checks import header_lines

logger = logging.getLogger(__name__)

# Raise when the content or meaning of a cache entry changes, so old entries are not read.
CACHE_FORMAT = 5
# DataConfig fields that do not change a record's windows and so stay out of the key.
SETTINGS_OUTSIDE_KEY = frozenset(
    {"split", "split_seed", "validation_fraction", "test_fraction", "cache_dir"}
)
# Hex digits of the key in an entry's file name (128 bits).
KEY_CHARS = 32
# Hex digits of the record location hash in an entry's file name (64 bits).
LOCATION_CHARS = 16
_ARRAYS = ("windows", "labels", "r_samples")
# RecordBeats fields stored in an entry's JSON metadata, with the JSON types they must have.
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "fs_hz": (int, float),
    "leads": list,
    "beat_source": str,
    "skipped": dict,
    "lead_fs_hz": list,
    "beats_found": int,
    "invalid_samples": int,
    "warnings": list,
}
# Errors that reading a damaged .npz file raises: a truncated file gives BadZipFile, an empty
# one EOFError, a missing array KeyError and unparsable metadata ValueError.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


class DamagedEntryError(ValueError):
    """A cache entry whose content cannot be turned back into a record's result."""


def record_files(path: Path, config: DataConfig) -> list[Path]:
    """List the files a record is read from: headers, signal files and the annotation file.

    File and segment names are joined to the header's folder as written, so that a name with a
    folder part (``sig/105.dat``) gives a key instead of an error. read_record then reports it.
    """
    header = path.with_name(f"{path.name}.hea")
    files = [header, path.parent / f"{path.name}.{config.annotation_extension}"]
    # A header that is not a readable file leaves the key to the file names, so that
    # read_record reports the record's problem.
    lines = _readable_header_lines(header)
    if lines and "/" in lines[0].split()[0]:
        for line in lines[1:]:
            segment = line.split()[0]
            if segment != "~":
                # Only the segment's own header and signal files: a segment that names the
                # master header would otherwise recurse without end.
                segment_header = path.parent / f"{segment}.hea"
                files.append(segment_header)
                files.extend(_signal_files(segment_header))
    else:
        files.extend(_signal_files(header))
    return files


def _readable_header_lines(header: Path) -> list[str]:
    """Return the header's lines, or none when it is missing, not a file or unreadable."""
    try:
        return header_lines(header) if header.is_file() else []
    except OSError:  # is_file raises too when a folder on the way may not be entered
        return []


def _signal_files(header: Path) -> list[Path]:
    lines = _readable_header_lines(header)
    names = {line.split()[0] for line in lines[1:] if line.split()[0] != "~"}
    return [header.parent / name for name in sorted(names)]


def cache_key(path: Path, config: DataConfig) -> str:
    """Return the hex SHA-256 key of a record's files and the window settings."""
    settings = {
        name: value
        for name, value in sorted(vars(config).items())
        if name not in SETTINGS_OUTSIDE_KEY
    }
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, settings], default=str).encode())
    for file in record_files(path, config):
        # The path distinguishes copies of a record in two folders whose files have equal
        # names, sizes and times, as cp -p, rsync -t and tar x leave them.
        location = str(_resolved(file))
        try:
            stat = file.stat()
        except FileNotFoundError:
            digest.update(json.dumps([location, "absent"]).encode() + b"\n")
            continue
        except ValueError:
            # The header names a file with a NUL character. The header's size and time are
            # already in the key, and read_record reports the record.
            digest.update(json.dumps([location, "invalid name"]).encode() + b"\n")
            continue
        except OSError:
            # A file this user may not reach: a key of the failure is not kept (see store), and
            # the record is read, and reported, without the cache.
            digest.update(json.dumps([location, "unreadable", uuid.uuid4().hex]).encode() + b"\n")
            continue
        digest.update(json.dumps([location, stat.st_size, stat.st_mtime_ns]).encode() + b"\n")
    return digest.hexdigest()


def _resolved(path: Path) -> Path:
    """Return the absolute path with symbolic links resolved where the file system allows it.

    A symbolic link loop or a name with a NUL character gives the absolute path unresolved.
    """
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):  # Python 3.11 raises RuntimeError on a loop
        return path.absolute()


def _location(path: Path) -> str:
    """Return the hex hash of a record's resolved path that names its cache entries."""
    return hashlib.sha256(str(_resolved(path)).encode()).hexdigest()[:LOCATION_CHARS]


class IngestCache:
    """Preprocessed records stored as ``.npz`` files in one folder.

    Arguments:
        folder: Cache folder; created on first write.
        config: Data settings that each loaded entry must fit.
    """

    def __init__(self, folder: Path, config: DataConfig) -> None:
        self.folder = Path(folder)
        self.config = config
        self.hits = 0
        self.misses = 0
        self.write_failed = False

    def _entry(self, record: str, path: Path, key: str) -> Path:
        return self.folder / f"{_safe_name(record)}-{_location(path)}-{key[:KEY_CHARS]}.npz"

    def load(self, record: str, path: Path, key: str) -> RecordBeats | RecordError | None:
        """Return the cached beats or cached failure of a record, or None on a miss.

        A damaged entry counts as a miss and is logged once at WARNING with its path and the
        reason. The next ``store`` of the record replaces it.

        Arguments:
            record: Record name relative to the data folder.
            path: Record path without extension.
            key: The record's ``cache_key``.
        """
        entry = self._entry(record, path, key)
        try:
            # The file is opened here because np.load leaves a path it opened unclosed when the
            # zip directory is damaged (numpy 2.4).
            with entry.open("rb") as file, np.load(file, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                arrays = {name: stored[name] for name in _ARRAYS if name in stored}
            result = _decode(record, meta, arrays, self.config)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (*_READ_ERRORS, DamagedEntryError) as exc:
            logger.warning(
                "damaged ingest cache entry ignored cache_entry=%s record=%s reason=%r",
                entry,
                record,
                str(exc) or type(exc).__name__,
            )
            self.misses += 1
            return None
        self.hits += 1
        return result

    def store(self, record: str, path: Path, key: str, result: RecordBeats | RecordError) -> None:
        """Write a record's beats or failure, replacing older entries of the same record path.

        Entries of a record of the same name in another folder are kept.

        A write that fails (a folder this user may not write, a full disk) is logged once at
        WARNING; the cache then takes no more entries in this run, and ingest goes on.
        """
        if self.write_failed:
            return
        try:
            self._write(record, path, key, result)
        except OSError as exc:
            self.write_failed = True
            logger.warning(
                "ingest cache write failed cache_dir=%s record=%s reason=%r action=stop_writing;"
                " the run writes no more cache entries and still reads existing ones. Give user "
                "id %d write access to the folder, or free space on its disk",
                self.folder,
                record,
                exc.strerror or str(exc),
                os.getuid(),
            )

    def _write(self, record: str, path: Path, key: str, result: RecordBeats | RecordError) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {}
        if isinstance(result, RecordError):
            meta: dict[str, Any] = {"error": result.reason}
        else:
            arrays = {name: getattr(result, name) for name in _ARRAYS}
            meta = {name: getattr(result, name) for name in _META_TYPES}
        entry = self._entry(record, path, key)
        for old in self.folder.glob(f"{glob.escape(_safe_name(record))}-*.npz"):
            if old != entry and _is_stale_entry(old.stem, record, path):
                old.unlink(missing_ok=True)
        # Write to a temporary name and rename, so a reader never sees half a file.
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, meta=np.array(json.dumps(meta)), **arrays)
            os.replace(temporary, entry)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _decode(
    record: str, meta: object, arrays: dict[str, np.ndarray], config: DataConfig
) -> RecordBeats | RecordError:
    """Rebuild a record's result from an entry's metadata and arrays.

    Raises:
        DamagedEntryError: If a field is missing, unknown or of the wrong type, the arrays
            disagree in shape, a window contains NaN or infinity, or the entry does not fit
            ``config`` (see ``_check_settings``).
    """
    if not isinstance(meta, dict):
        raise DamagedEntryError(f"metadata is a JSON {type(meta).__name__}, not an object")
    if "error" in meta:
        if set(meta) != {"error"} or not isinstance(meta["error"], str) or arrays:
            raise DamagedEntryError("failure entry has fields or arrays besides its reason")
        return RecordError(record, meta["error"])
    missing = sorted(set(_META_TYPES) - set(meta))
    unknown = sorted(set(meta) - set(_META_TYPES))
    if missing or unknown:
        raise DamagedEntryError(f"metadata fields missing={missing} unknown={unknown}")
    for name, expected in _META_TYPES.items():
        # bool is a subclass of int in Python but never a valid count or rate here.
        if isinstance(meta[name], bool) or not isinstance(meta[name], expected):
            raise DamagedEntryError(f"metadata field {name} is a JSON {type(meta[name]).__name__}")
    absent = [name for name in _ARRAYS if name not in arrays]
    if absent:
        raise DamagedEntryError(f"arrays missing: {', '.join(absent)}")
    windows, labels, r_samples = (arrays[name] for name in _ARRAYS)
    if windows.ndim != 3 or labels.shape != (len(windows),) or r_samples.shape != labels.shape:
        raise DamagedEntryError(
            f"array shapes disagree: windows {windows.shape}, labels {labels.shape}, "
            f"r_samples {r_samples.shape}"
        )
    if not np.issubdtype(windows.dtype, np.floating):
        raise DamagedEntryError(f"windows have dtype {windows.dtype}, not floating point")
    if not np.isfinite(windows).all():
        bad = int(np.count_nonzero(~np.isfinite(windows).all(axis=(1, 2))))
        raise DamagedEntryError(f"{bad} of {len(windows)} windows contain NaN or infinity")
    _check_settings(windows, labels, r_samples, meta, config)
    return RecordBeats(record=record, windows=windows, labels=labels, r_samples=r_samples, **meta)


def _check_settings(
    windows: np.ndarray,
    labels: np.ndarray,
    r_samples: np.ndarray,
    meta: dict[str, Any],
    config: DataConfig,
) -> None:
    """Raise unless an entry's arrays fit the window length, lead count and AAMI classes.

    The key covers the settings, so only an entry written by other code or edited by hand
    fails here. Ingest would otherwise concatenate its windows with other records' windows of
    another shape, or train on labels that name no class.

    Raises:
        DamagedEntryError: Naming the value found and the value the settings expect.
    """
    expected = (config.n_leads, config.window_samples)
    if windows.shape[1:] != expected:
        raise DamagedEntryError(
            f"windows have shape {windows.shape}, but the settings give (beats, n_leads, "
            f"window_samples) = (beats, {expected[0]}, {expected[1]})"
        )
    if len(meta["leads"]) != config.n_leads:
        raise DamagedEntryError(f"metadata names {len(meta['leads'])} leads, not {config.n_leads}")
    for name, values in (("labels", labels), ("r_samples", r_samples)):
        if not np.issubdtype(values.dtype, np.integer):
            raise DamagedEntryError(f"{name} have dtype {values.dtype}, not integer")
    outside = (labels < 0) | (labels >= len(AAMI_CLASSES))
    if outside.any():
        raise DamagedEntryError(
            f"{int(np.count_nonzero(outside))} labels lie outside the AAMI class indices "
            f"0 to {len(AAMI_CLASSES) - 1}, such as {int(labels[outside][0])}"
        )


def _safe_name(record: str) -> str:
    return record.replace("/", "__")


def _is_stale_entry(stem: str, record: str, path: Path) -> bool:
    """Return whether an entry file name belongs to this record path under any key.

    Names of ``CACHE_FORMAT`` 4 and older (``<record>-<key>``) match too, because their keys
    can no longer be produced and the files would stay forever.
    """
    name = re.escape(_safe_name(record))
    key = f"[0-9a-f]{{{KEY_CHARS}}}"
    return bool(
        re.fullmatch(f"{name}-{_location(path)}-{key}", stem)
        or re.fullmatch(f"{name}-{key}", stem)
    )
