"""Training loop: checkpoints, resume after SIGKILL, determinism, non-finite loss handling."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import torch

import appliance.train as train_module
from appliance.classes import AAMI_CLASSES
from appliance.config import ApplianceConfig, DataConfig, ModelConfig, TrainConfig
from appliance.dataset import BeatSet
from appliance.errors import (
    NonFiniteLossError,
    StoppedAtOnce,
    TrainingError,
)
from appliance.flow import ConditionalFlow
from appliance.train import (
    BEST_FILE,
    CHECKPOINT_FILE,
    SELECTION_MSE_CAP,
    Evaluation,
    TrainResult,
    evaluate,
    export_weights,
    load_checkpoint,
    stop_on_signals,
    train,
)

REPOSITORY = Path(__file__).resolve().parents[1]
# A few dozen steps of a small model: seconds per run on 2 cores.
TINY = ApplianceConfig(
    data=DataConfig(),
    model=ModelConfig(
        n_levels=2, steps_per_level=2, hidden_channels=16, kernel_size=3, bottleneck_dims=16
    ),
    train=TrainConfig(
        max_epochs=3,
        max_minutes=5.0,
        batch_size=32,
        checkpoint_every_steps=4,
        max_beats_per_class=150,
        threads=1,
        seed=3,
    ),
)

# Runs train() on beats saved by the test, as a separate process that the test can kill.
TRAIN_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from appliance.config import ApplianceConfig
from appliance.dataset import BeatSet
from appliance.train import train

folder = Path(sys.argv[1])
config = ApplianceConfig.from_dict(json.loads((folder / "config.json").read_text()))
sets = []
for name in ("train", "validation"):
    data = np.load(folder / f"{name}.npz")
    sets.append(BeatSet(data["windows"], data["labels"], data["records"]))
train(config, sets[0], sets[1], folder / "work", resume=True, progress=False)
"""


def _subset(beats: BeatSet, every: int) -> BeatSet:
    return BeatSet(beats.windows[::every], beats.labels[::every], beats.records[::every])


@pytest.fixture(scope="module")
def tiny_data(default_dataset) -> tuple[BeatSet, BeatSet]:  # noqa: ANN001
    return (
        _subset(default_dataset.splits["train"], 25),
        _subset(default_dataset.splits["validation"], 20),
    )


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> tuple[TrainResult, Path]:  # noqa: ANN001
    work_dir = tmp_path_factory.mktemp("tiny")
    result = train(TINY, *tiny_data, work_dir, resume=False, progress=False)
    return result, work_dir


def test_checkpoint_contains_run_state(tiny_run) -> None:
    result, work_dir = tiny_run
    state = torch.load(work_dir / CHECKPOINT_FILE, weights_only=False)
    assert ApplianceConfig.from_dict(state["config"]) == TINY
    assert state["step"] == result.summary["steps"]
    assert state["scale_mv"] == result.scale_mv
    assert state["optimizer"]["state"], "optimiser moments missing"
    assert state["optimizer"]["param_groups"][0]["lr"] == TINY.train.learning_rate
    assert math.isfinite(state["best_validation_loss"])
    assert state["best_validation_loss"] == result.summary["best_validation_loss"]
    assert state["classes_known"] == result.classes_known
    assert len(state["history"]) == TINY.train.max_epochs
    assert (work_dir / BEST_FILE).exists()


def test_training_caps_beats_per_class(tiny_run, tiny_data) -> None:
    result, _ = tiny_run
    counts = np.bincount(tiny_data[0].labels)
    expected = sum(min(int(c), TINY.train.max_beats_per_class) for c in counts if c >= 20)
    assert result.summary["train_beats"] == expected
    assert result.summary["train_beats"] < len(tiny_data[0])
    learnt = result.summary["learnt_class_counts"]
    assert sum(learnt.values()) == expected
    for name, count in result.summary["train_class_counts"].items():
        capped = min(count, TINY.train.max_beats_per_class) if count >= 20 else 0
        assert learnt[name] == capped, name


