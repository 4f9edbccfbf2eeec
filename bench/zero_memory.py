"""ZeRO memory: what each rank really holds per DeepSpeed ZeRO stage, vs the ZeRO paper's formulas.

Two ranks (torch.distributed on gloo, DeepSpeed's CPU accelerator) build the project's engine
(`training.engine.build_engine`) around a ~51 M-parameter UNet (the demo UNet widened to
128/256/512 channels) for ZeRO stages 0-3, train one step, run the next forward and backward
and then count, before that step's optimizer update, the bytes of every tensor the rank holds:
the module's parameters (ZeRO-3: the `ds_tensor` partitions plus the parameters it keeps
whole), gradients (`.grad`, and the ZeRO optimizer's partitioned gradient buffers), the AdamW
moments in the wrapped torch optimizer's `state`, and everything else the ZeRO optimizer
references. Storage is counted once, however many views point into it (DeepSpeed keeps
parameters and gradients as views of flat buffers). A second count, taken after each
parameter's gradient arrives, gives the peak during backward.

The baseline is Rajbhandari et al. 2020 (ZeRO), Ψ parameters on N ranks, in two variants,
both measured by default. fp32 (the project's default) with AdamW: parameters 4Ψ (stage 3:
/N), gradients 4Ψ (stage >= 2: /N), optimizer states 8Ψ (two fp32 moments; stage >= 1: /N);
the paper's fp32 master copy only exists in mixed precision (its K = 12 = 4 master + 8
moments), so this variant has none. bf16 (`train.precision=bf16`): parameters and gradients
2Ψ each, fp32 master weights 4Ψ and moments 8Ψ (both /N at stage >= 1). What DeepSpeed
holds beyond these (an fp32 master partition it clones even in fp32, its reduce buckets of
`reduce_bucket_size` elements, 5e8 by default) is reported on its own lines. Bytes are
storage allocated: a bucket made with torch.empty counts in full, as it would on a GPU,
though on a CPU only the pages written become resident.

    python -m bench.zero_memory [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from bench.common import WORK, Timer, table, write_result

WORLD = 2
STAGES = (0, 1, 2, 3)
WIDTHS = [128, 256, 512]  # the demo UNet ([32, 64, 128]) widened 4x: ~51 M parameters
MICRO_BATCH = 1  # activations are not what is measured; keep the steps cheap
# Model states first, then what DeepSpeed adds: when several categories reach the same
# storage (a gradient that is a view of a reduce bucket), the earlier one claims it.
CATEGORIES = ("buffers", "params", "optimizer_states", "master_weights", "grads", "other")
MODEL_STATES = ("params", "grads", "optimizer_states", "master_weights")
LABELS = {
    "params": "parameters",
    "grads": "gradients",
    "optimizer_states": "optimizer states (Adam moments)",
    "master_weights": "fp32 master weights",
    "buffers": "reduce buckets (ZeRO's constant-size buffers)",
    "other": "other tensors",
}


def formula(psi: int, world: int, stage: int, precision: str) -> dict[str, float]:
    """The ZeRO paper's per-rank model-state bytes, in the variant for this precision."""
    low = 4 if precision == "fp32" else 2
    return {
        "params": low * psi / (world if stage >= 3 else 1),
        "grads": low * psi / (world if stage >= 2 else 1),
        "optimizer_states": 8 * psi / (world if stage >= 1 else 1),
        # In fp32 the parameters are the master weights; mixed precision keeps an fp32 copy.
        "master_weights": 0.0 if precision == "fp32" else 4 * psi / (world if stage >= 1 else 1),
    }


