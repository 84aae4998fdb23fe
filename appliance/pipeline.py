"""The main job: train on a WFDB folder, serve, generate, validate, write the results."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from appliance.classes import AAMI_CLASSES
from appliance.client import ApplianceClient, Generated, Validated
from appliance.config import ApplianceConfig
from appliance.corrupt import corrupt
from appliance.dataset import BeatSet
from appliance.errors import ApplianceError, StoppedAtOnce, TrainingStoppedError
from appliance.jobs import train_and_export
from appliance.outputs import GENERATE_FILES, plot_real_vs_synthetic, write_beats
from appliance.privacy import NearestNeighbourIndex, privacy_space
from appliance.train import requested_stop_signal, stop_on_signals

logger = logging.getLogger(__name__)

GENERATE_COUNT = 1000
REAL_TEST_BEATS = 200
PIPELINE_CORRUPTIONS = ("gaussian_noise", "flat_line", "amplitude_x0.1", "time_reversed")
SERVER_START_TIMEOUT_S = 180.0
SERVER_STOP_TIMEOUT_S = 30.0
SUMMARY_FILE = "summary.json"
FIGURE_FILE = "real_vs_synthetic.png"
BEATS_FOLDER = "synthetic"
# Formats of the job's beats in BEATS_FOLDER.
JOB_FORMATS = ("npy", "wfdb")


class ServerProcess:
    """A ``python -m appliance serve`` child process on loopback with an OS-assigned port."""

    def __init__(self, store: Path, work_dir: Path) -> None:
        self.port_file = work_dir / "server.port"
        self.port_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                "serve",
                "--store",
                str(store),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--port-file",
                str(self.port_file),
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.address = ""

    def wait_serving(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> str:
        """Wait until the health service reports SERVING and return ``host:port``.

        Raises:
            ApplianceError: If the process exits or is not serving within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ApplianceError(
                    f"server exited with status {self.process.returncode} "
                    "before serving; see its log above"
                )
            if self.port_file.exists() and self.port_file.read_text().strip():
                self.address = f"127.0.0.1:{self.port_file.read_text().strip()}"
                with ApplianceClient(self.address) as client:
                    try:
                        if client.health() == "SERVING":
                            logger.info("server serving address=%s", self.address)
                            return self.address
                    except Exception as exc:  # grpc.RpcError while the port opens
                        logger.debug("health check not ready: %s", exc)
            time.sleep(0.5)
        raise ApplianceError(f"server did not report SERVING within {timeout_s:.0f} s")

    def stop(self) -> int:
        """Send SIGTERM and wait for the process; return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


@dataclass
class JobSummary:
    """Figures of one main-job run."""

    figures: dict[str, Any]
    table: str


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Return the probability that a positive scores above a negative (ties count half)."""
    from scipy.stats import mannwhitneyu

    statistic = mannwhitneyu(positive, negative, alternative="two-sided").statistic
    return float(statistic / (positive.size * negative.size))


def run_main_job(
    data_dir: Path,
    out_dir: Path,
    config: ApplianceConfig,
    progress: bool = True,
    train_options: Sequence[str] = (),
) -> JobSummary:
    """Train, export, serve, generate and validate; write beats, a figure and a summary.

    Arguments:
        data_dir: WFDB folder to train on.
        out_dir: Output folder.
        config: Settings of every stage.
        progress: Show training progress bars.
        train_options: The command line's training options besides ``--data``, repeated in
            the ``train --resume`` command that a stop in training names.

    Raises:
        DataError: If the data folder gives no usable beats.
        TrainingStoppedError: If a signal stopped training or export.
        StoppedAtOnce: If a signal stopped the job after the model was published.
        ApplianceError: If a stage fails; the server is stopped in any case.
    """
    # The highest folder that this job creates, removed again if it fails before writing.
    created = None
    missing = out_dir.absolute()
    while not missing.exists():
        created, missing = missing, missing.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "model-store"
    earlier = earlier_outputs(out_dir)
    if earlier:
        logger.warning(
            "out=%s contains an earlier run: its outputs (%s) are removed once training "
            "succeeds, its training checkpoints are replaced, and the new model becomes the "
            "store's current version; pass another --out to keep them",
            out_dir,
            ", ".join(str(path.relative_to(out_dir)) for path in earlier),
        )
    try:
        with stop_on_signals():
            job = train_and_export(
                data_dir, store, config, out_dir / "training", progress=progress
            )
            # A signal during publishing, after export's last check, is only recorded.
            signum = requested_stop_signal()
            if signum is not None:
                raise StoppedAtOnce(_stopped_after_training(signum, store), signum)
    except TrainingStoppedError as exc:
        if exc.checkpoint is None:
            raise  # stopped in export, whose message names the export command
        raise TrainingStoppedError(
            resume_message(exc, data_dir, out_dir, train_options),
            exc.signum,
            exc.step,
            exc.checkpoint,
        ) from exc
    except BaseException:
        if created is not None:
            _remove_if_no_files(created)
        raise
    if job.version is None:
        raise ApplianceError("the main job runs in one process; start it without torchrun")
    # Removed only now, so that a run that fails in training leaves the earlier one whole.
    for path in earlier_outputs(out_dir):
        path.unlink()
    return _serve_generate_validate(job, store, out_dir, config)