def test_training_lowers_validation_loss(tiny_run) -> None:
    result, _ = tiny_run
    history = result.summary["history"]
    assert history[-1]["validation_bpd"] < history[0]["validation_bpd"]


def test_same_seed_gives_identical_weights(tiny_run, tiny_data, tmp_path) -> None:
    first, _ = tiny_run
    second = train(TINY, *tiny_data, tmp_path, resume=False, progress=False)
    first_state = first.model.state_dict()
    second_state = second.model.state_dict()
    assert first_state.keys() == second_state.keys()
    for name, value in first_state.items():
        assert torch.equal(value, second_state[name]), name


def test_resume_after_sigkill_matches(tiny_run, tiny_data, tmp_path) -> None:
    uninterrupted, _ = tiny_run
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    for name, beats in zip(("train", "validation"), tiny_data, strict=True):
        np.savez(
            tmp_path / f"{name}.npz",
            windows=beats.windows,
            labels=beats.labels,
            records=beats.records,
        )
    checkpoint_path = tmp_path / "work" / CHECKPOINT_FILE
    process = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(tmp_path)],
        cwd=REPOSITORY,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not checkpoint_path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    killed_at = torch.load(checkpoint_path, weights_only=False)["step"]
    assert 0 < killed_at < uninterrupted.summary["steps"]
    assert not (tmp_path / "work" / BEST_FILE).exists()

    resumed = train(TINY, *tiny_data, tmp_path / "work", resume=True, progress=False)
    assert resumed.summary["steps"] == uninterrupted.summary["steps"]
    expected = uninterrupted.summary["validation_bpd"]
    assert resumed.summary["validation_bpd"] == pytest.approx(expected, rel=0.01)
    # The checkpoint restores the optimiser moments and the beat order too, so the resumed
    # run repeats the uninterrupted one. Without the moments it ends about 0.15 % off.
    assert resumed.summary["validation_bpd"] == pytest.approx(expected, rel=1e-6)
    assert resumed.summary["best_validation_loss"] == pytest.approx(
        uninterrupted.summary["best_validation_loss"], rel=0.01
    )
    assert resumed.scale_mv == uninterrupted.scale_mv


def test_resume_rejects_changed_settings(tiny_run, tiny_data, tmp_path) -> None:
    _, work_dir = tiny_run
    state = torch.load(work_dir / CHECKPOINT_FILE, weights_only=False)
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    changed = ApplianceConfig(
        data=TINY.data,
        model=TINY.model,
        train=TrainConfig(**{**TINY.train.__dict__, "learning_rate": 5e-4}),
    )
    with pytest.raises(TrainingError, match="train.learning_rate"):
        train(changed, *tiny_data, tmp_path, resume=True, progress=False)


def _first_weight(state: dict) -> str:  # type: ignore[type-arg]
    return next(name for name, value in state["model"].items() if value.is_floating_point())


def _drop_optimizer(state: dict) -> None:  # type: ignore[type-arg]
    del state["optimizer"]


def _drop_best(state: dict) -> None:  # type: ignore[type-arg]
    del state["best_model"]


def _negative_step(state: dict) -> None:  # type: ignore[type-arg]
    state["step"] = -5


def _text_records(state: dict) -> None:  # type: ignore[type-arg]
    state["train_records"] = "abc"


def _nan_weight(state: dict) -> None:  # type: ignore[type-arg]
    state["model"][_first_weight(state)][...] = float("nan")


def _wrong_best_shape(state: dict) -> None:  # type: ignore[type-arg]
    name = _first_weight(state)
    state["best_model"][name] = torch.zeros(3, *state["best_model"][name].shape)


