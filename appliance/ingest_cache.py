"""Cache of preprocessed beat windows, one file per record.

A cache entry is keyed by a SHA-256 hash of the record's files (path, size and modification time
in nanoseconds of the header, signal, segment and annotation files), of the settings that change
the windows, and of ``CACHE_FORMAT``. Editing, replacing or touching any of those files, or
changing a setting, gives a new key, so the stale entry is never read. It is deleted when the
new entry is written. Records that failed are cached too, with their reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import DataConfig
from appliance.ecg import RecordBeats
from appliance.errors import RecordError
from appliance.ingest_checks import header_lines

logger = logging.getLogger(__name__)

# Raise when the content or meaning of a cache entry changes, so old entries are not read.
CACHE_FORMAT = 1
# DataConfig fields that do not change a record's windows and so stay out of the key.
SETTINGS_OUTSIDE_KEY = frozenset(
    {"split", "split_seed", "validation_fraction", "test_fraction", "cache_dir"}
)
# Hex digits of the key in an entry's file name (128 bits).
KEY_CHARS = 32
_ARRAYS = ("windows", "labels", "r_samples")


def record_files(path: Path, config: DataConfig) -> list[Path]:
    """List the files a record is read from: headers, signal files and the annotation file."""
    header = path.with_name(f"{path.name}.hea")
    files = [header, path.with_name(f"{path.name}.{config.annotation_extension}")]
    if not header.exists():
        return files
    lines = header_lines(header)
    if lines and "/" in lines[0].split()[0]:
        for line in lines[1:]:
            segment = line.split()[0]
            if segment != "~":
                files.extend(record_files(path.with_name(segment), config)[:1])
                files.extend(_signal_files(path.with_name(f"{segment}.hea")))
    else:
        files.extend(_signal_files(header))
    return files


def _signal_files(header: Path) -> list[Path]:
    if not header.exists():
        return []
    names = {line.split()[0] for line in header_lines(header)[1:] if line.split()[0] != "~"}
    return [header.with_name(name) for name in sorted(names)]


def cache_key(path: Path, config: DataConfig) -> str:
    """Return the hex SHA-256 key of a record's files and the window settings."""
    settings = {
        name: value
        for name, value in sorted(vars(config).items())
        if name not in SETTINGS_OUTSIDE_KEY
    }
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, settings], default=str).encode())
    for file in record_files(path, config):
        try:
            stat = file.stat()
        except FileNotFoundError:
            digest.update(f"{file.name}:absent".encode())
            continue
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class IngestCache:
    """Preprocessed records stored as ``.npz`` files in one folder.

    Arguments:
        folder: Cache folder; created on first write.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def _entry(self, record: str, key: str) -> Path:
        return self.folder / f"{_safe_name(record)}-{key[:KEY_CHARS]}.npz"

    def load(self, record: str, key: str) -> RecordBeats | RecordError | None:
        """Return the cached beats or cached failure of a record, or None on a miss."""
        entry = self._entry(record, key)
        try:
            with np.load(entry, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                arrays = {name: stored[name] for name in _ARRAYS if name in stored}
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("cache_entry=%s action=ignore reason=%s", entry, exc)
            self.misses += 1
            return None
        self.hits += 1
        if "error" in meta:
            return RecordError(record, meta["error"])
        return RecordBeats(record=record, **arrays, **meta)

    def store(self, record: str, key: str, result: RecordBeats | RecordError) -> None:
        """Write a record's beats or failure, replacing older entries of the same record."""
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {}
        if isinstance(result, RecordError):
            meta: dict[str, Any] = {"error": result.reason}
        else:
            arrays = {name: getattr(result, name) for name in _ARRAYS}
            meta = {
                name: getattr(result, name)
                for name in (
                    "fs_hz",
                    "leads",
                    "beat_source",
                    "skipped",
                    "lead_fs_hz",
                    "beats_found",
                    "invalid_samples",
                    "warnings",
                )
            }
        entry = self._entry(record, key)
        for old in self.folder.glob(f"{_safe_name(record)}-*.npz"):
            if old != entry and old.stem[: -len("-") - KEY_CHARS] == _safe_name(record):
                old.unlink(missing_ok=True)
        # Write to a temporary name and rename, so a reader never sees half a file.
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(handle, "wb") as file:
            np.savez(file, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(temporary, entry)


def _safe_name(record: str) -> str:
    return record.replace("/", "__")
