"""Export of the trained flow to ONNX, parity checks, calibration and publication to the store."""

from __future__ import annotations

import logging
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from appliance.classes import AAMI_CLASSES
from appliance.config import ApplianceConfig
from appliance.dataset import BeatSet
from appliance.engine import Engine
from appliance.errors import ApplianceError
from appliance.flow import ConditionalFlow
from appliance.graph_form import graph_form
from appliance.latent_prior import (
    BEATS_PER_COMPONENT,
    MAX_FIT_BEATS_PER_CLASS,
    MIN_BEATS,
    SHRINKAGE_BEATS,
    LatentPrior,
)
from appliance.lead_check import HIDDEN_UNITS, LeadCheck
from appliance.privacy import NearestNeighbourIndex, privacy_space
from appliance.scoring import FEATURES, Calibration
from appliance.store import (
    ModelVersion,
    discard_partial,
    new_version_dir,
    publish_version,
)
from appliance.train import TrainResult, finite_or_none, one_hot, raise_if_stop_requested

logger = logging.getLogger(__name__)
# Model id of the engine that calibrates and checks a version before it is published.
UNPUBLISHED_MODEL_ID = "unpublished-calibration"

# Opset 20 has a Gelu operator, which ONNX Runtime runs as one kernel. At opset 18 the exporter
# spells GELU out as Div, Erf, Add and Mul, and the forward graph ran about 1.26 times slower
# (ONNX Runtime 1.32, one thread, batch 256).
OPSET_VERSION = 20
# Largest difference allowed between ONNX Runtime and PyTorch outputs (float32), relative to the
# larger of 1 and the largest magnitude of the PyTorch output in the same beat. An absolute limit
# of 1e-3 failed once on a briefly trained model (difference 1.5e-3), whose latent values are
# larger than 1.
PARITY_TOLERANCE = 1e-3
# Largest relative error of inverse(forward(x)) through ONNX Runtime on real beats.
ROUNDTRIP_MAX_REL_ERROR = 1e-4
PARITY_BEATS = 256


class ExportError(ApplianceError):
    """The exported graphs disagree with PyTorch or do not invert each other."""