def _wrong_shape(state: dict) -> None:  # type: ignore[type-arg]
    name = _first_weight(state)
    state["model"][name] = torch.zeros(3, *state["model"][name].shape)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (_drop_optimizer, "it has no optimizer"),
        (_drop_best, "it has no best_model"),
        (_negative_step, "it has step=-5"),
        (_text_records, "a train_records entry that is not beats per record"),
        (_nan_weight, "model weights with NaN or infinite values in "),
        (_wrong_shape, "its weights or optimiser state do not fit its own model settings"),
        (_wrong_best_shape, "its weights or optimiser state do not fit its own model settings"),
    ],
)
def test_resume_rejects_damaged_checkpoint(
    damage, named: str, tiny_run, tiny_data, tmp_path: Path
) -> None:  # noqa: ANN001
    _, work_dir = tiny_run
    state = torch.load(work_dir / CHECKPOINT_FILE, weights_only=False)
    damage(state)
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(TrainingError) as raised:
        train(TINY, *tiny_data, tmp_path, resume=True, progress=False)
    message = str(raised.value)
    assert f"cannot resume from {tmp_path / CHECKPOINT_FILE}" in message
    assert named in message
    assert "delete the checkpoint or pass another --work-dir" in message


def test_resume_names_truncated_checkpoint(tiny_run, tiny_data, tmp_path: Path) -> None:
    _, work_dir = tiny_run
    data = (work_dir / CHECKPOINT_FILE).read_bytes()
    (tmp_path / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainingError) as raised:
        train(TINY, *tiny_data, tmp_path, resume=True, progress=False)
    message = str(raised.value)
    assert message.startswith(f"cannot resume: {tmp_path / CHECKPOINT_FILE} is not a checkpoint")
    assert message.endswith("start afresh: delete the checkpoint or pass another --work-dir")
    assert "pass the best.pt" not in message


@pytest.mark.parametrize("name", [CHECKPOINT_FILE, BEST_FILE, "checkpoint.tmp"])
def test_folder_at_checkpoint_path_fails_first(name: str, tiny_data, tmp_path: Path) -> None:
    (tmp_path / name).mkdir()
    with pytest.raises(TrainingError) as raised:
        train(TINY, *tiny_data, tmp_path, resume=False, progress=False)
    assert f"{tmp_path / name} is a folder, so the checkpoint cannot be written" in str(
        raised.value
    )
    # Nothing was trained: the check runs before the first step.
    assert not (tmp_path / CHECKPOINT_FILE).is_file()


def test_failed_checkpoint_write_is_named(tmp_path: Path) -> None:
    path = tmp_path / "missing" / CHECKPOINT_FILE
    with pytest.raises(TrainingError) as raised:
        train_module._save(path, {"step": 1})
    assert f"checkpoint {path} cannot be written (" in str(raised.value)
    assert "--resume" in str(raised.value)
    assert not path.with_suffix(".tmp").exists()


def test_export_weights_are_the_best_of_either_file(tiny_run) -> None:
    _, work_dir = tiny_run
    best = load_checkpoint(work_dir / BEST_FILE)
    last = load_checkpoint(work_dir / CHECKPOINT_FILE)
    # Later steps than the best validation leave other weights in checkpoint.pt.
    last["model"] = {name: value + 1 for name, value in last["model"].items()}
    from_last = export_weights(last, work_dir / CHECKPOINT_FILE)
    from_best = export_weights(best, work_dir / BEST_FILE)
    assert from_last.keys() == best["model"].keys()
    for name, value in best["model"].items():
        assert torch.equal(from_last[name], value), name
        assert torch.equal(from_best[name], value), name


def test_export_weights_refuse_unvalidated_step(tiny_run, tmp_path: Path) -> None:
    _, work_dir = tiny_run
    state = load_checkpoint(work_dir / CHECKPOINT_FILE)
    state["best_model"], state["history"], state["step"] = None, [], 1
    with pytest.raises(TrainingError) as raised:
        export_weights(state, tmp_path / CHECKPOINT_FILE)
    assert "contains the weights of step 1, which were never validated" in str(raised.value)
    assert "--resume" in str(raised.value)


