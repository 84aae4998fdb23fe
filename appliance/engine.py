"""Inference on the exported graphs with ONNX Runtime: scoring, validation and generation.

This module and everything it imports stay free of PyTorch, so the serving process loads only
the ONNX graphs and the files the manifest lists.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from appliance.classes import AAMI_CLASSES
from appliance.errors import ModelStoreError
from appliance.latent_prior import LatentPrior
from appliance.lead_check import LeadCheck
from appliance.privacy import NearestNeighbourIndex, privacy_space
from appliance.scoring import FEATURES, Calibration, compute_features, morphology_centroids
from appliance.store import ModelVersion

logger = logging.getLogger(__name__)

INFERENCE_BATCH = 256
# Relative z -> x -> z error, ||z_back - z|| / ||z||, above which a generated beat counts as
# numerically unstable and is rejected.
ROUNDTRIP_REJECT_REL_ERROR = 1e-4
# Floor of ||z|| in that relative error, so that draws near z = 0 are judged on absolute error.
_ROUNDTRIP_MIN_NORM = 1e-3


@dataclass
class Scored:
    """Scores of a batch of beats.

    Attributes:
        scores: Pertinence scores in [0, 1], shape (beats,).
        classes: Class index each beat was scored under, shape (beats,).
        features: Statistics behind the scores, shape (beats, len(FEATURES)), columns in
            ``appliance.scoring.FEATURES`` order.
        z: Latent values, shape (beats, latent_dims).
    """

    scores: np.ndarray
    classes: np.ndarray
    features: np.ndarray
    z: np.ndarray


# GenerateResult fields that count draws, summed by ``merge_results``.
COUNT_FIELDS = (
    "draws",
    "pertinence_rejections",
    "privacy_rejections",
    "invalid_rejections",
    "non_finite_rejections",
    "amplitude_rejections",
    "unstable_rejections",
    "surplus_dropped",
)


@dataclass
class GenerateResult:
    """Accepted beats and the counts of one generation run.

    Attributes:
        beats: Accepted scaled beats, shape (accepted, leads, window_samples).
        classes: Class index of each accepted beat, shape (accepted,).
        scores: Pertinence score of each accepted beat, shape (accepted,).
        z: Latent values each accepted beat was generated from, shape (accepted, latent_dims).
        draws: Latent draws made.
        pertinence_rejections: Draws whose score was below the margin.
        privacy_rejections: Draws closer to a training beat than the privacy threshold.
        invalid_rejections: Draws rejected before scoring, the sum of the three counts below.
        non_finite_rejections: Draws whose beat had a NaN or infinite value.
        amplitude_rejections: Draws whose beat exceeded ``max_abs_mv``.
        unstable_rejections: Draws whose z -> x -> z relative error exceeded
            ``ROUNDTRIP_REJECT_REL_ERROR``.
        surplus_dropped: Draws that passed every check after their class had its count, dropped
            because a batch draws several candidates at once.
        budget_exhausted: True if some class did not reach its count within the draw budget.
        per_class_draws: Draws per class name.
        privacy_threshold: Distance below which a draw was a near-copy, in the privacy space.
    """

    beats: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    z: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    draws: int = 0
    pertinence_rejections: int = 0
    privacy_rejections: int = 0
    invalid_rejections: int = 0
    non_finite_rejections: int = 0
    amplitude_rejections: int = 0
    unstable_rejections: int = 0
    surplus_dropped: int = 0
    budget_exhausted: bool = False
    per_class_draws: dict[str, int] = field(default_factory=dict)
    privacy_threshold: float = 0.0


def merge_results(results: list[GenerateResult]) -> GenerateResult:
    """Combine the results of consecutive ``Engine.generate`` calls into one, in call order.

    Raises:
        ValueError: If ``results`` is empty.
    """
    if not results:
        raise ValueError("merge_results needs at least one result")
    merged = GenerateResult(
        beats=np.concatenate([r.beats for r in results]),
        classes=np.concatenate([r.classes for r in results]),
        scores=np.concatenate([r.scores for r in results]),
        z=np.concatenate([r.z for r in results]),
        privacy_threshold=results[0].privacy_threshold,
    )
    for result in results:
        for name in COUNT_FIELDS:
            setattr(merged, name, getattr(merged, name) + getattr(result, name))
        merged.budget_exhausted |= result.budget_exhausted
        for name, draws in result.per_class_draws.items():
            merged.per_class_draws[name] = merged.per_class_draws.get(name, 0) + draws
    return merged


def available_providers(require_gpu: bool = False) -> list[str]:
    """Return ONNX Runtime providers to use: CUDA first when present, then CPU.

    Raises:
        RuntimeError: If ``require_gpu`` is set and the CUDA provider is not available.
    """
    present = ort.get_available_providers()
    if "CUDAExecutionProvider" in present:
        # onnxruntime-gpu lists CUDA whenever it was built with it. The CUDA and cuDNN
        # libraries of the nvidia-* wheels are not on the loader path, and the serving process
        # never imports PyTorch (which would load them), so load them here.
        ort.preload_dlls(cuda=True, cudnn=True, msvc=False, directory="")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if require_gpu:
        raise RuntimeError(
            f"a GPU is required but ONNX Runtime offers only {present}; install "
            "onnxruntime-gpu with CUDA or drop --require-gpu"
        )
    return ["CPUExecutionProvider"]


@contextlib.contextmanager
def _loading(version: ModelVersion, key: str) -> Iterator[None]:
    """Turn a failure to load one version file into a ``ModelStoreError`` that names it.

    The file's hash matched the manifest, so such a failure means a writer replaced the file
    and recomputed the manifest, or export wrote a file this version cannot read.
    """
    try:
        yield
    except ModelStoreError:
        raise
    except Exception as exc:  # ONNX Runtime and NumPy raise many types for a bad file
        detail = str(exc).splitlines()[0] if str(exc) else "no details"
        if "pickle" in detail:
            # NumPy's own text suggests loading the file with pickle, which would run its code.
            detail = "the file contains Python objects, which export never writes"
        raise ModelStoreError(
            f"model store file {version.file(key)} ({key}) cannot be used: "
            f"{type(exc).__name__}: {detail[:200]}. The version's files do not fit together; "
            "restore the version, or publish the model again with `python -m appliance export` "
            "or `train`"
        ) from exc


def _finite_arrays(version: ModelVersion, key: str) -> dict[str, np.ndarray]:
    """Read a version's ``.npz`` file without pickle; raise ValueError on a non-finite array."""
    with np.load(version.file(key), allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    for name, values in arrays.items():
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            raise ValueError(f"array {name} contains NaN or infinite values")
    return arrays


def _check_graph_inputs(engine: Engine, version: ModelVersion) -> None:
    """Raise ``ModelStoreError`` unless each graph takes the inputs the manifest describes."""
    expected = {
        "forward_graph": (engine.forward_session, "x", [len(engine.leads), engine.window_samples]),
        "inverse_graph": (engine.inverse_session, "z", [engine.latent_dims]),
    }
    for key, (session, data_input, shape) in expected.items():
        inputs = {item.name: item.shape for item in session.get_inputs()}
        if set(inputs) != {data_input, "condition"} or list(inputs[data_input][1:]) != shape:
            found = ", ".join(f"{name} {dims}" for name, dims in inputs.items())
            raise ModelStoreError(
                f"model store file {version.file(key)} ({key}) takes inputs {found}, but the "
                f"manifest describes {data_input} [batch, {', '.join(map(str, shape))}] and "
                "condition; the graphs are swapped or come from another model. Restore the "
                "version, or publish the model again with `python -m appliance export` or `train`"
            )


class Engine:
    """The served model: both ONNX graphs, the calibration and the privacy index.

    Arguments:
        version: A verified model store version.
        intra_op_threads: ONNX Runtime threads per graph call (0 lets ONNX Runtime choose).
        require_gpu: Raise unless the CUDA execution provider is available.
    """

    def __init__(
        self, version: ModelVersion, intra_op_threads: int = 0, require_gpu: bool = False
    ) -> None:
        manifest = version.manifest
        self.version = version
        self.manifest = manifest
        contract = manifest["data"]
        self.fs_hz = float(contract["fs_hz"])
        self.window_samples = int(contract["window_samples"])
        self.pre_r_samples = int(contract["pre_r_samples"])
        self.leads = list(contract["leads"])
        self.scale_mv = float(contract["scale_mv"])
        self.bottleneck_dims = int(manifest["model"]["bottleneck_dims"])
        self.latent_dims = int(manifest["model"]["latent_dims"])
        self.classes_known = [AAMI_CLASSES.index(c) for c in manifest["classes_known"]]
        gate = manifest["gate"]
        self.default_margin = float(gate["default_margin"])
        self.min_margin = float(gate["min_margin"])
        self.max_margin = float(gate["max_margin"])
        self.truncation = float(gate["truncation"])
        # Stores exported before the tail scale existed keep the tail at zero.
        self.tail_scale = float(gate.get("tail_scale", 0.0))
        self.max_abs_mv = float(gate["max_abs_mv"])
        self.privacy_threshold = float(manifest.get("privacy", {}).get("threshold", 0.0))
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # ONNX Runtime's CPU arena grows to the most runs served at once and never shrinks: one
        # more full batch of the default model at once added about 60 MiB. Without it, a run's
        # buffers come from the C allocator, whose arenas the server caps
        # (``appliance.allocator``), at the same speed for batches of 256.
        options.enable_cpu_mem_arena = False
        providers = available_providers(require_gpu)
        with _loading(version, "forward_graph"):
            self.forward_session = ort.InferenceSession(
                str(version.file("forward_graph")), options, providers=providers
            )
        with _loading(version, "inverse_graph"):
            self.inverse_session = ort.InferenceSession(
                str(version.file("inverse_graph")), options, providers=providers
            )
        _check_graph_inputs(self, version)
        self.execution_provider = self.forward_session.get_providers()[0]
        if providers[0] != self.execution_provider:
            # ONNX Runtime falls back to the next provider when CUDA fails to start, for example
            # without a GPU or without the NVIDIA driver in the container.
            if require_gpu:
                raise RuntimeError(
                    f"a GPU is required but ONNX Runtime could not start {providers[0]} and "
                    f"fell back to {self.execution_provider}; run with a GPU and its driver "
                    "(docker run --gpus all) or drop --require-gpu"
                )
            logger.warning(
                "execution provider fallback requested=%s used=%s",
                providers[0],
                self.execution_provider,
            )
        # Export builds a draft version with the graphs only, to calibrate on them.
        self.calibration: Calibration | None = None
        self.privacy_index: NearestNeighbourIndex | None = None
        if "calibration" in manifest["files"]:
            with _loading(version, "calibration"):
                self.calibration = Calibration.from_arrays(_finite_arrays(version, "calibration"))
                if self.calibration.evidence.shape != self.calibration.feature_values.shape[:1]:
                    raise ValueError(
                        f"evidence has shape {self.calibration.evidence.shape} for "
                        f"{self.calibration.feature_values.shape[0]} calibration beats"
                    )
            calibrated = self.calibration.feature_values.shape[1]
            if calibrated != len(FEATURES):
                raise ModelStoreError(
                    f"model {manifest['model_id']} is calibrated on {calibrated} statistics, "
                    f"this version of the appliance scores with {len(FEATURES)}; retrain or "
                    "re-export the model with this version"
                )
        self.latent_prior = LatentPrior.standard(
            len(AAMI_CLASSES), self.bottleneck_dims, self.latent_dims
        )
        if "latent_prior" in manifest["files"]:
            with _loading(version, "latent_prior"):
                self.latent_prior = LatentPrior.from_arrays(
                    _finite_arrays(version, "latent_prior")
                )
        self.lead_check: LeadCheck | None = None
        if "lead_check" in manifest["files"]:
            with _loading(version, "lead_check"):
                self.lead_check = LeadCheck.from_arrays(_finite_arrays(version, "lead_check"))
        self.centroids: np.ndarray | None = None
        if "privacy_index" in manifest["files"]:
            with _loading(version, "privacy_index"):
                vectors = np.load(version.file("privacy_index"), allow_pickle=False)
                dims = len(self.leads) * self.window_samples
                if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] != dims:
                    raise ValueError(
                        f"shape {vectors.shape}, expected (training beats, {dims}) for "
                        f"{len(self.leads)} leads of {self.window_samples} samples"
                    )
                if not np.isfinite(vectors).all():
                    raise ValueError("NaN or infinite values")
                self.privacy_index = NearestNeighbourIndex(vectors)
                self.centroids = morphology_centroids(self.privacy_index.vectors)
        logger.info(
            "engine loaded model_id=%s provider=%s threads=%d",
            manifest["model_id"],
            self.execution_provider,
            intra_op_threads,
        )

    # Graph calls ---------------------------------------------------------------------------

    def _one_hot(self, classes: np.ndarray) -> np.ndarray:
        return np.eye(len(AAMI_CLASSES), dtype=np.float32)[classes]

    def forward(self, x: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the forward graph on scaled beats (beats, leads, samples): ``(z, log_det)``."""
        zs, log_dets = [], []
        for start in range(0, x.shape[0], INFERENCE_BATCH):
            z, log_det = self.forward_session.run(
                None,
                {
                    "x": x[start : start + INFERENCE_BATCH].astype(np.float32),
                    "condition": self._one_hot(classes[start : start + INFERENCE_BATCH]),
                },
            )
            zs.append(z)
            log_dets.append(log_det)
        return np.concatenate(zs), np.concatenate(log_dets)

    def inverse(self, z: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Run the inverse graph on latent values (beats, latent_dims): scaled beats."""
        xs = []
        for start in range(0, z.shape[0], INFERENCE_BATCH):
            (x,) = self.inverse_session.run(
                None,
                {
                    "z": z[start : start + INFERENCE_BATCH].astype(np.float32),
                    "condition": self._one_hot(classes[start : start + INFERENCE_BATCH]),
                },
            )
            xs.append(x)
        return np.concatenate(xs)

    def truncate(self, z: np.ndarray) -> np.ndarray:
        """Zero every latent value after the bottleneck, shape kept."""
        out = np.zeros_like(z)
        out[:, : self.bottleneck_dims] = z[:, : self.bottleneck_dims]
        return out

    def warm_up(self, concurrent_runs: int) -> None:
        """Generate one full batch in each of ``concurrent_runs`` threads at once.

        The C allocator keeps the peak of each of its arenas after a call. Without a warm up,
        a server's memory steps up the first time all its engine slots draw a full batch at
        once. After it, the memory that the server logs when it starts serving already
        contains that step.

        Arguments:
            concurrent_runs: Calls at the same time, the server's engine slots.
        """
        class_index = self.classes_known[0]
        start = threading.Barrier(concurrent_runs)
        failures: list[BaseException] = []

        def run(seed: int) -> None:
            try:
                start.wait()
                # A budget of two draws per beat is one batch of INFERENCE_BATCH draws. Margin 0
                # passes every valid draw to the privacy search, as the calls' accepted beats.
                self.generate(
                    {class_index: INFERENCE_BATCH // 2},
                    temperature=1.0,
                    margin=0.0,
                    seed=seed,
                    max_draws_per_beat=2,
                )
            except BaseException as exc:  # re-raised in the calling thread below
                start.abort()
                failures.append(exc)

        started: list[threading.Thread] = []
        try:
            for seed in range(concurrent_runs):
                thread = threading.Thread(target=run, args=(seed,), name=f"warm-up-{seed}")
                thread.start()
                started.append(thread)
        except BaseException:
            start.abort()  # the started threads wait at the barrier for the others
            raise
        finally:
            for thread in started:
                thread.join()
        real = [exc for exc in failures if not isinstance(exc, threading.BrokenBarrierError)]
        if real:
            raise real[0]

    # Scoring -------------------------------------------------------------------------------

    def features(self, x: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Compute the scoring statistics of scaled beats.

        Arguments:
            x: Scaled beats, shape (beats, leads, window_samples).
            classes: Class index per beat, shape (beats,).

        Returns:
            Statistics, shape (beats, len(FEATURES)), and latent values, shape
            (beats, latent_dims).
        """
        if self.centroids is None:
            raise RuntimeError("engine has no privacy index; load a published model version")
        z, log_det = self.forward(x, classes)
        x_projected = self.inverse(self.truncate(z), classes)
        features = compute_features(
            x,
            z,
            log_det,
            x_projected,
            self.centroids,
            self.bottleneck_dims,
            self.fs_hz,
            self.pre_r_samples,
            self.lead_match(x),
        )
        assert features.shape[1] == len(FEATURES)
        return features, z

    def lead_match(self, x: np.ndarray) -> np.ndarray:
        """Return the lead check logit per beat (beats, leads, samples), zeros without a check."""
        if self.lead_check is None:
            return np.zeros(x.shape[0])
        return self.lead_check.logit(x)

    def best_classes(self, x: np.ndarray) -> np.ndarray:
        """Return the known class of highest likelihood for each scaled beat, shape (beats,)."""
        best = np.zeros(x.shape[0], dtype=np.int64)
        best_log_prob = np.full(x.shape[0], -np.inf)
        for class_index in self.classes_known:
            classes = np.full(x.shape[0], class_index, dtype=np.int64)
            z, log_det = self.forward(x, classes)
            log_prob = -0.5 * (z.astype(np.float64) ** 2).sum(axis=1) + log_det
            better = log_prob > best_log_prob
            best[better] = class_index
            best_log_prob[better] = log_prob[better]
        return best

    def score(self, x: np.ndarray, classes: np.ndarray | None = None) -> Scored:
        """Score scaled beats under given classes, or under their best-fitting known class.

        Arguments:
            x: Scaled beats, shape (beats, leads, window_samples); must be finite.
            classes: Class index per beat, or -1 where unknown; ``None`` means all unknown.
        """
        resolved = np.full(x.shape[0], -1, dtype=np.int64) if classes is None else classes.copy()
        unknown = resolved < 0
        if unknown.any():
            resolved[unknown] = self.best_classes(x[unknown])
        features, z = self.features(x, resolved)
        if self.calibration is None:
            raise RuntimeError("engine has no calibration; load a published model version")
        return Scored(self.calibration.score(features), resolved, features, z)

    def privacy_distance(self, beats: np.ndarray) -> np.ndarray:
        """Return each beat's distance to its nearest training beat, shape (beats,)."""
        if self.privacy_index is None:
            raise RuntimeError("engine has no privacy index; load a published model version")
        return self.privacy_index.nearest_distance(privacy_space(beats))

    # Generation ----------------------------------------------------------------------------

    def draw_latent(
        self, rng: np.random.Generator, count: int, temperature: float, class_index: int
    ) -> np.ndarray:
        """Draw latent values of one class from the generation prior.

        ``e`` is standard normal, redrawn until ``|e| <= truncation``, and the prior maps it to
        ``z[:k] = mean_c + temperature * chol_c @ e[:k]`` and
        ``z[k:] = tail_mean_c + tail_scale * temperature * tail_std_c * e[k:]``. With
        ``tail_scale`` 0 only ``e[:k]`` is drawn. The prior is the one fitted at export
        (``appliance.latent_prior``), or the standard normal for a model exported without one.

        Returns:
            Latent values, shape (count, latent_dims), float32.
        """
        return self.latent_prior.sample(
            rng, count, class_index, temperature, self.truncation, self.tail_scale
        )

    def generate(
        self,
        counts: dict[int, int],
        temperature: float,
        margin: float,
        seed: int,
        max_draws_per_beat: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerateResult:
        """Draw, gate and collect beats until each class has its count or the budget runs out.

        Arguments:
            counts: Requested beats per class index.
            temperature: Multiplier of the latent standard deviation.
            margin: Lowest accepted pertinence score.
            seed: Seed of the draws.
            max_draws_per_beat: Draw budget per requested beat.
            should_stop: Optional callable returning True to stop early (a cancelled call).

        Returns:
            Accepted scaled beats (beats, leads, window_samples), their classes and scores, and
            the counts of draws and rejections.
        """
        run = self.start_generate(counts, temperature, margin, seed, max_draws_per_beat)
        run.advance(should_stop)
        return run.finish()

    def start_generate(
        self,
        counts: dict[int, int],
        temperature: float,
        margin: float,
        seed: int,
        max_draws_per_beat: int,
    ) -> GenerateRun:
        """Return a generation run that ``advance`` draws for, with the arguments of ``generate``.

        ``generate`` is ``advance`` to the end and ``finish``; a run advanced in several steps
        returns the same beats.
        """
        return GenerateRun(self, counts, temperature, margin, seed, max_draws_per_beat)

    def gate(
        self,
        x: np.ndarray,
        z: np.ndarray,
        labels: np.ndarray,
        margin: float,
        result: GenerateResult,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply the validity checks, the pertinence margin and the privacy guard to candidates.

        Arguments:
            x: Candidate scaled beats, shape (beats, leads, window_samples).
            z: Latent values they came from, shape (beats, latent_dims).
            labels: Class index of each candidate, shape (beats,).
            margin: Lowest accepted pertinence score.
            result: Run whose rejection counts are increased.

        Returns:
            Boolean mask of accepted candidates, shape (beats,), and each candidate's
            pertinence score, shape (beats,), 0 where it was not scored.
        """
        accepted = self._valid(x, z, labels, result)
        scores = np.zeros(x.shape[0])
        if accepted.any():
            index = np.flatnonzero(accepted)
            scores[index] = self.score(x[index], labels[index]).scores
            passed = scores[index] >= margin
            result.pertinence_rejections += int((~passed).sum())
            accepted[index[~passed]] = False
        if accepted.any():
            index = np.flatnonzero(accepted)
            private = self.privacy_distance(x[index]) >= self.privacy_threshold
            result.privacy_rejections += int((~private).sum())
            accepted[index[~private]] = False
        return accepted, scores

    def _valid(
        self, x: np.ndarray, z: np.ndarray, labels: np.ndarray, result: GenerateResult
    ) -> np.ndarray:
        """Mark draws that are finite, within ``max_abs_mv`` and map back to their ``z``.

        Arguments:
            x: Generated scaled beats, shape (beats, leads, window_samples).
            z: Latent values they came from, shape (beats, latent_dims).
            labels: Class index of each draw, shape (beats,).
            result: Run whose rejection counts are increased.

        Returns:
            Boolean mask of the draws to score, shape (beats,).
        """
        finite = np.isfinite(x).all(axis=(1, 2))
        within = np.zeros_like(finite)
        within[finite] = np.abs(x[finite]).max(axis=(1, 2)) * self.scale_mv <= self.max_abs_mv
        stable = np.zeros_like(finite)
        if within.any():
            z_back, _ = self.forward(x[within], labels[within])
            z_within = z[within].astype(np.float64)
            error = np.linalg.norm(z_back.astype(np.float64) - z_within, axis=1)
            norm = np.maximum(np.linalg.norm(z_within, axis=1), _ROUNDTRIP_MIN_NORM)
            stable[within] = error / norm <= ROUNDTRIP_REJECT_REL_ERROR
        result.non_finite_rejections += int((~finite).sum())
        result.amplitude_rejections += int((finite & ~within).sum())
        result.unstable_rejections += int((within & ~stable).sum())
        result.invalid_rejections += int((~stable).sum())
        return stable


def default_threads() -> int:
    """Return the CPU count available to this process (the container's CPU quota if set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class GenerateRun:
    """A generation run that can pause between batches and go on with the same draws.

    The random state and the counts live in the run, so the beats do not depend on where it
    paused. The server pauses a long run to send a progress message.

    Arguments:
        engine: Engine that draws, inverts and gates.
        counts: Requested beats per class index.
        temperature: Multiplier of the latent standard deviation.
        margin: Lowest accepted pertinence score.
        seed: Seed of the draws.
        max_draws_per_beat: Draw budget per requested beat.
    """

    def __init__(
        self,
        engine: Engine,
        counts: dict[int, int],
        temperature: float,
        margin: float,
        seed: int,
        max_draws_per_beat: int,
    ) -> None:
        self.engine = engine
        self.temperature = temperature
        self.margin = margin
        self.max_draws_per_beat = max_draws_per_beat
        self._rng = np.random.default_rng(seed)
        self._classes = sorted(counts.items())
        # Index into _classes of the class being drawn, and that class's counts so far.
        self._position = 0
        self._accepted = 0
        self._drawn = 0
        self._beats: list[np.ndarray] = []
        self._class_indices: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._latents: list[np.ndarray] = []
        self.result = GenerateResult(
            beats=np.zeros(0),
            classes=np.zeros(0),
            scores=np.zeros(0),
            privacy_threshold=engine.privacy_threshold,
        )

    @property
    def done(self) -> bool:
        """True when every class has its count or has used its draw budget."""
        return self._position >= len(self._classes)

    def advance(
        self, should_stop: Callable[[], bool] | None = None, until_s: float = math.inf
    ) -> None:
        """Draw batches until the run is done, ``should_stop`` returns True, or time runs out.

        Arguments:
            should_stop: Optional callable returning True to stop early (a cancelled call).
            until_s: ``time.monotonic()`` value after which no new batch starts. A call on a
                run that is not done draws at least one batch unless ``should_stop`` returns
                True, so a run always moves on.
        """
        drew = False
        while not self.done:
            class_index, requested = self._classes[self._position]
            budget = requested * self.max_draws_per_beat
            if self._accepted >= requested or self._drawn >= budget:
                self._close_class()
                continue
            if should_stop is not None and should_stop():
                return
            if drew and time.monotonic() >= until_s:
                return
            self._draw_batch(class_index, requested, budget)
            drew = True

    def finish(self) -> GenerateResult:
        """Return the run's result; classes not finished count as out of budget.

        A run stopped early (``should_stop``) ends here too, with the beats accepted so far.
        """
        while not self.done:
            self._close_class()
        engine = self.engine
        result = self.result
        shape = (0, len(engine.leads), engine.window_samples)
        result.beats = np.concatenate(self._beats) if self._beats else np.zeros(shape, np.float32)
        result.classes = (
            np.concatenate(self._class_indices)
            if self._class_indices
            else np.zeros(0, dtype=np.int64)
        )
        result.scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        result.z = (
            np.concatenate(self._latents)
            if self._latents
            else np.zeros((0, engine.latent_dims), dtype=np.float32)
        )
        return result

    def _draw_batch(self, class_index: int, requested: int, budget: int) -> None:
        """Draw, invert and gate one batch of the current class."""
        engine = self.engine
        batch = int(
            min(INFERENCE_BATCH, max(8, 2 * (requested - self._accepted)), budget - self._drawn)
        )
        z = engine.draw_latent(self._rng, batch, self.temperature, class_index)
        labels = np.full(batch, class_index, dtype=np.int64)
        x = engine.inverse(z, labels)
        self._drawn += batch
        accepted_mask, batch_scores = engine.gate(x, z, labels, self.margin, self.result)
        passed_index = np.flatnonzero(accepted_mask)
        take_index = passed_index[: requested - self._accepted]
        self.result.surplus_dropped += passed_index.size - take_index.size
        self._beats.append(x[take_index])
        self._scores.append(batch_scores[take_index])
        self._latents.append(z[take_index])
        self._class_indices.append(np.full(take_index.size, class_index, dtype=np.int64))
        self._accepted += take_index.size

    def _close_class(self) -> None:
        """Add the current class's draws to the result and move to the next class."""
        class_index, requested = self._classes[self._position]
        self.result.draws += self._drawn
        self.result.per_class_draws[AAMI_CLASSES[class_index]] = self._drawn
        if self._accepted < requested:
            self.result.budget_exhausted = True
        self._position += 1
        self._accepted = 0
        self._drawn = 0