def _walk(obj: Any, path: str, seen: set[int], found: list[tuple[str, Any]], depth: int) -> None:
    """Every tensor reachable from a DeepSpeed or torch optimizer object, with its path."""
    import torch

    if isinstance(obj, torch.Tensor):
        found.append((path, obj))
        for attr in ("grad", "ds_tensor", "grad_accum"):
            inner = getattr(obj, attr, None)
            if isinstance(inner, torch.Tensor):
                found.append((f"{path}.{attr}", inner))
        return
    if depth > 6 or id(obj) in seen or isinstance(obj, (int, float, str, bytes, type(None))):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return  # the module is walked on its own, parameter by parameter
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            _walk(key, f"{path}[key]", seen, found, depth + 1)
            _walk(
                value,
                f"{path}[{key if isinstance(key, (str, int)) else '.'}]",
                seen,
                found,
                depth + 1,
            )
    elif isinstance(obj, (list, tuple, set)):
        for i, value in enumerate(list(obj)):
            _walk(value, f"{path}[{i}]", seen, found, depth + 1)
    elif type(obj).__module__.startswith("deepspeed") or isinstance(obj, torch.optim.Optimizer):
        # Only DeepSpeed's own objects and optimizers: process groups, streams and loggers
        # hold no model state, and following them would walk half the interpreter.
        for key, value in list(vars(obj).items()):
            _walk(value, f"{path}.{key}", seen, found, depth + 1)


def snapshot(
    engine, attributes: tuple[str, ...] | None = None, optimizer_state: bool = True
) -> dict[str, Any]:
    """Bytes per category of every distinct storage this rank's engine holds.

    `attributes`: walk only the ZeRO optimizer's attributes whose names contain one of these
    (the module's parameters and gradients are always counted). `optimizer_state=False`
    leaves out the torch optimizer's state and parameters (moments and master weights).
    """
    import torch

    claims: dict[int, tuple[int, dict[str, str]]] = {}  # storage -> (bytes, category -> path)

    def claim(tensor: torch.Tensor, category: str, path: str) -> None:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or tensor.device.type == "meta":
            return
        nbytes, categories = claims.setdefault(storage.data_ptr(), (storage.nbytes(), {}))
        categories.setdefault(category, path)

    for name, p in engine.module.named_parameters():
        claim(p.data, "params", name)
        for attr, category in (("ds_tensor", "params"), ("grad", "grads"), ("grad_accum", "grads")):
            t = getattr(p, attr, None)
            if isinstance(t, torch.Tensor):
                claim(t, category, f"{name}.{attr}")
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)  # ZeRO wraps the torch AdamW; stage 0 does not
    for param, state in inner.state.items() if optimizer_state else ():
        # ZeRO-3 swaps its fp32 partition in and out of param_groups; the state keeps it.
        if isinstance(param, torch.Tensor):
            claim(param, "master_weights", "optimizer.state key")
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                claim(t, "optimizer_states", f"state.{key}")
    for group in inner.param_groups if optimizer_state else ():
        for p in group["params"]:
            claim(p, "master_weights", "optimizer.param_groups")
            if p.grad is not None:
                claim(p.grad, "grads", "optimizer.param_groups.grad")
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()
    for key, value in vars(zero).items() if zero is not inner else ():
        if attributes is None or any(a in key.lower() for a in attributes):
            _walk(value, f"optimizer.{key}", seen, found, 1)
    for path, t in found:
        lower = path.lower()
        bucket = "ipg" in lower and ".buffer" in lower  # not the parameters a bucket lists
        category = "buffers" if bucket else "grads" if "grad" in lower else "other"
        claim(t, category, path)

    totals = dict.fromkeys(CATEGORIES, 0)
    other: dict[str, int] = {}
    for nbytes, categories in claims.values():
        category = next(c for c in CATEGORIES if c in categories)
        totals[category] += nbytes
        if category in ("buffers", "other"):
            name = re.sub(r"\[\d+\]", "[i]", categories[category])
            other[name] = other.get(name, 0) + nbytes
    return {"bytes": totals, "where": {k: v for k, v in other.items() if v >= 1 << 16}}


