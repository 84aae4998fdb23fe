"""Measure the gate on MIT-BIH: out-of-distribution AUROC, membership inference, privacy search.

Run from the repository root:

    .venv/bin/python benchmarks/gate.py [--data MITDB_FOLDER] [--minutes 20] [--work DIR]

It trains a flow on DS1 of the de Chazal inter-patient split (a same-patient hold-out of the
last 15 % of each record kept out), exports it, then scores real DS2 beats (other patients)
against each corrupted kind, lead V1 of the same DS2 records as the other-lead case. With
``--store`` it skips training, uses an exported store (trained on the same split) and
recalibrates the score with this checkout's statistics.
It also times the exact nearest-neighbour search of the privacy guard at 100,000 training beats.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from appliance.classes import AAMI_CLASSES
from appliance.config import ApplianceConfig, DataConfig, TrainConfig
from appliance.corrupt import CORRUPTIONS, OTHER_LEAD, ood_suite, read_other_lead
from appliance.dataset import DE_CHAZAL_DS2, BeatSet, ingest
from appliance.engine import Engine
from appliance.errors import RecordError
from appliance.holdout import concatenate, split_holdout
from appliance.jobs import read_other_lead_beats, train_records
from appliance.lead_check import LeadCheck
from appliance.privacy import NearestNeighbourIndex, privacy_space
from appliance.quality.privacy_metrics import matched_samples
from appliance.quality.protocol import recorded_training
from appliance.scoring import Calibration, auroc
from appliance.store import ModelVersion, load_current
from appliance.train import select_training_beats

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mitdb"
INDEX_BEATS = 100_000
INDEX_QUERIES = 1024

logger = logging.getLogger("benchmarks.gate")


def _sample(beats: BeatSet, known: list[int], count: int, rng: np.random.Generator) -> BeatSet:
    index = np.flatnonzero(np.isin(beats.labels, known))
    index = np.sort(rng.choice(index, min(count, index.size), replace=False))
    return BeatSet(
        windows=beats.windows[index], labels=beats.labels[index], records=beats.records[index]
    )


def _scores(engine: Engine, beats: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    return engine.score((beats / engine.scale_mv).astype(np.float32), labels).scores


def measure_ood(
    engine: Engine,
    data: Path,
    test: BeatSet,
    config: DataConfig,
    per_kind: int,
    rng: np.random.Generator,
) -> dict[str, dict[str, float]]:
    """Return AUROC of real DS2 beats against each corrupted kind, unlabelled and labelled."""
    real = _sample(test, engine.classes_known, per_kind, rng)
    other_parts = []
    for record in sorted(set(real.records.tolist())):
        try:
            other_parts.append(read_other_lead(data / record, record, config))
        except RecordError as exc:
            logger.info("record=%s has no other lead: %s", record, exc)
    other = np.concatenate(other_parts)
    other = other[rng.choice(other.shape[0], min(per_kind, other.shape[0]), replace=False)]
    suite = ood_suite(real.windows, other, engine.fs_hz, rng)
    real_unlabelled = _scores(engine, real.windows, None)
    real_labelled = _scores(engine, real.windows, real.labels)
    figures: dict[str, dict[str, float]] = {}
    for kind in [*CORRUPTIONS, OTHER_LEAD]:
        unlabelled = _scores(engine, suite[kind], None)
        row = {"unlabelled": auroc(real_unlabelled, unlabelled)}
        if kind != OTHER_LEAD:
            row["labelled"] = auroc(real_labelled, _scores(engine, suite[kind], real.labels))
        figures[kind] = row
        logger.info("kind=%s auroc=%s", kind, row)
    figures["real"] = {
        "median_score_unlabelled": float(np.median(real_unlabelled)),
        "beats": float(real.windows.shape[0]),
    }
    return figures


def _subset(beats: BeatSet, index: np.ndarray) -> BeatSet:
    return BeatSet(
        windows=beats.windows[index], labels=beats.labels[index], records=beats.records[index]
    )


def measure_membership(
    engine: Engine,
    fit: BeatSet,
    holdout: BeatSet,
    count: int,
    rng: np.random.Generator,
    training: TrainConfig,
) -> dict[str, float | None]:
    """Return AUROC of two attacks telling training beats from beats never trained on.

    Members are the fit beats training learnt from (``select_training_beats`` with the
    model's cap and seed). Non-members are the same-patient hold-out, and separately the fit
    beats the cap left out, from the same period as the members. Each comparison draws the
    members in the class counts of the non-member sample.
    """
    classes_known, trained = select_training_beats(
        fit.labels, training.max_beats_per_class, training.seed
    )
    members = _subset(fit, trained)
    left_out = np.isin(fit.labels, [AAMI_CLASSES.index(name) for name in classes_known])
    left_out[trained] = False
    per_class = max(1, count // len(engine.classes_known))
    generated = engine.generate(
        dict.fromkeys(engine.classes_known, per_class),
        1.0,
        engine.default_margin,
        seed=1,
        max_draws_per_beat=20,
    )
    released = NearestNeighbourIndex(privacy_space(generated.beats))

    def attacks(others: BeatSet) -> tuple[float | None, float | None]:
        member_index, other_index = matched_samples(members.labels, others.labels, count, rng)
        if member_index.size == 0:
            return None, None
        inside, outside = _subset(members, member_index), _subset(others, other_index)
        score_auroc = auroc(
            _scores(engine, inside.windows, inside.labels),
            _scores(engine, outside.windows, outside.labels),
        )
        distance_auroc = auroc(
            -released.nearest_distance(privacy_space(inside.windows)),
            -released.nearest_distance(privacy_space(outside.windows)),
        )
        return max(score_auroc, 1 - score_auroc), max(distance_auroc, 1 - distance_auroc)

    score_holdout, distance_holdout = attacks(holdout)
    score_unseen, distance_unseen = attacks(_subset(fit, np.flatnonzero(left_out)))
    return {
        "score_attack_auroc": score_holdout,
        "synthetic_distance_attack_auroc": distance_holdout,
        "score_attack_auroc_unseen": score_unseen,
        "synthetic_distance_attack_auroc_unseen": distance_unseen,
        "members": float(members.labels.size),
        "unseen": float(left_out.sum()),
        "synthetic_beats": float(generated.beats.shape[0]),
        "synthetic_draws": float(generated.draws),
        "privacy_rejections": float(generated.privacy_rejections),
        "pertinence_rejections": float(generated.pertinence_rejections),
        "invalid_rejections": float(generated.invalid_rejections),
        "privacy_threshold": engine.privacy_threshold,
    }


def measure_index(train: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """Time the exact search of ``INDEX_QUERIES`` queries among ``INDEX_BEATS`` beats."""
    rows = rng.choice(train.shape[0], INDEX_BEATS, replace=train.shape[0] < INDEX_BEATS)
    # Jitter repeated beats so the index holds distinct vectors.
    beats = train[rows] + 0.01 * rng.standard_normal(train[rows].shape)
    start = time.perf_counter()
    index = NearestNeighbourIndex(privacy_space(beats))
    build_s = time.perf_counter() - start
    queries = privacy_space(train[rng.choice(train.shape[0], INDEX_QUERIES)])
    start = time.perf_counter()
    index.nearest_distance(queries)
    search_s = time.perf_counter() - start
    return {
        "train_beats": float(INDEX_BEATS),
        "build_s": build_s,
        "queries": INDEX_QUERIES,
        "search_s": search_s,
        "queries_per_s": INDEX_QUERIES / search_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MIT-BIH folder")
    parser.add_argument(
        "--train-data",
        type=Path,
        help="folder the model is trained on (default: DS1 of --data); with a SPLITS file its "
        "split is used, and its records are left out of the DS2 test set",
    )
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget, minutes")
    parser.add_argument("--work", type=Path, help="folder for checkpoints and the store")
    parser.add_argument("--store", type=Path, help="use this exported store; skip training")
    parser.add_argument("--beats", type=int, default=1000, help="real beats per measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")

    config = ApplianceConfig(
        data=DataConfig(split="de-chazal"),
        train=TrainConfig(max_epochs=1000, max_minutes=args.minutes, seed=args.seed),
    )
    full = ingest(args.data, config.data)
    dataset = full
    if args.train_data is not None:
        dataset = ingest(args.train_data, DataConfig())
    fit, holdout = split_holdout(dataset.splits["train"])
    trained_on = set(dataset.splits["train"].records.tolist())
    trained_on |= set(dataset.splits["validation"].records.tolist())
    unseen = ~np.isin(full.splits["test"].records, sorted(trained_on))
    test = BeatSet(
        windows=full.splits["test"].windows[unseen],
        labels=full.splits["test"].labels[unseen],
        records=full.splits["test"].records[unseen],
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="gate-bench-"))
    store = args.store
    if store is None:
        from appliance.export import export_model
        from appliance.train import train

        store = work / "store"
        started = time.perf_counter()
        result = train(
            config, fit, dataset.splits["validation"], work / "train", resume=True, progress=False
        )
        logger.info(
            "trained seconds=%.0f summary=%s",
            time.perf_counter() - started,
            {k: v for k, v in result.summary.items() if k != "history"},
        )
        export_model(
            config,
            result,
            fit,
            concatenate(dataset.splits["validation"], holdout),
            store,
            {"leads": dataset.leads},
            other_lead_beats=read_other_lead_beats(
                args.train_data or args.data, train_records(dataset), config.data, args.seed
            ),
        )
    version = load_current(store)
    if args.store is not None:
        # Load the graphs without the stored calibration, which may hold another version's
        # statistics, and recalibrate with this checkout's statistics as export would.
        files = {k: v for k, v in version.manifest["files"].items() if k != "calibration"}
        version = ModelVersion(path=version.path, manifest={**version.manifest, "files": files})
    engine = Engine(version)
    if args.store is not None:
        if engine.lead_check is None:
            # A store exported before the lead check: fit it as export would.
            other_leads = read_other_lead_beats(
                args.train_data or args.data, train_records(dataset), config.data, args.seed
            )
            if other_leads is not None:
                engine.lead_check = LeadCheck.fit(fit.windows, other_leads, config.train.seed)
        held_out = concatenate(dataset.splits["validation"], holdout)
        known = np.isin(held_out.labels, engine.classes_known)
        x = (held_out.windows[known] / engine.scale_mv).astype(np.float32)
        engine.calibration = Calibration.fit(engine.features(x, held_out.labels[known])[0])
    rng = np.random.default_rng(args.seed)
    figures = {
        "model_id": engine.manifest["model_id"],
        "training": engine.manifest.get("training", {}).get("epochs_run"),
        "test_records": [r for r in DE_CHAZAL_DS2 if r in set(test.records.tolist())],
        "ood_auroc": measure_ood(engine, args.data, test, config.data, args.beats, rng),
        "membership": measure_membership(
            engine,
            fit,
            holdout,
            args.beats,
            rng,
            recorded_training(engine.manifest) or config.train,
        ),
        "privacy_index": measure_index(fit.windows, rng),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
