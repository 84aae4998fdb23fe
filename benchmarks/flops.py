"""Count the arithmetic of one training step per beat: the appliance's flow against zuko's.

Run from the repository root:

    .venv/bin/python benchmarks/flops.py [--batch 128]

It builds the appliance's flow with the default ``ModelConfig`` (one lead, 256 samples) and the
zuko RealNVP of ``benchmarks/flow_baselines.py``, which has the same parameter count. It runs
one forward and backward pass of each training loss on random beats and counts the
floating-point operations with PyTorch's ``FlopCounterMode``. The count is the work behind the
per-epoch times that ``flow_baselines.py`` measures.

It then times a large float32 matrix product (``MATMUL_SIZE`` square, best of ``MATMUL_REPEATS``)
with one thread and with ``--threads`` threads. That rate is about the most arithmetic the
cores do per second, so the figures that end in ``_floor`` are lower bounds: the training
arithmetic of one epoch of ``--epoch-beats`` beats at the ``--threads`` rate, and one forward
pass of the inference graph (batch 256, no gradient) at the one-thread rate.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch
import zuko
from flow_baselines import ZUKO_TRANSFORMS, zuko_hidden_for
from torch.utils.flop_counter import FlopCounterMode

from appliance.classes import AAMI_CLASSES
from appliance.config import ModelConfig, TrainConfig
from appliance.flow import ConditionalFlow
from appliance.train import compute_loss, one_hot


def step_flops(
    loss_of_batch: Callable[[], torch.Tensor], parameters: list[torch.nn.Parameter]
) -> int:
    """Return the floating-point operations of one forward and backward pass."""
    with FlopCounterMode(display=False) as counter:
        loss = loss_of_batch()
        torch.autograd.grad(loss, parameters)
    return int(counter.get_total_flops())


# Side of the square float32 matrices whose product measures the cores' arithmetic rate.
MATMUL_SIZE = 2048
MATMUL_REPEATS = 5
# Batch of the inference benchmark in ``grpc_throughput.py``.
INFERENCE_BATCH = 256


def matmul_gflops(threads: int) -> float:
    """Return the best float32 matrix-product rate of ``threads`` torch threads, in GFLOP/s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.rand(MATMUL_SIZE, MATMUL_SIZE)
        b = torch.rand(MATMUL_SIZE, MATMUL_SIZE)
        torch.mm(a, b)
        best_s = math.inf
        for _ in range(MATMUL_REPEATS):
            start = time.perf_counter()
            torch.mm(a, b)
            best_s = min(best_s, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * MATMUL_SIZE**3 / best_s / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="beats per training step")
    parser.add_argument(
        "--epoch-beats",
        type=int,
        default=8987,
        help="training beats per epoch, for the epoch floor (default: 8987, the DS1 benchmark's)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of training")
    args = parser.parse_args()
    torch.manual_seed(0)
    window_samples = 256
    classes = len(AAMI_CLASSES)
    flow = ConditionalFlow(ModelConfig(), 1, window_samples, classes)
    parameters = sum(p.numel() for p in flow.parameters())
    x = torch.randn(args.batch, 1, window_samples)
    condition = one_hot(torch.randint(0, classes, (args.batch,)))
    flow(x, condition)  # initialises ActNorm from this batch
    weight = TrainConfig().reconstruction_weight
    figures: dict[str, float] = {"batch": args.batch, "parameters": parameters}
    appliance_params = [p for p in flow.parameters() if p.requires_grad]
    figures["appliance_mflop_per_beat"] = (
        step_flops(lambda: compute_loss(flow, x, condition, weight)[0], appliance_params)
        / args.batch
        / 1e6
    )
    figures["appliance_without_reconstruction_mflop_per_beat"] = (
        step_flops(lambda: compute_loss(flow, x, condition, 0.0)[0], appliance_params)
        / args.batch
        / 1e6
    )
    width = zuko_hidden_for(parameters, window_samples, classes)
    realnvp = zuko.flows.RealNVP(
        window_samples, classes, transforms=ZUKO_TRANSFORMS, hidden_features=(width, width)
    )
    flat = x.flatten(1)

    def zuko_loss() -> torch.Tensor:
        return -realnvp(condition).log_prob(flat).mean() / (window_samples * math.log(2.0))

    figures["zuko_parameters"] = sum(p.numel() for p in realnvp.parameters())
    figures["zuko_mflop_per_beat"] = (
        step_flops(zuko_loss, list(realnvp.parameters())) / args.batch / 1e6
    )
    figures["ratio"] = figures["appliance_mflop_per_beat"] / figures["zuko_mflop_per_beat"]
    inference_x = torch.randn(INFERENCE_BATCH, 1, window_samples)
    inference_condition = one_hot(torch.randint(0, classes, (INFERENCE_BATCH,)))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        flow(inference_x, inference_condition)
    forward_gflop = counter.get_total_flops() / 1e9
    figures["forward_gflop_batch_256"] = forward_gflop
    one_thread_gflops = matmul_gflops(1)
    threads_gflops = matmul_gflops(args.threads)
    figures["matmul_gflops_1_thread"] = one_thread_gflops
    figures[f"matmul_gflops_{args.threads}_threads"] = threads_gflops
    figures["epoch_beats"] = args.epoch_beats
    figures["appliance_epoch_s_floor"] = (
        figures["appliance_mflop_per_beat"] * args.epoch_beats / 1e3 / threads_gflops
    )
    figures["forward_ms_floor_1_thread"] = forward_gflop / one_thread_gflops * 1e3
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