class PeakTracker:
    """Snapshots after each parameter's gradient arrives (after DeepSpeed's own hook for it,
    which was registered first), keeping the largest total seen."""

    def __init__(self, engine):
        self.engine, self.active, self.peak, self.fixed = engine, False, None, {}
        self.handles = [
            p.register_post_accumulate_grad_hook(self._hook)
            for p in engine.module.parameters()
            if p.requires_grad
        ]

    def start(self) -> None:
        # Moments and master weights do not change during backward: count them once.
        held = snapshot(self.engine, attributes=())["bytes"]
        self.fixed = {k: held[k] for k in ("optimizer_states", "master_weights")}
        self.active = True

    def _hook(self, _param) -> None:
        if self.active:
            self.update()

    def update(self) -> None:
        # Once per parameter, so only what changes during backward: the module's parameters
        # and gradients, the ZeRO optimizer's gradient buffers and reduce buckets.
        current = snapshot(self.engine, ("grad", "ipg"), optimizer_state=False)
        current["bytes"].update(self.fixed)
        if self.peak is None or sum(current["bytes"].values()) > sum(self.peak["bytes"].values()):
            self.peak = current

    def close(self) -> None:
        self.active = False
        for handle in self.handles:
            handle.remove()


def stage_config(stage: int, precision: str):
    """The demo preset with the widened UNet, at this ZeRO stage and precision, on 2 ranks."""
    from core.loader import build_config

    return build_config(
        {
            "preset": "demo",
            "unet": {"block_out_channels": WIDTHS},
            "train": {
                "zero_stage": stage,
                "precision": precision,
                "num_workers": WORLD,
                "micro_batch_size": MICRO_BATCH,
                "global_batch_size": MICRO_BATCH * WORLD,
            },
        },
        absolute_paths=False,
    )


def measure_stage(stage: int, precision: str, template) -> dict[str, Any]:
    """One engine at this ZeRO stage around a copy of the `template` UNet: bytes held before
    the second optimizer update, and the peak during the second backward."""
    import torch

    from data_pipeline.cache import CacheBatch
    from models.schedulers import build_noise_scheduler
    from models.text_encoders import text_hidden_size
    from training.engine import build_engine
    from training.objective import diffusion_loss

    config = stage_config(stage, precision)
    latent_channels = config.autoencoder.latent_channels
    # A copy, as DeepSpeed partitions (ZeRO-3) or casts (bf16) the module it wraps in place;
    # copying is faster than building and initialising 51 M parameters again.
    unet = copy.deepcopy(template)
    psi = sum(p.numel() for p in unet.parameters())
    engine = build_engine(unet, config, WORLD)
    size = config.data.resolution // config.autoencoder.downsample_factor
    length = config.text_encoder.max_length
    # A batch shaped as the latent cache delivers it (moments = mean and log-variance).
    batch = CacheBatch(
        moments=torch.randn(MICRO_BATCH, 1, 2 * latent_channels, size, size),
        context=torch.randn(MICRO_BATCH, length, text_hidden_size(config)),
        mask=torch.ones(MICRO_BATCH, length, dtype=torch.bool),
    )
    empty = (torch.zeros(length, text_hidden_size(config)), torch.zeros(length, dtype=torch.bool))
    scheduler = build_noise_scheduler(config)
    tracker = PeakTracker(engine)
    built = time.perf_counter()

    def forward_backward() -> None:
        loss, _ = diffusion_loss(engine, batch, scheduler, (0.0, 1.0), empty, 0.1)
        engine.backward(loss)

    forward_backward()
    engine.step()  # AdamW's moments exist from the first update on
    first = time.perf_counter()
    tracker.start()
    forward_backward()
    tracker.active = False
    second = time.perf_counter()
    held = snapshot(engine)
    tracker.update()
    engine.step()
    tracker.close()
    peak = tracker.peak
    persistent = [p for p in engine.module.parameters() if getattr(p, "ds_persist", False)]
    result = {
        "stage": stage,
        "precision": precision,
        "psi": psi,
        "held": held["bytes"],
        "held_total": sum(held["bytes"].values()),
        "peak_in_backward": peak["bytes"],
        "peak_total": sum(peak["bytes"].values()),
        "peak_buffers_and_other": peak["where"],
        "buffers_and_other": held["where"],
        "formula": formula(psi, WORLD, stage, precision),
        "optimizer": type(engine.optimizer).__name__,
        "reduce_bucket_size": engine.zero_reduce_bucket_size(),
        "persistent_params": sum(p.numel() for p in persistent),
        "persistent_bytes": sum(p.numel() * p.element_size() for p in persistent),
        "seconds": {"first_step": first - built, "tracked_backward": second - first},
    }
    engine.destroy()
    return result


