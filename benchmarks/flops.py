"""Count the arithmetic of one training step per beat: the appliance's flow against zuko's.

Run from the repository root:

    .venv/bin/python benchmarks/flops.py [--batch 128]

It builds the appliance's flow with the default ``ModelConfig`` (one lead, 256 samples) and the
zuko RealNVP of ``benchmarks/flow_baselines.py``, which has the same parameter count. It runs
one forward and backward pass of each training loss on random beats and counts the
floating-point operations with PyTorch's ``FlopCounterMode``. The count is the work behind the
per-epoch times that ``flow_baselines.py`` measures.
"""

from __future__ import annotations

import argparse
import json
import math
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="beats per training step")
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
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
