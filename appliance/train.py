"""Maximum-likelihood training of the conditional flow, with checkpoints and a time budget.

The same loop runs in one process or under ``torchrun`` with DistributedDataParallel: every
rank builds the same global batch, trains on its contiguous share of it, and DDP averages the
gradients, so the weights follow the single-process run with the same ``batch_size`` up to
float32 rounding. Only rank 0 writes checkpoints and ``best.pt``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from appliance.classes import AAMI_CLASSES
from appliance.config import ApplianceConfig, TrainConfig
from appliance.dataset import BeatSet
from appliance.distributed import DistributedContext, any_rank, barrier, init_from_env
from appliance.errors import (
    NonFiniteLossError,
    StoppedAtOnce,
    TrainingError,
    TrainingStoppedError,
)
from appliance.flow import ConditionalFlow, bits_per_dim, standard_normal_log_prob

logger = logging.getLogger(__name__)

# Set by ``stop_on_signals``; training saves a checkpoint and stops after the step in progress.
_stop_requested = threading.Event()
# Number of the signal that set ``_stop_requested``.
_stop_signum = [0]


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[None]:
    """Make SIGTERM and SIGINT stop training cleanly while the block runs (main thread only).

    Training then saves a checkpoint after the step in progress and raises
    ``TrainingStoppedError``, so ``train --resume`` continues from there. The previous
    handlers are restored on exit.

    Arguments:
        enabled: False leaves the handlers alone. Ranks of a distributed run pass False,
            because one rank cannot stop alone without the others waiting for it.
    """
    if not enabled:
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT)

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        if _stop_requested.is_set():
            # A second signal means the user will not wait for the current step or stage.
            logger.warning(
                "signal=%s received again; stopping now without saving", signal.strsignal(signum)
            )
            raise StoppedAtOnce(
                f"stopped at once by a second {signal.strsignal(signum)}; the store's current "
                "version is unchanged, and the work folder keeps the last checkpoint saved "
                "before it (train --resume continues from there)",
                signum,
            )
        logger.warning(
            "signal=%s received; training stops after the current step, an export after its "
            "current stage (send it again to stop at once)",
            signal.strsignal(signum),
        )
        _stop_signum[0] = signum
        _stop_requested.set()

    # Cleared before the handlers go in, so that a signal that arrives at once is kept.
    _stop_requested.clear()
    previous = {number: signal.signal(number, request_stop) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _stop_requested.clear()


def requested_stop_signal() -> int | None:
    """Return the signal that asked the run to stop inside ``stop_on_signals``, or None."""
    return _stop_signum[0] if _stop_requested.is_set() else None


def raise_if_stop_requested(stage: str) -> None:
    """Raise ``TrainingStoppedError`` if a signal asked the run to stop.

    Arguments:
        stage: What would run next, named in the message (``export privacy index``).
    """
    if _stop_requested.is_set():
        signum = _stop_signum[0]
        raise TrainingStoppedError(
            f"stopped by {signal.strsignal(signum)} before {stage}; nothing was published",
            signum,
        )


CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
# Entries that every checkpoint has; ``train_records`` is absent from older ones.
CHECKPOINT_KEYS = ("config", "model", "step", "scale_mv", "classes_known")
# The end of load_checkpoint's messages when a user passed the file.
CHECKPOINT_ADVICE = "pass the best.pt or checkpoint.pt of a training work folder"
# The end of its messages when train --resume found the file in its work folder.
RESUME_ADVICE = "start afresh: delete the checkpoint or pass another --work-dir"
# Entries that resuming needs besides those.
RESUME_KEYS = ("optimizer", "best_validation_loss", "best_model", "history")
# Characters of torch's error kept in the message about a file that is not a checkpoint.
DETAIL_CHARS = 120
# A class needs this many training beats before the model offers it for generation.
MIN_BEATS_PER_KNOWN_CLASS = 20
# Gradients are rescaled to at most this global L2 norm before each optimiser step.
MAX_GRADIENT_NORM = 5.0
# Without a terminal for the progress bar, a progress line is logged at most this often, so
# that a log shows training is alive within an epoch that takes minutes.
PROGRESS_LOG_S = 60.0
VALIDATION_BATCH = 512
# Per-beat bottleneck reconstruction error (squared scaled units) at which checkpoint selection
# caps a beat. The scaled training beats have unit variance, so 1 is the error of predicting
# zero: a beat whose projection diverges counts as failed, not as 1e5 times worse.
SELECTION_MSE_CAP = 1.0
# Training settings that shape the trajectory; a resumed run must use the checkpoint's values.
RESUME_MUST_MATCH = (
    "batch_size",
    "learning_rate",
    "weight_decay",
    "reconstruction_weight",
    "noise_std",
    "class_balance",
    "max_beats_per_class",
    "seed",
)
MIXED_PRECISION_CHOICES = ("no", "bf16")


@dataclass
class TrainResult:
    """A trained model and what the run measured.

    ``summary`` goes into the manifest and ``summary.json`` as JSON, so its figures that are
    not finite, such as an uncapped reconstruction error that overflowed, are None.
    """

    model: ConditionalFlow
    scale_mv: float
    classes_known: list[str]
    summary: dict[str, Any] = field(default_factory=dict)


def finite_or_none(value: float | None) -> float | None:
    """Return ``value`` unchanged, or None when it is NaN or infinite.

    ``json.dumps`` writes NaN and infinity as ``NaN`` and ``Infinity``, which are not JSON and
    which strict parsers reject, so figures that go into JSON files pass through this first.
    """
    if value is None or not math.isfinite(value):
        return None
    return value


def one_hot(labels: torch.Tensor, classes: int = len(AAMI_CLASSES)) -> torch.Tensor:
    """Return one-hot float rows for class indices, shape (batch, classes)."""
    return torch.nn.functional.one_hot(labels.long(), classes).float()


def compute_loss(
    model: ConditionalFlow, x: torch.Tensor, condition: torch.Tensor, reconstruction_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (total loss, NLL in bits per dimension, bottleneck reconstruction MSE).

    The reconstruction term maps ``x`` to latent values, zeroes every value after the
    bottleneck, maps back, and penalises the squared error, so that the leading latent values
    carry the beat's shape. With ``reconstruction_weight == 0`` the inverse pass is skipped and
    the MSE returned is 0.
    """
    z, log_det = model(x, condition)
    nll_bpd = bits_per_dim(standard_normal_log_prob(z) + log_det, model.latent_dims).mean()
    loss = nll_bpd
    reconstruction = torch.zeros((), dtype=x.dtype, device=x.device)
    if reconstruction_weight > 0:
        x_projected, _ = model.inverse(model.truncate(z), condition)
        reconstruction = ((x_projected - x) ** 2).mean()
        loss = loss + reconstruction_weight * reconstruction
    return loss, nll_bpd, reconstruction