def resume_message(
    exc: TrainingStoppedError, data_dir: Path, out_dir: Path, train_options: Sequence[str] = ()
) -> str:
    """Return the error of a job whose training a signal stopped, with the command to resume."""
    resume = shlex.join(
        [
            "python",
            "-m",
            "appliance",
            "train",
            "--data",
            str(data_dir),
            *train_options,
            "--store",
            str(out_dir / "model-store"),
            "--work-dir",
            str(out_dir / "training"),
            "--resume",
        ]
    )
    return (
        f"training stopped by {signal.strsignal(exc.signum)} at step {exc.step}; the checkpoint "
        f"{exc.checkpoint} is saved and nothing was exported. run has no --resume: `{resume}` "
        "continues this training and publishes the model, without the job's beats, figure and "
        "summary; running the job again trains from the start"
    )


def earlier_outputs(out_dir: Path) -> list[Path]:
    """Return the files of an earlier main job in ``out_dir``: summary, figure and beats."""
    names = [SUMMARY_FILE, FIGURE_FILE] + [
        f"{BEATS_FOLDER}/{name}" for fmt in JOB_FORMATS for name in GENERATE_FILES[fmt]
    ]
    return [out_dir / name for name in names if (out_dir / name).is_file()]


def _remove_if_no_files(folder: Path) -> None:
    """Remove ``folder`` if it and its subfolders contain no file, as a failed start leaves it."""
    if any(path.is_file() or path.is_symlink() for path in folder.rglob("*")):
        return
    shutil.rmtree(folder, ignore_errors=True)


def _stopped_after_training(signum: int, store: Path) -> str:
    """Return the error of a job that a signal stopped after its model was published."""
    return (
        f"stopped by {signal.strsignal(signum)} after training; the model is published in "
        f"{store}, and the job's beats, figure and summary were not written. Serve that model "
        f"with `python -m appliance serve --store {store}`, or run the job again, which trains "
        "again"
    )


class _JobStop:
    """SIGTERM and SIGINT handling while the job's server runs.

    The first signal raises ``StoppedAtOnce`` where the main thread is, and the exception
    unwinds through the ``finally`` clause that stops the server. Inside ``shield`` (while the
    server process starts or stops) the signal is only recorded and raised when the shield
    ends, so that the process is neither left unstarted nor left unreaped. Later signals are
    logged and ignored.

    Arguments:
        store: The model store the job published to, named in the error.
    """

    def __init__(self, store: Path) -> None:
        self.store = store
        self.signum: int | None = None
        self.shielded = False

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        """Signal handler: record the first signal and raise it unless shielded."""
        if self.signum is not None:
            logger.warning(
                "signal=%s received again; ignored while the job's server stops",
                signal.strsignal(signum),
            )
            return
        self.signum = signum
        if not self.shielded:
            raise self.error()

    def error(self) -> StoppedAtOnce:
        """Return the exception of the recorded signal."""
        assert self.signum is not None
        return StoppedAtOnce(_stopped_after_training(self.signum, self.store), self.signum)

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """Record a signal during the block instead of raising it there; raise it after."""
        self.shielded = True
        try:
            yield
        finally:
            self.shielded = False
        if self.signum is not None:
            raise self.error()

    @contextlib.contextmanager
    def installed(self) -> Iterator[_JobStop]:
        """Install ``handle`` for SIGTERM and SIGINT during the block, then restore."""
        signals = (signal.SIGTERM, signal.SIGINT)
        previous = {number: signal.signal(number, self.handle) for number in signals}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


@dataclass
class _Served:
    """Results of the job's calls to its own server.

    Attributes:
        generated: The Generate call's beats.
        validated: Validate's scores of the generated, real and corrupted beats, in that order.
        real: The real beats that were validated, shape (beats, leads, window_samples).
        per_kind: Corrupted beats validated per corruption.
        test: The real beats the figure compares with.
        real_source: Where ``test`` comes from, for the figure's title.
    """

    generated: Generated
    validated: Validated
    real: np.ndarray
    per_kind: int
    test: BeatSet
    real_source: str


