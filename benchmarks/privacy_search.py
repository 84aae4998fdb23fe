"""Measure the privacy search's time and working memory per index block size.

Run from the repository root:

    .venv/bin/python benchmarks/privacy_search.py [--index-beats 40000] [--blocks 32768 4096]

The index contains random unit vectors of one lead of 256 samples, the width of the default
model. The search is exact and brute force, so its cost depends on the index's size and not on
its contents. For each block size the benchmark searches one batch of 256 queries, the
server's batch, and prints the median time of five searches and the peak of memory that
numpy allocated during one (``tracemalloc``). Every block size must return the same
distances as the first one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc

import numpy as np

from appliance.privacy import INDEX_CHUNK, QUERY_BATCH, NearestNeighbourIndex, privacy_space

WINDOW_SAMPLES = 256
REPEATS = 5


def main() -> int:
    """Time the search for each block size and print one JSON line per size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-beats", type=int, default=40_000, help="training beats")
    parser.add_argument(
        "--blocks",
        type=int,
        nargs="+",
        default=[32768, 16384, 8192, INDEX_CHUNK, 2048, 1024],
        help="index vectors per block (rows of one matrix product)",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    index = NearestNeighbourIndex(
        privacy_space(rng.standard_normal((args.index_beats, 1, WINDOW_SAMPLES)))
    )
    queries = privacy_space(rng.standard_normal((QUERY_BATCH, 1, WINDOW_SAMPLES)))
    reference: np.ndarray | None = None
    for block in args.blocks:
        index.chunk_rows = block
        distances = index.nearest_distance(queries)
        times_s = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            index.nearest_distance(queries)
            times_s.append(time.perf_counter() - start)
        tracemalloc.start()
        index.nearest_distance(queries)
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if reference is None:
            reference = distances
        elif not np.array_equal(distances, reference):
            raise SystemExit(f"block {block} returned other distances than block {args.blocks[0]}")
        figures = {
            "index_beats": args.index_beats,
            "queries": QUERY_BATCH,
            "block_rows": block,
            "median_ms": round(1000 * float(np.median(times_s)), 1),
            "peak_numpy_mib": round(peak_bytes / 2**20, 1),
            "blas_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        }
        print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
