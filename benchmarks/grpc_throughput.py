"""Measure the gRPC service against in-process calls, ONNX Runtime against PyTorch, and load.

Run from the repository root:

    .venv/bin/python benchmarks/grpc_throughput.py [--store STORE] [--duration-s 60]

Without ``--store`` the benchmark trains the short fixture model (two epochs on the bundled
records, a few minutes) in a temporary folder. With ``--store`` it needs the PyTorch checkpoint
that ``train`` leaves in ``STORE/training/best.pt`` (or ``--checkpoint``) for the ONNX Runtime
against PyTorch figure.

The server is a ``python -m appliance serve`` child process on 127.0.0.1, so its memory is
measured apart from the clients. Every figure comes from one run, so that ratios compare
measurements taken under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from appliance.client import ApplianceClient
from appliance.engine import Engine
from appliance.pipeline import ServerProcess
from appliance.store import load_current

GENERATE_BEATS = 512
REPEATS = 3
TORCH_BATCH = 256


def percentile_ms(seconds: list[float], q: float) -> float:
    """Return the q-th percentile of durations in milliseconds."""
    return float(np.percentile(np.asarray(seconds) * 1000, q))


def train_store(folder: Path):  # noqa: ANN201
    """Train the short fixture model into ``folder/store``; return the PyTorch model."""
    from appliance.config import DEFAULT_DATA_DIR, ApplianceConfig, TrainConfig
    from appliance.jobs import train_and_export

    config = ApplianceConfig(train=TrainConfig(max_epochs=2, max_minutes=2.0, seed=0))
    job = train_and_export(
        DEFAULT_DATA_DIR, folder / "store", config, folder / "training", progress=False
    )
    return job.result.model


def load_model(checkpoint: Path):  # noqa: ANN201
    """Load the PyTorch flow of a ``best.pt`` checkpoint, or return None if it is missing."""
    if not checkpoint.exists():
        return None
    import torch

    from appliance.classes import AAMI_CLASSES
    from appliance.config import ApplianceConfig
    from appliance.flow import ConditionalFlow

    state = torch.load(checkpoint, weights_only=False)
    config = ApplianceConfig.from_dict(state["config"])
    model = ConditionalFlow(
        config.model, config.data.n_leads, config.data.window_samples, len(AAMI_CLASSES)
    )
    model.load_state_dict(state["model"])
    return model


def generate_throughput(
    engine: Engine, client: ApplianceClient, margin: float
) -> dict[str, float]:
    """Accepted beats per second: Generate over gRPC against ``Engine.generate`` in-process."""
    known = engine.classes_known
    counts = {c: GENERATE_BEATS // len(known) for c in known}
    total = sum(counts.values())
    local, remote = [], []
    for repeat in range(REPEATS):
        start = time.perf_counter()
        result = engine.generate(counts, 1.0, margin, seed=repeat, max_draws_per_beat=20)
        local.append(result.beats.shape[0] / (time.perf_counter() - start))
        start = time.perf_counter()
        generated = client.generate(count=total, seed=repeat, margin=margin)
        remote.append(generated.beats.shape[0] / (time.perf_counter() - start))
    in_process, grpc_rate = statistics.median(local), statistics.median(remote)
    return {
        "beats_requested": total,
        "in_process_beats_per_s": in_process,
        "grpc_beats_per_s": grpc_rate,
        "grpc_over_in_process": grpc_rate / in_process,
    }


def onnx_against_torch(engine: Engine, model, threads: int) -> dict[str, float]:  # noqa: ANN001
    """Seconds per forward and inverse call of batch 256, ONNX Runtime against PyTorch eager."""
    import torch

    torch.set_num_threads(threads)
    model.eval()
    rng = np.random.default_rng(0)
    classes = np.full(TORCH_BATCH, engine.classes_known[0], dtype=np.int64)
    z = engine.draw_latent(rng, TORCH_BATCH, 1.0, engine.classes_known[0])
    x = engine.inverse(z, classes)
    condition = torch.from_numpy(np.eye(5, dtype=np.float32)[classes])

    def timed(call: Callable[[], object], repeats: int = 5) -> float:
        call()
        durations = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            durations.append(time.perf_counter() - start)
        return statistics.median(durations)

    with torch.no_grad():
        torch_forward = timed(lambda: model(torch.from_numpy(x), condition))
        torch_inverse = timed(lambda: model.inverse(torch.from_numpy(z), condition))
    onnx_forward = timed(lambda: engine.forward(x, classes))
    onnx_inverse = timed(lambda: engine.inverse(z, classes))
    return {
        "threads": threads,
        "batch": TORCH_BATCH,
        "torch_forward_ms": torch_forward * 1000,
        "onnx_forward_ms": onnx_forward * 1000,
        "forward_speedup": torch_forward / onnx_forward,
        "torch_inverse_ms": torch_inverse * 1000,
        "onnx_inverse_ms": onnx_inverse * 1000,
        "inverse_speedup": torch_inverse / onnx_inverse,
    }


def validate_latency(client: ApplianceClient, beats: np.ndarray) -> dict[str, float]:
    """Validate latency in ms for one beat (200 calls) and for 1000 beats (10 calls)."""
    figures: dict[str, float] = {}
    for size, calls in ((1, 200), (1000, 10)):
        batch = beats[:size]
        client.validate(batch)
        durations = []
        for _ in range(calls):
            start = time.perf_counter()
            client.validate(batch)
            durations.append(time.perf_counter() - start)
        figures[f"beats_{size}_p50_ms"] = percentile_ms(durations, 50)
        figures[f"beats_{size}_p99_ms"] = percentile_ms(durations, 99)
    return figures


def resident_mib(pid: int) -> float:
    """Return the resident memory of a process in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS line for process {pid}")