def _served_calls(job: Any, store: Path, out_dir: Path, config: ApplianceConfig) -> _Served:
    """Start a server on the published model, call Generate and Validate, stop the server.

    Raises:
        StoppedAtOnce: If SIGTERM or SIGINT arrived; the server is stopped first.
        ApplianceError: If a call fails or accepts no beat; the server is stopped first.
    """
    with _JobStop(store).installed() as stop:
        server: ServerProcess | None = None
        try:
            with stop.shield():
                server = ServerProcess(store, out_dir)
            address = server.wait_serving()
            with ApplianceClient(address) as client:
                generated = client.generate(count=GENERATE_COUNT, seed=config.train.seed)
                if generated.beats.shape[0] == 0:
                    raise ApplianceError(no_beat_message(generated.stats, store))
                rng = np.random.default_rng(config.train.seed)
                test = job.dataset.splits["test"]
                real_source = (
                    f"test records {', '.join(sorted(set(map(str, test.records))))}, "
                    "patients the model never saw"
                )
                if len(test) == 0:
                    test = job.holdout_beats
                    real_source = "the held-out end of the training records"
                    logger.warning(
                        "no test records; using the same-patient hold-out as real beats"
                    )
                pick = rng.choice(len(test), size=min(REAL_TEST_BEATS, len(test)), replace=False)
                real = test.windows[pick]
                per_kind = REAL_TEST_BEATS // len(PIPELINE_CORRUPTIONS)
                corrupted = {
                    kind: corrupt(real[:per_kind], kind, config.data.fs_hz, rng)
                    for kind in PIPELINE_CORRUPTIONS
                }
                everything = np.concatenate([generated.beats, real, *corrupted.values()])
                validated = client.validate(everything.astype(np.float32))
        finally:
            if server is not None:
                with stop.shield():
                    status = server.stop()
    if status != 0:
        raise ApplianceError(f"server exited with status {status} after SIGTERM")
    return _Served(generated, validated, real, per_kind, test, real_source)


def _serve_generate_validate(
    job: Any, store: Path, out_dir: Path, config: ApplianceConfig
) -> JobSummary:
    """Serve the published model, generate and validate through it, and write the outputs."""
    manifest = job.version.manifest
    served = _served_calls(job, store, out_dir, config)
    generated, validated, real = served.generated, served.validated, served.real
    per_kind, test, real_source = served.per_kind, served.test, served.real_source
    n_synthetic, n_real = generated.beats.shape[0], real.shape[0]
    scores = validated.scores
    synthetic_scores = scores[:n_synthetic]
    real_scores = scores[n_synthetic : n_synthetic + n_real]
    kind_scores: dict[str, np.ndarray] = {}
    start = n_synthetic + n_real
    for kind in PIPELINE_CORRUPTIONS:
        kind_scores[kind] = scores[start : start + per_kind]
        start += per_kind

    index = NearestNeighbourIndex(privacy_space(job.fit_beats.windows))
    distances = (
        index.nearest_distance(privacy_space(generated.beats)) if n_synthetic else np.zeros(0)
    )
    beats_dir = out_dir / BEATS_FOLDER
    written: list[Path] = []
    for fmt in JOB_FORMATS:
        written += write_beats(
            beats_dir,
            generated.beats,
            generated.classes,
            generated.scores,
            generated.fs_hz,
            int(manifest["data"]["pre_r_samples"]),
            list(manifest["data"]["leads"]),
            fmt,
        )
    figure = plot_real_vs_synthetic(
        out_dir / FIGURE_FILE,
        test.windows,
        test.labels,
        generated.beats,
        generated.classes,
        generated.fs_hz,
        real_source,
    )
    stats = generated.stats
    figures: dict[str, Any] = {
        "model_id": manifest["model_id"],
        "generated": n_synthetic,
        "requested": GENERATE_COUNT,
        "draws": int(stats.draws),
        "accept_rate": n_synthetic / max(1, int(stats.draws)),
        "pertinence_rejections": int(stats.pertinence_rejections),
        "privacy_rejections": int(stats.privacy_rejections),
        "invalid_rejections": int(stats.invalid_rejections),
        "surplus_dropped": int(stats.surplus_dropped),
        "real_source": real_source,
        "privacy_threshold": float(stats.privacy_threshold),
        "margin": float(stats.margin),
        "synthetic_per_class": {
            c: generated.classes.count(c) for c in AAMI_CLASSES if c in generated.classes
        },
        "score_quantiles": {
            "synthetic": _quantiles(synthetic_scores),
            "real_test": _quantiles(real_scores),
            **{f"corrupted_{k}": _quantiles(v) for k, v in kind_scores.items()},
        },
        "auroc_real_vs_corrupted": {k: auroc(real_scores, v) for k, v in kind_scores.items()},
        "synthetic_nearest_train_distance": _quantiles(distances),
        "files": [
            str(p) for p in [*written, figure, out_dir / SUMMARY_FILE, store, out_dir / "training"]
        ],
        "training": {k: v for k, v in job.result.summary.items() if k != "history"},
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(figures, indent=2))
    return JobSummary(figures=figures, table=_table(figures))


