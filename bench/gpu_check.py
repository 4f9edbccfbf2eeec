"""`make gpu-check`: the GPU path of ldm, measured on one CUDA GPU in one prepared script.

Everything runs in this one process, without Ray or MLflow (the GPU machine this is made for
has neither; a one-worker `ldm train` runs its rank the same way, in process):

1. **Real data, written on the GPU.** The checked-in Twemoji fixture (`tests/fixtures/
   emoji64`, repeated `--copies` times) becomes raw shards, then a latent cache at 256 px
   and at 512 px, through the precompute actors' own code (`ShardDecoder`, `Encoder`,
   `ShardWriter`, the manifest writer), driven in process. The models are the preset's
   sizes with fresh weights (an `sd1`-size KL autoencoder and a CLIP ViT-L/14-size text
   tower with MiniLM's tokenizer): speed does not depend on training. Encoder img/s is timed
   after the first batch (cuDNN's autotuning).
2. **ldm's step** (`training.loop.UNetTraining.step`: the DeepSpeed engine, EMA, the cache
   stream and its loader process) against a **bare PyTorch loop** of the same UNet and
   AdamW on random tensors of the batch's shapes (bf16 weights and activations, fp32 master
   weights and moments: what DeepSpeed's bf16 mode is, without DeepSpeed or data), at both
   resolutions; then each speed switch on its own (`train.channels_last`, `fused_optimizer`,
   `gradient_checkpointing`; `compile` and eager attention at 512 px only), and a
   micro-batch sweep with the layout and optimizer switches that were faster, doubling until
   the GPU's memory is full, the bare loop beside its fastest size. img/s, MFU (img/s x
   traced training FLOPs per sample / the GPU's dense bf16 peak) and peak memory per row;
   the step's time split (data wait, forward, backward, optimizer), and for the 512 px
   baseline a torch.profiler table of the operators with the most self time on the GPU.
3. **Memory per ZeRO stage** (0-2) of ldm's step at 512 px next to what `ldm plan`'s formulas
   predict for it (one GPU: no stage shards anything, the rows show the constant parts).
4. **Resume**: ldm's step trained k steps and checkpointed by the project's checkpointer,
   then on; a fresh `UNetTraining` resumed from the tag takes the same next steps: their
   losses are compared (bitwise, or the difference printed when nondeterministic kernels
   make them differ).

Writes `bench/results/gpu.json` (GPU, driver, torch, date, every row, and the row `ldm
plan` calibrates its GPU family on) and prints one table. Refuses to run without a GPU
(exit code 2). `--dry-run` runs the same code on the CPU with the `tiny` preset at 32/64 px,
two steps a row, and writes nothing to `bench/results/` (`make test` runs it).

    make gpu-check    # python -m bench.gpu_check; sized for 8 minutes on one H200 (not yet run)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, WORK, table, write_result

FIXTURE = ROOT / "tests" / "fixtures" / "emoji64"
GPU_WORK = WORK / "gpu-check"


@dataclass(frozen=True)
class Plan:
    """What one run measures: the preset, its sizes and the micro-batches."""

    preset: str
    resolutions: tuple[int, ...]
    micro_batch: dict[int, int]  # per resolution: the switch rows' micro-batch
    max_micro_batch: int  # the sweep stops here (or at the first out-of-memory error)
    copies: int  # the fixture's 64 images repeated, for a cache larger than the batch
    warmup_steps: int
    timed_steps: int
    precision: str
    compile_rows: bool
    switch_rows: tuple[str, ...] | None = None  # None: every switch of SWITCHES
    zero_stages: tuple[int, ...] = (0, 1, 2)


GPU_PLAN = Plan("sd1", (256, 512), {256: 32, 512: 16}, 256, 8, 3, 10, "bf16", True)
# The CPU dry run: every section once, at one small resolution, a step or two per row. Of
# the rows that differ only in their overrides (switches, ZeRO stages), two each: the same
# code runs for every one, and each costs `make test` an engine (test_memory_options checks
# every switch, and compiles the same engine).
DRY_PLAN = Plan(
    "tiny", (32,), {32: 2}, 2, 1, 1, 1, "fp32", False, ("baseline", "fused_optimizer"), (0, 2)
)

# (label, overrides) of the switch rows; each on its own against the baseline.
SWITCHES = [
    ("baseline", []),
    ("channels_last", ["train.channels_last=true"]),
    ("fused_optimizer", ["train.fused_optimizer=true"]),
    ("compile", ["train.compile=default"]),
    ("gradient_checkpointing", ["train.gradient_checkpointing=true"]),
    ("eager attention", ["train.attention=eager"]),
]
# Rows measured at the largest resolution only: compiling an SD-size UNet takes minutes, and
# eager attention is a reference, not a choice; the 8-minute budget has room for one each.
LARGEST_ONLY = {"compile", "eager attention"}


def base_config(plan: Plan, resolution: int, models: dict[str, str], overrides: list[str]):
    from core.loader import build_config

    micro = plan.micro_batch[resolution]
    return build_config(
        {
            "preset": plan.preset,
            "run": {"root": str(GPU_WORK / "runs"), "name": f"check-{resolution}"},
            "data": {"resolution": resolution, "shards": str(GPU_WORK / "shards")},
            "autoencoder": {"pretrained": models["autoencoder"]},
            "text_encoder": {"name_or_path": models["text_encoder"]},
            "precompute": {"cache_dir": str(GPU_WORK / f"cache-{resolution}")},
            "train": {
                "num_workers": 1,
                "micro_batch_size": micro,
                "global_batch_size": micro,  # one GPU, no accumulation
                "precision": plan.precision,
                "num_steps": 10**6,
                "num_loader_workers": 1,
                "keep_last": 1,
            },
            "tracking": {"log_model": False},
        },
        overrides,
    )


# --- 1. real data through the precompute actors' code --------------------------------------


def write_sources(copies: int) -> Path:
    """Raw shards of the fixture images, each repeated `copies` times under its own name."""
    from data_pipeline.shards import write_shards

    images = GPU_WORK / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    captions = [
        json.loads(line) for line in (FIXTURE / "captions.jsonl").read_text().split("\n") if line
    ]
    lines = []
    for copy in range(copies):
        for entry in captions:
            name = f"{copy:02d}_{entry['file']}"
            (images / name).write_bytes((FIXTURE / entry["file"]).read_bytes())
            lines.append(json.dumps({"file": name, "caption": entry["caption"]}))
    (images / "captions.jsonl").write_text("\n".join(lines) + "\n")
    shards = GPU_WORK / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    write_shards(images, shards, 64, progress=False)
    return shards


def write_models(preset: str, tokenizer: Path | None = None) -> dict[str, str]:
    """The preset's autoencoder and text encoder with fresh weights, as the folders a user's
    pretrained ones would be; a text tower known only by name gets MiniLM's tokenizer (from
    `tokenizer`, else from the package that ships it)."""
    from core.config import MINILM
    from core.loader import build_config
    from models.autoencoder import build_autoencoder
    from models.text_encoders import (
        KNOWN_TEXT_ENCODERS,
        text_encoder_config,
        text_encoder_path,
        text_model,
    )

    config = build_config({"preset": preset})
    folder = GPU_WORK / "models"
    autoencoder = folder / "autoencoder"
    if not (autoencoder / "config.json").is_file():
        torch.manual_seed(0)
        build_autoencoder(config).save_pretrained(autoencoder)
    name = config.text_encoder.name_or_path
    if name not in KNOWN_TEXT_ENCODERS:
        return {"autoencoder": str(autoencoder), "text_encoder": name}
    text = folder / "text_encoder"
    if not (text / "config.json").is_file():
        torch.manual_seed(0)
        text_model(text_encoder_config(config.text_encoder)).save_pretrained(text)
        source = tokenizer or text_encoder_path(MINILM)
        for file in Path(source).iterdir():
            if "token" in file.name or file.name == "vocab.txt":
                shutil.copy(file, text / file.name)
    return {"autoencoder": str(autoencoder), "text_encoder": str(text)}


def precompute_in_process(config, device: torch.device) -> dict[str, Any]:
    """The precompute job's decode, encode and write steps, one shard after another here
    (the precompute benchmark's bare loop), then its manifest; the encoder's img/s after its
    first batch (cuDNN's autotuning)."""
    from bench.precompute import bare_precompute
    from core.layout import RunLayout
    from data_pipeline.images import list_shards
    from data_pipeline.precompute import cache_spec, write_cache_manifest

    cache = Path(config.precompute.cache_dir)
    shutil.rmtree(cache, ignore_errors=True)
    autoencoder_dir = RunLayout.of(config).autoencoder_dir
    spec = cache_spec(config, autoencoder_dir)
    shards = list_shards(config.data.shards)
    steady = bare_precompute(config, spec, shards, cache)[1:]
    manifest = write_cache_manifest(
        config, spec, str(cache), [Path(s).name for s in shards], autoencoder_dir, None
    )
    free_memory(device)
    seconds = sum(s for s, _ in steady)
    return {
        "resolution": config.data.resolution,
        "num_samples": manifest["num_samples"],
        "encoder_images_per_s": sum(n for _, n in steady) / seconds if seconds else None,
        "encoder_device": str(device),
        "cache_dir": str(cache),
    }


# --- 2.-4. ldm's step, the bare loop, ZeRO memory, resume ------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@contextmanager
def ldm_rank(config, cache_dir: str, resume_from: str | None = None):
    """ldm's UNet rank as `ldm train` builds it for one local worker (no tracking)."""
    from core.layout import RunLayout
    from orchestrator.launcher import single_rank_group
    from training.context import RankContext
    from training.loop import UNetTraining

    with single_rank_group():
        context = RankContext(
            config,
            RunLayout.of(config),
            None,
            {"cache_dir": cache_dir, "resume_from": resume_from, "newest_at_start": resume_from},
        )
        run = UNetTraining(context)
        try:
            run.resume()
            yield run
        finally:
            run.close_loader()
            run.main.close()


def time_steps(step, device: torch.device, warmup: int, timed: int) -> float:
    """Seconds per step of `timed` steps after `warmup` (compilation, autotuning)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(timed):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / timed


def ldm_row(
    config, cache_dir: str, device: torch.device, plan: Plan, profile: bool = False
) -> dict[str, Any]:
    """ldm's step timed; with `profile`, two more steps under torch.profiler, whose top
    operators (by self time on the device, or on the CPU in a dry run) say where time goes."""
    from training.engine import compiled_graphs

    free_memory(device)
    top: list[dict[str, Any]] = []
    with ldm_rank(config, cache_dir) as run:
        graphs_before = compiled_graphs()
        step_s = time_steps(run.step, device, plan.warmup_steps, plan.timed_steps)
        graphs = compiled_graphs() - graphs_before
        phases = {k: v for k, v in run.window.seconds.items() if v}
        if profile:
            top = top_operators(run.step, device)
    return {
        "step_s": step_s,
        "peak_gib": peak_gib(device),
        "compiled_graphs": graphs,
        "phases_s": phases,
        **({"top_operators": top} if profile else {}),
    }


def top_operators(step, device: torch.device, num_steps: int = 2, top: int = 15) -> list[dict]:
    """The operators that took the most self time over `num_steps` steps, with their share."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(num_steps):
            step()
        synchronize(device)
    on_device = device.type == "cuda"
    events = profiler.key_averages()

    def self_us(event) -> float:
        return event.self_device_time_total if on_device else event.self_cpu_time_total

    total = sum(self_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    return [
        {
            "name": e.key,
            "self_ms_per_step": self_us(e) / 1000 / num_steps,
            "share": self_us(e) / total,
            "calls_per_step": e.count / num_steps,
        }
        for e in ranked
    ]


class BareLoop:
    """The same UNet and AdamW as ldm's step, bf16 model with fp32 master weights and
    moments (DeepSpeed's bf16 mode, without DeepSpeed), on tensors already on the device."""

    def __init__(self, config, device: torch.device):
        from models.schedulers import build_noise_scheduler
        from models.unet import build_unet

        torch.manual_seed(0)
        with torch.device(device):
            self.unet = build_unet(config, latent_channels=config.autoencoder.latent_channels)
        self.unet.to(torch.bfloat16).train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.master = [p.detach().float() for p in self.params]
        for m in self.master:
            m.grad = torch.zeros_like(m)
        self.optimizer = torch.optim.AdamW(
            self.master, lr=config.train.learning_rate, weight_decay=config.train.weight_decay
        )
        self.scheduler = build_noise_scheduler(config)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        mb, size = (
            config.train.micro_batch_size,
            config.data.resolution // config.autoencoder.downsample_factor,
        )
        length, width = config.text_encoder.max_length, self.unet.config.cross_attention_dim
        g = torch.Generator(device).manual_seed(0)
        self.latents = torch.randn(
            mb, config.autoencoder.latent_channels, size, size, device=device, generator=g
        )
        self.context = torch.randn(
            mb, length, width, device=device, generator=g, dtype=torch.bfloat16
        )
        real = torch.randint(min(8, length), length + 1, (mb, 1), device=device, generator=g)
        self.mask = torch.arange(length, device=device)[None] < real
        self.device = device

    def step(self) -> None:
        noise = torch.randn_like(self.latents)
        t = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (len(noise),), device=self.device
        )
        noisy = self.scheduler.add_noise(self.latents, noise, t)
        pred = self.unet(
            noisy.to(torch.bfloat16),
            t,
            encoder_hidden_states=self.context,
            encoder_attention_mask=self.mask,
        ).sample
        (pred.float() - noise).pow(2).mean().backward()
        with torch.no_grad():
            torch._foreach_copy_([m.grad for m in self.master], [p.grad for p in self.params])
            self.optimizer.step()
            torch._foreach_copy_(self.params, self.master)
        for p in self.params:
            p.grad = None


def bare_row(config, device: torch.device, plan: Plan) -> dict[str, Any]:
    free_memory(device)
    loop = BareLoop(config, device)
    step_s = time_steps(loop.step, device, plan.warmup_steps, plan.timed_steps)
    del loop
    return {"step_s": step_s, "peak_gib": peak_gib(device)}


def resume_check(config, cache_dir: str, device: torch.device, steps: int = 2) -> dict[str, Any]:
    """Losses of `steps` steps after a checkpoint: uninterrupted, and resumed from it."""
    shutil.rmtree(Path(config.run.root) / config.run.name, ignore_errors=True)
    with ldm_rank(config, cache_dir) as run:
        for _ in range(steps):
            run.step()
        run.maybe_checkpoint(force=True)
        tag = run.tag
        after = []
        for _ in range(steps):
            run.step()
            after.append(torch.stack(run.losses).mean().item())
    free_memory(device)
    with ldm_rank(config, cache_dir, resume_from=tag) as run:
        assert run.state.step == steps, run.state.step
        resumed = []
        for _ in range(steps):
            run.step()
            resumed.append(torch.stack(run.losses).mean().item())
    free_memory(device)
    return {
        "uninterrupted": after,
        "resumed": resumed,
        "bitwise": after == resumed,
        "max_abs_difference": max(abs(a - b) for a, b in zip(after, resumed, strict=True)),
    }


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def measure_resolution(
    plan: Plan,
    resolution: int,
    models: dict[str, str],
    device: torch.device,
    peak: float | None,
    say,
    result: dict[str, Any],
) -> None:
    """At one resolution: the cache, the bare loop, ldm's step with each switch, the sweep."""
    from models.flops import train_flops_per_sample
    from models.unet import build_unet

    config = base_config(plan, resolution, models, [])
    cache = precompute_in_process(config, device)
    result["precompute"].append(cache)
    rate = cache["encoder_images_per_s"] or 0.0
    say(f"{resolution}px cache: {cache['num_samples']} samples, encoder {rate:.1f} img/s")
    size = resolution // config.autoencoder.downsample_factor
    with torch.device("meta"):
        meta = build_unet(config, config.autoencoder.latent_channels)
    flops = train_flops_per_sample(meta, size, config.text_encoder.max_length)

    def record(kind: str, label: str, micro: int, measured: dict) -> dict:
        images_per_s = micro / measured["step_s"]
        row = {
            "resolution": resolution,
            "kind": kind,
            "switches": label,
            "micro_batch": micro,
            **measured,
            "images_per_s": images_per_s,
            "mfu": images_per_s * flops / peak if peak else None,
        }
        result["rows"].append(row)
        say(f"{resolution}px {kind} {label} mb {micro}: {images_per_s:.1f} img/s")
        return row

    micro = plan.micro_batch[resolution]
    bare = record("bare", "bare loop", micro, bare_row(config, device, plan))
    fastest: list[str] = []
    baseline = None
    for label, overrides in SWITCHES:
        if label == "compile" and not plan.compile_rows:
            continue
        if plan.switch_rows is not None and label not in plan.switch_rows:
            continue
        if label in LARGEST_ONLY and resolution != max(plan.resolutions):
            continue
        switched = base_config(plan, resolution, models, overrides)
        # The baseline at the largest resolution is profiled: where its time goes.
        profiled = label == "baseline" and resolution == max(plan.resolutions)
        measured = ldm_row(switched, cache["cache_dir"], device, plan, profile=profiled)
        row = record("ldm", label, micro, measured)
        baseline = baseline or row
        row["vs_baseline"] = row["images_per_s"] / baseline["images_per_s"]
        faster = row["vs_baseline"] > 1.0
        # The sweep takes the faster of these along; not compile: each new engine in the
        # sweep would compile again (minutes each), and its own row already says what it gains.
        if label in ("channels_last", "fused_optimizer") and faster:
            fastest += overrides
    baseline["vs_bare"] = baseline["images_per_s"] / bare["images_per_s"]

    # The micro-batch sweep with what was faster, doubling until memory runs out; then the
    # bare loop at the fastest size (the same model: its memory fits where ldm's did).
    label = "+".join(o.split("=")[0].removeprefix("train.") for o in fastest) or "baseline"
    sweep_micro, best = micro, None
    while sweep_micro <= plan.max_micro_batch:
        sizes = [f"train.micro_batch_size={sweep_micro}", f"train.global_batch_size={sweep_micro}"]
        swept = base_config(plan, resolution, models, [*fastest, *sizes])
        try:
            measured = ldm_row(swept, cache["cache_dir"], device, plan)
        except Exception as err:  # an out-of-memory error ends the sweep
            if not is_oom(err):
                raise
            free_memory(device)
            say(f"{resolution}px sweep: micro-batch {sweep_micro} does not fit")
            break
        row = record("sweep", label, sweep_micro, measured)
        if best is None or row["images_per_s"] > best["images_per_s"]:
            best, best_config = row, swept
        sweep_micro *= 2
    if best is not None:
        bare_best = bare_row(best_config, device, plan)
        best["bare_images_per_s"] = best["micro_batch"] / bare_best["step_s"]
        best["vs_bare"] = best["images_per_s"] / best["bare_images_per_s"]
    if best is not None and resolution == max(plan.resolutions):
        keys = ("micro_batch", "images_per_s", "resolution", "switches")
        result["calibration"] = {k: best[k] for k in keys} | {"preset": plan.preset}


def main(dry_run: bool = False, tokenizer: Path | None = None) -> dict[str, Any]:
    if not dry_run and not torch.cuda.is_available():
        print(
            "gpu-check: needs a CUDA GPU (torch.cuda.is_available() is False); not run",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from diffusers.utils import logging as diffusers_logging

    from models.flops import peak_flops
    from orchestrator import plan as planner
    from training import engine as engine_module

    diffusers_logging.set_verbosity_error()  # the bf16 cast of a fresh UNet warns per row
    started = time.perf_counter()
    plan = DRY_PLAN if dry_run else GPU_PLAN
    if dry_run:  # inductor's C++ code generation takes minutes on a small CPU: trace only
        engine_module.COMPILE_BACKEND = "aot_eager"
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: the warm-up's autotuning pays off
    peak = peak_flops(device, {})

    def say(text: str) -> None:
        print(f"gpu-check [{time.perf_counter() - started:5.0f} s] {text}", flush=True)

    shutil.rmtree(GPU_WORK / "runs", ignore_errors=True)
    write_sources(plan.copies)
    models = write_models(plan.preset, tokenizer)
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "driver": driver_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "preset": plan.preset,
        "precision": plan.precision,
        "peak_tflops_bf16": peak / 1e12 if peak else None,
        "warmup_steps": plan.warmup_steps,
        "timed_steps": plan.timed_steps,
        "precompute": [],
        "rows": [],
    }
    for resolution in plan.resolutions:
        measure_resolution(plan, resolution, models, device, peak, say, result)

    # ZeRO stages 0-2 at the largest resolution, against the plan's formula for one GPU.
    resolution = max(plan.resolutions)
    cache_dir = str(GPU_WORK / f"cache-{resolution}")
    zero = []
    for stage in plan.zero_stages:
        config = base_config(plan, resolution, models, [f"train.zero_stage={stage}"])
        measured = ldm_row(config, cache_dir, device, plan)
        predicted = planner.plan(config, 1, "h200", 1.0, 0.5).memory_gib[stage]
        zero.append(
            {"zero_stage": stage, "measured_peak_gib": measured["peak_gib"], "plan_gib": predicted}
        )
        say(f"ZeRO-{stage}: peak {measured['peak_gib'] or 0:.1f} GiB, plan {predicted:.1f} GiB")
    result["zero_memory"] = zero

    resume_config = base_config(plan, min(plan.resolutions), models, [])
    result["resume"] = resume_check(
        resume_config, str(GPU_WORK / f"cache-{min(plan.resolutions)}"), device
    )
    say(f"resume: {result['resume']}")
    result["seconds"] = time.perf_counter() - started
    if dry_run:  # a CPU dry run is no result: kept out of bench/results/
        (GPU_WORK / "gpu_dry_run.json").write_text(json.dumps(result, indent=2))
    else:
        write_result("gpu", result)
    print(format_table(result))
    return result


def driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (
        out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    )


def format_table(result: dict[str, Any]) -> str:
    header = (
        *("px", "step", "switches", "micro-batch", "img/s"),
        *("vs baseline", "vs bare", "MFU", "peak GiB"),
    )
    rows = [
        (
            str(r["resolution"]),
            r["kind"],
            r["switches"],
            str(r["micro_batch"]),
            f"{r['images_per_s']:.1f}",
            f"{r['vs_baseline']:.2f}" if "vs_baseline" in r else "",
            f"{r['vs_bare']:.3f}" if "vs_bare" in r else "",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
            f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a",
        )
        for r in result["rows"]
    ]
    text = [
        f"{result['gpu']} (driver {result['driver']}), torch {result['torch']}, "
        f"{result['date']}, {result['preset']} UNet, {result['precision']}",
        table(rows, header),
    ]
    for cache in result["precompute"]:
        text.append(
            f"precompute {cache['resolution']}px: {cache['num_samples']} samples, "
            f"autoencoder + text encoder {cache['encoder_images_per_s'] or 0:.1f} img/s"
        )
    for z in result["zero_memory"]:
        peak = "n/a" if z["measured_peak_gib"] is None else f"{z['measured_peak_gib']:.1f}"
        text.append(f"ZeRO-{z['zero_stage']}: peak {peak} GiB, ldm plan {z['plan_gib']:.1f} GiB")
    for row in result["rows"]:
        for op in row.get("top_operators", [])[:10]:
            text.append(
                f"  {row['resolution']}px baseline profile: {op['share']:6.1%} "
                f"{op['self_ms_per_step']:9.2f} ms/step  {op['name'][:70]}"
            )
    r = result["resume"]
    same = "bitwise equal" if r["bitwise"] else f"differ by {r['max_abs_difference']:.2e}"
    text.append(f"resume: the next steps' losses {same}")
    return "\n".join(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the tiny preset on the CPU")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="MiniLM's tokenizer files (bench/gpu_wheels.sh copies them) where its package "
        "is not installed",
    )
    args = parser.parse_args()
    main(args.dry_run, args.tokenizer)
