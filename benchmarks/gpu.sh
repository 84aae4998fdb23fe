#!/usr/bin/env bash
# GPU check: train a few epochs on all MIT-BIH beats on CUDA (float32 and bf16), export, and time
# generation with ONNX Runtime's CUDA execution provider against its CPU one. Prints figures.
#
# Needs a CUDA build of torch and onnxruntime-gpu in the environment; it installs nothing,
# because the GPU machine has no network. `timeout 290` stops it before 5 minutes.
# NOTE: not run yet: no GPU machine was available, so the per-step time on a GPU, and with
# it whether 3 epochs of 1 minute each fit the budget, is a guess.
#
# Usage: benchmarks/gpu.sh [MITDB_FOLDER] [OUTPUT_FOLDER]
set -euo pipefail

MITDB="${1:-../shared/data/mitdb}"
OUT_DIR="${2:-${OUT:-/tmp/gpu-check}}"
PYTHON="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT_DIR"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

exec timeout 290 "$PYTHON" - "$MITDB" "$OUT_DIR" <<'PY'
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import appliance.engine as engine_module
from appliance.config import ApplianceConfig, TrainConfig
from appliance.engine import Engine
from appliance.jobs import train_and_export
from appliance.store import load_current
from appliance.train import evaluate

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
mitdb, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
print(f"torch={torch.__version__} cuda={torch.cuda.is_available()} "
      f"onnxruntime={ort.__version__} providers={ort.get_available_providers()}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch; run on a GPU machine with a CUDA build of torch")

figures = {}
for precision in ("no", "bf16"):
    config = ApplianceConfig(
        train=dataclasses.replace(
            TrainConfig(),
            max_epochs=3,
            max_minutes=1.0,
            batch_size=256,
            device="cuda",
            mixed_precision=precision,
        )
    )
    store = out_dir / f"store-{precision}"
    started = time.monotonic()
    job = train_and_export(mitdb, store, config, out_dir / f"work-{precision}", progress=False)
    train_s = time.monotonic() - started
    test = job.dataset.splits["test"]
    model = job.result.model.to("cuda")
    test_bpd, test_mse = evaluate(model, test, job.result.scale_mv, torch.device("cuda"))
    model.cpu()
    figures[precision] = {
        "train_and_export_s": round(train_s, 1),
        "epochs": job.result.summary["epochs"],
        "steps": job.result.summary["steps"],
        "test_nll_bpd": round(test_bpd, 4),
        "test_reconstruction_mse": round(test_mse, 5),
        "test_beats": len(test),
    }
    print(f"mixed_precision={precision} " + json.dumps(figures[precision]))

version = load_current(out_dir / "store-no")
rng = np.random.default_rng(0)
beats = 4096
for name, providers in (
    ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("cpu", ["CPUExecutionProvider"]),
):
    if providers[0] not in ort.get_available_providers():
        print(f"provider={name} unavailable; install onnxruntime-gpu for the CUDA provider")
        continue
    # The engine takes the CUDA provider whenever it is present; this pins the list instead.
    engine_module.available_providers = lambda require_gpu=False, p=providers: list(p)
    engine = Engine(version)
    classes = rng.choice(engine.classes_known, size=beats)
    z = engine.draw_latent(rng, beats, 1.0, engine.classes_known[0])
    engine.inverse(z[:256], classes[:256])  # warm-up: session start and CUDA kernels
    started = time.monotonic()
    x = engine.inverse(z, classes)
    engine.forward(x, classes)
    elapsed = time.monotonic() - started
    print(f"provider={engine.execution_provider} beats={beats} inverse_plus_forward_s={elapsed:.3f} "
          f"beats_per_s={beats / elapsed:.0f}")
PY