class _Objective(torch.nn.Module):
    """The training loss as a module, so that DistributedDataParallel sees one forward call.

    The loss runs the flow's forward and inverse passes; wrapping both in one ``forward``
    lets DDP average the gradients of every parameter after each backward pass.
    """

    def __init__(self, flow: ConditionalFlow, reconstruction_weight: float) -> None:
        super().__init__()
        self.flow = flow
        self.reconstruction_weight = reconstruction_weight

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return compute_loss(self.flow, x, condition, self.reconstruction_weight)


def _epoch_order(labels: np.ndarray, class_balance: float, seed: int, epoch: int) -> np.ndarray:
    """Draw the beat order of one epoch; rarer classes are drawn more often when balancing."""
    counts = np.bincount(labels, minlength=len(AAMI_CLASSES)).astype(np.float64)
    weights = counts[labels] ** (-class_balance)
    weights /= weights.sum()
    rng = np.random.default_rng([seed, epoch])
    return rng.choice(labels.size, size=labels.size, replace=True, p=weights)


def select_training_beats(
    labels: np.ndarray, max_beats_per_class: int, seed: int
) -> tuple[list[str], np.ndarray]:
    """Return the known classes and the beats that training learns from.

    A class is known when it has at least ``MIN_BEATS_PER_KNOWN_CLASS`` beats. Each known class
    keeps at most ``max_beats_per_class`` beats, drawn with ``seed``. The quality report and the
    gate benchmark call this too, so that their members are the beats the model learnt from.

    Arguments:
        labels: AAMI class index of each training beat, shape (beats,).
        max_beats_per_class: Cap on beats per class (``TrainConfig.max_beats_per_class``).
        seed: Seed of the draw (``TrainConfig.seed``).

    Returns:
        The names of the known classes, in AAMI order, and the sorted indices of the selected
        beats into ``labels``.
    """
    counts = np.bincount(labels, minlength=len(AAMI_CLASSES))
    classes_known = [
        n for i, n in enumerate(AAMI_CLASSES) if counts[i] >= MIN_BEATS_PER_KNOWN_CLASS
    ]
    known = np.flatnonzero(np.isin(labels, [AAMI_CLASSES.index(n) for n in classes_known]))
    return classes_known, known[_cap_per_class(labels[known], max_beats_per_class, seed)]


