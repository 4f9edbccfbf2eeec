"""The DeepSpeed engine: the one module in the project that imports deepspeed.

The DeepSpeed JSON is derived from the experiment config here, never kept beside it. The
optimizer is torch's AdamW (DeepSpeed's own CPU Adam needs a C++ build at first use), with
a linear-warmup schedule that DeepSpeed checkpoints with the rest of the engine state.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402
from deepspeed.checkpoint import ds_to_universal  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils import groups  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

# DeepSpeed's shared-memory op serves only its inference all-reduce, never training, yet it is
# compiled (60-110 s of C++ on a fresh CPU machine) when the comm backend starts: skip it.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from core.config import ExperimentConfig  # noqa: E402
from core.errors import LdmError  # noqa: E402

# What DeepSpeed's ZeRO optimizer states hold besides tensors and plain data (listed by
# torch.serialization.get_unsafe_globals_in_checkpoint on every stage and precision we
# write): torch's weights-only unpickler rebuilds these classes and refuses anything else.
_CHECKPOINT_CLASSES = [LossScaler, ZeroStageEnum, fragment_address]
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def deepspeed_config(config: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this experiment and world size."""
    t = config.train
    accumulation = t.gradient_accumulation_steps(world_size)
    ds: dict[str, Any] = {
        "train_batch_size": t.micro_batch_size * world_size * accumulation,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {
            "stage": t.zero_stage,
            "reduce_bucket_size": t.reduce_bucket_size,
            "allgather_bucket_size": t.reduce_bucket_size,
        },
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,  # our loop logs; DeepSpeed's own prints would only add noise
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    # Always written: DeepSpeed clips at 1.0 when the key is absent, so 0 ("off") must say so.
    ds["gradient_clipping"] = t.grad_clip
    return ds


def build_engine(
    model: torch.nn.Module, config: ExperimentConfig, world_size: int, load_universal: bool = False
):
    """Wrap `model` in a DeepSpeed engine (torch.distributed must already be initialised).

    `load_universal`: the engine will load a universal checkpoint (see `to_universal`).
    """
    t = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        weight_decay=t.weight_decay,
        # None, not False: torch then picks its foreach loop where it can, as before.
        fused=True if t.fused_optimizer else None,
    )
    warmup = max(1, t.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config={
            **deepspeed_config(config, world_size),
            **({"checkpoint": {"load_universal": True}} if load_universal else {}),
        },
        dist_init_required=False,
    )
    if t.compile != "off":
        compile_engine(engine, t.compile)
    return engine


# What `train.compile` compiles with; tests swap in a backend that traces the same graphs
# (AOTAutograd included) without inductor's code generation, minutes of C++ on a small CPU.
COMPILE_BACKEND = "inductor"


def compile_engine(engine, mode: str) -> None:
    """torch.compile the engine's module in place (its parameter names, hence checkpoints,
    stay as they are): the forward and backward run compiled, DeepSpeed's step does not."""
    kwargs = {"mode": mode} if COMPILE_BACKEND == "inductor" and mode != "default" else {}
    engine.compile(backend=COMPILE_BACKEND, compile_kwargs=kwargs)


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process: flat after the first step, or the
    run recompiles (a shape or a guard that changes from step to step)."""
    from torch._dynamo.utils import counters  # noqa: PLC0415 - only where compile is on

    return int(counters["stats"]["unique_graphs"])


def autoencoder_deepspeed_config(
    config: ExperimentConfig, world_size: int, num_parameters: int
) -> dict[str, Any]:
    """The DeepSpeed JSON of a stage-1 engine (autoencoder or discriminator): fp32, one
    micro batch per step (`autoencoder.batch_size` split over the ranks), and
    `autoencoder.zero_stage`. `num_parameters`: the engine's model size, which bounds the
    ZeRO buckets (DeepSpeed's defaults allocate 2 GB per rank whatever the model's size)."""
    ae = config.autoencoder
    # One bucket holds every gradient; DeepSpeed wants it a multiple of its alignment (2).
    bucket = -(-num_parameters // 1024) * 1024
    return {
        "train_batch_size": ae.batch_size,
        "train_micro_batch_size_per_gpu": ae.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": ae.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "bf16": {"enabled": False},
        # Stage 1 does not clip (as the paper's code), and DeepSpeed clips at 1.0 unless told.
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def build_module_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ds_config: dict[str, Any],
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
):
    """Wrap `model` with the torch `optimizer` (and scheduler, stepped by `engine.step()`)
    in a DeepSpeed engine; torch.distributed must already be initialised."""
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    return engine


def forget_process_groups() -> None:
    """Drop the process groups DeepSpeed cached at its last `initialize`. A process that
    destroys its torch.distributed group and makes a new one (stage 1 trained in the
    driver, more than once in one process) must call this, or DeepSpeed uses the dead one."""
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        setattr(groups, name, None)


def save_engine(engine, folder: Path) -> None:
    """Every rank writes its ZeRO shard of module, optimizer and scheduler state into `folder`."""
    # The `latest` pointer DeepSpeed writes is not trusted: commit markers decide (checkpoint.py).
    engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)


@contextmanager
def weights_only_loads(folder: Path) -> Iterator[None]:
    """Every `torch.load` inside goes through torch's weights-only unpickler, DeepSpeed's own
    calls included (they ask for a full unpickle). A checkpoint is data on storage that others
    may write: a full unpickle would run whatever code a file names, on every rank."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_CHECKPOINT_CLASSES):
            yield
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = named.group(1) if named else "objects other than tensors and plain data"
        raise LdmError(
            f"checkpoint {folder}: refused to load it: a file in it holds {what}, which ldm "
            "never writes (someone else wrote that file); delete the tag or resume from another"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def to_universal(tag_dir: Path, out_dir: Path) -> None:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format (one file per parameter and
    state, unpartitioned), which an engine of any world size can load: elastic restarts."""
    with weights_only_loads(tag_dir):
        _to_universal(tag_dir, out_dir)


def _to_universal(tag_dir: Path, out_dir: Path) -> None:
    ds_to_universal.main(
        argparse.Namespace(
            input_folder=str(tag_dir),
            output_folder=str(out_dir),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # our checkpoints carry no Megatron-style metadata
        )
    )


def load_engine(engine, folder: Path) -> None:
    """Load the DeepSpeed checkpoint in `folder` (ours, verified against its commit marker)."""
    with weights_only_loads(folder):
        path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")


@contextmanager
def full_parameters(engine) -> Iterator[None]:
    """Inside, the module's parameters hold their whole weights on every rank (to read, e.g.
    for the EMA): ZeRO-3 gathers its partitions (a collective); other stages hold them whole."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        yield


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole module's weights on every rank (gathers ZeRO-3 partitions when needed)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
