"""Train the appliance on MIT-BIH DS1 within a time budget, then write the quality report.

Run from the repository root:

    .venv/bin/python benchmarks/quality.py --out runs/quality [--train-minutes 12]
    .venv/bin/python benchmarks/quality.py --out runs/quality --store STORE   # skip training

The report (``quality.html``, ``quality.json`` and the figures) goes to ``--out``; the headline
figures of the appliance and both baselines are logged as one Markdown table for
``docs/benchmarks.md``, with the training and evaluation times.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from appliance.config import ApplianceConfig, DataConfig, TrainConfig
from appliance.jobs import train_and_export
from appliance.quality.report import build_report, metric_rows

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mitdb"
logger = logging.getLogger("benchmarks.quality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MIT-BIH folder")
    parser.add_argument("--out", type=Path, required=True, help="report and work folder")
    parser.add_argument(
        "--store", type=Path, help="existing store trained on --data; skips training"
    )
    parser.add_argument(
        "--train-minutes", type=float, default=12.0, help="wall-clock training budget in minutes"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    cache_dir = str(args.out / "ingest-cache")
    store = args.store
    train_s = None
    if store is None:
        store = args.out / "store"
        config = ApplianceConfig(
            data=DataConfig(split="de-chazal", cache_dir=cache_dir),
            train=TrainConfig(
                max_minutes=args.train_minutes, max_epochs=1000, threads=args.threads, seed=0
            ),
        )
        start = time.perf_counter()
        train_and_export(args.data, store, config, args.out / "work", progress=False)
        train_s = time.perf_counter() - start
    start = time.perf_counter()
    summary = build_report(store, args.data, args.out / "report", cache_dir=cache_dir)
    report_s = time.perf_counter() - start
    rows = metric_rows(summary)
    columns = list(rows[0][1]) if rows else []
    lines = ["| generator | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows:
        cells = ["n/a" if v is None else f"{v:.4f}" for v in values.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    logger.info("figures\n%s", "\n".join(lines))
    logger.info(
        "timing %s",
        json.dumps(
            {"train_s": train_s, "report_s": report_s, "train_minutes_budget": args.train_minutes}
        ),
    )


if __name__ == "__main__":
    main()
