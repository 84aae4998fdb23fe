"""The main job's later stages: no accepted beat, a signal while it serves, resuming training."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from appliance import pipeline
from appliance.client import ApplianceClient, Generated
from appliance.config import DEFAULT_DATA_DIR, ApplianceConfig
from appliance.dataset import BeatSet, Dataset
from appliance.errors import ApplianceError, StoppedAtOnce
from appliance.jobs import TrainJobResult
from appliance.store import load_current
from appliance.train import TrainResult
from appliance.v1 import appliance_pb2 as pb

pytestmark = pytest.mark.slow


class RecordedServer(pipeline.ServerProcess):
    """The job's real server process, kept in ``started`` so that a test can check its end.

    With ``signal_on_start`` set, the job receives SIGTERM once the process has started, while
    the job still creates the ``ServerProcess``.
    """

    started: list[pipeline.ServerProcess] = []
    signal_on_start = False

    def __init__(self, store: Path, work_dir: Path) -> None:
        super().__init__(store, work_dir)
        RecordedServer.started.append(self)
        if RecordedServer.signal_on_start:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # a signal handler that raises would do so here


@pytest.fixture
def trained_job(
    monkeypatch: pytest.MonkeyPatch,
    model_store: Path,
    default_dataset: Dataset,
    split_train: tuple[BeatSet, BeatSet],
    trained_result: TrainResult,
    tmp_path: Path,
) -> Path:
    """An --out folder whose training stage returns the fixture model instead of training."""
    out = tmp_path / "out"
    shutil.copytree(model_store, out / "model-store")

    def trained(data_dir: Path, store: Path, *args: object, **kwargs: object) -> TrainJobResult:
        return TrainJobResult(
            default_dataset, split_train[0], split_train[1], trained_result, load_current(store)
        )

    monkeypatch.setattr(pipeline, "train_and_export", trained)
    monkeypatch.setattr(pipeline, "ServerProcess", RecordedServer)
    RecordedServer.started.clear()
    RecordedServer.signal_on_start = False
    return out


def test_job_no_accepted_beat_writes_nothing(
    trained_job: Path, fixture_config: ApplianceConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = trained_job
    # An earlier run's outputs, which the new run removes at its start.
    (out / "summary.json").write_text("{}\n")
    (out / "synthetic").mkdir()
    (out / "synthetic" / "synthetic.npy").write_bytes(b"earlier")
    (out / "synthetic" / "notes.txt").write_text("the user's own file\n")
    real_generate = ApplianceClient.generate

    def nothing_accepted(self: ApplianceClient, **kwargs: object) -> Generated:
        real_generate(self, count=1, seed=1)  # one real call reaches the server first
        stats = pb.GenerateStats(
            draws=20000, pertinence_rejections=19990, invalid_rejections=10, margin=0.05
        )
        return Generated(np.zeros((0, 1, 256), np.float32), [], np.zeros(0), stats, 360.0)

    monkeypatch.setattr(ApplianceClient, "generate", nothing_accepted)
    with pytest.raises(ApplianceError) as raised:
        pipeline.run_main_job(DEFAULT_DATA_DIR, out, fixture_config, progress=False)
    message = str(raised.value)
    assert message.startswith("the gate accepted none of 20000 draws at margin 0.050")
    assert "pertinence rejections 19990, privacy rejections 0, invalid 10" in message
    assert f"The model is published in {out / 'model-store'}" in message
    assert "it is not trained enough to generate" in message
    assert "longer --max-minutes or more --epochs" in message
    assert not (out / "summary.json").exists()
    assert not (out / "synthetic" / "synthetic.npy").exists()
    assert not (out / "real_vs_synthetic.png").exists()
    assert (out / "synthetic" / "notes.txt").read_text() == "the user's own file\n"
    (server,) = RecordedServer.started
    assert server.process.poll() == 0


@pytest.mark.parametrize("moment", ["server_starting", "generate_call"])
def test_signal_while_the_job_serves_stops_its_server(
    trained_job: Path,
    fixture_config: ApplianceConfig,
    monkeypatch: pytest.MonkeyPatch,
    moment: str,
) -> None:
    def terminated(self: ApplianceClient, **kwargs: object) -> Generated:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the job")

    if moment == "server_starting":
        RecordedServer.signal_on_start = True
    else:
        monkeypatch.setattr(ApplianceClient, "generate", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StoppedAtOnce) as raised:
        pipeline.run_main_job(DEFAULT_DATA_DIR, trained_job, fixture_config, progress=False)
    assert raised.value.signum == signal.SIGTERM
    store = trained_job / "model-store"
    assert str(raised.value).startswith(
        f"stopped by Terminated after training; the model is published in {store}"
    )
    assert f"python -m appliance serve --store {store}" in str(raised.value)
    # The server started and was stopped, also when the signal came while it started. A
    # server process that had not yet set its own handlers ends by SIGTERM itself.
    (server,) = RecordedServer.started
    assert server.process.poll() in (0, -signal.SIGTERM)
    assert not (trained_job / "server.port").exists()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_run_stopped_training_names_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "appliance", "run", "--data", str(DEFAULT_DATA_DIR), "--out",
         str(out), "--epochs", "1", "--seed", "3", "--no-progress"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "training start" in line:
            process.send_signal(signal.SIGTERM)
            break
    _, rest = process.communicate(timeout=300)
    stderr = "".join(lines) + rest

    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    (error,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "run has no --resume" in error
    command = error.split("`")[1]
    # The run's own training options come along, so the checkpoint's settings match.
    assert command == (
        f"python -m appliance train --data {DEFAULT_DATA_DIR} --epochs 1 --seed 3 --no-progress "
        f"--store {out / 'model-store'} --work-dir {out / 'training'} --resume"
    )

    resumed = subprocess.run(
        [sys.executable, *command.split()[1:]], capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume" in resumed.stderr
    assert load_current(out / "model-store").manifest["model_id"]
