"""The model store's partial version folders: an export killed mid-way leaves nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ModelStoreError
from appliance.store import (
    CURRENT_FILE,
    OWNER_FILE,
    PARTIAL_PREFIX,
    UNOWNED_PARTIAL_AGE_S,
    VERSIONS_DIR,
    current_version_id,
    load_current,
    model_id_of,
    new_version_dir,
    publish_version,
)


def _ended_pid() -> int:
    """Return the id of a process that has already exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _partial(store: Path, name: str, owner: str | None) -> Path:
    folder = store / VERSIONS_DIR / f"{PARTIAL_PREFIX}{name}"
    folder.mkdir(parents=True)
    (folder / "privacy_index.npy").write_bytes(b"training beats")
    if owner is not None:
        (folder / OWNER_FILE).write_text(owner)
    return folder


def test_new_version_removes_killed_exports(tmp_path: Path) -> None:
    host = socket.gethostname()
    killed = _partial(tmp_path, "killed", f"{host} {_ended_pid()}\n")
    running = _partial(tmp_path, "running", f"{host} {os.getpid()}\n")
    elsewhere = _partial(tmp_path, "elsewhere", f"other-host-{host} {_ended_pid()}\n")
    old_elsewhere = _partial(tmp_path, "old-elsewhere", f"other-host-{host} {_ended_pid()}\n")
    fresh_unowned = _partial(tmp_path, "fresh", None)
    old_unowned = _partial(tmp_path, "old", None)
    old_time = time.time() - UNOWNED_PARTIAL_AGE_S - 60
    os.utime(old_unowned, (old_time, old_time))
    os.utime(old_elsewhere, (old_time, old_time))

    created = new_version_dir(tmp_path)

    assert not killed.exists()
    assert not old_unowned.exists()
    assert not old_elsewhere.exists()
    assert running.exists()
    assert elsewhere.exists()
    assert fresh_unowned.exists()
    assert (created / OWNER_FILE).read_text().split() == [host, str(os.getpid())]


def test_published_version_has_no_owner_file(model_store: Path) -> None:
    versions = [p for p in (model_store / VERSIONS_DIR).iterdir() if p.is_dir()]
    assert versions
    for version in versions:
        assert not (version / OWNER_FILE).exists(), version
        assert not version.name.startswith(PARTIAL_PREFIX), version


@pytest.mark.parametrize("owner", ["", "one-field", "host not-a-pid"])
def test_unreadable_owner_keeps_partial(tmp_path: Path, owner: str) -> None:
    damaged = _partial(tmp_path, "damaged", owner)
    new_version_dir(tmp_path)
    assert damaged.exists()


def _publish(store: Path, calibration: bytes, trained_at: str, margin: float) -> str:
    partial = new_version_dir(store)
    manifest: dict[str, Any] = {
        "trained_at": trained_at,
        "data": {"fs_hz": 360.0},
        "gate": {"default_margin": margin},
        "files": {},
    }
    for key, content in (("forward_graph", b"graph"), ("calibration", calibration)):
        (partial / f"{key}.bin").write_bytes(content)
        manifest["files"][key] = {"name": f"{key}.bin"}
    return str(publish_version(store, partial, manifest).manifest["model_id"])


def test_model_id_covers_calibration_and_gate(tmp_path: Path) -> None:
    first = _publish(tmp_path / "a", b"calibration", "2026-01-01T00:00:00+00:00", 0.05)
    same = _publish(tmp_path / "b", b"calibration", "2026-06-01T00:00:00+00:00", 0.05)
    other_calibration = _publish(tmp_path / "c", b"other", "2026-01-01T00:00:00+00:00", 0.05)
    other_margin = _publish(tmp_path / "d", b"calibration", "2026-01-01T00:00:00+00:00", 0.1)
    assert len(first) == 16
    assert same == first
    assert other_calibration != first
    assert other_margin != first
    assert model_id_of(load_current(tmp_path / "a").manifest) == first


def test_missing_store_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="does not exist; check --store"):
        load_current(tmp_path / "mistyped")
    (tmp_path / "file").write_text("not a store")
    with pytest.raises(ModelStoreError, match="is not a folder; check --store"):
        load_current(tmp_path / "file")


@pytest.mark.parametrize("named", ["nonsense-version", "", "..", "../elsewhere"])
def test_current_naming_absent_version_lists_present(tmp_path: Path, named: str) -> None:
    _publish(tmp_path, b"calibration", "2026-01-01T00:00:00+00:00", 0.05)
    present = current_version_id(tmp_path)
    (tmp_path / CURRENT_FILE).write_text(named + "\n")
    with pytest.raises(ModelStoreError) as raised:
        load_current(tmp_path)
    message = str(raised.value)
    assert f"names version {named!r}" in message
    assert f"versions present: {present}" in message