def _rank(rank: int, port: int, precisions: list[str], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        DS_ACCELERATOR="cpu",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from models.unet import build_unet

    config = stage_config(0, "fp32")
    torch.manual_seed(0)
    template = build_unet(config, config.autoencoder.latent_channels)
    results = []
    try:
        for precision in precisions:
            for stage in STAGES:
                results.append(measure_stage(stage, precision, template))
                gc.collect()  # the last engine's buffers go before the next one is built
                dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    head, f = f"{r['precision']} ZeRO-{r['stage']}", r["formula"]
    rows = []
    for category in MODEL_STATES:
        got, want = r["held"][category], f[category]
        if got or want:
            ratio = f"{got / want:.3f}" if want else "not in formula"
            rows.append((f"{head} {LABELS[category]}", _mb(got), _mb(want), ratio))
    extra = r["held"]["buffers"] + r["held"]["other"]
    if extra:
        rows.append((f"{head} reduce buckets + other", _mb(extra), "-", "not in formula"))
    want = sum(f.values())
    for label, got in (("total held", r["held_total"]), ("peak in backward", r["peak_total"])):
        rows.append((f"{head} {label}", _mb(got), _mb(want), f"{got / want:.3f}"))
    return rows


def _notes(r: dict[str, Any]) -> list[str]:
    head = f"{r['precision']} ZeRO-{r['stage']} ({r['optimizer']})"
    peak = ", ".join(
        f"{LABELS[c].split(' (')[0]} {_mb(b)}" for c, b in r["peak_in_backward"].items() if b
    )
    notes = [f"{head} peak in backward: {peak}"]
    notes += [f"  at peak {_mb(b)} in {n}" for n, b in r["peak_buffers_and_other"].items()]
    notes += [f"  after backward {_mb(b)} in {n}" for n, b in r["buffers_and_other"].items()]
    if r["persistent_params"]:
        notes.append(
            f"  keeps {r['persistent_params']:,} parameters ({_mb(r['persistent_bytes'])}) whole "
            "on every rank (below stage3_param_persistence_threshold)"
        )
    return notes


def main(precisions: list[str] = ("fp32", "bf16")) -> dict[str, Any]:
    import torch.multiprocessing as mp

    os.environ["DS_ACCELERATOR"] = "cpu"  # before any DeepSpeed import, here and in children
    out = WORK / "zero_memory"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with Timer() as timer:
        mp.start_processes(
            _rank,
            args=(_free_port(), list(precisions), str(out)),
            nprocs=WORLD,
            start_method="spawn",
        )
    by_rank = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    runs = [
        {**same[0], "held_total_per_rank": [r["held_total"] for r in same]}
        for same in zip(*by_rank, strict=True)
    ]
    result = {
        "world_size": WORLD,
        "psi": runs[0]["psi"],
        "unet_block_out_channels": WIDTHS,
        "micro_batch_size": MICRO_BATCH,
        "formula": "ZeRO (Rajbhandari et al. 2020), per rank: fp32 params 4Ψ, grads 4Ψ, Adam "
        "moments 8Ψ, no master copy; bf16 params 2Ψ, grads 2Ψ, fp32 master 4Ψ, moments 8Ψ; "
        "params /N at stage 3, grads /N at stage >= 2, master and moments /N at stage >= 1",
        "bytes": "storage bytes allocated (torch.empty buckets count in full, as on a GPU)",
        "seconds": timer.seconds,
        "runs": runs,
    }
    write_result("zero_memory", result)
    print(f"Ψ = {result['psi']:,} parameters, N = {WORLD} ranks; bytes per rank (rank 0)")
    print(table([row for r in runs for row in _rows(r)]))
    for r in runs:
        print("\n".join(_notes(r)))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"]
    )
    args = parser.parse_args()
    started = time.perf_counter()
    main(args.precision)
    print(f"zero_memory: {time.perf_counter() - started:.0f} s")
