"""Process groups for data-parallel training, device selection and rank helpers.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in each. ``init_from_env`` joins that group with NCCL when
the process has a CUDA device and with gloo otherwise. A plain ``python`` process (no
``WORLD_SIZE`` or ``WORLD_SIZE=1``) gets a single-process context and no group.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from appliance.errors import TrainingError

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
# A rank waits this long for the others at a collective before it raises.
COLLECTIVE_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the training job.

    Attributes:
        rank: Global rank, 0 to ``world_size - 1``.
        world_size: Number of training processes in the job.
        local_rank: Rank on this node; it picks the CUDA device.
        device: Torch device this process trains on.
        backend: Process-group backend (``nccl`` or ``gloo``), empty in a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def is_distributed(self) -> bool:
        """Whether gradients are averaged across more than one process."""
        return self.world_size > 1

    @property
    def is_rank_zero(self) -> bool:
        """Whether this process writes checkpoints, exports and logs the run's results."""
        return self.rank == 0


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """Return the training device for a ``TrainConfig.device`` value.

    Args:
        requested: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
        local_rank: Rank on this node; it selects CUDA device ``local_rank`` modulo the count.

    Raises:
        TrainingError: If ``requested`` is unknown, or is ``cuda`` on a machine without CUDA.
    """
    if requested not in DEVICE_CHOICES:
        raise TrainingError(f"train.device={requested!r} is invalid; use one of {DEVICE_CHOICES}")
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise TrainingError(
                "train.device='cuda' but torch sees no CUDA device; install a CUDA build of "
                "torch on a GPU machine or set train.device to 'auto' or 'cpu'"
            )
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise TrainingError(
            f"environment variable {name}={value!r} is not an integer; torchrun sets it"
        ) from None


def current_context(requested_device: str = "auto") -> DistributedContext:
    """Return the context of an already initialised process group, or a single process.

    Raises:
        TrainingError: As ``select_device``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext(device=select_device(requested_device))
    local_rank = _env_int("LOCAL_RANK", 0)
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=select_device(requested_device, local_rank),
        backend=str(dist.get_backend()),
    )


def init_from_env(
    requested_device: str = "auto", init_method: str = "env://"
) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment.

    Does nothing beyond device selection when ``WORLD_SIZE`` is unset or 1, or when a group
    is already initialised (its context is returned).

    Args:
        requested_device: As ``select_device``.
        init_method: Rendezvous URL; ``env://`` reads ``MASTER_ADDR`` and ``MASTER_PORT``, and
            ``file:///path`` uses a shared file instead of a TCP store.

    Raises:
        TrainingError: If the environment is inconsistent or the device is unavailable.
    """
    if dist.is_available() and dist.is_initialized():
        return current_context(requested_device)
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = select_device(requested_device, local_rank)
    if world_size <= 1:
        return DistributedContext(device=device)
    if not 0 <= rank < world_size:
        raise TrainingError(f"RANK={rank} is outside 0..{world_size - 1}; start with torchrun")
    if not dist.is_available():
        raise TrainingError("this torch build has no torch.distributed; install a full build")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    context = DistributedContext(rank, world_size, local_rank, device, backend)
    logger.info(
        "process group joined backend=%s rank=%d world_size=%d local_rank=%d device=%s",
        backend,
        rank,
        world_size,
        local_rank,
        device,
    )
    return context


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_rank_zero() -> bool:
    """Whether this process is rank 0, or the only process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def any_rank(flag: bool, context: DistributedContext) -> bool:
    """Return True on every rank when ``flag`` is True on at least one rank.

    Ranks must take the same branch at a collective (stop, skip, raise), or the others wait
    until ``COLLECTIVE_TIMEOUT_S``.
    """
    if not context.is_distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier(context: DistributedContext) -> None:
    """Wait for every rank; a no-op in a single process."""
    if context.is_distributed:
        if context.device.type == "cuda":
            dist.barrier(device_ids=[context.device.index or 0])
        else:
            dist.barrier()
