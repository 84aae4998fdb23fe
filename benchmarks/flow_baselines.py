"""Test NLL of the conditional flow against two baselines on the inter-patient MIT-BIH split.

Models, all class-conditional and all on the same scaled beats:

- the appliance's flow (``appliance.train.train``), at the default reconstruction weight and,
  to measure the bottleneck term, at weight 0;
- a Gaussian per class fitted in PCA space (full covariance, eigenvalues floored at the
  dequantisation noise variance);
- a zuko RealNVP with as many parameters as the appliance's flow, trained with the same
  optimiser, batch size, beat order, noise and wall-clock budget.

Test NLL is in bits per dimension on the test records (de Chazal DS2) of the classes the flow
knows. Train time per epoch includes the validation pass of each epoch for both flows.

Each flow trains for ``--minutes`` (checked at epoch ends), so the defaults aim at about
10 minutes in all; the scoring of the 51,655 test beats comes on top (``--test-stride`` cuts
it). Usage::

    .venv/bin/python benchmarks/flow_baselines.py --data ../shared/data/mitdb
    .venv/bin/python benchmarks/flow_baselines.py --minutes 0.5 --max-beats-per-class 1000 \
        --test-stride 10 --skip-ablation
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zuko

from appliance.classes import AAMI_CLASSES
from appliance.config import ApplianceConfig, DataConfig, TrainConfig
from appliance.dataset import BeatSet, ingest
from appliance.train import _cap_per_class, _epoch_order, evaluate, one_hot, train

ROOT = Path(__file__).resolve().parents[1]
ZUKO_TRANSFORMS = 8


def known_subset(beats: BeatSet, classes_known: list[str]) -> BeatSet:
    keep = np.isin(beats.labels, [AAMI_CLASSES.index(name) for name in classes_known])
    return BeatSet(beats.windows[keep], beats.labels[keep], beats.records[keep])


def train_subset(beats: BeatSet, classes_known: list[str], settings: TrainConfig) -> BeatSet:
    """Select the training beats the way ``appliance.train`` does (known classes, capped)."""
    known = known_subset(beats, classes_known)
    index = _cap_per_class(known.labels, settings.max_beats_per_class, settings.seed)
    return BeatSet(known.windows[index], known.labels[index], known.records[index])


def pca_gaussian_bpd(train_set: BeatSet, test_set: BeatSet, scale_mv: float, noise_std: float):
    """Fit one Gaussian per class in PCA space; return the test NLL in bits per dimension."""
    x_train = train_set.windows.reshape(len(train_set), -1).astype(np.float64) / scale_mv
    x_test = test_set.windows.reshape(len(test_set), -1).astype(np.float64) / scale_mv
    dims = x_train.shape[1]
    log_prob = np.zeros(len(test_set))
    for label in np.unique(test_set.labels):
        members = x_train[train_set.labels == label]
        mean = members.mean(axis=0)
        _, singular, components = np.linalg.svd(members - mean, full_matrices=False)
        variances = np.zeros(dims)
        variances[: singular.size] = singular**2 / members.shape[0]
        variances = np.maximum(variances, noise_std**2)
        if components.shape[0] < dims:  # fewer beats than dimensions: complete the basis
            _, _, full = np.linalg.svd(members - mean, full_matrices=True)
            components = full
        rows = test_set.labels == label
        projected = (x_test[rows] - mean) @ components.T
        log_prob[rows] = -0.5 * (
            (projected**2 / variances).sum(axis=1)
            + np.log(variances).sum()
            + dims * math.log(2 * math.pi)
        )
    return float(-log_prob.mean() / (dims * math.log(2.0)))


def zuko_hidden_for(parameters: int, features: int, context: int) -> int:
    """Return the MLP width at which a zuko RealNVP has closest to ``parameters`` weights."""
    best_width, best_gap = 1, math.inf
    for width in range(4, 1024):
        flow = zuko.flows.RealNVP(
            features, context, transforms=ZUKO_TRANSFORMS, hidden_features=(width, width)
        )
        gap = abs(sum(p.numel() for p in flow.parameters()) - parameters)
        if gap < best_gap:
            best_width, best_gap = width, gap
        elif gap > best_gap:
            break
    return best_width


def zuko_bpd(flow: zuko.flows.Flow, beats: BeatSet, scale_mv: float) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(beats), 512):
            x = torch.from_numpy(beats.windows[start : start + 512] / scale_mv).float()
            condition = one_hot(torch.from_numpy(beats.labels[start : start + 512]))
            log_prob = flow(condition).log_prob(x.flatten(1))
            total += float(-log_prob.sum()) / (x[0].numel() * math.log(2.0))
    return total / len(beats)


def train_zuko(train_set, validation_set, scale_mv, settings: TrainConfig, width: int):
    """Train the zuko RealNVP with the appliance's optimiser, order and noise; return stats."""
    torch.manual_seed(settings.seed)
    features = train_set.windows[0].size
    flow = zuko.flows.RealNVP(
        features, len(AAMI_CLASSES), transforms=ZUKO_TRANSFORMS, hidden_features=(width, width)
    )
    optimizer = torch.optim.Adam(
        flow.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    windows = (train_set.windows / scale_mv).astype(np.float32)
    steps_per_epoch = max(1, len(train_set) // settings.batch_size)
    best, best_state, epochs, step = math.inf, None, 0, 0
    started = time.monotonic()
    for epoch in range(settings.max_epochs):
        order = _epoch_order(train_set.labels, settings.class_balance, settings.seed, epoch)
        flow.train()
        for batch_index in range(steps_per_epoch):
            index = order[
                batch_index * settings.batch_size : (batch_index + 1) * settings.batch_size
            ]
            x = torch.from_numpy(windows[index]).flatten(1)
            noise = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
            x = x + settings.noise_std * torch.randn(x.shape, generator=noise)
            condition = one_hot(torch.from_numpy(train_set.labels[index]))
            loss = -flow(condition).log_prob(x).mean() / (features * math.log(2.0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
            optimizer.step()
            step += 1
        flow.eval()
        validation = zuko_bpd(flow, validation_set, scale_mv)
        epochs += 1
        if validation < best:
            best = validation
            best_state = {k: v.clone() for k, v in flow.state_dict().items()}
        if time.monotonic() - started > settings.max_minutes * 60:
            break
    duration_s = time.monotonic() - started
    if best_state is not None:
        flow.load_state_dict(best_state)
    flow.eval()
    parameters = sum(p.numel() for p in flow.parameters())
    return flow, {"epochs": epochs, "duration_s": duration_s, "parameters": parameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mitdb")
    parser.add_argument("--minutes", type=float, default=2.5, help="training budget per flow")
    parser.add_argument("--max-beats-per-class", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every model")
    parser.add_argument(
        "--test-stride", type=int, default=1, help="score every n-th test beat (1: all)"
    )
    parser.add_argument(
        "--skip-ablation", action="store_true", help="skip the reconstruction_weight=0 run"
    )
    args = parser.parse_args()
    # The appliance's training flushes denormal numbers to zero, so the baselines get the same
    # mode. It is set before the first parallel operation, because worker threads inherit it.
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)

    started = time.monotonic()
    dataset = ingest(args.data, DataConfig(split="de-chazal"))
    test_all = dataset.splits["test"]
    dataset.splits["test"] = BeatSet(
        test_all.windows[:: args.test_stride],
        test_all.labels[:: args.test_stride],
        test_all.records[:: args.test_stride],
    )
    print(
        f"ingest: {time.monotonic() - started:.1f} s, beats per split: "
        + ", ".join(f"{k}={len(v)}" for k, v in dataset.splits.items())
    )
    settings = TrainConfig(
        max_epochs=1000,
        max_minutes=args.minutes,
        max_beats_per_class=args.max_beats_per_class,
        threads=args.threads,
    )
    config = ApplianceConfig(data=DataConfig(split="de-chazal"), train=settings)
    weights = [settings.reconstruction_weight] + ([] if args.skip_ablation else [0.0])
    rows = []
    scale_mv, classes_known, parameters = 1.0, list(AAMI_CLASSES), 0
    for weight in weights:
        run_config = dataclasses.replace(
            config, train=dataclasses.replace(settings, reconstruction_weight=weight)
        )
        with tempfile.TemporaryDirectory() as work_dir:
            result = train(
                run_config,
                dataset.splits["train"],
                dataset.splits["validation"],
                Path(work_dir),
                resume=False,
                progress=False,
            )
        scale_mv, classes_known = result.scale_mv, result.classes_known
        parameters = result.summary["parameters"]
        test_set = known_subset(dataset.splits["test"], classes_known)
        test_figures = evaluate(result.model, test_set, scale_mv)
        test_bpd, test_mse = test_figures.nll_bpd, test_figures.reconstruction_mse
        epochs = result.summary["epochs"]
        rows.append(
            (
                f"appliance flow, reconstruction_weight={weight:g}",
                parameters,
                epochs,
                result.summary["duration_s"] / epochs,
                test_bpd,
                test_mse * scale_mv**2,
            )
        )

    test_set = known_subset(dataset.splits["test"], classes_known)
    train_set = train_subset(dataset.splits["train"], classes_known, settings)
    validation_set = known_subset(dataset.splits["validation"], classes_known)
    gaussian = pca_gaussian_bpd(train_set, test_set, scale_mv, settings.noise_std)
    rows.append(("Gaussian per class in PCA space", 0, 0, math.nan, gaussian, math.nan))

    width = zuko_hidden_for(parameters, train_set.windows[0].size, len(AAMI_CLASSES))
    torch.set_flush_denormal(True)  # train() turns the mode off on return
    flow, stats = train_zuko(train_set, validation_set, scale_mv, settings, width)
    rows.append(
        (
            f"zuko {zuko.__version__} RealNVP, {ZUKO_TRANSFORMS} couplings, MLP {width}x2",
            stats["parameters"],
            stats["epochs"],
            stats["duration_s"] / stats["epochs"],
            zuko_bpd(flow, test_set, scale_mv),
            math.nan,
        )
    )

    print(
        f"scale_mv={scale_mv:.4f} classes={','.join(classes_known)} test_beats={len(test_set)} "
        f"train_beats={len(train_set)} threads={args.threads} minutes_per_flow={args.minutes}"
    )
    print(
        "| Model | Parameters | Epochs | Train time per epoch (s) | Test NLL (bits/dim) "
        "| Bottleneck reconstruction MSE (mV^2) |"
    )
    print("|---|---|---|---|---|---|")
    for name, count, epochs, epoch_s, bpd, mse in rows:
        print(f"| {name} | {count:,} | {epochs} | {epoch_s:.1f} | {bpd:.3f} | {mse:.5f} |")
    print(f"total: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
