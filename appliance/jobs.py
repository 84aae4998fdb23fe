"""The training job: ingest, train, export and publish to the model store."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import ApplianceConfig
from appliance.dataset import BeatSet, Dataset, ingest
from appliance.distributed import is_rank_zero
from appliance.export import export_model
from appliance.holdout import concatenate, split_holdout
from appliance.store import ModelVersion
from appliance.train import TrainResult, train

logger = logging.getLogger(__name__)


@dataclass
class TrainJobResult:
    """Everything the training job produced; ``version`` is None on ranks other than 0."""

    dataset: Dataset
    fit_beats: BeatSet
    holdout_beats: BeatSet
    result: TrainResult
    version: ModelVersion | None


def train_and_export(
    data_dir: Path,
    store: Path,
    config: ApplianceConfig,
    work_dir: Path,
    progress: bool = True,
    resume: bool = False,
) -> TrainJobResult:
    """Ingest a WFDB folder, train the flow, export the graphs and publish them.

    Raises:
        DataError: If the folder gives no usable training data.
        TrainingError: If training fails; nothing is published.
        ExportError: If the exported graphs fail their checks; nothing is published.
    """
    dataset = ingest(data_dir, config.data)
    fit_beats, holdout_beats = split_holdout(dataset.splits["train"])
    result = train(
        config, fit_beats, dataset.splits["validation"], work_dir, resume=resume, progress=progress
    )
    if not is_rank_zero():
        # Under torchrun every rank trains; only rank 0 exports and publishes.
        return TrainJobResult(dataset, fit_beats, holdout_beats, result, None)
    calibration_beats = concatenate(dataset.splits["validation"], holdout_beats)
    facts = data_facts(dataset)
    version = export_model(config, result, fit_beats, calibration_beats, store, facts)
    return TrainJobResult(dataset, fit_beats, holdout_beats, result, version)


def data_facts(dataset: Dataset) -> dict[str, Any]:
    """Return the facts about the ingested data that the manifest records."""
    return {
        "leads": dataset.leads,
        "records": dataset.report.split_of_record,
        "beat_sources": dataset.report.beat_sources,
        "fs_hz_of_record": dataset.fs_hz_of_record,
        "preprocessing": dataset.preprocessing.to_dict() if dataset.preprocessing else None,
    }
