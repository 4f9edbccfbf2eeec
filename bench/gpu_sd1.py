"""GPU script: the sd1 preset's UNet training img/s, MFU and peak memory on one CUDA GPU, at
256² and 512², with the memory/speed switches on and off.

Not part of `make bench` or CI: it needs a CUDA GPU and refuses to run without one (exit
code 2). It builds the `sd1` preset's UNet (859,520,964 parameters) with
`training.models.build_unet`, which applies `train.gradient_checkpointing` and
`train.attention`; `train.channels_last` is applied to the inputs, as the training loop does.

Precision: bf16 weights, activations and gradients with fp32 master weights and fp32 AdamW
moments (torch's fused AdamW on the master copy), which is what `train.precision=bf16` means
under DeepSpeed; not torch.autocast over fp32 weights. The step is the DDPM step of
`training.objective.diffusion_loss` (noise, timesteps, epsilon target, MSE in fp32; no latent draw
or caption dropout, whose cost is nil on a GPU), written out here because that function draws
timesteps and dropout masks on the CPU, which a batch on the GPU does not mix with. Inputs:
random latents (4x32x32 at 256², 4x64x64 at 512²) and a 77x768 context whose attention mask
keeps 8-77 real tokens per caption, as the cache's masks do. Per row: a few warm-up steps
(cuDNN autotuning), then >= 10 timed steps between torch.cuda.synchronize() calls.
MFU = img/s x model FLOPs per sample (`training.flops.train_flops_per_sample`: 3x the traced
forward, so recomputation under gradient checkpointing is not counted as useful work) / the
device's dense bf16 peak (`training.flops`). A micro batch that does not fit is halved until
it does, and the row says so.

    python -m bench.gpu_sd1 [--steps 10]    # a few minutes on an H100/H200
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Any

import torch

from bench.common import WORK, write_result

# (label, config overrides, micro batch at 256², at 512²); sized for an 80+ GiB GPU.
ROWS = [
    ("baseline (sdpa)", [], 32, 16),
    ("+channels_last", ["train.channels_last=true"], 32, 16),
    ("+gradient_checkpointing", ["train.gradient_checkpointing=true"], 64, 32),
    ("eager attention", ["train.attention=eager"], 32, 16),
]
RESOLUTIONS = (256, 512)
WARMUP = 3
# The CPU dry run: the same code path with the tiny preset, two tiny steps per row.
DRY_ROWS = [(label, overrides, 2, 2) for label, overrides, _, _ in ROWS]


def row_config(preset: str, resolution: int, overrides: list[str], micro_batch: int):
    from core.loader import build_config

    return build_config(
        {
            "preset": preset,
            "run": {"root": str(WORK)},
            "data": {"resolution": resolution},
            # One GPU: the batch arithmetic of the preset's 8 workers does not apply.
            "train": {
                "num_workers": 1,
                "micro_batch_size": micro_batch,
                "global_batch_size": micro_batch,
                "precision": "bf16",
            },
        },
        overrides,
    )


class Bf16Trainer:
    """bf16 model, fp32 master weights and moments (fused AdamW): DeepSpeed's bf16 mode
    without DeepSpeed, for one device."""

    def __init__(self, config, device: torch.device):
        from models.schedulers import build_noise_scheduler
        from models.unet import build_unet

        torch.manual_seed(0)
        with torch.device(device):  # initialise on the GPU: 860 M parameters, seconds not minutes
            self.unet = build_unet(config, latent_channels=config.autoencoder.latent_channels)
        self.unet.to(torch.bfloat16).train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.master = [p.detach().float() for p in self.params]
        for m in self.master:
            m.grad = torch.zeros_like(m)
        self.optimizer = torch.optim.AdamW(
            self.master,
            lr=config.train.learning_rate,
            weight_decay=config.train.weight_decay,
            fused=True,
        )
        self.scheduler = build_noise_scheduler(config)
        self.channels_last = config.train.channels_last
        self.device = device

    def step(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> None:
        noise = torch.randn_like(latents)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        pred = self.unet(
            noisy.to(torch.bfloat16, memory_format=layout),
            t,
            encoder_hidden_states=context,
            encoder_attention_mask=mask,
        ).sample
        loss = (pred.float() - noise).pow(2).mean()
        loss.backward()
        with torch.no_grad():
            torch._foreach_copy_([m.grad for m in self.master], [p.grad for p in self.params])
            self.optimizer.step()
            torch._foreach_copy_(self.params, self.master)
        for p in self.params:
            p.grad = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config, device: torch.device, num_steps: int, warmup: int) -> dict[str, float]:
    """img/s and peak memory of `num_steps` timed steps after `warmup` steps."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Bf16Trainer(config, device)
    mb = config.train.micro_batch_size
    size = config.data.resolution // config.autoencoder.downsample_factor
    length = config.text_encoder.max_length
    width = trainer.unet.config.cross_attention_dim
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(
        mb, config.autoencoder.latent_channels, size, size, device=device, generator=g
    )
    context = torch.randn(mb, length, width, device=device, generator=g, dtype=torch.bfloat16)
    real = torch.randint(min(8, length), length + 1, (mb, 1), device=device, generator=g)
    mask = torch.arange(length, device=device)[None] < real
    for _ in range(warmup):
        trainer.step(latents, context, mask)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(num_steps):
        trainer.step(latents, context, mask)
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    unet = trainer.unet
    return {
        "images_per_s": mb * num_steps / seconds,
        "step_s": seconds / num_steps,
        "peak_gib": peak,
        # What the switches did to the model this row trained, for the record.
        "gradient_checkpointing": unet.is_gradient_checkpointing,
        "attention_processors": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
        "input_channels_last": trainer.channels_last,
    }


