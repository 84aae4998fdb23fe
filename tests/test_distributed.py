"""Data-parallel training: two gloo ranks on real MIT-BIH beats against one process.

The ranks are separate processes with the environment ``torchrun`` would set (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``) and meet through a file store, so no TCP store listens; gloo's
own connections use the loopback interface.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from appliance.config import ApplianceConfig, DataConfig, ModelConfig, TrainConfig
from appliance.dataset import BeatSet
from appliance.distributed import select_device
from appliance.errors import TrainingError
from appliance.train import BEST_FILE, CHECKPOINT_FILE, train

REPOSITORY = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
# Float32 tolerance between DDP's averaged gradient (two means of 16 beats) and the gradient
# of the mean of the same 32 beats in one process.
GRADIENT_RTOL = 1e-4
GRADIENT_ATOL = 1e-6
WEIGHT_ATOL = 1e-5
# Adam moves each weight by up to lr * (1 - beta1) / sqrt(1 - beta2) per step (3.16 lr with
# torch's default betas) whatever the gradient's size, so a weight whose gradient is rounding
# noise (about 1e-9) can move the other way in one run, and the runs drift apart step by step.
ADAM_MAX_STEP_OVER_LR = 0.1 / (1.0 - 0.999) ** 0.5

SMALL = ApplianceConfig(
    data=DataConfig(),
    model=ModelConfig(
        n_levels=2, steps_per_level=1, hidden_channels=8, kernel_size=3, bottleneck_dims=16
    ),
    train=TrainConfig(
        max_epochs=2,
        batch_size=32,
        checkpoint_every_steps=1000,
        max_beats_per_class=60,
        threads=1,
        seed=5,
        device="cpu",
    ),
)

# One rank: joins the group, records the flat weights after every optimiser step and the
# largest difference to the other rank, records which rank wrote files, then trains.
RANK_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
import torch
import torch.distributed as dist
import appliance.train as train_module
from appliance.config import ApplianceConfig
from appliance.dataset import BeatSet
from appliance.distributed import init_from_env

folder, work_dir, max_epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
values = json.loads((folder / "config.json").read_text())
values["train"]["max_epochs"] = max_epochs
config = ApplianceConfig.from_dict(values)
context = init_from_env("cpu", init_method="file://" + str(folder / "rendezvous"))
snapshots, gaps, saves, gradients = [], [], [], []

def before_step(optimizer, args, kwargs):
    gradients.append(
        torch.cat([p.grad.reshape(-1) for g in optimizer.param_groups for p in g["params"]])
    )

def after_step(optimizer, args, kwargs):
    flat = torch.cat([p.detach().reshape(-1) for g in optimizer.param_groups for p in g["params"]])
    gathered = [torch.empty_like(flat) for _ in range(context.world_size)]
    dist.all_gather(gathered, flat)
    gaps.append(max(float((other - flat).abs().max()) for other in gathered))
    snapshots.append(flat.clone())

from torch.optim.optimizer import (
    register_optimizer_step_post_hook, register_optimizer_step_pre_hook
)
register_optimizer_step_pre_hook(before_step)
register_optimizer_step_post_hook(after_step)
real_save = train_module._save
def recording_save(path, state):
    saves.append(path.name)
    real_save(path, state)
train_module._save = recording_save

sets = []
for name in ("train", "validation"):
    data = np.load(folder / f"{name}.npz")
    sets.append(BeatSet(data["windows"], data["labels"], data["records"]))
result = train_module.train(config, sets[0], sets[1], work_dir, resume=True, progress=False)
torch.save(
    {
        "snapshots": torch.stack(snapshots) if snapshots else torch.zeros(0),
        "gradients": torch.stack(gradients) if gradients else torch.zeros(0),
        "gaps": gaps,
        "saves": saves,
        "steps": result.summary["steps"],
        "validation_bpd": result.summary["validation_bpd"],
        "world_size": result.summary["world_size"],
        "final": result.model.state_dict(),
    },
    folder / f"rank{context.rank}-epochs{max_epochs}.pt",
)
dist.destroy_process_group()
"""


def _subset(beats: BeatSet, every: int) -> BeatSet:
    return BeatSet(beats.windows[::every], beats.labels[::every], beats.records[::every])


@pytest.fixture(scope="module")
def small_data(default_dataset) -> tuple[BeatSet, BeatSet]:  # noqa: ANN001
    return (
        _subset(default_dataset.splits["train"], 25),
        _subset(default_dataset.splits["validation"], 40),
    )


