"""Agreeing to stop: every rank saves a committed checkpoint, then the job ends.

Two ways a stop reaches the ranks, checked together once per step: the launcher's request
(its own SIGTERM or `ldm jobs stop`: a file on the run's storage that rank 0 polls), and a
SIGTERM to a rank's own process (`core.signals`). One all-reduce makes every rank see either,
so they all reach the same collective save. Which rank was signalled is written into the
stop file, so the launcher can say why the job stopped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from core import signals
from training.collectives import comm_device
from training.rank0 import Rank0


def agree_to_stop(main: Rank0) -> bool:
    """Collective, once per step on every rank: whether to checkpoint and stop now. Rank 0
    records which rank was signalled (the lowest, if several) in the stop file."""
    rank, world = dist.get_rank(), dist.get_world_size()
    flags = torch.tensor(
        [
            1.0 if main.stop_requested() else 0.0,  # None (not polled) on ranks other than 0
            float(world - rank) if signals.requested() else 0.0,  # MAX: the lowest rank
        ],
        device=comm_device(),
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    launcher, signalled = flags.tolist()
    if signalled:
        main.record_stop(f"SIGTERM to worker rank {world - int(signalled)}")
    return bool(launcher or signalled)