def load_test(
    address: str, pid: int, beats: np.ndarray, clients: int, duration_s: float, margin: float
) -> dict[str, float]:
    """Run ``clients`` threads mixing Generate (20 beats) and Validate (50 beats)."""
    latencies: dict[str, list[float]] = {"Generate": [], "Validate": []}
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def worker(index: int) -> None:
        rng = random.Random(index)
        with ApplianceClient(address, timeout_s=120.0) as client:
            while time.monotonic() < stop_at:
                method = "Generate" if rng.random() < 0.5 else "Validate"
                start = time.perf_counter()
                try:
                    if method == "Generate":
                        client.generate(count=20, seed=rng.randrange(2**32), margin=margin)
                    else:
                        client.validate(beats[:50])
                except Exception as exc:  # every failure is counted and reported
                    with lock:
                        failures.append(f"{method}: {exc!r}"[:200])
                    continue
                with lock:
                    latencies[method].append(time.perf_counter() - start)

    rss_before = resident_mib(pid)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rss_after = resident_mib(pid)
    everything = latencies["Generate"] + latencies["Validate"]
    return {
        "clients": clients,
        "duration_s": duration_s,
        "calls": len(everything),
        "failures": len(failures),
        "first_failures": failures[:3],  # type: ignore[dict-item]
        "generate_p50_ms": percentile_ms(latencies["Generate"], 50),
        "generate_p99_ms": percentile_ms(latencies["Generate"], 99),
        "validate_p50_ms": percentile_ms(latencies["Validate"], 50),
        "validate_p99_ms": percentile_ms(latencies["Validate"], 99),
        "all_p99_ms": percentile_ms(everything, 99),
        "server_rss_before_mib": rss_before,
        "server_rss_after_mib": rss_after,
        "server_rss_growth_percent": 100 * (rss_after - rss_before) / rss_before,
    }


def run(
    store: Path,
    model,
    duration_s: float,
    clients: int,
    work: Path,  # noqa: ANN001
    margin: float | None,
) -> dict:
    """Start a server on ``store`` and collect every figure."""
    server = ServerProcess(store, work)
    try:
        address = server.wait_serving()
        with ApplianceClient(address, timeout_s=300.0) as client:
            info = client.model_info()
            margin = info.default_margin if margin is None else margin
            engine = Engine(load_current(store), intra_op_threads=info.intra_op_threads)
            beats = client.generate(count=1000, seed=1, margin=0.0).beats
            figures = {
                "server": {
                    "cpu_limit": info.cpu_limit,
                    "cpu_limit_source": info.cpu_limit_source,
                    "engine_slots": info.engine_slots,
                    "intra_op_threads": info.intra_op_threads,
                    "execution_provider": info.execution_provider,
                },
                "margin": margin,
                "generate": generate_throughput(engine, client, margin),
                "validate": validate_latency(client, beats),
            }
            if model is not None:
                figures["onnx_vs_torch"] = onnx_against_torch(engine, model, info.intra_op_threads)
        figures["load"] = load_test(
            address, server.process.pid, beats, clients, duration_s, margin
        )
    finally:
        exit_status = server.stop()
    figures["server_exit_status"] = exit_status
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="model store to serve (default: train the fixture model)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="PyTorch checkpoint of the store's model (default: STORE/training/best.pt)",
    )
    parser.add_argument(
        "--duration-s",
        type=float,
        default=60.0,
        help="length of the load test in seconds (default: 60)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=None,
        help="pertinence margin of every Generate call (default: the model's)",
    )
    parser.add_argument(
        "--clients", type=int, default=32, help="concurrent clients of the load test (default: 32)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="grpc-bench-") as folder:
        work = Path(folder)
        if args.store is None:
            model = train_store(work)
            store = work / "store"
        else:
            store = args.store
            model = load_model(args.checkpoint or store / "training" / "best.pt")
            if model is None:
                sys.stderr.write("no PyTorch checkpoint found; skipping ONNX against PyTorch\n")
        figures = run(store, model, args.duration_s, args.clients, work, args.margin)
    json.dump(figures, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
