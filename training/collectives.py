"""The small collectives the loops share: where their tensors live, averaging logged values."""

from __future__ import annotations

import torch
import torch.distributed as dist


def comm_device() -> torch.device:
    """Where tensors for collectives must be: NCCL (GPU workers) reduces only CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over all ranks, in one all-reduce (every rank passes the same keys)."""
    keys = sorted(values)
    totals = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(totals)
    world = dist.get_world_size()
    return {k: v / world for k, v in zip(keys, totals.tolist(), strict=True)}
