"""The model store's partial version folders: an export killed mid-way leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
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
    ModelVersion,
    current_version_id,
    load_current,
    model_id_of,
    new_version_dir,
    publish_version,
    require_served_files,
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


def _republish(store: Path, change: dict[str, Any] | None = None) -> ModelVersion:
    """Publish the current version's files again, as an export of the same weights would."""
    current = load_current(store)
    partial = new_version_dir(store)
    manifest = {
        key: value
        for key, value in current.manifest.items()
        if key not in ("format", "model_id", "version")
    }
    manifest.update(change or {})
    manifest["files"] = {}
    for key, entry in current.manifest["files"].items():
        shutil.copy(current.path / entry["name"], partial / entry["name"])
        manifest["files"][key] = {"name": entry["name"]}
    return publish_version(store, partial, manifest)


def test_same_model_again_keeps_current_version(model_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    kept_version = current_version_id(store)
    model_id = load_current(store).manifest["model_id"]
    # A resumed run whose best weights did not change: same files and settings, later date.
    again = _republish(store, {"trained_at": "2027-01-01T00:00:00+00:00"})
    assert not again.newly_published
    assert again.manifest["model_id"] == model_id
    assert current_version_id(store) == kept_version
    assert [p.name for p in (store / VERSIONS_DIR).iterdir()] == [kept_version]


def test_same_model_replaces_unservable_current(model_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    broken = current_version_id(store)
    manifest_path = store / VERSIONS_DIR / broken / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # Outside the model id, so the id check passes while serving refuses the version.
    manifest["trained_at"] = 12345
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ModelStoreError, match="trained_at=12345"):
        require_served_files(load_current(store))
    again = _republish(store, {"trained_at": "2027-01-01T00:00:00+00:00"})
    assert again.newly_published
    assert current_version_id(store) != broken
    require_served_files(load_current(store))


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


def _manifest_path(store: Path) -> Path:
    return store / VERSIONS_DIR / current_version_id(store) / "manifest.json"


def _edit_manifest(store: Path, edit) -> None:  # noqa: ANN001
    path = _manifest_path(store)
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_edited_manifest_is_refused(tmp_path: Path) -> None:
    _publish(tmp_path, b"calibration", "2026-01-01T00:00:00+00:00", 0.05)
    # The training date is not part of the model id, so editing it is allowed.
    _edit_manifest(tmp_path, lambda m: m.update(trained_at="2026-02-01T00:00:00+00:00"))
    load_current(tmp_path)
    _edit_manifest(tmp_path, lambda m: m["gate"].update(default_margin=-5.0))
    with pytest.raises(ModelStoreError, match="was edited after the model was published"):
        load_current(tmp_path)


@pytest.mark.parametrize("name", ["../outside.bin", "..", "sub/calibration.bin", ""])
def test_file_outside_version_is_refused(tmp_path: Path, name: str) -> None:
    _publish(tmp_path, b"calibration", "2026-01-01T00:00:00+00:00", 0.05)
    (tmp_path / VERSIONS_DIR / "outside.bin").write_bytes(b"calibration")
    _edit_manifest(tmp_path, lambda m: m["files"]["calibration"].update(name=name))
    with pytest.raises(ModelStoreError, match="not a file name inside the version folder"):
        load_current(tmp_path)


def test_linked_or_odd_file_is_refused(tmp_path: Path) -> None:
    _publish(tmp_path, b"calibration", "2026-01-01T00:00:00+00:00", 0.05)
    folder = _manifest_path(tmp_path).parent
    # Same bytes behind a link: the hash would match, the link is refused.
    elsewhere = tmp_path / "elsewhere.bin"
    elsewhere.write_bytes(b"calibration")
    (folder / "calibration.bin").unlink()
    (folder / "calibration.bin").symlink_to(elsewhere)
    with pytest.raises(ModelStoreError, match=r"\(calibration\) is a symbolic link"):
        load_current(tmp_path)
    (folder / "calibration.bin").unlink()
    (folder / "calibration.bin").mkdir()
    with pytest.raises(ModelStoreError, match=r"\(calibration\) is not a regular file"):
        load_current(tmp_path)


def test_manifest_without_files_is_named(tmp_path: Path) -> None:
    _publish(tmp_path, b"calibration", "2026-01-01T00:00:00+00:00", 0.05)
    _edit_manifest(tmp_path, lambda m: m.pop("files"))
    with pytest.raises(ModelStoreError, match="has no 'files' table"):
        load_current(tmp_path)


def test_binary_current_is_named(tmp_path: Path) -> None:
    _publish(tmp_path, b"calibration", "2026-01-01T00:00:00+00:00", 0.05)
    (tmp_path / CURRENT_FILE).write_bytes(b"\xff\xfe\x00version")
    with pytest.raises(ModelStoreError, match="is not a version name in UTF-8 text"):
        load_current(tmp_path)


def test_served_files_are_required(tmp_path: Path, model_store: Path) -> None:
    require_served_files(load_current(model_store))
    _publish(tmp_path, b"calibration", "2026-01-01T00:00:00+00:00", 0.05)
    with pytest.raises(ModelStoreError, match="lists no inverse_graph, privacy_index file"):
        require_served_files(load_current(tmp_path))