def _launch(folder: Path, work_dir: Path, max_epochs: int) -> list[dict[str, Any]]:
    """Run the two ranks to completion and return what each recorded."""
    rendezvous = folder / "rendezvous"
    rendezvous.unlink(missing_ok=True)
    processes = []
    for rank in range(WORLD_SIZE):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT, str(folder), str(work_dir), str(max_epochs)],
                cwd=REPOSITORY,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    for rank, process in enumerate(processes):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"rank {rank}: {stderr.decode()[-3000:]}"
    return [
        torch.load(folder / f"rank{rank}-epochs{max_epochs}.pt", weights_only=False)
        for rank in range(WORLD_SIZE)
    ]


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory) -> dict[str, Any]:  # noqa: ANN001
    """A two-rank job stopped after epoch 1 and resumed to epoch 2, and one process."""
    folder = tmp_path_factory.mktemp("ddp")
    (folder / "config.json").write_text(json.dumps(SMALL.to_dict()))
    for name, beats in zip(("train", "validation"), small_data, strict=True):
        np.savez(
            folder / f"{name}.npz",
            windows=beats.windows,
            labels=beats.labels,
            records=beats.records,
        )
    work_dir = folder / "work"
    first = _launch(folder, work_dir, 1)
    first_files = sorted(p.name for p in work_dir.iterdir())
    resumed = _launch(folder, work_dir, 2)

    snapshots: list[torch.Tensor] = []
    gradients: list[torch.Tensor] = []

    def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:  # noqa: ANN401
        gradients.append(
            torch.cat([p.grad.reshape(-1) for g in optimizer.param_groups for p in g["params"]])
        )

    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:  # noqa: ANN401
        snapshots.append(
            torch.cat(
                [p.detach().reshape(-1) for g in optimizer.param_groups for p in g["params"]]
            )
        )

    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    handles = [
        register_optimizer_step_pre_hook(before_step),
        register_optimizer_step_post_hook(after_step),
    ]
    try:
        single = train(SMALL, *small_data, folder / "single", resume=False, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    return {
        "first": first,
        "first_files": first_files,
        "resumed": resumed,
        "single": single,
        "single_snapshots": torch.stack(snapshots),
        "single_gradients": torch.stack(gradients),
    }


def test_ranks_identical_after_each_step(runs) -> None:
    for launch in ("first", "resumed"):
        for rank, record in enumerate(runs[launch]):
            assert record["world_size"] == WORLD_SIZE
            assert record["gaps"], f"{launch} rank {rank} took no step"
            assert max(record["gaps"]) == 0.0, f"{launch} rank {rank}: {record['gaps']}"


def test_ranks_return_identical_models(runs) -> None:
    first, second = runs["resumed"]
    for name, value in first["final"].items():
        assert torch.equal(value, second["final"][name]), name


def test_only_rank_zero_writes_files(runs) -> None:
    for launch in ("first", "resumed"):
        zero, other = runs[launch]
        assert CHECKPOINT_FILE in zero["saves"], launch
        assert BEST_FILE in zero["saves"], launch
        assert other["saves"] == [], launch
    assert runs["first_files"] == [BEST_FILE, CHECKPOINT_FILE]


def test_restart_resumes_from_checkpoint(runs) -> None:
    steps_first = runs["first"][0]["steps"]
    steps_total = runs["resumed"][0]["steps"]
    assert steps_total == 2 * steps_first
    # The resumed job took only the second epoch's steps.
    assert len(runs["resumed"][0]["snapshots"]) == steps_total - steps_first


def test_first_gradient_matches_single_process(runs) -> None:
    # Before the first step both runs hold the same weights, so DDP's averaged gradient must
    # equal the single-process gradient of the whole batch up to float32 rounding.
    torch.testing.assert_close(
        runs["first"][0]["gradients"][0],
        runs["single_gradients"][0],
        rtol=GRADIENT_RTOL,
        atol=GRADIENT_ATOL,
    )


def test_trajectory_matches_single_process(runs) -> None:
    single = runs["single_snapshots"]
    ddp = torch.cat([runs["first"][0]["snapshots"], runs["resumed"][0]["snapshots"]])
    assert single.shape == ddp.shape
    assert runs["single"].summary["steps"] == runs["resumed"][0]["steps"]
    learning_rate = SMALL.train.learning_rate
    for step in range(single.shape[0]):
        gap = (ddp[step] - single[step]).abs()
        # Most weights agree to float32 rounding; the drifting ones stay within Adam's bound.
        assert float(gap.median()) <= WEIGHT_ATOL, f"step {step}: median gap"
        bound = 2.0 * ADAM_MAX_STEP_OVER_LR * learning_rate * (step + 1)
        assert float(gap.max()) <= bound, f"step {step}: max gap {float(gap.max()):.2e}"


def test_validation_loss_matches_single_process(runs) -> None:
    single = runs["single"].summary["validation_bpd"]
    for rank, record in enumerate(runs["resumed"]):
        assert record["validation_bpd"] == pytest.approx(single, rel=1e-3), f"rank {rank}"


def test_cuda_device_rejected_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TrainingError, match="train.device='cuda'"):
        select_device("cuda")
    assert select_device("auto") == torch.device("cpu")


def test_unknown_device_rejected() -> None:
    with pytest.raises(TrainingError, match="train.device='tpu'"):
        select_device("tpu")


def test_bf16_rejected_on_cpu(small_data, tmp_path) -> None:
    config = ApplianceConfig(
        data=SMALL.data,
        model=SMALL.model,
        train=TrainConfig(**{**SMALL.train.__dict__, "mixed_precision": "bf16"}),
    )
    with pytest.raises(TrainingError, match="needs a CUDA device"):
        train(config, *small_data, tmp_path, resume=False, progress=False)
    assert not tmp_path.joinpath(CHECKPOINT_FILE).exists()