def measure_fitting(
    preset: str,
    resolution: int,
    overrides: list[str],
    micro_batch: int,
    device,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """`measure` at `micro_batch`, halved after each out-of-memory error."""
    tried_oom = []
    while micro_batch >= 1:
        config = row_config(preset, resolution, overrides, micro_batch)
        try:
            return {
                "micro_batch": micro_batch,
                "oom_at": tried_oom,
                **measure(config, device, steps, warmup),
            }
        except torch.cuda.OutOfMemoryError:
            tried_oom.append(micro_batch)
        gc.collect()  # the failed step's model and activations, before the next try
        torch.cuda.empty_cache()
        micro_batch //= 2
    return {
        "micro_batch": 0,
        "oom_at": tried_oom,
        "images_per_s": 0.0,
        "step_s": None,
        "peak_gib": None,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "resolution",
        "switches",
        "micro batch",
        "img/s",
        "vs baseline",
        "MFU",
        "peak memory GiB",
    )
    lines = [header]
    for r in rows:
        mb = str(r["micro_batch"]) + (f" (OOM at {r['oom_at']})" if r["oom_at"] else "")
        lines.append(
            (
                f"{r['resolution']}²",
                r["switches"],
                mb,
                f"{r['images_per_s']:.1f}",
                f"{r['vs_baseline']:.2f}",
                "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def main(dry_run: bool = False, steps: int = 10) -> dict[str, Any]:
    """Measure every row; `dry_run`: the tiny preset on the CPU, to check the code path."""
    if not dry_run and not torch.cuda.is_available():
        print(
            "gpu_sd1: needs a CUDA GPU (torch.cuda.is_available() is False); not run",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from diffusers.utils import logging as diffusers_logging

    from models.flops import peak_flops, train_flops_per_sample
    from models.unet import build_unet

    # Casting the freshly built UNet to bf16 warns once per row about modules to keep in fp32
    # (there are none in this UNet).
    diffusers_logging.set_verbosity_error()
    # An explicit index, so the random generator and the tensors it fills agree on the device.
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    preset, rows = ("tiny", DRY_ROWS) if dry_run else ("sd1", ROWS)
    resolutions = (32, 64) if dry_run else RESOLUTIONS
    steps, warmup = (2, 1) if dry_run else (steps, WARMUP)
    if device.type == "cuda":
        # TF32 only touches fp32 matmuls and convolutions (the bf16 model has none: a safety
        # net, not a speed-up); fixed shapes make cuDNN's autotuning, in the warm-up, pay off.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    peak = peak_flops(device, {})
    started = time.perf_counter()
    results = []
    for resolution in resolutions:
        config = row_config(preset, resolution, [], 1)
        size = resolution // config.autoencoder.downsample_factor
        with torch.device("meta"):
            meta_unet = build_unet(config, config.autoencoder.latent_channels)
        flops = train_flops_per_sample(meta_unet, size, config.text_encoder.max_length)
        baseline = None
        for label, overrides, mb256, mb512 in rows:
            micro_batch = mb256 if resolution == resolutions[0] else mb512
            r = measure_fitting(preset, resolution, overrides, micro_batch, device, steps, warmup)
            baseline = baseline or r["images_per_s"]
            achieved = r["images_per_s"] * flops
            results.append(
                {
                    "resolution": resolution,
                    "latent": [config.autoencoder.latent_channels, size, size],
                    "switches": label,
                    "overrides": overrides,
                    **r,
                    "vs_baseline": r["images_per_s"] / baseline if baseline else 0.0,
                    "model_tflops_per_s": achieved / 1e12,
                    "mfu": achieved / peak if peak else None,
                    "train_gflops_per_sample": flops / 1e9,
                }
            )
            print(
                f"gpu_sd1: {resolution}² {label}: micro batch {r['micro_batch']}, "
                f"{r['images_per_s']:.1f} img/s ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "preset": preset,
        "precision": "bf16 weights/activations/grads, fp32 master weights + fused AdamW",
        "peak_tflops": peak / 1e12 if peak else None,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
        "rows": results,
    }
    if dry_run:  # a CPU dry run is no result: keep it out of bench/results/
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / "gpu_sd1_dry_run.json").write_text(json.dumps(result, indent=2))
    else:
        write_result("gpu_sd1", result)
    print(f"{result['device']}, {preset} UNet, {result['precision']}")
    print(format_table(results))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (>= 10)")
    parser.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    started = time.perf_counter()
    main(args.dry_run, max(10, args.steps) if not args.dry_run else 2)
    print(f"gpu_sd1: {time.perf_counter() - started:.0f} s")
