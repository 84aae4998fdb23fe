"""The main job's stages working together: store, ONNX graphs, a live server and its client."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance.client import ApplianceClient
from appliance.corrupt import corrupt
from appliance.dataset import Dataset
from appliance.engine import Engine
from appliance.pipeline import PIPELINE_CORRUPTIONS, _table, _training_line, auroc
from appliance.privacy import privacy_space
from appliance.store import load_current

# Corrupted kinds the main job validates, and the AUROC each must reach against real beats.
MIN_AUROC = 0.9
TEST_BEATS = 200


@pytest.fixture(scope="module")
def engine(model_store: Path) -> Engine:
    return Engine(load_current(model_store))


@pytest.fixture(scope="module")
def record_beats(default_dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    test = default_dataset.splits["test"]
    pick = np.random.default_rng(1).choice(len(test), size=TEST_BEATS, replace=False)
    return test.windows[pick], test.labels[pick]


def test_store_manifest_lists_contract(model_store: Path) -> None:
    manifest = load_current(model_store).manifest
    assert manifest["data"]["fs_hz"] == 360.0
    assert manifest["data"]["window_samples"] == 256
    assert manifest["data"]["leads"] == ["MLII"]
    assert manifest["data"]["scale_mv"] > 0
    assert set(manifest["files"]) == {
        "forward_graph",
        "inverse_graph",
        "calibration",
        "privacy_index",
        "latent_prior",
        "lead_check",
    }
    for entry in manifest["files"].values():
        assert len(entry["sha256"]) == 64
    assert manifest["training"]["steps"] > 0
    assert set(manifest["classes_known"]) >= {"N", "S", "V", "F"}
    # trained_at is when training ended, not when the graphs were exported.
    assert manifest["trained_at"] == manifest["training"]["finished_at"]
    assert manifest["trained_at"] <= manifest["exported_at"]


def test_store_rejects_modified_graph(model_store: Path, tmp_path: Path) -> None:
    import shutil

    from appliance.errors import ModelStoreError

    copy = tmp_path / "store"
    shutil.copytree(model_store, copy)
    version = load_current(copy)
    graph = version.file("inverse_graph")
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(ModelStoreError, match="SHA-256"):
        load_current(copy)


def test_onnx_roundtrip_on_real_test_beats(engine: Engine, record_beats) -> None:
    beats, labels = record_beats
    x = (beats / engine.scale_mv).astype(np.float32)
    known = np.isin(labels, engine.classes_known)
    z, _ = engine.forward(x[known], labels[known])
    x_back = engine.inverse(z, labels[known])
    flat, back = x[known].reshape(known.sum(), -1), x_back.reshape(known.sum(), -1)
    relative = np.linalg.norm(back - flat, axis=1) / np.linalg.norm(flat, axis=1)
    assert relative.max() < 1e-4


@pytest.mark.parametrize("kind", PIPELINE_CORRUPTIONS)
def test_score_ranks_real_above_corrupted(engine: Engine, record_beats, kind: str) -> None:
    beats, _ = record_beats
    rng = np.random.default_rng(2)
    real = engine.score((beats / engine.scale_mv).astype(np.float32)).scores
    bad = engine.score(
        (corrupt(beats, kind, engine.fs_hz, rng) / engine.scale_mv).astype(np.float32)
    ).scores
    assert auroc(real, bad) >= MIN_AUROC


def test_serving_imports_no_torch() -> None:
    code = (
        "import sys, appliance.server, appliance.engine, appliance.service; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_generate_over_socket_returns_new_beats(
    server_address: str, engine: Engine, split_train
) -> None:
    with ApplianceClient(server_address) as client:
        assert client.health() == "SERVING"
        generated = client.generate(count=40, seed=7)
    assert generated.beats.shape[0] > 0
    assert generated.beats.shape[1:] == (1, engine.window_samples)
    assert np.isfinite(generated.beats).all()
    assert set(generated.classes) <= {"N", "S", "V", "F"}
    assert generated.stats.accepted == generated.beats.shape[0]
    fit_beats = split_train[0].windows
    generated_vectors = privacy_space(generated.beats)
    train_vectors = privacy_space(fit_beats)
    for vector in generated_vectors:
        assert not np.any(np.all(train_vectors == vector, axis=1))
    distances = engine.privacy_distance(generated.beats / engine.scale_mv)
    assert (distances >= generated.stats.privacy_threshold).all()


def test_validate_over_socket_scores_mixed_batch(server_address: str, record_beats) -> None:
    beats, _ = record_beats
    rng = np.random.default_rng(3)
    noise = corrupt(beats[:20], "gaussian_noise", 360.0, rng)
    with ApplianceClient(server_address) as client:
        reply = client.validate(np.concatenate([beats[:50], noise]).astype(np.float32))
    assert reply.scores.shape == (70,)
    assert ((reply.scores >= 0) & (reply.scores <= 1)).all()
    assert reply.scores[:50].mean() > reply.scores[50:].mean()
    assert not reply.accepted[50:].any()
    assert set(reply.classes) <= {"N", "S", "V", "F"}


def test_model_info_carries_contract_only(server_address: str, model_store: Path) -> None:
    with ApplianceClient(server_address) as client:
        info = client.model_info()
    manifest = load_current(model_store).manifest
    assert info.model_id == manifest["model_id"]
    assert info.window_samples == 256
    assert info.forward_graph_sha256 == manifest["files"]["forward_graph"]["sha256"]
    text = str(info)
    assert str(model_store) not in text
    assert json.dumps(manifest["files"]["privacy_index"]["name"]) not in text


def test_summary_table_accounts_for_every_draw() -> None:
    figures = {
        "model_id": "0123456789abcdef",
        "generated": 1000,
        "requested": 1000,
        "draws": 1296,
        "accept_rate": 1000 / 1296,
        "pertinence_rejections": 188,
        "privacy_rejections": 17,
        "invalid_rejections": 15,
        "surplus_dropped": 76,
        "real_source": "test records 213, patients the model never saw",
        "synthetic_per_class": {"N": 1000},
        "margin": 0.05,
        "privacy_threshold": 0.06,
        "score_quantiles": {"synthetic": {"q50": 0.5}},
        "auroc_real_vs_corrupted": {},
        "synthetic_nearest_train_distance": {},
        "files": [],
        "training": _training(steps=156, stopped_by="epochs"),
    }
    lines = _table(figures).splitlines()
    assert lines[0].startswith("training: 156 steps of 78 per epoch (2.0 epochs)")
    counted = lines[1].split("draws", 1)[1]
    parts = [int(n) for n in re.findall(r"(?<![.\d])\d+(?![.\d])", counted)]
    assert sum(parts) + figures["generated"] == figures["draws"], lines[1]
    assert any("test records 213" in line for line in lines)


def _training(steps: int, stopped_by: str) -> dict[str, object]:
    return {
        "steps": steps,
        "steps_per_epoch": 78,
        "duration_s": 301.4,
        "stopped_by": stopped_by,
        "validation_bpd": -2.1,
    }


@pytest.mark.parametrize(
    ("steps", "stopped_by", "undertrained"),
    [(42, "time budget", True), (78, "time budget", False), (42, "epochs", False)],
)
def test_training_line_flags_short_budget(steps: int, stopped_by: str, undertrained: bool) -> None:
    line = _training_line(_training(steps, stopped_by))
    assert line.startswith(f"training: {steps} steps of 78 per epoch")
    assert f"stopped by {stopped_by}" in line
    assert ("undertrained" in line) is undertrained


@pytest.mark.parametrize(
    ("steps", "epochs_text"),
    [
        (82, "(1.1 epochs, ending within epoch 2)"),
        (156, "(2.0 epochs)"),
        (42, "(0.5 epochs, ending within epoch 1)"),
    ],
)
def test_training_line_names_partial_epoch(steps: int, epochs_text: str) -> None:
    # The training log and summary.json count the epoch reached, 2 for 82 steps of 78.
    line = _training_line(_training(steps, "time budget"))
    assert f"78 per epoch {epochs_text} in 301 s" in line