def test_export_weights_refuse_non_finite(tiny_run, tmp_path: Path) -> None:
    _, work_dir = tiny_run
    state = load_checkpoint(work_dir / BEST_FILE)
    _nan_weight(state)
    state["best_model"] = None
    with pytest.raises(TrainingError, match="weights with NaN or infinite values in "):
        export_weights(state, tmp_path / BEST_FILE)


def test_training_flushes_denormal_numbers(monkeypatch, tiny_data, tmp_path) -> None:
    smallest_normal = torch.finfo(torch.float32).tiny
    products: list[float] = []

    def record_mode(*args: object) -> NoReturn:
        # A denormal product is flushed to zero only while the mode is on.
        products.append((torch.tensor([smallest_normal]) * 0.25).item())
        raise TrainingError("stopped by the test")

    monkeypatch.setattr(train_module, "_train", record_mode)
    with pytest.raises(TrainingError, match="stopped by the test"):
        train(TINY, *tiny_data, tmp_path, resume=False, progress=False)
    assert products == [0.0]
    # The mode is restored for the calling thread afterwards.
    assert (torch.tensor([smallest_normal]) * 0.25).item() > 0.0


def test_resume_rejects_other_activation(tiny_run, tiny_data, tmp_path) -> None:
    _, work_dir = tiny_run
    state = torch.load(work_dir / CHECKPOINT_FILE, weights_only=False)
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    other = "gelu" if TINY.model.activation == "relu" else "relu"
    changed = replace(TINY, model=replace(TINY.model, activation=other))
    with pytest.raises(TrainingError, match=f"activation='{other}'"):
        train(changed, *tiny_data, tmp_path, resume=True, progress=False)


def test_resume_rejects_other_training_records(tiny_run, tiny_data, tmp_path) -> None:
    _, work_dir = tiny_run
    state = torch.load(work_dir / CHECKPOINT_FILE, weights_only=False)
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    train_beats, validation_beats = tiny_data
    first_record = sorted(set(train_beats.records.tolist()))[0]
    keep = train_beats.records != first_record
    fewer = BeatSet(train_beats.windows[keep], train_beats.labels[keep], train_beats.records[keep])
    with pytest.raises(TrainingError, match=f"training records missing: {first_record}"):
        train(TINY, fewer, validation_beats, tmp_path, resume=True, progress=False)


def test_resume_ignores_cache_folder(tiny_run, tiny_data, tmp_path, caplog) -> None:
    # The ingest cache does not change the beats, so moving it must not block a resume.
    _, work_dir = tiny_run
    state = torch.load(work_dir / CHECKPOINT_FILE, weights_only=False)
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    moved = ApplianceConfig(
        data=DataConfig(**{**TINY.data.__dict__, "cache_dir": str(tmp_path / "cache")}),
        model=TINY.model,
        train=TINY.train,
    )
    caplog.set_level(logging.INFO, logger="appliance.train")
    resumed = train(moved, *tiny_data, tmp_path, resume=True, progress=False)
    assert any("resume checkpoint=" in record.message for record in caplog.records)
    # The run had reached its epochs, so resuming logs that and trains no step.
    complete = [r.getMessage() for r in caplog.records if "finds the run complete" in r.message]
    assert complete == [
        f"resume finds the run complete step={state['step']} max_epochs="
        f"{TINY.train.max_epochs}; nothing is trained and the best weights are exported as "
        "they are. To train on, raise --epochs"
    ]
    assert resumed.summary["steps"] == state["step"]
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, state["best_model"][name]), name


