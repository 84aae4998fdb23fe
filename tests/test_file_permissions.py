"""Record files, folders and cache folders that the ingesting user may not read or write.

Root reads every file whatever its mode, so under root each ingest runs in a forked child that
has switched to the unprivileged user id 65534 first. Everything the child needs is imported
before the fork, because the virtual environment may lie where that user cannot read.
"""

from __future__ import annotations

import encodings.ascii  # noqa: F401 - the forked child cannot import codecs on its own
import encodings.cp437  # noqa: F401 - zip file names in the .npz cache entries
import encodings.latin_1  # noqa: F401
import encodings.utf_8  # noqa: F401
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_bad_records import write_record

from appliance.config import DataConfig
from appliance.dataset import ingest
from appliance.errors import ApplianceError

UNPRIVILEGED_ID = 65534
NOT_READABLE = "is not readable by this process"


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """Yield a folder that the unprivileged user can enter (pytest's own folders are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="appliance-permissions-"))
    folder.chmod(0o755)
    for parent in folder.parents:
        if not parent.stat().st_mode & 0o001:
            shutil.rmtree(folder)
            pytest.skip(f"{parent} cannot be entered by other users, so the test cannot run")
    yield folder
    shutil.rmtree(folder)


def _ingest_as_other_user(data_dir: Path, config: DataConfig) -> dict[str, Any]:
    """Ingest ``data_dir`` as an unprivileged user; return the skips, error and warnings.

    Under root the ingest runs in a forked child with user id 65534; under any other user it
    runs in this process, whose user the file modes already restrict.
    """
    if os.geteuid() != 0:
        return _ingest_here(data_dir, config)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            text = pipe.read()
        os.waitpid(pid, 0)
        assert text, "the forked ingest wrote no result"
        return dict(json.loads(text))
    os.close(read_end)
    try:
        os.setgid(UNPRIVILEGED_ID)
        os.setuid(UNPRIVILEGED_ID)
        result = _ingest_here(data_dir, config)
    except BaseException as exc:  # the child's traceback would be lost with os._exit
        result = {"error": f"the forked child failed: {type(exc).__name__}: {exc}"}
    with os.fdopen(write_end, "w") as pipe:
        pipe.write(json.dumps(result))
    os._exit(0)


def _ingest_here(data_dir: Path, config: DataConfig) -> dict[str, Any]:
    result: dict[str, Any] = {"error": None, "skipped": {}, "read": [], "warnings": []}
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: result["warnings"].append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("appliance").addHandler(handler)
    try:
        dataset = ingest(data_dir, config)
        result["skipped"] = dataset.report.records_skipped
        result["read"] = dataset.report.records_read
    except ApplianceError as exc:
        result["error"] = str(exc)
    except Exception as exc:
        result["error"] = f"unexpected {type(exc).__name__}: {exc}"
    finally:
        logging.getLogger("appliance").removeHandler(handler)
    return result


def _three_records(folder: Path) -> Path:
    data = folder / "data"
    data.mkdir()
    for name in ("a", "b", "c"):
        write_record(data, name)
    for path in [data, *data.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return data


def test_unreadable_signal_and_annotations_skipped(shared_tmp: Path):
    data = _three_records(shared_tmp)
    (data / "b.dat").chmod(0o000)
    (data / "c.atr").chmod(0o000)
    result = _ingest_as_other_user(data, DataConfig(split="random"))
    assert result["error"] is None
    assert result["read"] == ["a"]
    assert f"{data / 'b.dat'} {NOT_READABLE}" in result["skipped"]["b"]
    assert f"{data / 'c.atr'} {NOT_READABLE}" in result["skipped"]["c"]
    assert "give that user read access" in result["skipped"]["b"]
    # The header advice of a damaged file would send the user to the wrong fix.
    assert "matches its signal lines" not in result["skipped"]["b"]
    assert "corrupt" not in result["skipped"]["c"]


def test_unreadable_record_is_read_once_permitted(shared_tmp: Path):
    data = _three_records(shared_tmp)
    cache = shared_tmp / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    config = DataConfig(split="random", cache_dir=str(cache))
    (data / "b.dat").chmod(0o000)
    first = _ingest_as_other_user(data, config)
    assert NOT_READABLE in first["skipped"]["b"]
    # chmod leaves the size and time that the cache key covers unchanged, so a kept failure
    # would skip the record again.
    (data / "b.dat").chmod(0o644)
    second = _ingest_as_other_user(data, config)
    assert second["error"] is None, second
    assert second["skipped"] == {}
    assert sorted(second["read"]) == ["a", "b", "c"]


def test_unreadable_data_folder_named(shared_tmp: Path):
    data = _three_records(shared_tmp)
    data.chmod(0o700 if os.geteuid() == 0 else 0o000)
    try:
        result = _ingest_as_other_user(data, DataConfig(split="random"))
    finally:
        data.chmod(0o755)
    assert result["error"] is not None
    assert f"data folder {data} cannot be listed" in result["error"]
    assert "give that user read and search access" in result["error"]


def test_unwritable_cache_folder_warns_and_reads(shared_tmp: Path):
    data = _three_records(shared_tmp)
    cache = shared_tmp / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    result = _ingest_as_other_user(data, DataConfig(split="random", cache_dir=str(cache)))
    assert result["error"] is None
    assert sorted(result["read"]) == ["a", "b", "c"]
    failures = [line for line in result["warnings"] if "ingest cache write failed" in line]
    assert len(failures) == 1
    assert f"cache_dir={cache}" in failures[0]
    assert "action=stop_writing" in failures[0]
    assert list(cache.iterdir()) == []


def test_folder_without_read_permission_named(shared_tmp: Path):
    # Search permission without read permission: files can be opened, the folder not listed.
    data = _three_records(shared_tmp)
    data.chmod(0o711)
    try:
        result = _ingest_as_other_user(data, DataConfig(split="random"))
    finally:
        data.chmod(0o755)
    assert result["error"] is not None
    assert f"data folder {data} cannot be listed" in result["error"]


def test_unreadable_subfolder_is_named(shared_tmp: Path):
    data = _three_records(shared_tmp)
    hidden = data / "hidden"
    hidden.mkdir()
    write_record(hidden, "d")
    hidden.chmod(0o700 if os.geteuid() == 0 else 0o000)
    try:
        result = _ingest_as_other_user(data, DataConfig(split="random"))
    finally:
        hidden.chmod(0o755)
    assert result["error"] is None
    assert sorted(result["read"]) == ["a", "b", "c"]
    skips = [line for line in result["warnings"] if f"folder={hidden} action=skip" in line]
    assert len(skips) == 1
    assert "its records are not read" in skips[0]


def test_unenterable_record_folder_with_cache_is_skipped(shared_tmp: Path):
    # RECORDS names a record in a folder this user may not enter.
    data = _three_records(shared_tmp)
    hidden = data / "p1"
    hidden.mkdir()
    write_record(hidden, "x")
    (data / "RECORDS").write_text("a\nb\nc\np1/x\n")
    (data / "RECORDS").chmod(0o644)
    hidden.chmod(0o700 if os.geteuid() == 0 else 0o000)
    cache = shared_tmp / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    try:
        result = _ingest_as_other_user(data, DataConfig(split="random", cache_dir=str(cache)))
    finally:
        hidden.chmod(0o755)
    assert result["error"] is None
    assert sorted(result["read"]) == ["a", "b", "c"]
    assert NOT_READABLE in result["skipped"]["p1/x"]
