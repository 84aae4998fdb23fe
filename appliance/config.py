"""Settings of each stage, as frozen dataclasses with units in the field names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(__file__).parent / "data" / "default"


@dataclass(frozen=True)
class DataConfig:
    """How records become beat windows.

    Attributes:
        fs_hz: Sampling rate of the model; records at other rates are resampled to it.
        window_samples: Samples per beat window at ``fs_hz``.
        pre_r_samples: Samples before the R peak inside the window.
        leads: Lead names in preference order; the first one a record has is used for each
            of the ``n_leads`` model channels.
        n_leads: Number of leads per window.
        annotation_extension: Extension of the reference beat annotation files.
        highpass_hz: Cut-off of the zero-phase high-pass filter that removes baseline wander.
        split: How records are split: ``auto``, ``file``, ``de-chazal`` or ``random``.
        split_seed: Seed of the random split by record.
        validation_fraction: Fraction of records for validation in a random split.
        test_fraction: Fraction of records for test in a random split.
        cache_dir: Folder of the ingest cache of preprocessed beat windows; empty disables it.
    """

    fs_hz: float = 360.0
    window_samples: int = 256
    pre_r_samples: int = 90
    leads: tuple[str, ...] = ("MLII", "II", "V5", "ML2")
    n_leads: int = 1
    annotation_extension: str = "atr"
    highpass_hz: float = 0.5
    split: str = "auto"
    split_seed: int = 0
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    cache_dir: str = ""


# Nonlinearities of the coupling subnetworks. ReLU is the default: ONNX Runtime's CPU provider
# folds it into the convolution before it, while GELU runs as a kernel of its own.
ACTIVATIONS = ("relu", "gelu")
# Activation of models whose saved settings predate ``ModelConfig.activation``.
LEGACY_ACTIVATION = "gelu"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the conditional invertible network.

    Attributes:
        n_levels: Multi-scale levels; each squeezes time by 2 and factors out half the channels,
            except the last.
        steps_per_level: Flow steps (ActNorm, 1x1 convolution, affine coupling) per level.
        hidden_channels: Channels of each coupling subnetwork.
        kernel_size: Kernel size of the coupling subnetwork convolutions.
        bottleneck_dims: Leading latent dimensions that carry the beat's shape (the
            reconstruction term) and get a full-covariance generation prior. The other
            dimensions get an independent prior, scaled by ``GateConfig.tail_scale``.
        activation: Nonlinearity between the coupling subnetwork convolutions, one of
            ``ACTIVATIONS``. Models saved before this setting existed used ``"gelu"``.
    """

    n_levels: int = 4
    steps_per_level: int = 4
    hidden_channels: int = 64
    kernel_size: int = 5
    bottleneck_dims: int = 32
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model activation {self.activation!r} is not supported; use one of "
                f"{', '.join(ACTIVATIONS)}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Training budget and optimiser.

    Attributes:
        max_epochs: Upper bound on epochs.
        max_minutes: Wall-clock budget. Training stops at the first step past it, then
            validates and saves a checkpoint, which can end the last epoch early.
        batch_size: Beats per optimiser step.
        learning_rate: Adam learning rate.
        weight_decay: Adam weight decay.
        reconstruction_weight: Weight of the squared error of the bottleneck reconstruction,
            added to the negative log-likelihood in bits per dimension.
        noise_std: Standard deviation of the dequantisation noise added to scaled beats.
        class_balance: Sample training beats so that each class is seen at least this fraction
            of the time its uniform share would give (0 keeps the data's own balance).
        max_beats_per_class: Cap on training beats per class, to bound the epoch time.
        seed: Seed of every random draw in training.
        threads: Torch intra-op threads (0 keeps torch's default).
        checkpoint_every_steps: Steps between checkpoints.
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``. Under
            ``torchrun`` each process takes CUDA device ``LOCAL_RANK``.
        mixed_precision: ``no`` (float32) or ``bf16`` (bfloat16 autocast of the training
            forward pass, CUDA only). Checkpoints and exported graphs stay float32.
    """

    max_epochs: int = 30
    max_minutes: float = 5.0
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    reconstruction_weight: float = 10.0
    noise_std: float = 0.01
    class_balance: float = 0.5
    max_beats_per_class: int = 20000
    seed: int = 0
    threads: int = 0
    checkpoint_every_steps: int = 200
    device: str = "auto"
    mixed_precision: str = "no"


@dataclass(frozen=True)
class GateConfig:
    """Pertinence gate and privacy guard settings stored with the model.

    Attributes:
        default_margin: Lowest pertinence score that ``Generate`` accepts by default.
        min_margin: Lowest margin a request may ask for.
        max_margin: Highest margin a request may ask for.
        privacy_quantile: Quantile of held-out beats' distances to the training set below which
            a generated beat counts as a near-copy.
        truncation: Bound of the standard normal values that the generation prior maps to
            latent values. Each is redrawn until its magnitude is at most this. A latent value
            mixes several of them through the prior's Cholesky factor, so it can lie more than
            ``truncation * temperature`` of its own standard deviations from the class mean.
        max_abs_mv: Physiological amplitude limit; a generated beat beyond it is rejected.
        tail_scale: Spread of the latent values after the bottleneck relative to the
            generation prior's (``appliance.latent_prior``): 1 draws them as fitted, 0 fixes them
            at their mean, so that generation samples the bottleneck only.
    """

    default_margin: float = 0.05
    min_margin: float = 0.0
    max_margin: float = 0.99
    privacy_quantile: float = 0.05
    truncation: float = 3.0
    max_abs_mv: float = 10.0
    tail_scale: float = 1.0


@dataclass(frozen=True)
class ApplianceConfig:
    """All settings of one training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as plain JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ApplianceConfig:
        """Build settings from ``to_dict`` output; unknown keys raise ``TypeError``."""
        data = dict(values.get("data", {}))
        if "leads" in data:
            data["leads"] = tuple(data["leads"])
        model = dict(values.get("model", {}))
        model.setdefault("activation", LEGACY_ACTIVATION)
        return cls(
            data=DataConfig(**data),
            model=ModelConfig(**model),
            train=TrainConfig(**values.get("train", {})),
            gate=GateConfig(**values.get("gate", {})),
        )