def _cap_per_class(labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Return sorted indices that keep at most ``max_per_class`` beats of each class."""
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if members.size > max_per_class:
            members = rng.choice(members, size=max_per_class, replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _save(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically, so a kill never leaves half a file.

    Raises:
        TrainingError: If the file cannot be written (a folder in its place, a full disk),
            naming the file; the checkpoint saved before stays in place.
    """
    temporary = path.with_suffix(".tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a failed write as RuntimeError from its zip writer.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise TrainingError(
            f"checkpoint {path} cannot be written ({exc}); check that the path is not a folder, "
            "that the work folder is writable and that its disk has space, then run the same "
            "train command with --resume"
        ) from exc


def check_checkpoint_paths(work_dir: Path) -> None:
    """Raise ``TrainingError`` before training if a checkpoint path is taken by a folder."""
    for name in (CHECKPOINT_FILE, BEST_FILE):
        path = work_dir / name
        if path.is_dir() or path.with_suffix(".tmp").is_dir():
            raise TrainingError(
                f"{path if path.is_dir() else path.with_suffix('.tmp')} is a folder, so the "
                "checkpoint cannot be written there; remove it or pass another --work-dir"
            )


def record_differences(trained: dict[str, int], found: dict[str, int]) -> list[str]:
    """Return how two maps of beats per training record differ, one phrase per kind of change.

    Returns:
        Phrases that name the missing records, the extra records and the changed counts; an
        empty list when the maps are equal.
    """
    missing = sorted(set(trained) - set(found))
    extra = sorted(set(found) - set(trained))
    changed = sorted(name for name in set(trained) & set(found) if trained[name] != found[name])
    differences = []
    if missing:
        differences.append(f"training records missing: {', '.join(missing)}")
    if extra:
        differences.append(f"records not trained on: {', '.join(extra)}")
    if changed:
        differences.append(
            "beat counts differ for "
            + ", ".join(f"{name} ({trained[name]} trained, {found[name]} now)" for name in changed)
        )
    return differences


def _check_resumable(
    state: dict[str, Any], config: ApplianceConfig, path: Path, train_records: dict[str, int]
) -> None:
    """Raise ``TrainingError`` if a checkpoint was written with other settings or other beats.

    The ingest cache folder is left out of the comparison, because it does not change the
    beats. The beats per training record are compared instead, so that a run resumed on other
    records cannot leave the first records' beats out of the privacy guard.
    """
    problem = _resume_value_problem(state)
    if problem:
        raise TrainingError(
            f"cannot resume from {path}: it has {problem}, which `train` never writes, so the "
            "file was edited or damaged. Start afresh: delete the checkpoint or pass another "
            "--work-dir"
        )
    saved = ApplianceConfig.from_dict(state["config"])
    differences = []
    if saved.model != config.model:
        differences.append(f"model: checkpoint {saved.model}, now {config.model}")
    if replace(saved.data, cache_dir="") != replace(config.data, cache_dir=""):
        differences.append(f"data: checkpoint {saved.data}, now {config.data}")
    for name in RESUME_MUST_MATCH:
        before, now = getattr(saved.train, name), getattr(config.train, name)
        if before != now:
            differences.append(f"train.{name}: checkpoint {before}, now {now}")
    if differences:
        raise TrainingError(
            f"cannot resume from {path}: settings differ ({'; '.join(differences)}); "
            "use the checkpoint's settings, or start afresh: delete the checkpoint or pass "
            "another --work-dir"
        )
    trained = state.get("train_records")
    if trained is None:
        logger.warning(
            "checkpoint=%s has no list of its training records (written by an older version), "
            "so the resumed run cannot check that it trains on the same records",
            path,
        )
        return
    record_changes = record_differences(dict(trained), train_records)
    if record_changes:
        raise TrainingError(
            f"cannot resume from {path}: the data gives other training beats "
            f"({'; '.join(record_changes)}). The privacy guard must see every beat the weights "
            "were trained on, so pass the data folder the checkpoint was trained on, or start "
            "afresh: delete the checkpoint or pass another --work-dir"
        )


def _resume_value_problem(state: dict[str, Any]) -> str:
    """Return a phrase naming a missing or impossible value that resuming needs, or ''."""
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        return f"no {', '.join(missing)}"
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"step={step!r} (a count of steps from 0)"
    if not isinstance(state["optimizer"], dict):
        return "an optimizer entry that is not an optimiser state"
    if not isinstance(state["history"], list) or not all(
        isinstance(entry, dict) for entry in state["history"]
    ):
        return "a history that is not a list of epoch records"
    loss = state["best_validation_loss"]
    if isinstance(loss, bool) or not isinstance(loss, int | float) or math.isnan(loss):
        return f"best_validation_loss={loss!r} (a number, or infinity before any validation)"
    trained = state.get("train_records")
    if trained is not None and not (
        isinstance(trained, dict)
        and all(isinstance(k, str) and type(v) is int for k, v in trained.items())
    ):
        return "a train_records entry that is not beats per record"
    for key in ("model", "best_model"):
        problem = weights_problem(state[key], allow_none=key == "best_model")
        if problem:
            return f"{key} {problem}"
    return ""


def weights_problem(weights: object, allow_none: bool = False) -> str:
    """Return a phrase naming why ``weights`` is not a finite state dict, or ''."""
    if weights is None and allow_none:
        return ""
    if not isinstance(weights, dict) or not all(
        isinstance(value, torch.Tensor) for value in weights.values()
    ):
        return "weights that are not a dictionary of tensors"
    for name, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"weights with NaN or infinite values in {name}"
    return ""


@dataclass(frozen=True)
class Evaluation:
    """Validation figures of a beat set.

    Attributes:
        nll_bpd: Mean negative log-likelihood in bits per dimension.
        reconstruction_mse: Mean bottleneck reconstruction error, squared scaled units.
        capped_mse: The same mean with each beat's error capped at ``SELECTION_MSE_CAP``,
            which checkpoint selection uses: a few beats of a held-out patient whose projection
            diverges cannot outweigh the rest.
    """

    nll_bpd: float
    reconstruction_mse: float
    capped_mse: float


@torch.no_grad()
def evaluate(
    model: ConditionalFlow,
    beats: BeatSet,
    scale_mv: float,
    device: torch.device | None = None,
) -> Evaluation:
    """Return the NLL and bottleneck reconstruction figures of a beat set.

    Batches go to ``device`` (default: the device of the model's first parameter).
    """
    model.eval()
    device = device or next(model.parameters()).device
    nll_parts, error_parts = [], []
    for start in range(0, len(beats), VALIDATION_BATCH):
        x = torch.from_numpy(beats.windows[start : start + VALIDATION_BATCH] / scale_mv).float()
        condition = one_hot(torch.from_numpy(beats.labels[start : start + VALIDATION_BATCH]))
        x, condition = x.to(device), condition.to(device)
        z, log_det = model(x, condition)
        nll = bits_per_dim(standard_normal_log_prob(z) + log_det, model.latent_dims)
        x_projected, _ = model.inverse(model.truncate(z), condition)
        errors = ((x_projected - x) ** 2).mean(dim=(1, 2))
        nll_parts.append(nll.double().cpu().numpy())
        error_parts.append(errors.double().cpu().numpy())
    nll_all = np.concatenate(nll_parts)
    error_all = np.concatenate(error_parts)
    # A projection that overflows counts as failed too, like one that diverges.
    capped = np.where(
        np.isfinite(error_all), np.minimum(error_all, SELECTION_MSE_CAP), SELECTION_MSE_CAP
    )
    return Evaluation(
        nll_bpd=float(nll_all.mean()),
        reconstruction_mse=float(error_all.mean()),
        capped_mse=float(capped.mean()),
    )


def train(
    config: ApplianceConfig,
    train_beats: BeatSet,
    validation_beats: BeatSet,
    work_dir: Path,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train the flow by maximum likelihood plus the bottleneck reconstruction term.

    Checkpoints go to ``work_dir/checkpoint.pt`` every ``checkpoint_every_steps`` steps and at
    each epoch end; the best model by validation loss goes to ``work_dir/best.pt`` when the run
    finishes. With ``resume``, a run continues from ``work_dir/checkpoint.pt`` when it exists
    and reaches the same weights as an uninterrupted run: the beat order and the noise of each
    step derive from the seed, the epoch and the step alone. The time budget counts from the
    start of each call.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the call joins the process group from the
    environment unless one is already initialised, and every rank must call it with the same
    arguments. Rank 0 alone writes files and reads the checkpoint to resume from, then sends
    it to the other ranks. Every rank returns the same weights, on the CPU.

    Raises:
        NonFiniteLossError: If the loss or its gradient becomes NaN or infinite. The last good
            checkpoint stays and ``best.pt`` is not written.
        TrainingError: If there is no validation beat, the checkpoint to resume from was
            written with other settings, the device or mixed precision setting is invalid, or
            ``batch_size`` is not a multiple of the number of ranks.
    """
    settings = config.train
    if len(validation_beats) == 0:
        raise TrainingError(
            "no validation beats: the split put no record in validation. The random split "
            "needs at least 3 records (one each for train, validation and test); add records, "
            "or write a SPLITS file (NAME SPLIT per line) that names at least one validation "
            "record. See docs/ingest.md, section Splits"
        )
    if settings.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise TrainingError(
            f"train.mixed_precision={settings.mixed_precision!r} is invalid; "
            f"use one of {MIXED_PRECISION_CHOICES}"
        )
    context = init_from_env(settings.device)
    if settings.mixed_precision == "bf16" and context.device.type != "cuda":
        raise TrainingError(
            f"train.mixed_precision='bf16' needs a CUDA device but training runs on "
            f"{context.device}; set train.mixed_precision='no' or train on a GPU"
        )
    if settings.batch_size % context.world_size != 0:
        raise TrainingError(
            f"train.batch_size={settings.batch_size} is not a multiple of the "
            f"{context.world_size} ranks; pick a batch size that splits evenly"
        )
    logger.info(
        "training start device=%s mixed_precision=%s rank=%d world_size=%d backend=%s",
        context.device,
        settings.mixed_precision,
        context.rank,
        context.world_size,
        context.backend or "none",
    )
    # As the flow trains, some activations of the backward pass fall below float32's smallest
    # normal value, and x86 CPUs compute on such denormal numbers many times slower. Flushing
    # them to zero took a forward and backward pass of 128 beats through trained DS1 weights
    # from 1.2 s to 0.2 s (one thread). The mode is per thread, and threads copy it from the
    # thread that starts them, so in a fresh process it reaches PyTorch's worker threads.
    flush_denormal = torch.set_flush_denormal(True)
    threads_before = torch.get_num_threads()
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    logger.info("training threads=%d flush_denormal=%s", torch.get_num_threads(), flush_denormal)
    try:
        return _train(config, train_beats, validation_beats, work_dir, resume, progress, context)
    finally:
        torch.set_num_threads(threads_before)
        torch.set_flush_denormal(False)


def load_checkpoint(path: Path, advice: str = CHECKPOINT_ADVICE) -> dict[str, Any]:
    """Read a checkpoint that ``train`` wrote, as tensors and plain Python values only.

    ``weights_only`` loading runs no code from the file, so a hostile file cannot run any.

    Arguments:
        path: The checkpoint file.
        advice: What the user should do, ending each error message.

    Raises:
        TrainingError: If the file is not a checkpoint that ``train`` wrote, naming the file.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise TrainingError(
            f"checkpoint {path} cannot be read ({exc.strerror or exc}); give this user (user id "
            f"{os.getuid()}) read access to it"
        ) from exc
    except (IsADirectoryError, FileNotFoundError) as exc:
        raise TrainingError(
            f"checkpoint {path} cannot be read ({exc.strerror or exc}); {advice}"
        ) from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        # A truncated file gives OSError (Invalid argument) from the zip reader.
        detail = str(exc).splitlines()[0] if str(exc) else "no details"
        if len(detail) > DETAIL_CHARS:
            detail = detail[: DETAIL_CHARS - 3] + "..."
        raise TrainingError(
            f"{path} is not a checkpoint written by `train` ({type(exc).__name__}: {detail}); "
            f"{advice}"
        ) from exc
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise TrainingError(
            f"{path} is not a checkpoint written by `train`: it lacks {', '.join(missing)}; "
            f"{advice}"
        )
    problem = _checkpoint_value_problem(state)
    if problem:
        raise TrainingError(
            f"checkpoint {path} has {problem}, which `train` never writes, so the file was "
            f"edited or damaged; {advice}"
        )
    return cast(dict[str, Any], state)


def export_weights(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Return the weights of a checkpoint that an export should publish: its best validated ones.

    ``best.pt`` contains the best weights as ``model``. ``checkpoint.pt`` contains the last
    step's weights as ``model`` and the best ones as ``best_model``, so both files export the same
    model.

    Raises:
        TrainingError: If the checkpoint contains no validated weights, naming the file.
    """
    best = state.get("best_model")
    problem = weights_problem(best, allow_none=True) or weights_problem(state["model"])
    if problem:
        raise TrainingError(
            f"checkpoint {path} has {problem}, which `train` never writes or publishes, so the "
            "file was edited or damaged; export the best.pt of another training run"
        )
    if isinstance(best, dict) and best:
        last = state["model"]
        if last.keys() != best.keys() or any(
            last[name].shape != best[name].shape or not torch.equal(last[name], best[name])
            for name in best
        ):
            logger.info(
                "export uses best validated weights checkpoint=%s step=%s "
                "best_validation_loss=%.4f; the last step's weights are not exported",
                path,
                state.get("step"),
                float(state.get("best_validation_loss", math.nan)),
            )
        return cast(dict[str, torch.Tensor], best)
    if not state.get("history"):
        raise TrainingError(
            f"checkpoint {path} contains the weights of step {state.get('step')}, which were "
            "never validated: training stopped before its first epoch ended. Run the same train "
            "command with --resume until an epoch ends, then export its best.pt"
        )
    return cast(dict[str, torch.Tensor], state["model"])


def _checkpoint_value_problem(state: dict[str, Any]) -> str:
    """Return a phrase naming a checkpoint value that training never writes, or ''."""
    scale_mv = state["scale_mv"]
    if not (isinstance(scale_mv, int | float) and math.isfinite(scale_mv) and scale_mv > 0):
        return f"scale_mv={scale_mv!r} (a positive number of mV)"
    classes = state["classes_known"]
    if not (
        isinstance(classes, list)
        and classes
        and all(name in AAMI_CLASSES for name in classes)
        and len(set(classes)) == len(classes)
    ):
        return f"classes_known={classes!r} (distinct names from {', '.join(AAMI_CLASSES)})"
    try:
        data = ApplianceConfig.from_dict(state["config"]).data
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return f"invalid settings under 'config' ({exc})"
    if not (math.isfinite(data.fs_hz) and data.fs_hz > 0):
        return f"config data fs_hz={data.fs_hz!r} (a positive rate in Hz)"
    return ""


def _load_resume_state(
    checkpoint_path: Path, resume: bool, context: DistributedContext
) -> dict[str, Any] | None:
    """Read the checkpoint on rank 0 and send it to the other ranks (None when none)."""
    state: dict[str, Any] | None = None
    if context.is_rank_zero and resume and checkpoint_path.exists():
        try:
            state = load_checkpoint(checkpoint_path, RESUME_ADVICE)
        except TrainingError as exc:
            raise TrainingError(f"cannot resume: {exc}") from exc
    if context.is_distributed:
        box: list[Any] = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    return state


def _to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a state dict on the CPU, so checkpoints load on machines without a GPU."""
    return {name: value.detach().cpu() for name, value in state.items()}


def _global_batch(
    windows: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    batch_index: int,
    step: int,
    settings: TrainConfig,
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Build batch ``batch_index`` of an epoch with the dequantisation noise of ``step``.

    Returns:
        Beat indices (batch,), noisy scaled beats (batch, leads, samples) and one-hot
        conditions (batch, classes), all on the CPU.
    """
    index = order[batch_index * settings.batch_size : (batch_index + 1) * settings.batch_size]
    x = torch.from_numpy(windows[index])  # (batch, leads, samples)
    noise = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    x = x + settings.noise_std * torch.randn(x.shape, generator=noise)
    condition = one_hot(torch.from_numpy(labels[index]))
    return index, x, condition


def _train(
    config: ApplianceConfig,
    train_beats: BeatSet,
    validation_beats: BeatSet,
    work_dir: Path,
    resume: bool,
    progress: bool,
    context: DistributedContext,
) -> TrainResult:
    settings = config.train
    device = context.device
    writes_files = context.is_rank_zero
    if writes_files:
        work_dir.mkdir(parents=True, exist_ok=True)
        check_checkpoint_paths(work_dir)
    checkpoint_path = work_dir / CHECKPOINT_FILE
    state = _load_resume_state(checkpoint_path, resume, context)
    if state is not None:
        _check_resumable(state, config, checkpoint_path, train_beats.beats_per_record())

    # Data: drop classes too rare to learn, cap the common ones, scale to unit deviation.
    counts = np.bincount(train_beats.labels, minlength=len(AAMI_CLASSES))
    classes_known, known = select_training_beats(
        train_beats.labels, settings.max_beats_per_class, settings.seed
    )
    scale_mv = float(train_beats.windows[known].std(dtype=np.float64))
    if state is not None:
        scale_mv, classes_known = float(state["scale_mv"]), list(state["classes_known"])
    windows = (train_beats.windows[known] / scale_mv).astype(np.float32)  # (beats, leads, samples)
    labels = train_beats.labels[known]
    records = train_beats.records[known]

    torch.manual_seed(settings.seed)
    model = ConditionalFlow(config.model, windows.shape[1], windows.shape[2], len(AAMI_CLASSES))
    model.to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    steps_per_epoch = max(1, labels.size // settings.batch_size)
    step, best_loss = 0, math.inf
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = []
    if state is not None:
        try:
            if state["best_model"] is not None:
                # Loaded first, so that a best_model of another shape fails here, not at the end.
                model.load_state_dict(state["best_model"])
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TrainingError(
                f"cannot resume from {checkpoint_path}: its weights or optimiser state do not "
                f"fit its own model settings ({first_line[:DETAIL_CHARS]}), so the file was "
                "edited or damaged. Start afresh: delete the checkpoint or pass another "
                "--work-dir"
            ) from exc
        step, best_loss = int(state["step"]), float(state["best_validation_loss"])
        best_state, history = state["best_model"], list(state["history"])
        logger.info("resume checkpoint=%s step=%d rank=%d", checkpoint_path, step, context.rank)
    elif resume and context.is_rank_zero:
        logger.warning(
            "no checkpoint to resume from checkpoint=%s; training starts at step 0. To resume "
            "another run, pass the work folder that contains its checkpoint.pt (--work-dir)",
            checkpoint_path,
        )

    def checkpoint() -> dict[str, Any]:
        return {
            "config": config.to_dict(),
            "step": step,
            "model": _to_cpu(model.state_dict()),
            "optimizer": optimizer.state_dict(),
            "scale_mv": scale_mv,
            "classes_known": classes_known,
            "best_validation_loss": best_loss,
            "best_model": None if best_state is None else _to_cpu(best_state),
            "history": history,
            # Beats per training record, so that an export can check it gets the same beats.
            "train_records": train_beats.beats_per_record(),
        }

    def save_checkpoint() -> None:
        if writes_files:
            _save(checkpoint_path, checkpoint())

    # bf16 autocast covers the loss's forward and inverse passes; weights, gradients and
    # optimiser moments stay float32.
    autocast = torch.autocast(
        device_type=device.type,
        dtype=torch.bfloat16,
        enabled=settings.mixed_precision == "bf16",
    )
    objective = _Objective(model, settings.reconstruction_weight)
    local_batch = settings.batch_size // context.world_size
    local_slice = slice(context.rank * local_batch, (context.rank + 1) * local_batch)
    if context.is_distributed and step == 0:
        # ActNorm sets its bias and scale from the first batch it sees in training mode. Each
        # rank runs that batch whole, as a single process would, instead of only its share.
        _, x, condition = _global_batch(
            windows,
            labels,
            _epoch_order(labels, settings.class_balance, settings.seed, 0),
            0,
            0,
            settings,
        )
        model.train()
        with torch.no_grad(), autocast:
            model(x.to(device), condition.to(device))
    trainable: torch.nn.Module = objective
    if context.is_distributed:
        trainable = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )

    total_steps = settings.max_epochs * steps_per_epoch
    if state is not None and step >= total_steps and context.is_rank_zero:
        logger.info(
            "resume finds the run complete step=%d max_epochs=%d; nothing is trained and the "
            "best weights are exported as they are. To train on, raise --epochs",
            step,
            settings.max_epochs,
        )
    budget_s = settings.max_minutes * 60.0
    started = time.monotonic()
    first_step = step
    # A bar redrawn into a log file or pipe buries the epoch lines, so it needs a terminal.
    show_bar = progress and context.is_rank_zero and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=step, disable=not show_bar, unit="step")
    log_progress = progress and context.is_rank_zero and not show_bar
    last_progress_log = time.monotonic()
    stopped_by = "epochs"
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, settings.max_epochs):
        order = _epoch_order(labels, settings.class_balance, settings.seed, epoch)
        trainable.train()
        running: list[float] = []
        for batch_index in range(step - epoch * steps_per_epoch, steps_per_epoch):
            index, x, condition = _global_batch(
                windows, labels, order, batch_index, step, settings
            )
            if context.is_distributed:
                index, x, condition = index[local_slice], x[local_slice], condition[local_slice]
            x, condition = x.to(device), condition.to(device)
            with autocast:
                loss, nll_bpd, _ = trainable(x, condition)
            loss_finite = bool(torch.isfinite(loss))
            # In a single process a non-finite loss stops before the backward pass. Across
            # ranks every rank must reach the gradient all-reduce first; a NaN loss on one
            # rank then makes the averaged gradient NaN on all, and all stop together below.
            if not loss_finite and not context.is_distributed:
                bar.close()
                raise NonFiniteLossError(step, sorted(set(records[index].tolist())))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gradient_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRADIENT_NORM)
            # A non-finite gradient would turn every weight into NaN at the optimiser step, and
            # the next checkpoint would store them; stop before either happens.
            if not loss_finite or not torch.isfinite(gradient_norm):
                bar.close()
                raise NonFiniteLossError(step, sorted(set(records[index].tolist())))
            optimizer.step()
            step += 1
            running.append(float(nll_bpd.detach()))
            bar.update(1)
            bar.set_postfix_str(
                f"epoch={epoch + 1}/{settings.max_epochs} loss_bpd={np.mean(running[-50:]):.3f}"
            )
            if log_progress and time.monotonic() - last_progress_log >= PROGRESS_LOG_S:
                last_progress_log = time.monotonic()
                logger.info(
                    "training progress epoch=%d/%d step=%d/%d loss_bpd=%.3f elapsed_s=%.0f",
                    epoch + 1,
                    settings.max_epochs,
                    step,
                    total_steps,
                    float(np.mean(running[-50:])),
                    last_progress_log - started,
                )
            # The epoch-end checkpoint covers the last batch, after validation has updated the
            # best model; saving before validation would let a resumed run skip that validation.
            last_batch = batch_index == steps_per_epoch - 1
            if step % settings.checkpoint_every_steps == 0 and not last_batch:
                save_checkpoint()
            if _stop_requested.is_set() and not last_batch and not context.is_distributed:
                bar.close()
                save_checkpoint()
                raise _stopped(step, checkpoint_path)
            # The budget ends the epoch early; validation and the checkpoint below still run,
            # so the model selection covers the last steps. Rank 0's clock decides for all, so
            # no rank leaves the loop while others train on.
            over_budget = context.is_rank_zero and time.monotonic() - started > budget_s
            if any_rank(over_budget, context):
                stopped_by = "time budget"
                break

        # NOTE: every rank evaluates the whole validation set; the ranks hold the same weights,
        # so they reach the same loss and the same best model without a collective.
        figures = evaluate(model, validation_beats, scale_mv, device)
        validation_bpd, validation_mse = figures.nll_bpd, figures.reconstruction_mse
        validation_loss = validation_bpd + settings.reconstruction_weight * figures.capped_mse
        if not math.isfinite(validation_loss):
            bar.close()
            raise NonFiniteLossError(step, ["validation"])
        if validation_loss < best_loss:
            best_loss = validation_loss
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(
            {
                "epoch": epoch + 1,
                "train_bpd": float(np.mean(running)) if running else math.nan,
                "validation_bpd": validation_bpd,
                "validation_reconstruction_mse": validation_mse,
                "validation_capped_mse": figures.capped_mse,
            }
        )
        if context.is_rank_zero:
            logger.info(
                "epoch=%d step=%d train_bpd=%.4f validation_bpd=%.4f validation_mse=%.5f "
                "validation_capped_mse=%.5f step_ms=%.1f elapsed_s=%.0f",
                epoch + 1,
                step,
                history[-1]["train_bpd"],
                validation_bpd,
                validation_mse,
                figures.capped_mse,
                1000.0 * (time.monotonic() - started) / max(1, step - first_step),
                time.monotonic() - started,
            )
        save_checkpoint()
        if _stop_requested.is_set() and not context.is_distributed:
            bar.close()
            raise _stopped(step, checkpoint_path)
        if stopped_by == "time budget":
            break
    bar.close()

    if best_state is not None:
        model.load_state_dict(best_state)
    if writes_files:
        _save(work_dir / BEST_FILE, {**checkpoint(), "model": _to_cpu(model.state_dict())})
    barrier(context)
    model.eval()
    final = evaluate(model, validation_beats, scale_mv, device)
    validation_bpd, validation_mse = final.nll_bpd, final.reconstruction_mse
    model.cpu()
    learnt = np.bincount(labels, minlength=len(AAMI_CLASSES))
    summary = {
        # The epoch reached, counted even when the budget ended it early. A run resumed inside
        # an epoch logs that epoch twice in the history, so len(history) would overcount.
        "epochs": int(history[-1]["epoch"]) if history else 0,
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "duration_s": round(time.monotonic() - started, 1),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "stopped_by": stopped_by,
        "validation_bpd": finite_or_none(validation_bpd),
        "validation_reconstruction_mse": finite_or_none(validation_mse),
        "best_validation_loss": finite_or_none(best_loss),
        "scale_mv": scale_mv,
        # train_class_counts counts every training beat. train_beats and learnt_class_counts
        # count the beats training learnt from, after the unknown classes and the cap.
        "train_beats": int(labels.size),
        "train_class_counts": {n: int(counts[i]) for i, n in enumerate(AAMI_CLASSES)},
        "learnt_class_counts": {n: int(learnt[i]) for i, n in enumerate(AAMI_CLASSES)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": [
            {name: finite_or_none(value) for name, value in epoch.items()} for epoch in history
        ],
        "device": str(device),
        "mixed_precision": settings.mixed_precision,
        "world_size": context.world_size,
    }
    logger.info(
        "training done epoch_reached=%d steps=%d validation_bpd=%.4f duration_s=%.1f rank=%d",
        summary["epochs"],
        step,
        validation_bpd,
        summary["duration_s"],
        context.rank,
    )
    return TrainResult(
        model=model, scale_mv=scale_mv, classes_known=classes_known, summary=summary
    )


def _stopped(step: int, checkpoint_path: Path) -> TrainingStoppedError:
    """Build the error that ends a training run stopped by a signal."""
    signum = _stop_signum[0]
    return TrainingStoppedError(
        f"training stopped by {signal.strsignal(signum)} at step {step}; the checkpoint "
        f"{checkpoint_path} is saved and nothing was exported. Run the same train command with "
        "--resume (and the same --work-dir) to continue",
        signum,
        step=step,
        checkpoint=checkpoint_path,
    )
