"""Measure ingest of all 48 MIT-BIH records: cold, then from the ingest cache.

Run from the repository root:

    .venv/bin/python benchmarks/ingest.py [--data MITDB_FOLDER]

Each pass runs in its own child process, so that its peak resident memory (``ru_maxrss``) is
its own. The cache lives in a temporary folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mitdb"


def run_pass(data: Path, cache_dir: str) -> dict[str, float]:
    """Ingest once in this process and return the figures of the pass."""
    from appliance.config import DataConfig
    from appliance.dataset import ingest

    # A random split reads every record; the de Chazal split would leave out the paced ones.
    config = DataConfig(split="random", cache_dir=cache_dir)
    start = time.perf_counter()
    dataset = ingest(data, config)
    seconds = time.perf_counter() - start
    beats = sum(len(s) for s in dataset.splits.values())
    return {
        "records": len(dataset.report.records_read),
        "cache_hits": dataset.report.cache_hits,
        "beats": beats,
        "seconds": seconds,
        "beats_per_s": beats / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MIT-BIH folder")
    parser.add_argument("--child", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        logging.basicConfig(level=logging.ERROR)
        print(json.dumps(run_pass(args.data, args.child)))
        return
    with tempfile.TemporaryDirectory(prefix="ingest-cache-") as cache_dir:
        for name in ("cold", "cache"):
            output = subprocess.run(
                [sys.executable, __file__, "--data", str(args.data), "--child", cache_dir],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            figures = json.loads(output.splitlines()[-1])
            print(
                f"{name:<6} records={figures['records']} cache_hits={figures['cache_hits']} "
                f"beats={figures['beats']} seconds={figures['seconds']:.2f} "
                f"beats_per_s={figures['beats_per_s']:.0f} "
                f"peak_rss_mib={figures['peak_rss_mib']:.0f}"
            )


if __name__ == "__main__":
    main()
