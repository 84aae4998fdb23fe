"""Time ONNX Runtime against PyTorch eager on one model, without a server.

Run from the repository root:

    .venv/bin/python benchmarks/onnx_vs_eager.py --store STORE --checkpoint BEST_PT

It calls the same measurement as ``grpc_throughput.py`` (forward and inverse, batch 256,
``--threads`` threads each, one by default) ``--repeats`` times in one process and prints each
result as a JSON line. PyTorch eager allocates every intermediate tensor anew, and glibc maps
allocations above its mmap threshold freshly each time, so eager's figure depends on the
allocator's state. To time eager
with heap allocations, as in a warmed-up process, run it with glibc's tuning variables set, for
example ``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824
MALLOC_TOP_PAD_=268435456``. ONNX Runtime uses its own memory arena either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grpc_throughput import load_model, onnx_against_torch

from appliance.engine import Engine
from appliance.store import load_current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="model store to load")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="PyTorch checkpoint of the store's model (default: STORE/training/best.pt)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="measurements (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="threads of each side (default: 1)")
    args = parser.parse_args()
    model = load_model(args.checkpoint or args.store / "training" / "best.pt")
    if model is None:
        sys.exit("no PyTorch checkpoint found; pass --checkpoint")
    engine = Engine(load_current(args.store), intra_op_threads=args.threads)
    for _ in range(args.repeats):
        figures = onnx_against_torch(engine, model, threads=args.threads)
        sys.stdout.write(json.dumps({k: round(v, 2) for k, v in figures.items()}) + "\n")


if __name__ == "__main__":
    main()