def _fail_at(monkeypatch: pytest.MonkeyPatch, failing_call: int, mode: str) -> None:
    """Make the training loss (mode "loss") or its gradient (mode "gradient") non-finite."""
    real = train_module.compute_loss
    calls = {"training": 0}

    def compute_loss(model, x, condition, weight):  # noqa: ANN001, ANN202
        loss, nll_bpd, reconstruction = real(model, x, condition, weight)
        if model.training:
            if calls["training"] == failing_call:
                if mode == "loss":
                    loss = loss * math.nan
                else:
                    # sqrt at 0: the value stays 0 but its derivative is infinite, so the
                    # gradient becomes NaN while the loss stays finite.
                    loss = loss + torch.sqrt(0.0 * next(model.parameters()).sum())
            calls["training"] += 1
        return loss, nll_bpd, reconstruction

    monkeypatch.setattr(train_module, "compute_loss", compute_loss)


@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_non_finite_stops_and_keeps_checkpoint(mode, monkeypatch, tiny_data, tmp_path) -> None:
    failing_step = 10
    _fail_at(monkeypatch, failing_step, mode)
    with pytest.raises(NonFiniteLossError, match=f"step {failing_step}") as caught:
        train(TINY, *tiny_data, tmp_path, resume=False, progress=False)
    assert caught.value.step == failing_step
    assert caught.value.records
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    every = TINY.train.checkpoint_every_steps
    assert state["step"] == failing_step // every * every
    for name, value in state["model"].items():
        assert torch.all(torch.isfinite(value.float())), name
    model = train_module.ConditionalFlow(TINY.model, 1, TINY.data.window_samples, 5)
    model.load_state_dict(state["model"])


def test_evaluate_caps_diverging_projections(tiny_data) -> None:  # noqa: ANN001
    _, validation = tiny_data
    model = ConditionalFlow(TINY.model, 1, 256, len(AAMI_CLASSES))
    model.eval()
    scale_mv = float(np.std(validation.windows))
    plain = evaluate(model, validation, scale_mv)
    # One beat blown up 1000 times: its projection through the bottleneck misses by far.
    windows = validation.windows.copy()
    windows[0] *= 1000.0
    outlier = evaluate(model, BeatSet(windows, validation.labels, validation.records), scale_mv)
    beats = len(validation)
    assert outlier.reconstruction_mse > 100 * plain.reconstruction_mse
    assert outlier.capped_mse <= plain.capped_mse + SELECTION_MSE_CAP / beats + 1e-9
    assert outlier.capped_mse >= plain.capped_mse
    assert plain.capped_mse <= plain.reconstruction_mse


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"non-standard JSON constant {name}")


def test_non_finite_mse_is_written_as_null(monkeypatch, tiny_data, tmp_path) -> None:  # noqa: ANN001
    from appliance.export import _manifest
    from appliance.store import MANIFEST_FILE, new_version_dir, publish_version

    real_evaluate = train_module.evaluate

    def overflowing(*args, **kwargs) -> Evaluation:  # noqa: ANN002, ANN003
        # What evaluate returns when one projection overflows float32: the plain mean is
        # infinite and the capped mean, which checkpoint selection uses, stays finite.
        figures = real_evaluate(*args, **kwargs)
        return Evaluation(figures.nll_bpd, math.inf, figures.capped_mse)

    monkeypatch.setattr(train_module, "evaluate", overflowing)
    one_epoch = ApplianceConfig(
        data=TINY.data,
        model=TINY.model,
        train=TrainConfig(**{**TINY.train.__dict__, "max_epochs": 1}),
    )
    result = train(one_epoch, *tiny_data, tmp_path / "work", resume=False, progress=False)
    assert result.summary["validation_reconstruction_mse"] is None
    assert result.summary["history"][0]["validation_reconstruction_mse"] is None
    assert result.summary["history"][0]["epoch"] == 1
    assert math.isfinite(result.summary["validation_bpd"])

    summary = json.loads(json.dumps(result.summary), parse_constant=_reject_constant)
    assert summary["validation_reconstruction_mse"] is None

    # The manifest writer of the store, on the manifest that export builds from the summary.
    store = tmp_path / "store"
    partial = new_version_dir(store)
    for name in ("forward.onnx", "inverse.onnx"):
        (partial / name).write_bytes(name.encode())
    manifest = _manifest(one_epoch, result, {"leads": ["MLII"]})
    manifest["files"] = {
        "forward_graph": {"name": "forward.onnx"},
        "inverse_graph": {"name": "inverse.onnx"},
    }
    version = publish_version(store, partial, manifest)
    text = (version.path / MANIFEST_FILE).read_text()
    written = json.loads(text, parse_constant=_reject_constant)
    assert written["training"]["validation_reconstruction_mse"] is None
    assert "Infinity" not in text