class ForwardGraph(nn.Module):
    """x (batch, leads, samples), condition (batch, classes) -> z (batch, dims), log_det."""

    def __init__(self, flow: ConditionalFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.flow(x, condition)


class InverseGraph(nn.Module):
    """z (batch, dims), condition (batch, classes) -> x (batch, leads, samples)."""

    def __init__(self, flow: ConditionalFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x, _ = self.flow.inverse(z, condition)
        return x


def export_graphs(model: ConditionalFlow, folder: Path) -> tuple[Path, Path]:
    """Write ``forward.onnx`` and ``inverse.onnx`` with a dynamic batch axis.

    The graphs hold ``graph_form(model)``, the same function with faster operators.
    """
    model.eval()
    model.freeze_inverse()
    graph_model = graph_form(model)
    classes = len(AAMI_CLASSES)
    x = torch.zeros(2, model.leads, model.window_samples)
    z = torch.zeros(2, model.latent_dims)
    condition = one_hot(torch.tensor([0, 1]), classes)
    batch = torch.export.Dim("batch", min=1)
    forward_path, inverse_path = folder / "forward.onnx", folder / "inverse.onnx"
    # In torch 2.13 the exporter's internals emit deprecation and shape-naming warnings that
    # concern the exporter, not this model, so they are silenced for the export calls only.
    exporter_logger = logging.getLogger("torch.onnx")
    exporter_level = exporter_logger.level
    exporter_logger.setLevel(logging.ERROR)  # "torchvision is not installed" notices
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        program = torch.onnx.export(
            ForwardGraph(graph_model).eval(),
            (x, condition),
            input_names=["x", "condition"],
            output_names=["z", "log_det"],
            dynamic_shapes={"x": {0: batch}, "condition": {0: batch}},
            opset_version=OPSET_VERSION,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        assert program is not None
        program.save(str(forward_path))
        program = torch.onnx.export(
            InverseGraph(graph_model).eval(),
            (z, condition),
            input_names=["z", "condition"],
            output_names=["x"],
            dynamic_shapes={"z": {0: batch}, "condition": {0: batch}},
            opset_version=OPSET_VERSION,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        assert program is not None
        program.save(str(inverse_path))
    exporter_logger.setLevel(exporter_level)
    return forward_path, inverse_path


def scaled_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """Return the largest ``|actual - expected|`` over a beat divided by ``max(1, max|expected|)``.

    Arguments:
        actual: Outputs to check, shape (beats, ...).
        expected: Reference outputs, same shape.

    Returns:
        The largest scaled difference over all beats; NaN anywhere gives NaN.
    """
    difference = np.abs(actual - expected).reshape(len(expected), -1).max(axis=1)
    magnitude = np.abs(expected).reshape(len(expected), -1).max(axis=1)
    return float((difference / np.maximum(magnitude, 1.0)).max())


def parity_figures(
    x: np.ndarray,
    torch_outputs: tuple[np.ndarray, np.ndarray, np.ndarray],
    onnx_outputs: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, float]:
    """Compare ONNX Runtime outputs with PyTorch outputs on the same beats.

    Arguments:
        x: Scaled beats, shape (beats, leads, window_samples).
        torch_outputs: PyTorch ``z`` (beats, dims), ``log_det`` (beats,) and the inverse of
            that ``z``, shape of ``x``.
        onnx_outputs: The same three from the ONNX graphs, the inverse taken of ONNX's ``z``.

    Returns:
        Each check's figure by name.

    Raises:
        ExportError: If a figure exceeds ``PARITY_TOLERANCE`` or ``ROUNDTRIP_MAX_REL_ERROR``,
            or is NaN.
    """
    z_torch, log_det_torch, x_torch = torch_outputs
    z_onnx, log_det_onnx, x_onnx = onnx_outputs
    figures = {
        "parity_z_max_scaled_diff": scaled_difference(z_onnx, z_torch),
        "parity_log_det_max_scaled_diff": scaled_difference(log_det_onnx, log_det_torch),
        "parity_x_max_scaled_diff": scaled_difference(x_onnx, x_torch),
        "roundtrip_max_rel_error": float(
            (
                np.linalg.norm((x_onnx - x).reshape(len(x), -1), axis=1)
                / np.linalg.norm(x.reshape(len(x), -1), axis=1)
            ).max()
        ),
    }
    for name, limit in (
        ("parity_z_max_scaled_diff", PARITY_TOLERANCE),
        ("parity_log_det_max_scaled_diff", PARITY_TOLERANCE),
        ("parity_x_max_scaled_diff", PARITY_TOLERANCE),
        ("roundtrip_max_rel_error", ROUNDTRIP_MAX_REL_ERROR),
    ):
        if not figures[name] <= limit:
            raise ExportError(
                f"exported graphs failed the {name} check: {figures[name]:.3g} > "
                f"{limit:g}; nothing was published"
            )
    return figures


def check_parity(
    model: ConditionalFlow, engine: Engine, x: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Compare ONNX Runtime with PyTorch on real beats and check the ONNX round trip.

    Arguments:
        model: The trained flow, in evaluation mode.
        engine: An engine on the exported graphs.
        x: Scaled real beats, shape (beats, leads, window_samples), float32.
        labels: Class index of each beat, shape (beats,).

    Raises:
        ExportError: If the graphs disagree with PyTorch or do not invert each other
            (``parity_figures``).
    """
    with torch.no_grad():
        condition = one_hot(torch.from_numpy(labels))
        z_torch, log_det_torch = model(torch.from_numpy(x), condition)
        x_torch, _ = model.inverse(z_torch, condition)
    z_onnx, log_det_onnx = engine.forward(x, labels)
    return parity_figures(
        x,
        (z_torch.numpy(), log_det_torch.numpy(), x_torch.numpy()),
        (z_onnx, log_det_onnx, engine.inverse(z_onnx, labels)),
    )


def export_model(
    config: ApplianceConfig,
    result: TrainResult,
    train_beats: BeatSet,
    calibration_beats: BeatSet,
    store: Path,
    data_facts: dict[str, Any] | None = None,
    other_lead_beats: np.ndarray | None = None,
) -> ModelVersion:
    """Export, check, calibrate and publish a trained model as the store's current version.

    Arguments:
        config: Settings of the run.
        result: Trained model and its summary.
        train_beats: Training beats (mV), for the privacy index.
        calibration_beats: Held-out real beats (mV) never trained on, for the parity check,
            the pertinence calibration and the privacy threshold.
        store: Model store folder.
        data_facts: Extra facts about the data for the manifest (records, sources).
        other_lead_beats: Beats of the training records' leads that the model does not use
            (mV, shape (beats, 1, window_samples), from ``jobs.read_other_lead_beats``), for
            the lead check; None leaves the check out.

    Raises:
        ExportError: If a check fails or a file of the version cannot be written; the store's
            current version is left unchanged.
    """
    model = result.model
    # Export can run for minutes, so its stages are logged as progress.
    logger.info("export started store=%s train_beats=%d", store, len(train_beats.labels))
    try:
        partial = new_version_dir(store)
    except OSError as exc:
        raise ExportError(_store_write_message(store, exc)) from exc
    try:
        raise_if_stop_requested("the graphs were exported")
        forward_path, inverse_path = export_graphs(model, partial)
        manifest: dict[str, Any] = _manifest(config, result, data_facts or {})
        manifest["files"] = {
            "forward_graph": {"name": forward_path.name},
            "inverse_graph": {"name": inverse_path.name},
        }
        train_known = np.isin(
            train_beats.labels, [AAMI_CLASSES.index(c) for c in result.classes_known]
        )
        train_vectors = privacy_space(train_beats.windows[train_known])
        np.save(partial / "privacy_index.npy", train_vectors)
        # The draft engine loads the privacy index too: the morphology statistic compares beats
        # with centroids of the training beats.
        manifest["files"]["privacy_index"] = {"name": "privacy_index.npy"}
        logger.info(
            "export graphs written forward=%s inverse=%s", forward_path.name, inverse_path.name
        )
        if other_lead_beats is not None:
            raise_if_stop_requested("the lead check was fitted")
            lead_check = LeadCheck.fit(train_beats.windows, other_lead_beats, config.train.seed)
            logger.info("export lead check fitted other_lead_beats=%d", other_lead_beats.shape[0])
            with (partial / "lead_check.npz").open("wb") as handle:
                np.savez(handle, **lead_check.to_arrays())  # type: ignore[arg-type]
            manifest["files"]["lead_check"] = {"name": "lead_check.npz"}
            manifest["lead_check"] = {
                "model_lead_beats": int(train_beats.windows.shape[0]),
                "other_lead_beats": int(other_lead_beats.shape[0]),
                "hidden_units": HIDDEN_UNITS,
            }
        # The id is set at publication, so the log line of this engine names the step instead.
        draft = Engine(
            ModelVersion(path=partial, manifest={**manifest, "model_id": UNPUBLISHED_MODEL_ID})
        )
        known = np.isin(
            calibration_beats.labels, [AAMI_CLASSES.index(c) for c in result.classes_known]
        )
        x_holdout = (calibration_beats.windows[known] / result.scale_mv).astype(np.float32)
        labels_holdout = calibration_beats.labels[known]
        raise_if_stop_requested("the graphs were checked against PyTorch")
        figures = check_parity(
            model, draft, x_holdout[:PARITY_BEATS], labels_holdout[:PARITY_BEATS]
        )
        raise_if_stop_requested("the generation prior was fitted")
        prior = _fit_latent_prior(draft, train_beats, result, config.train.seed)
        with (partial / "latent_prior.npz").open("wb") as handle:
            np.savez(handle, **prior.to_arrays())  # type: ignore[arg-type]
        raise_if_stop_requested("the score was calibrated")
        features, _ = draft.features(x_holdout, labels_holdout)
        calibration = Calibration.fit(features)
        arrays = calibration.to_arrays()
        with (partial / "calibration.npz").open("wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
        distances = NearestNeighbourIndex(train_vectors).nearest_distance(
            privacy_space(calibration_beats.windows[known])
        )
        threshold = float(np.quantile(distances, config.gate.privacy_quantile))
        manifest["files"]["calibration"] = {"name": "calibration.npz"}
        manifest["files"]["privacy_index"] = {"name": "privacy_index.npy"}
        manifest["files"]["latent_prior"] = {"name": "latent_prior.npz"}
        manifest["latent_prior"] = {
            "kind": "per class: mixture of full-covariance Gaussians on the bottleneck, "
            "independent Gaussian values on the tail",
            "beats_per_class": {name: int(prior.beats[i]) for i, name in enumerate(AAMI_CLASSES)},
            "components_per_class": {
                name: prior.components(i) for i, name in enumerate(AAMI_CLASSES)
            },
            "shrinkage_beats": SHRINKAGE_BEATS,
            "min_beats": MIN_BEATS,
            "beats_per_component": BEATS_PER_COMPONENT,
        }
        manifest["privacy"] = {
            "threshold": threshold,
            "quantile": config.gate.privacy_quantile,
            "space": "per-beat z-normalised waveform, RMS difference",
            "holdout_distance_quantiles": {
                q: float(np.quantile(distances, float(q))) for q in ("0.01", "0.05", "0.5")
            },
            "train_beats": int(train_vectors.shape[0]),
        }
        manifest["calibration"] = {"features": list(FEATURES), "beats": int(features.shape[0])}
        manifest["quality"] = {
            **figures,
            "validation_bpd": finite_or_none(result.summary.get("validation_bpd")),
        }
        raise_if_stop_requested("the version was published")
        version = publish_version(store, partial, manifest)
    except OSError as exc:
        discard_partial(partial)
        raise ExportError(_store_write_message(store, exc)) from exc
    except BaseException:
        discard_partial(partial)
        raise
    logger.info(
        "%s model_id=%s store=%s roundtrip_max_rel_error=%.2e privacy_threshold=%.4f",
        "published" if version.newly_published else "unchanged",
        version.manifest["model_id"],
        store,
        figures["roundtrip_max_rel_error"],
        threshold,
    )
    return version


def _store_write_message(store: Path, exc: OSError) -> str:
    """Return the error for a model version that could not be written to ``store``."""
    where = f" at {exc.filename}" if exc.filename else ""
    return (
        f"writing the model version to store {store} failed{where} ({exc.strerror or exc}); "
        "the store's current version is unchanged. Free space or pass a writable --store "
        "folder, then export again"
    )


def _fit_latent_prior(
    draft: Engine, train_beats: BeatSet, result: TrainResult, seed: int
) -> LatentPrior:
    """Fit the generation prior to the latent values of sampled training beats of each class.

    Raises:
        ExportError: If a training beat maps to a latent value that is not finite, or the
            latent values of a class are too large to fit a Gaussian to.
    """
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for name in result.classes_known:
        members = np.flatnonzero(train_beats.labels == AAMI_CLASSES.index(name))
        if members.size > MAX_FIT_BEATS_PER_CLASS:
            members = rng.choice(members, MAX_FIT_BEATS_PER_CLASS, replace=False)
        chosen.append(np.sort(members))
    index = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    labels = train_beats.labels[index]
    x = (train_beats.windows[index] / result.scale_mv).astype(np.float32)
    z, _ = draft.forward(x, labels)
    try:
        prior = LatentPrior.fit(z, labels, len(AAMI_CLASSES), draft.bottleneck_dims, seed=seed)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    logger.info(
        "latent prior fitted beats=%d classes=%s components=%s",
        int(index.size),
        {name: int(prior.beats[i]) for i, name in enumerate(AAMI_CLASSES) if prior.beats[i]},
        {name: prior.components(i) for i, name in enumerate(AAMI_CLASSES) if prior.beats[i]},
    )
    return prior


def _manifest(
    config: ApplianceConfig, result: TrainResult, data_facts: dict[str, Any]
) -> dict[str, Any]:
    model = result.model
    summary = {k: v for k, v in result.summary.items() if k != "history"}
    exported_at = datetime.now(UTC).isoformat(timespec="seconds")
    return {
        # A checkpoint exported again carries the time its weights were saved instead.
        "trained_at": str(result.summary.get("finished_at") or exported_at),
        "exported_at": exported_at,
        "data": {
            "fs_hz": config.data.fs_hz,
            "window_samples": config.data.window_samples,
            "pre_r_samples": config.data.pre_r_samples,
            "leads": data_facts.get("leads", list(config.data.leads[: config.data.n_leads])),
            "lead_preference": list(config.data.leads),
            "scale_mv": result.scale_mv,
            "units": "mV after baseline-wander removal",
            "highpass_hz": config.data.highpass_hz,
            **{k: v for k, v in data_facts.items() if k != "leads"},
        },
        "classes": list(AAMI_CLASSES),
        "classes_known": result.classes_known,
        "model": {
            **config.model.__dict__,
            "latent_dims": model.latent_dims,
            "parameters": sum(p.numel() for p in model.parameters()),
            "opset": OPSET_VERSION,
        },
        "gate": dict(config.gate.__dict__),
        "training": {**summary, "config": config.train.__dict__},
    }