def no_beat_message(stats: Any, store: Path) -> str:
    """Return the error of a job whose Generate call accepted no beat.

    Arguments:
        stats: The call's ``GenerateStats``.
        store: The model store the job published to.
    """
    others = stats.pertinence_rejections + stats.invalid_rejections
    if stats.privacy_rejections > others:
        fix = (
            "most draws were near-copies of training beats, which longer training makes more "
            "likely: run the job on more records"
        )
    else:
        fix = (
            "it is not trained enough to generate: run the job again with a longer "
            "--max-minutes or more --epochs, or on more records"
        )
    return (
        f"the gate accepted none of {stats.draws} draws at margin {stats.margin:.3f} "
        f"(pertinence rejections {stats.pertinence_rejections}, privacy rejections "
        f"{stats.privacy_rejections}, invalid {stats.invalid_rejections}), so the job wrote no "
        f"beats, figure or summary. The model is published in {store}, but {fix}"
    )


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {name: float(v) for name, v in zip(("q05", "q25", "q50", "q75", "q95"), q, strict=True)}


def _training_line(training: dict[str, Any]) -> str:
    """Return the table's line on training, flagged when the budget ended the first epoch."""
    steps, steps_per_epoch = int(training["steps"]), int(training["steps_per_epoch"])
    validation_bpd = training.get("validation_bpd")
    # The log and summary.json count the epoch reached, so a partial last epoch is named.
    partial = (
        f", ending within epoch {steps // steps_per_epoch + 1}" if steps % steps_per_epoch else ""
    )
    line = (
        f"training: {steps} steps of {steps_per_epoch} per epoch "
        f"({steps / steps_per_epoch:.1f} epochs{partial}) in {training['duration_s']:.0f} s, "
        "stopped by "
        f"{training['stopped_by']}; validation NLL "
        + ("n/a" if validation_bpd is None else f"{validation_bpd:.3f} bits/dim")
    )
    if training["stopped_by"] == "time budget" and steps < steps_per_epoch:
        line += (
            "; the time budget ended training within its first epoch, so the model is "
            "undertrained: rerun on idle cores or raise --max-minutes"
        )
    return line


def _table(figures: dict[str, Any]) -> str:
    lines = [
        _training_line(figures["training"]),
        f"model {figures['model_id']}: generated {figures['generated']}/{figures['requested']} "
        f"beats from {figures['draws']} draws (accept rate {figures['accept_rate']:.2f}; "
        f"rejected: pertinence {figures['pertinence_rejections']}, privacy "
        f"{figures['privacy_rejections']}, invalid {figures['invalid_rejections']}; accepted "
        f"beyond the request and dropped {figures['surplus_dropped']})",
        f"per class: {figures['synthetic_per_class']}   margin {figures['margin']:.2f}   "
        f"privacy threshold {figures['privacy_threshold']:.4f}",
        "",
        "pertinence score quantiles: 0 to 1, higher is more like the held-out real beats the "
        "score is calibrated on;",
        f"real_test: {figures['real_source']}",
        "AUROC: probability that a real test beat scores above its corrupted copy "
        "(1 separates them, 0.5 does not)",
        f"{'pertinence score':<30}{'q05':>8}{'q25':>8}{'q50':>8}{'q75':>8}{'q95':>8}{'AUROC':>8}",
    ]
    for name, quantiles in figures["score_quantiles"].items():
        kind = name.removeprefix("corrupted_")
        area = figures["auroc_real_vs_corrupted"].get(kind)
        row = "".join(
            f"{quantiles.get(q, float('nan')):>8.3f}" for q in ("q05", "q25", "q50", "q75", "q95")
        )
        lines.append(f"{name:<30}{row}{'' if area is None else f'{area:>8.3f}'}")
    d = figures["synthetic_nearest_train_distance"]
    if d:
        lines.append("")
        lines.append(
            f"synthetic nearest-training-beat distance (RMS, z-normalised): "
            f"q05 {d['q05']:.3f}  q50 {d['q50']:.3f}  q95 {d['q95']:.3f}  "
            f"(threshold {figures['privacy_threshold']:.3f})"
        )
    lines.append("")
    lines.append("files: " + ", ".join(figures["files"]))
    return "\n".join(lines)