def test_empty_validation_names_the_fix(tiny_data, tmp_path: Path) -> None:  # noqa: ANN001
    fit, validation = tiny_data
    empty = BeatSet(validation.windows[:0], validation.labels[:0], validation.records[:0])
    with pytest.raises(TrainingError, match="no validation beats") as caught:
        train(TINY, fit, empty, tmp_path / "work", resume=False, progress=False)
    assert "at least 3 records" in str(caught.value)
    assert "SPLITS file" in str(caught.value)
    assert not (tmp_path / "work" / CHECKPOINT_FILE).exists()


class _WritesFile:
    """A pickle payload that creates a file when unpickled with full pickle semantics."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.target), "ran"))  # type: ignore[return-value]


def test_load_checkpoint_runs_no_code(tmp_path: Path):
    marker = tmp_path / "marker.txt"
    hostile = tmp_path / "hostile.pt"
    torch.save({"config": _WritesFile(marker)}, hostile)
    with pytest.raises(TrainingError, match="is not a checkpoint written by `train`"):
        load_checkpoint(hostile)
    assert not marker.exists()


def test_load_checkpoint_names_missing_entries(tmp_path: Path):
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}, "step": 3}, partial)
    with pytest.raises(TrainingError, match="lacks config, scale_mv, classes_known"):
        load_checkpoint(partial)


def test_load_checkpoint_folder_is_named(tmp_path: Path):
    folder = tmp_path / "checkpoint.pt"
    folder.mkdir()
    with pytest.raises(TrainingError, match="cannot be read") as raised:
        load_checkpoint(folder)
    assert str(folder) in str(raised.value)


def test_time_budget_ends_epoch_early(tiny_run, tiny_data, tmp_path: Path) -> None:  # noqa: ANN001
    full, _ = tiny_run
    work_dir = tmp_path / "work"
    # A budget shorter than one step stops training after its first step, mid-epoch.
    short = replace(TINY, train=replace(TINY.train, max_minutes=1e-9))
    result = train(short, *tiny_data, work_dir, resume=False, progress=False)
    assert result.summary["stopped_by"] == "time budget"
    assert result.summary["steps"] == 1
    assert result.summary["steps"] < full.summary["steps"] // full.summary["epochs"]
    assert result.summary["epochs"] == 1
    assert result.summary["steps_per_epoch"] == full.summary["steps"] // full.summary["epochs"]
    assert len(result.summary["history"]) == 1
    assert math.isfinite(result.summary["best_validation_loss"])
    state = load_checkpoint(work_dir / CHECKPOINT_FILE)
    assert state["step"] == 1
    assert (work_dir / BEST_FILE).exists()
    # A second short run resumes inside the same epoch, which the summary counts once.
    again = train(short, *tiny_data, work_dir, resume=True, progress=False)
    assert again.summary["steps"] == 2
    assert len(again.summary["history"]) == 2
    assert again.summary["epochs"] == 1
    # Resumed with the longer budget, training finishes the epochs the short run left.
    resumed = train(TINY, *tiny_data, work_dir, resume=True, progress=False)
    assert resumed.summary["stopped_by"] == "epochs"
    assert resumed.summary["steps"] == full.summary["steps"]


def test_progress_logged_without_terminal(
    tiny_data, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytest captures stderr, so stderr is not a terminal and training logs instead of a bar.
    monkeypatch.setattr(train_module, "PROGRESS_LOG_S", 0.0)
    caplog.set_level(logging.INFO, logger="appliance.train")
    result = train(TINY, *tiny_data, tmp_path / "work", resume=False, progress=True)
    lines = [r.getMessage() for r in caplog.records if "training progress" in r.getMessage()]
    assert len(lines) == result.summary["steps"]
    total = TINY.train.max_epochs * (result.summary["steps"] // result.summary["epochs"])
    assert f"step=1/{total} " in lines[0]
    assert lines[-1].startswith(f"training progress epoch={TINY.train.max_epochs}/")


def test_progress_off_logs_no_progress(
    tiny_data, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_module, "PROGRESS_LOG_S", 0.0)
    caplog.set_level(logging.INFO, logger="appliance.train")
    train(TINY, *tiny_data, tmp_path / "work", resume=False, progress=False)
    assert not [r for r in caplog.records if "training progress" in r.getMessage()]


def test_resume_without_checkpoint_logs_fresh_start(
    tiny_data, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.train")
    train(TINY, *tiny_data, tmp_path / "work", resume=True, progress=False)
    fresh = [r for r in caplog.records if "no checkpoint to resume" in r.getMessage()]
    assert len(fresh) == 1
    assert fresh[0].levelno == logging.WARNING
    assert str(tmp_path / "work" / CHECKPOINT_FILE) in fresh[0].getMessage()
    assert "--work-dir" in fresh[0].getMessage()


def test_sigterm_during_export_publishes_nothing(tmp_path: Path) -> None:
    work_dir = tmp_path / "work"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "appliance", "train", "--store", str(tmp_path / "store"),
            "--work-dir", str(work_dir), "--max-beats-per-class", "100", "--epochs", "1",
            "--max-minutes", "10", "--threads", "1", "--no-progress",
        ],
        cwd=REPOSITORY,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "export started" in line:
            process.send_signal(signal.SIGTERM)
            break
    lines.append(process.communicate(timeout=300)[1])
    stderr = "".join(lines)

    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "an export after its current stage" in stderr
    assert "error: export stopped by Terminated before " in stderr
    assert f"export --checkpoint {work_dir / BEST_FILE}" in stderr
    assert "published model" not in stderr
    assert not (tmp_path / "store" / "CURRENT").exists()
    assert not list((tmp_path / "store" / "versions").glob("*"))
    assert (work_dir / BEST_FILE).exists()


def test_second_signal_stops_at_once() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        # The first signal only requests a stop, so the run goes on to the end of its step.
        time.sleep(0.1)
        with pytest.raises(StoppedAtOnce) as raised:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5.0)
            except Exception:  # noqa: BLE001 - as ingest's handler of a damaged record does
                pytest.fail("the second signal was caught as an ordinary exception")
    assert raised.value.signum == signal.SIGTERM
    assert "stopped at once by a second Terminated;" in str(raised.value)
    assert "current version is unchanged" in str(raised.value)
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_stops_training_with_checkpoint(tmp_path: Path) -> None:
    work_dir = tmp_path / "work"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "appliance", "train", "--store", str(tmp_path / "store"),
            "--work-dir", str(work_dir), "--max-beats-per-class", "100", "--epochs", "1000",
            "--max-minutes", "10", "--threads", "1", "--no-progress",
        ],
        cwd=REPOSITORY,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    checkpoint_path = work_dir / CHECKPOINT_FILE
    deadline = time.monotonic() + 300
    while not checkpoint_path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr_bytes = process.communicate(timeout=120)
    stderr = stderr_bytes.decode()

    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "training stops after the current step" in stderr
    stopped_at = torch.load(checkpoint_path, weights_only=False)["step"]
    assert f"training stopped by Terminated at step {stopped_at};" in stderr
    assert "--resume" in stderr
    assert not (tmp_path / "store" / "CURRENT").exists()
