"""Served versions whose files or values do not fit together are refused when serving starts.

Each case damages a copy of the fixture store. Where the edit falls under the model id or a
file hash, the copy's hashes and id are computed again, as any writer of the format could
do, so that the checks behind those sums are the ones under test.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.errors import ModelStoreError
from appliance.server import load_served_engine
from appliance.store import (
    CURRENT_FILE,
    MAX_POINTER_BYTES,
    VERSIONS_DIR,
    current_version_id,
    load_current,
    model_id_of,
    sha256_of,
)

pytestmark = pytest.mark.slow


def _copy(model_store: Path, tmp_path: Path) -> tuple[Path, Path]:
    store = tmp_path / "store"
    shutil.copytree(model_store, store, symlinks=True)
    return store, store / VERSIONS_DIR / current_version_id(store)


def _edit_manifest(
    version: Path, edit: Callable[[dict[str, Any]], None], rehash: bool = True
) -> None:
    """Edit the manifest; with ``rehash``, compute its file hashes and model id again."""
    path = version / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if rehash:
        for entry in manifest["files"].values():
            entry["sha256"] = sha256_of(version / entry["name"])
        manifest["model_id"] = model_id_of(manifest)
    path.write_text(json.dumps(manifest))


def _load_error(store: Path) -> str:
    with pytest.raises(ModelStoreError) as raised:
        load_served_engine(store)
    return str(raised.value)


def test_fixture_store_passes_every_check(model_store: Path) -> None:
    engine = load_served_engine(model_store)
    assert engine.manifest["model_id"] == load_current(model_store).manifest["model_id"]


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda m: m.pop("training"), "training=None (a table)"),
        (lambda m: m.update(trained_at=12345), "trained_at=12345 (a non-empty string)"),
        (lambda m: m.pop("version"), "version=None (a non-empty string)"),
        (
            lambda m: m["training"]["train_class_counts"].update(N=float("nan")),
            "training.train_class_counts=",
        ),
        (lambda m: m["quality"].update(x=10**400), "quality="),
    ],
)
def test_values_outside_model_id_are_checked(
    edit: Callable[[dict[str, Any]], None], named: str, model_store: Path, tmp_path: Path
) -> None:
    # These sections are not part of the model id, so the edit passes the id check.
    store, version = _copy(model_store, tmp_path)
    _edit_manifest(version, edit, rehash=False)
    message = _load_error(store)
    assert f"manifest {version / 'manifest.json'} has values that the appliance never writes" in (
        message
    )
    assert named in message
    assert "publish the model again" in message


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda m: m["privacy"].update(threshold=-1.0), "privacy.threshold=-1.0"),
        (lambda m: m["data"].update(fs_hz=0.0), "data.fs_hz=0.0"),
        (lambda m: m["data"].update(window_samples=10**12), "data.window_samples=1000000000000"),
        (lambda m: m.update(classes_known=["Z"]), "classes_known=['Z']"),
        (lambda m: m["gate"].update(default_margin=float("nan")), "gate.default_margin=nan"),
        (lambda m: m["gate"].update(min_margin=0.5), "between gate.min_margin and"),
    ],
)
def test_values_under_model_id_are_checked(
    edit: Callable[[dict[str, Any]], None], named: str, model_store: Path, tmp_path: Path
) -> None:
    store, version = _copy(model_store, tmp_path)
    _edit_manifest(version, edit)
    assert named in _load_error(store)


def test_swapped_graphs_are_named(model_store: Path, tmp_path: Path) -> None:
    store, version = _copy(model_store, tmp_path)
    manifest = json.loads((version / "manifest.json").read_text())
    forward = version / manifest["files"]["forward_graph"]["name"]
    inverse = version / manifest["files"]["inverse_graph"]["name"]
    forward_bytes = forward.read_bytes()
    forward.write_bytes(inverse.read_bytes())
    inverse.write_bytes(forward_bytes)
    _edit_manifest(version, lambda m: None)
    message = _load_error(store)
    assert f"model store file {forward} (forward_graph) takes inputs z " in message
    assert "the graphs are swapped or come from another model" in message


def _rewrite_npz(version: Path, key: str, change: Callable[[dict[str, np.ndarray]], None]) -> Path:
    manifest = json.loads((version / "manifest.json").read_text())
    path = version / manifest["files"][key]["name"]
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    change(arrays)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    _edit_manifest(version, lambda m: None)
    return path


def _first_float_nan(arrays: dict[str, np.ndarray]) -> None:
    name = next(n for n, a in arrays.items() if a.dtype.kind == "f" and a.size)
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] = np.nan


@pytest.mark.parametrize("key", ["calibration", "latent_prior", "lead_check"])
def test_non_finite_arrays_are_named(key: str, model_store: Path, tmp_path: Path) -> None:
    store, version = _copy(model_store, tmp_path)
    if key not in json.loads((version / "manifest.json").read_text())["files"]:
        pytest.skip(f"the fixture model has no {key} file")
    path = _rewrite_npz(version, key, _first_float_nan)
    message = _load_error(store)
    assert f"model store file {path} ({key}) cannot be used" in message
    assert "contains NaN or infinite values" in message


def test_truncated_evidence_is_named(model_store: Path, tmp_path: Path) -> None:
    store, version = _copy(model_store, tmp_path)
    path = _rewrite_npz(
        version,
        "calibration",
        lambda a: a.update(evidence=a["evidence"][: a["evidence"].size // 2]),
    )
    message = _load_error(store)
    assert f"model store file {path} (calibration) cannot be used" in message
    assert "calibration beats" in message


def test_pickled_calibration_gets_no_unsafe_advice(model_store: Path, tmp_path: Path) -> None:
    store, version = _copy(model_store, tmp_path)
    path = _rewrite_npz(
        version, "calibration", lambda a: a.update(evidence=np.array([{"a": 1}], dtype=object))
    )
    message = _load_error(store)
    assert f"model store file {path} (calibration) cannot be used" in message
    assert "contains Python objects" in message
    assert "allow_pickle" not in message


def test_privacy_index_of_other_width_is_named(model_store: Path, tmp_path: Path) -> None:
    store, version = _copy(model_store, tmp_path)
    manifest = json.loads((version / "manifest.json").read_text())
    path = version / manifest["files"]["privacy_index"]["name"]
    np.save(path, np.ones((5, 10), dtype=np.float32))
    _edit_manifest(version, lambda m: None)
    message = _load_error(store)
    assert f"model store file {path} (privacy_index) cannot be used" in message
    assert "shape (5, 10), expected (training beats, " in message


def test_lead_check_of_other_shape_fails_self_check(model_store: Path, tmp_path: Path) -> None:
    store, version = _copy(model_store, tmp_path)
    if "lead_check" not in json.loads((version / "manifest.json").read_text())["files"]:
        pytest.skip("the fixture model has no lead check")
    _rewrite_npz(
        version, "lead_check", lambda a: a.update(hidden_weight=a["hidden_weight"][:, :3])
    )
    message = _load_error(store)
    assert "self-check failed: scoring or generating beats raised" in message
    assert "The version's files do not fit together" in message


def test_current_link_is_refused(model_store: Path, tmp_path: Path) -> None:
    store, _ = _copy(model_store, tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text(current_version_id(store) + "\n")
    (store / CURRENT_FILE).unlink()
    (store / CURRENT_FILE).symlink_to(target)
    assert "is not a regular file (a link or a device)" in _load_error(store)


def test_oversized_current_is_not_echoed(model_store: Path, tmp_path: Path) -> None:
    store, _ = _copy(model_store, tmp_path)
    (store / CURRENT_FILE).write_text("secret-line\n" * 100)
    message = _load_error(store)
    assert f"contains more than {MAX_POINTER_BYTES} bytes" in message
    assert "secret-line" not in message


def test_current_naming_unfinished_export(model_store: Path, tmp_path: Path) -> None:
    store, _ = _copy(model_store, tmp_path)
    (store / VERSIONS_DIR / ".partial-x").mkdir()
    (store / CURRENT_FILE).write_text(".partial-x\n")
    assert "the folder of an export that never finished" in _load_error(store)


def test_linked_version_folder_is_refused(model_store: Path, tmp_path: Path) -> None:
    store, version = _copy(model_store, tmp_path)
    moved = tmp_path / "moved-version"
    version.rename(moved)
    version.symlink_to(moved, target_is_directory=True)
    assert f"{version} is a symbolic link" in _load_error(store)
