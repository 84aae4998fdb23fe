"""The training job: ingest, train, export and publish to the model store."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import ApplianceConfig, DataConfig
from appliance.dataset import BeatSet, Dataset, ingest
from appliance.distributed import is_rank_zero
from appliance.ecg import normal_lead_name, read_record, record_lead_names
from appliance.errors import RecordError, TrainingStoppedError
from appliance.export import ExportError, export_model
from appliance.holdout import concatenate, split_holdout
from appliance.lead_check import MAX_BEATS_PER_SIDE, MIN_OTHER_LEAD_BEATS
from appliance.store import ModelVersion
from appliance.train import BEST_FILE, TrainResult, train

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
    other_leads = read_other_lead_beats(
        data_dir, train_records(dataset), config.data, config.train.seed
    )
    try:
        version = export_model(
            config,
            result,
            fit_beats,
            calibration_beats,
            store,
            facts,
            other_lead_beats=other_leads,
        )
    except TrainingStoppedError as exc:
        raise TrainingStoppedError(
            f"export {exc}. {_export_command_hint(work_dir, data_dir)}", exc.signum
        ) from exc
    except ExportError as exc:
        if not isinstance(exc.__cause__, OSError):
            raise
        raise ExportError(
            f"{exc}. {_export_command_hint(work_dir, data_dir)} with this or another writable "
            "store after the fix"
        ) from exc
    return TrainJobResult(dataset, fit_beats, holdout_beats, result, version)


def _export_command_hint(work_dir: Path, data_dir: Path) -> str:
    """Name the kept weights and the command that exports them without training again.

    Training took minutes to hours, so a failed or stopped export should not cost a new run.
    """
    best = shlex.quote(str(work_dir / BEST_FILE))
    return (
        f"The trained weights are kept in {work_dir / BEST_FILE}; to publish them, run "
        f"`python -m appliance export --checkpoint {best} --data "
        f"{shlex.quote(str(data_dir))} --store STORE`"
    )


def data_facts(dataset: Dataset) -> dict[str, Any]:
    """Return the facts about the ingested data that the manifest records."""
    return {
        "leads": dataset.leads,
        "records": dataset.report.split_of_record,
        "beat_sources": dataset.report.beat_sources,
        "fs_hz_of_record": dataset.fs_hz_of_record,
        "preprocessing": dataset.preprocessing.to_dict() if dataset.preprocessing else None,
    }


def train_records(dataset: Dataset) -> list[str]:
    """Return the names of the records in the training split, in file order."""
    return list(dict.fromkeys(dataset.splits["train"].records.tolist()))


def read_other_lead_beats(
    data_dir: Path, records: list[str], config: DataConfig, seed: int = 0
) -> np.ndarray | None:
    """Read beats of the leads that the model does not use, from the given records.

    A lead counts as other when its name, compared without regard to case or spaces, differs
    from every configured lead. A fallback lead such as V5 is the model's lead in a record
    without MLII, so it is never a negative. A lead named twice is read once.

    Arguments:
        data_dir: Folder of the WFDB records.
        records: Record names relative to ``data_dir``, the training records. Records without
            a reference annotation file are left out.
        config: Data settings of the model; each other lead is read with them, with that lead
            in place of the configured ones.
        seed: Seed of the sample kept when the records give more than
            ``MAX_BEATS_PER_SIDE`` beats; memory stays bounded by that count.

    Returns:
        Beats, shape (beats, 1, window_samples), in mV; None when the model has several leads
        or fewer than ``MIN_OTHER_LEAD_BEATS`` other-lead beats were read.
    """
    if config.n_leads != 1:
        logger.info("lead check skipped reason=model_has_%d_leads", config.n_leads)
        return None
    configured = {normal_lead_name(lead) for lead in config.leads}
    rng = np.random.default_rng(seed)
    sample = np.zeros((0, 1, config.window_samples), dtype=np.float32)
    keys = np.zeros(0)
    read = 0
    for record in records:
        path = data_dir / record
        if not path.with_name(f"{path.name}.{config.annotation_extension}").exists():
            # Without reference annotations each lead would get its own detected beats, at
            # other positions and at the cost of one more detector pass per lead.
            logger.info("record=%s other leads skipped reason=no_annotation_file", record)
            continue
        try:
            names = record_lead_names(path, record)
        except RecordError as exc:
            logger.warning("record=%s other leads skipped action=skip reason=%s", record, exc)
            continue
        others = [name for name in names if normal_lead_name(name) not in configured]
        # One name per lead: read_record matches names without regard to case or spaces, so a
        # repeated lead would read its first channel again.
        first_of: dict[str, str] = {}
        for name in others:
            if normal_lead_name(name) in first_of:
                logger.info("record=%s lead=%s repeated; the first channel is read", record, name)
            first_of.setdefault(normal_lead_name(name), name)
        for name in first_of.values():
            try:
                beats = read_record(path, record, replace(config, leads=(name,), n_leads=1))
            except RecordError as exc:
                logger.warning(
                    "record=%s lead=%s skipped action=skip reason=%s", record, name, exc
                )
                continue
            read += beats.windows.shape[0]
            # Keeping the beats of the smallest random keys is a uniform sample of all beats.
            sample = np.concatenate([sample, beats.windows])
            keys = np.concatenate([keys, rng.random(beats.windows.shape[0])])
            if keys.size > MAX_BEATS_PER_SIDE:
                smallest = np.sort(np.argpartition(keys, MAX_BEATS_PER_SIDE)[:MAX_BEATS_PER_SIDE])
                sample, keys = sample[smallest], keys[smallest]
    if read < MIN_OTHER_LEAD_BEATS:
        logger.warning(
            "lead check skipped reason=too_few_other_lead_beats beats=%d min=%d effect=the "
            "score has no lead_match evidence, so beats of another lead are caught by shape "
            "alone",
            read,
            MIN_OTHER_LEAD_BEATS,
        )
        return None
    logger.info("other leads read beats=%d kept=%d", read, sample.shape[0])
    return sample
